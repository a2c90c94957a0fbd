//! What the API thread may do (`vmm run --api-socket`, `vmm serve`): the `api` crate's server
//! loop (poll over the listener, a stop descriptor and its connections; accept4; the peer's
//! credentials, and nothing else of getsockopt; recv and send), the handlers behind it, and
//! removing its socket file when it ends.
//!
//! The handlers: `vmm.ping` gives the pid; `vm.pause` kicks the vCPUs out of KVM_RUN
//! (pthread_kill, as the main thread does); the others take locks, wait on condition variables
//! with a timeout and write the VM's stop eventfd, all in the base list. `vmm serve` forwards
//! to a VM child's own API socket with `api::client` (a Unix socket, connected, with send and
//! receive timeouts); it starts and reaps children, checks configs against the host and reads
//! a child's report on another, unfiltered thread, so this list opens no file, and neither
//! forks, nor execs, nor signals a process.

use super::rules::{base, AllowList, Check};

pub(super) fn allow_list() -> AllowList {
    use libc::*;
    let mut l = base();
    // The server loop, and the client reading its answers (std's read on a stream).
    l.allow(&[
        SYS_poll,
        SYS_ppoll,
        SYS_accept4,
        SYS_recvfrom,
        SYS_sendto,
        SYS_read,
    ]);
    // Who connected: SO_PEERCRED only.
    l.allow_when(
        SYS_getsockopt,
        &[
            Check::eq(1, SOL_SOCKET as u64),
            Check::eq(2, SO_PEERCRED as u64),
        ],
    );
    // vmm.ping's pid; vm.pause's kick of a vCPU (pthread_kill is tgkill to our own pid).
    l.allow(&[SYS_getpid]);
    l.allow_values(SYS_tgkill, 2, &[SIGRTMIN() as u64]);
    // The client, forwarding to a VM child's socket: a Unix stream socket only, its
    // timeouts set.
    l.allow_values(SYS_socket, 0, &[AF_UNIX as u64]);
    l.allow(&[SYS_connect]);
    for option in [SO_RCVTIMEO, SO_SNDTIMEO] {
        l.allow_when(
            SYS_setsockopt,
            &[Check::eq(1, SOL_SOCKET as u64), Check::eq(2, option as u64)],
        );
    }
    // The socket file looked up (still ours?) and removed when the server drops.
    l.allow(&[SYS_statx, SYS_newfstatat, SYS_unlink]);
    l
}

#[cfg(test)]
mod tests {
    use std::os::fd::AsRawFd;
    use std::os::unix::net::UnixStream;
    use std::path::PathBuf;
    use std::time::{Duration, Instant};

    use api::client::Client;
    use api::{Endpoint, Handler, Limits, Method, Response, Server};

    use super::super::{filter_api_thread, violation, SeccompLevel, ThreadKind};

    fn args(a: &[u64]) -> [u64; 6] {
        let mut all = [0u64; 6];
        all[..a.len()].copy_from_slice(a);
        all
    }

    #[test]
    fn the_api_thread_serves_and_forwards_but_neither_starts_nor_writes_anything() {
        let l = ThreadKind::Api.allow_list();
        let sol = libc::SOL_SOCKET as u64;
        assert!(l.allows(libc::SYS_accept4, &args(&[])));
        assert!(l.allows(
            libc::SYS_getsockopt,
            &args(&[3, sol, libc::SO_PEERCRED as u64])
        ));
        assert!(!l.allows(
            libc::SYS_getsockopt,
            &args(&[3, sol, libc::SO_PEERSEC as u64])
        ));
        assert!(l.allows(libc::SYS_socket, &args(&[libc::AF_UNIX as u64])));
        assert!(!l.allows(libc::SYS_socket, &args(&[libc::AF_INET as u64])));
        assert!(l.allows(
            libc::SYS_setsockopt,
            &args(&[3, sol, libc::SO_RCVTIMEO as u64])
        ));
        assert!(!l.allows(
            libc::SYS_setsockopt,
            &args(&[3, sol, libc::SO_SNDBUF as u64])
        ));
        let rtmin = libc::SIGRTMIN() as u64;
        assert!(l.allows(libc::SYS_tgkill, &args(&[1, 2, rtmin])));
        assert!(!l.allows(libc::SYS_tgkill, &args(&[1, 2, libc::SIGKILL as u64])));
        let at = libc::AT_FDCWD as u64;
        for flags in [
            libc::O_RDONLY,
            libc::O_WRONLY,
            libc::O_CREAT | libc::O_RDONLY,
        ] {
            assert!(!l.allows(libc::SYS_openat, &args(&[at, 0, flags as u64])));
        }
        for call in [
            libc::SYS_clone,
            libc::SYS_clone3,
            libc::SYS_execve,
            libc::SYS_kill,
            libc::SYS_ioctl,
            libc::SYS_bind,
            libc::SYS_listen,
            libc::SYS_mlock2,
            libc::SYS_prctl,
            libc::SYS_seccomp,
        ] {
            assert!(
                !l.allows(call, &args(&[])),
                "{}",
                super::super::syscall_name(call)
            );
        }
    }

    /// Names the folder (upstream socket) to the child test; unset, the child test does
    /// nothing.
    const CHILD_ENV: &str = "VMM_TEST_API_FILTER_CHILD";
    /// The child test's name, for the test binary run again.
    const CHILD_TEST: &str = "seccomp::api::tests::filtered_api_server_child";
    /// What the SIGSYS handler exits with (after its line on stderr).
    const FORBIDDEN_CALL: i32 = 1;

