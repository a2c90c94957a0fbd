//! The server over real sockets in a temporary folder, with small limits so bounds are met fast.

use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::thread::JoinHandle;

use super::*;
use crate::client::Client;
use crate::Method;

const LIMITS: Limits = Limits {
    max_header_bytes: 1024,
    max_body_bytes: 4096,
    header_timeout: Duration::from_millis(300),
    max_connections: 4,
};

/// Answers ping, echoes vm.create's body length, gives vm.info a body of `big` bytes, and is
/// done after vmm.shutdown.
struct TestHandler {
    big: usize,
    done: bool,
}

impl Handler for TestHandler {
    fn handle(&mut self, endpoint: Endpoint, body: &[u8]) -> Response {
        match endpoint {
            Endpoint::VmmPing => Response::json(200, &serde_json::json!({"pong": true})),
            Endpoint::VmCreate => Response::json(200, &serde_json::json!({"got": body.len()})),
            Endpoint::VmInfo => Response::json(200, &"x".repeat(self.big)),
            Endpoint::VmmShutdown => {
                self.done = true;
                Response::no_content()
            }
            _ => Response::no_content(),
        }
    }

    fn done(&self) -> bool {
        self.done
    }
}

struct Running {
    path: PathBuf,
    stop: UnixStream,
    thread: JoinHandle<std::io::Result<()>>,
    _dir: tempfile::TempDir,
}

fn start(limits: Limits, big: usize) -> Running {
    start_idle(limits, big, IDLE_TIMEOUT)
}

fn start_idle(limits: Limits, big: usize, idle: Duration) -> Running {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("api.sock");
    let mut server = Server::bind(&path, limits).unwrap();
    server.set_idle_timeout(idle);
    let (stop, stop_rx) = UnixStream::pair().unwrap();
    let thread = std::thread::spawn(move || {
        let mut handler = TestHandler { big, done: false };
        let r = server.run(&mut handler, stop_rx.as_raw_fd());
        drop(stop_rx);
        r
    });
    Running {
        path,
        stop,
        thread,
        _dir: dir,
    }
}

impl Running {
    fn client(&self) -> Client {
        Client::connect(&self.path, Duration::from_secs(5)).unwrap()
    }

    fn raw(&self) -> UnixStream {
        let s = UnixStream::connect(&self.path).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        s
    }

    /// Stops the server through its stop fd; the loop must end within a second.
    fn stop(mut self) {
        self.stop.write_all(&[1]).unwrap();
        ended_within(&self.thread, Duration::from_secs(1));
        self.thread.join().unwrap().unwrap();
    }
}

/// Fails unless `thread` ends within `limit` (a server loop that does not stop must fail the
/// test, not hang it).
fn ended_within<T>(thread: &JoinHandle<T>, limit: Duration) {
    let t = Instant::now();
    while !thread.is_finished() {
        assert!(
            t.elapsed() < limit,
            "the server loop did not end within {limit:?}"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// One answer read off `s` (no byte past it, so pipelined answers stay): status, head, body.
fn answer(s: &mut UnixStream) -> (u16, String, String) {
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        let mut b = [0u8; 1];
        assert_eq!(
            s.read(&mut b).unwrap(),
            1,
            "the connection ended before an answer"
        );
        head.push(b[0]);
    }
    let mut headers = [httparse::EMPTY_HEADER; 16];
    let mut r = httparse::Response::new(&mut headers);
    r.parse(&head).unwrap();
    let len = r
        .headers
        .iter()
        .find(|h| h.name.eq_ignore_ascii_case("content-length"))
        .map_or(0, |h| {
            std::str::from_utf8(h.value).unwrap().parse().unwrap()
        });
    let status = r.code.unwrap();
    let mut body = vec![0u8; len];
    s.read_exact(&mut body).unwrap();
    (
        status,
        String::from_utf8(head).unwrap(),
        String::from_utf8_lossy(&body).into_owned(),
    )
}

/// Whether the server closed `s` (end of stream, or reset).
fn closed(s: &mut UnixStream) -> bool {
    let mut b = [0u8; 1];
    match s.read(&mut b) {
        Ok(n) => n == 0,
        Err(e) => e.kind() == std::io::ErrorKind::ConnectionReset,
    }
}

fn send_raw(run: &Running, request: &[u8]) -> (u16, String, String, UnixStream) {
    let mut s = run.raw();
    s.write_all(request).unwrap();
    let (status, head, body) = answer(&mut s);
    (status, head, body, s)
}

#[test]
fn ping_round_trips_through_the_client() {
    let run = start(LIMITS, 0);
    let mut c = run.client();
    let reply = c.request(Method::Get, "/api/v1/vmm.ping", None).unwrap();
    assert_eq!(reply.status, 200);
    assert_eq!(reply.json().unwrap(), serde_json::json!({"pong": true}));
    let reply = c
        .request(Method::Put, "/api/v1/vm.create", Some(b"{\"a\": 1}"))
        .unwrap();
    assert_eq!(reply.json().unwrap(), serde_json::json!({"got": 8}));
    let reply = c.request(Method::Put, "/api/v1/vm.boot", None).unwrap();
    assert_eq!((reply.status, reply.body.len()), (204, 0));
    run.stop();
}

#[test]
fn a_thousand_requests_share_one_connection() {
    let run = start(LIMITS, 0);
    let mut s = run.raw();
    for _ in 0..1000 {
        s.write_all(b"GET /api/v1/vmm.ping HTTP/1.1\r\nHost: x\r\n\r\n")
            .unwrap();
        let (status, head, _) = answer(&mut s);
        assert_eq!(status, 200);
        assert!(!head.contains("Connection: close"));
    }
    run.stop();
}

#[test]
fn pipelined_requests_are_answered_in_order() {
    let run = start(LIMITS, 0);
    let mut s = run.raw();
    s.write_all(
        b"PUT /api/v1/vm.create HTTP/1.1\r\nContent-Length: 3\r\n\r\n{ }GET /api/v1/vmm.ping HTTP/1.1\r\n\r\n",
    )
    .unwrap();
    assert_eq!(answer(&mut s).2, r#"{"got":3}"#);
    assert_eq!(answer(&mut s).2, r#"{"pong":true}"#);
    run.stop();
}

#[test]
fn malformed_requests_get_400_naming_the_problem_and_close() {
    let run = start(LIMITS, 0);
    let (status, head, body, mut s) =
        send_raw(&run, b"GET /api/v1/vmm.ping HTTP/1.1\r\nno colon\r\n\r\n");
    assert_eq!(status, 400);
    assert!(head.contains("Content-Type: application/json"));
    assert!(body.contains("invalid header name"), "{body}");
    assert!(closed(&mut s));
    run.stop();
}

#[test]
fn an_unknown_path_gets_404_naming_it_and_the_connection_stays() {
    let run = start(LIMITS, 0);
    let (status, _, body, mut s) = send_raw(&run, b"GET /api/v1/vm.nope HTTP/1.1\r\n\r\n");
    assert_eq!(status, 404);
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert!(
        v["error"].as_str().unwrap().contains("/api/v1/vm.nope"),
        "{body}"
    );
    s.write_all(b"GET /api/v1/vmm.ping HTTP/1.1\r\n\r\n")
        .unwrap();
    assert_eq!(answer(&mut s).0, 200);
    run.stop();
}

#[test]
fn a_wrong_method_gets_405_with_allow() {
    let run = start(LIMITS, 0);
    let (status, head, body, _s) = send_raw(&run, b"PUT /api/v1/vm.info HTTP/1.1\r\n\r\n");
    assert_eq!(status, 405);
    assert!(head.contains("\r\nAllow: GET\r\n"), "{head}");
    assert!(body.contains("vm.info takes GET, not PUT"), "{body}");
    run.stop();
}

#[test]
fn a_body_on_an_endpoint_that_takes_none_gets_400() {
    let run = start(LIMITS, 0);
    let (status, _, body, _s) = send_raw(
        &run,
        b"PUT /api/v1/vm.pause HTTP/1.1\r\nContent-Length: 2\r\n\r\n{}",
    );
    assert_eq!(status, 400);
    assert!(body.contains("vm.pause takes no body"), "{body}");
    run.stop();
}

#[test]
fn a_body_over_the_limit_gets_413_and_close() {
    let run = start(LIMITS, 0);
    let (status, head, body, mut s) = send_raw(
        &run,
        b"PUT /api/v1/vm.create HTTP/1.1\r\nContent-Length: 4097\r\n\r\n",
    );
    assert_eq!(status, 413);
    assert!(head.contains("Connection: close"));
    assert!(
        body.contains("4097 bytes exceeds the limit of 4096"),
        "{body}"
    );
    assert!(closed(&mut s));
    // Headers over their limit too.
    let long = format!(
        "GET /api/v1/vmm.ping HTTP/1.1\r\nX: {}\r\n\r\n",
        "a".repeat(2000)
    );
    let (status, _, _, mut s) = send_raw(&run, long.as_bytes());
    assert_eq!(status, 413);
    assert!(closed(&mut s));
    run.stop();
}

#[test]
fn chunked_bodies_get_411() {
    let run = start(LIMITS, 0);
    let (status, _, body, mut s) = send_raw(
        &run,
        b"PUT /api/v1/vm.create HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n2\r\n{}\r\n0\r\n\r\n",
    );
    assert_eq!(status, 411);
    assert!(body.contains("Content-Length"), "{body}");
    assert!(closed(&mut s));
    run.stop();
}

#[test]
fn a_client_waiting_for_100_continue_gets_it() {
    let run = start(LIMITS, 0);
    let mut s = run.raw();
    s.write_all(
        b"PUT /api/v1/vm.create HTTP/1.1\r\nContent-Length: 2\r\nExpect: 100-continue\r\n\r\n",
    )
    .unwrap();
    assert_eq!(answer(&mut s).0, 100);
    s.write_all(b"{}").unwrap();
    assert_eq!(answer(&mut s).2, r#"{"got":2}"#);
    run.stop();
}

#[test]
fn http_1_0_is_answered_then_closed() {
    let run = start(LIMITS, 0);
    let (status, head, _, mut s) = send_raw(&run, b"GET /api/v1/vmm.ping HTTP/1.0\r\n\r\n");
    assert_eq!(status, 200);
    assert!(head.contains("Connection: close"));
    assert!(closed(&mut s));
    run.stop();
}

#[test]
fn headers_never_finished_get_408_within_the_limit_and_close() {
    let run = start(LIMITS, 0);
    let t = Instant::now();
    let (status, _, body, mut s) = send_raw(&run, b"GET /api/v1/vmm.ping HTTP/1.1\r\nHost:");
    let took = t.elapsed();
    assert_eq!(status, 408);
    assert!(
        body.contains("request line and headers did not arrive"),
        "{body}"
    );
    assert!(
        took >= LIMITS.header_timeout && took < LIMITS.header_timeout * 4,
        "{took:?}"
    );
    assert!(closed(&mut s));
    // A body that never finishes, the same.
    let (status, _, body, _s) = send_raw(
        &run,
        b"PUT /api/v1/vm.create HTTP/1.1\r\nContent-Length: 10\r\n\r\n{",
    );
    assert_eq!(status, 408);
    assert!(body.contains("the body did not arrive"), "{body}");
    run.stop();
}

#[test]
fn connections_beyond_the_limit_are_closed_while_the_first_still_work() {
    let run = start(LIMITS, 0);
    let mut first: Vec<Client> = (0..LIMITS.max_connections).map(|_| run.client()).collect();
    for c in &mut first {
        assert_eq!(
            c.request(Method::Get, "/api/v1/vmm.ping", None)
                .unwrap()
                .status,
            200
        );
    }
    let mut extra = run.raw();
    let (status, _, body) = answer(&mut extra);
    assert_eq!(status, 503);
    assert!(body.contains("4 connections open"), "{body}");
    assert!(closed(&mut extra));
    for c in &mut first {
        assert_eq!(
            c.request(Method::Get, "/api/v1/vmm.ping", None)
                .unwrap()
                .status,
            200
        );
    }
    // Once one closes, a new one is taken.
    drop(first.pop());
    std::thread::sleep(Duration::from_millis(50));
    assert_eq!(
        run.client()
            .request(Method::Get, "/api/v1/vmm.ping", None)
            .unwrap()
            .status,
        200
    );
    run.stop();
}

#[test]
fn a_peer_that_never_reads_does_not_stop_another_being_served() {
    // An answer far larger than a socket's buffer.
    let run = start(LIMITS, 8 << 20);
    let mut stuck = run.raw();
    stuck
        .write_all(b"GET /api/v1/vm.info HTTP/1.1\r\n\r\n")
        .unwrap();
    std::thread::sleep(Duration::from_millis(50));
    let mut c = run.client();
    let t = Instant::now();
    for _ in 0..10 {
        assert_eq!(
            c.request(Method::Get, "/api/v1/vmm.ping", None)
                .unwrap()
                .status,
            200
        );
    }
    assert!(t.elapsed() < LIMITS.header_timeout, "{:?}", t.elapsed());
    // The stuck one is dropped once its answer made no progress for the header timeout.
    std::thread::sleep(LIMITS.header_timeout * 2);
    let mut got = 0;
    let mut chunk = [0u8; 65536];
    while let Ok(n @ 1..) = stuck.read(&mut chunk) {
        got += n;
    }
    assert!(got < 8 << 20, "the whole answer came: {got}");
    run.stop();
}

#[test]
fn the_stop_fd_ends_run_with_connections_open() {
    let run = start(LIMITS, 0);
    let mut c = run.client();
    assert_eq!(
        c.request(Method::Get, "/api/v1/vmm.ping", None)
            .unwrap()
            .status,
        200
    );
    let _half = {
        let mut s = run.raw();
        s.write_all(b"GET /api").unwrap();
        s
    };
    run.stop();
}

#[test]
fn the_handler_being_done_ends_run_after_its_answer() {
    let run = start(LIMITS, 0);
    let mut c = run.client();
    let reply = c
        .request(Method::Put, "/api/v1/vmm.shutdown", None)
        .unwrap();
    assert_eq!(reply.status, 204);
    ended_within(&run.thread, Duration::from_secs(2));
    run.thread.join().unwrap().unwrap();
}

#[test]
fn the_socket_is_owner_only_and_removed_on_drop_while_ours() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("api.sock");
    let server = Server::bind(&path, LIMITS).unwrap();
    let mode = std::fs::metadata(&path).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600, "{mode:o}");
    drop(server);
    assert!(!path.exists());
    // Replaced by someone else since: left alone.
    let server = Server::bind(&path, LIMITS).unwrap();
    std::fs::remove_file(&path).unwrap();
    std::fs::write(&path, b"theirs").unwrap();
    drop(server);
    assert_eq!(std::fs::read(&path).unwrap(), b"theirs");
}

#[test]
fn a_stale_socket_is_replaced() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("api.sock");
    // std leaves the file behind when the listener drops: what a crash leaves.
    drop(UnixListener::bind(&path).unwrap());
    assert!(path.exists());
    let server = Server::bind(&path, LIMITS).unwrap();
    drop(server);
}

#[test]
fn a_regular_file_is_refused_and_left_untouched() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("api.sock");
    std::fs::write(&path, b"keep me").unwrap();
    let e = Server::bind(&path, LIMITS).err().unwrap();
    assert!(matches!(e, BindError::NotSocket(_)), "{e}");
    let message = e.to_string();
    assert!(message.contains(&path.display().to_string()), "{message}");
    assert!(
        message.contains("remove it or choose another --api-socket"),
        "{message}"
    );
    assert_eq!(std::fs::read(&path).unwrap(), b"keep me");
}

#[test]
fn a_socket_someone_listens_on_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("api.sock");
    let live = UnixListener::bind(&path).unwrap();
    let e = Server::bind(&path, LIMITS).err().unwrap();
    assert!(matches!(e, BindError::InUse(_)), "{e}");
    assert!(e.to_string().contains("another process serves"), "{e}");
    // Still theirs.
    assert!(UnixStream::connect(&path).is_ok());
    drop(live);
}