    /// What `vmm serve`'s handler does on its API thread: ping with the pid, forward to a VM
    /// child's socket; done after vmm.shutdown.
    struct Serving {
        upstream: PathBuf,
        done: bool,
    }

    impl Handler for Serving {
        fn handle(&mut self, endpoint: Endpoint, _body: &[u8]) -> Response {
            match endpoint {
                Endpoint::VmmPing => {
                    Response::json(200, &serde_json::json!({"pid": std::process::id()}))
                }
                Endpoint::VmInfo => {
                    let forwarded = Client::connect(&self.upstream, Duration::from_secs(5))
                        .and_then(|mut c| c.request(Method::Get, "/api/v1/vmm.ping", None));
                    match forwarded {
                        Ok(r) => Response {
                            status: r.status,
                            body: Some(r.body),
                        },
                        Err(e) => Response::error(500, e.to_string()),
                    }
                }
                Endpoint::VmmShutdown => {
                    self.done = true;
                    Response::no_content()
                }
                _ => Response::error(409, "not in this test"),
            }
        }

        fn done(&self) -> bool {
            self.done
        }
    }

    struct Upstream;

    impl Handler for Upstream {
        fn handle(&mut self, _: Endpoint, _: &[u8]) -> Response {
            Response::json(200, &serde_json::json!({"upstream": true}))
        }
    }

    /// Run by [`an_api_server_serves_under_the_api_filter`] in a test binary of its own (a
    /// fork of this multi-threaded one could inherit a lock another test holds): filters its
    /// thread with the API list under `on`, then serves until vmm.shutdown and drops the
    /// server. A forbidden call ends the process with the SIGSYS line and status 1.
    #[test]
    fn filtered_api_server_child() {
        let Some(dir) = std::env::var_os(CHILD_ENV).map(PathBuf::from) else {
            return;
        };
        let mut server = Server::bind(&dir.join("api.sock"), Limits::default()).unwrap();
        let mut handler = Serving {
            upstream: dir.join("vm.sock"),
            done: false,
        };
        filter_api_thread(SeccompLevel::On).unwrap();
        server.run(&mut handler, -1).unwrap();
        drop(server);
        assert_eq!(violation(), None);
    }

    /// Ends the child if the test fails before it does.
    struct Reap(std::process::Child);

    impl Drop for Reap {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }

    /// A real `api::Server` on a thread filtered with the API list (in a child process, so a
    /// missing call ends it with status 1 naming the call) serves a client in this process:
    /// the server loop, bad requests, a forward to another API socket, and the socket file
    /// removed as the server drops.
    #[test]
    fn an_api_server_serves_under_the_api_filter() {
        let dir = tempfile::tempdir().unwrap();
        let mut upstream = Server::bind(&dir.path().join("vm.sock"), Limits::default()).unwrap();
        let (mut stop_upstream, stop_rx) = UnixStream::pair().unwrap();
        let upstream_thread =
            std::thread::spawn(move || upstream.run(&mut Upstream, stop_rx.as_raw_fd()));
        let path = dir.path().join("api.sock");
        let child = std::process::Command::new(std::env::current_exe().unwrap())
            .args(["--exact", CHILD_TEST, "--nocapture", "--test-threads=1"])
            .env(CHILD_ENV, dir.path())
            .stdout(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let mut child = Reap(child);
        let deadline = Instant::now() + Duration::from_secs(20);
        let mut c = loop {
            if let Ok(c) = Client::connect(&path, Duration::from_secs(5)) {
                break c;
            }
            assert!(Instant::now() < deadline, "the child never listened");
            assert!(
                child.0.try_wait().unwrap().is_none(),
                "the child ended early"
            );
            std::thread::sleep(Duration::from_millis(10));
        };
        let ping = c.request(Method::Get, "/api/v1/vmm.ping", None).unwrap();
        assert_eq!(ping.json().unwrap()["pid"], child.0.id());
        let info = c.request(Method::Get, "/api/v1/vm.info", None).unwrap();
        assert_eq!(info.json().unwrap()["upstream"], true, "{info:?}");
        assert_eq!(
            c.request(Method::Get, "/api/v1/nope", None).unwrap().status,
            404
        );
        assert_eq!(
            c.request(Method::Put, "/api/v1/vm.info", None)
                .unwrap()
                .status,
            405
        );
        let mut raw = UnixStream::connect(&path).unwrap();
        std::io::Write::write_all(&mut raw, b"GET / HTTP/1.1\r\nbad\r\n\r\n").unwrap();
        let mut answer = String::new();
        std::io::Read::read_to_string(&mut raw, &mut answer).unwrap();
        assert!(answer.starts_with("HTTP/1.1 400 "), "{answer}");
        let bye = c
            .request(Method::Put, "/api/v1/vmm.shutdown", None)
            .unwrap();
        assert_eq!(bye.status, 204);
        let status = loop {
            if let Some(s) = child.0.try_wait().unwrap() {
                break s;
            }
            assert!(
                Instant::now() < deadline,
                "the child did not end after vmm.shutdown"
            );
            std::thread::sleep(Duration::from_millis(10));
        };
        assert!(
            status.success(),
            "the filtered server ended with {status} (exit {FORBIDDEN_CALL}: a forbidden call, named on stderr)"
        );
        assert!(
            !path.exists(),
            "the filtered server did not remove its socket"
        );
        std::io::Write::write_all(&mut stop_upstream, &[1]).unwrap();
        upstream_thread.join().unwrap().unwrap();
    }
}