#[test]
fn a_missing_folder_is_refused_naming_the_path() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("nope/api.sock");
    let e = Server::bind(&path, LIMITS).err().unwrap();
    assert!(matches!(e, BindError::NoFolder(_)), "{e}");
    assert!(e.to_string().contains("nope/api.sock"), "{e}");
}

/// Another user's connection is closed at accept. Needs root (to become another user).
#[test]
fn another_users_connection_is_refused() {
    if sys::euid() != 0 {
        println!("skipped: not root, so no other uid to connect as");
        return;
    }
    const NOBODY: libc::uid_t = 65534;
    const CLOSED: i32 = 0;
    const ANSWERED: i32 = 1;
    const SETUP_FAILED: i32 = 2;
    let run = start(LIMITS, 0);
    // The file mode would stop another user before the peer check: open it so the check is
    // what refuses.
    std::fs::set_permissions(&run.path, std::fs::Permissions::from_mode(0o777)).unwrap();
    let dir = run.path.parent().unwrap();
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    // SAFETY: a zeroed sockaddr_un is valid; the path fits (a temp dir).
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
    for (d, s) in addr
        .sun_path
        .iter_mut()
        .zip(run.path.to_str().unwrap().bytes())
    {
        *d = s as libc::c_char;
    }
    let request = b"GET /api/v1/vmm.ping HTTP/1.1\r\n\r\n";
    // SAFETY: the child makes raw system calls only and leaves with _exit.
    let pid = unsafe { libc::fork() };
    assert!(pid >= 0);
    if pid == 0 {
        // SAFETY: in the child: raw system calls on local buffers.
        unsafe {
            if libc::syscall(libc::SYS_setuid, NOBODY) != 0 {
                libc::_exit(SETUP_FAILED);
            }
            let fd = libc::socket(libc::AF_UNIX, libc::SOCK_STREAM, 0);
            let len = std::mem::size_of::<libc::sockaddr_un>() as libc::socklen_t;
            if fd < 0 || libc::connect(fd, (&addr as *const libc::sockaddr_un).cast(), len) != 0 {
                libc::_exit(SETUP_FAILED);
            }
            libc::send(
                fd,
                request.as_ptr().cast(),
                request.len(),
                libc::MSG_NOSIGNAL,
            );
            let mut b = [0u8; 64];
            let n = libc::recv(fd, b.as_mut_ptr().cast(), b.len(), 0);
            libc::_exit(if n > 0 { ANSWERED } else { CLOSED });
        }
    }
    let mut status = 0;
    // SAFETY: waiting for the child just forked.
    assert_eq!(unsafe { libc::waitpid(pid, &mut status, 0) }, pid);
    assert!(libc::WIFEXITED(status), "{status:#x}");
    assert_eq!(libc::WEXITSTATUS(status), CLOSED);
    // Root (this process's own uid here) is served.
    assert_eq!(
        run.client()
            .request(Method::Get, "/api/v1/vmm.ping", None)
            .unwrap()
            .status,
        200
    );
    run.stop();
}

#[test]
fn an_idle_connection_is_closed_and_the_client_makes_a_new_one() {
    let idle = Duration::from_millis(200);
    let run = start_idle(LIMITS, 0, idle);
    let mut raw = run.raw();
    let mut c = run.client();
    assert_eq!(
        c.request(Method::Get, "/api/v1/vmm.ping", None)
            .unwrap()
            .status,
        200
    );
    let t = Instant::now();
    assert!(closed(&mut raw));
    assert!(
        t.elapsed() >= idle / 2 && t.elapsed() < idle * 5,
        "{:?}",
        t.elapsed()
    );
    // The client's kept connection is gone too: it sends again on a new one.
    std::thread::sleep(idle * 2);
    assert_eq!(
        c.request(Method::Get, "/api/v1/vmm.ping", None)
            .unwrap()
            .status,
        200
    );
    run.stop();
}

#[test]
fn the_client_follows_connection_close() {
    let run = start(LIMITS, 0);
    let mut c = run.client();
    assert_eq!(
        c.request(Method::Put, "/api/v1/vm.boot", None)
            .unwrap()
            .status,
        204
    );
    // A body over the limit: 413 with Connection: close; the next request goes on a new one.
    let big = vec![b' '; LIMITS.max_body_bytes + 1];
    let reply = c
        .request(Method::Put, "/api/v1/vm.create", Some(&big))
        .unwrap();
    assert_eq!(reply.status, 413);
    assert_eq!(
        c.request(Method::Get, "/api/v1/vmm.ping", None)
            .unwrap()
            .status,
        200
    );
    run.stop();
}
