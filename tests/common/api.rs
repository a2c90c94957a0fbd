//! `vmm serve` under test, and two HTTP clients for its socket: the test's own (raw bytes on
//! a UnixStream, so that malformed requests can be sent) and Debian's `curl`.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

/// A running `vmm serve`, with its own folder for the socket and the VMs' private folders
/// (`XDG_RUNTIME_DIR`); stdout (the guests' serial output) and stderr piped. Dropping it
/// kills it.
pub struct Serve {
    pub child: Child,
    pub dir: tempfile::TempDir,
    pub socket: PathBuf,
}

impl Serve {
    /// `vmm serve --api-socket DIR/api.sock ARGS`, once it answers vmm.ping.
    pub fn start(args: &[&str]) -> Serve {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("api.sock");
        std::fs::create_dir(dir.path().join("run")).unwrap();
        let child = super::vmm()
            .arg("serve")
            .arg("--api-socket")
            .arg(&socket)
            .args(args)
            .env("XDG_RUNTIME_DIR", dir.path().join("run"))
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut serve = Serve { child, dir, socket };
        let deadline = Instant::now() + Duration::from_secs(10);
        while !serve.socket.exists() || serve.try_get("vmm.ping").is_none() {
            if let Ok(Some(status)) = serve.child.try_wait() {
                panic!("vmm serve ended ({status}): {}", serve.stderr_now());
            }
            assert!(Instant::now() < deadline, "vmm serve never answered");
            std::thread::sleep(Duration::from_millis(10));
        }
        serve
    }

    /// The folder under which serve makes each VM's private folder.
    pub fn run_dir(&self) -> PathBuf {
        self.dir.path().join("run")
    }

    fn try_get(&self, name: &str) -> Option<(u16, String)> {
        let mut s = UnixStream::connect(&self.socket).ok()?;
        s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
        let req = format!("GET /api/v1/{name} HTTP/1.1\r\nHost: localhost\r\n\r\n");
        s.write_all(req.as_bytes()).ok()?;
        read_response(&mut s)
    }

    /// A request with the test's own client: `(status, body)`.
    pub fn call(&self, method: &str, name: &str, body: Option<&str>) -> (u16, String) {
        let mut s = UnixStream::connect(&self.socket).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(90))).unwrap();
        let mut req = format!("{method} /api/v1/{name} HTTP/1.1\r\nHost: localhost\r\n");
        if let Some(b) = body {
            req += &format!(
                "Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{b}",
                b.len()
            );
        } else {
            req += "\r\n";
        }
        s.write_all(req.as_bytes()).unwrap();
        read_response(&mut s).unwrap_or_else(|| panic!("no response to {method} {name}"))
    }

    /// GET `name`'s JSON body, asserting 200.
    pub fn get(&self, name: &str) -> serde_json::Value {
        let (status, body) = self.call("GET", name, None);
        assert_eq!(status, 200, "GET {name}: {body}");
        serde_json::from_str(&body).unwrap_or_else(|e| panic!("GET {name}: {e}: {body}"))
    }

    /// PUT `name`, asserting 204.
    pub fn put(&self, name: &str, body: Option<&str>) {
        let (status, text) = self.call("PUT", name, body);
        assert_eq!(status, 204, "PUT {name}: {text}");
    }

    /// vm.info's state.
    pub fn state(&self) -> String {
        self.get("vm.info")["state"].as_str().unwrap().to_string()
    }

    /// Polls vm.info until the state is `state` (at most `within`); returns that vm.info.
    pub fn wait_for_state(&self, state: &str, within: Duration) -> serde_json::Value {
        let deadline = Instant::now() + within;
        loop {
            let info = self.get("vm.info");
            if info["state"] == state {
                return info;
            }
            assert!(Instant::now() < deadline, "never {state}: {info:#}");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Asserts the server is unharmed: vmm.ping answers.
    pub fn assert_alive(&self) {
        let ping = self.get("vmm.ping");
        assert_eq!(ping["pid"], self.child.id(), "{ping}");
    }

    /// The pids of serve's child processes (the VMs' `vmm run`), from /proc.
    pub fn children(&self) -> Vec<u32> {
        children_of(self.child.id())
    }

    /// Waits (at most 60 s) for serve to exit; returns its status and stderr.
    pub fn wait_exit(&mut self) -> (std::process::ExitStatus, String) {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return (status, self.stderr_now());
            }
            assert!(Instant::now() < deadline, "vmm serve did not exit");
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// What serve printed on stderr so far (the whole of it once it exited).
    fn stderr_now(&mut self) -> String {
        if self.child.try_wait().ok().flatten().is_none() {
            return "(serve still runs; stderr read at its exit)".into();
        }
        let mut err = String::new();
        if let Some(mut e) = self.child.stderr.take() {
            let _ = e.read_to_string(&mut err);
        }
        err
    }
}

impl Drop for Serve {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The pids of `pid`'s children, from every thread's `children` file.
pub fn children_of(pid: u32) -> Vec<u32> {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return Vec::new();
    };
    let mut pids: Vec<u32> = tasks
        .flatten()
        .filter_map(|t| std::fs::read_to_string(t.path().join("children")).ok())
        .flat_map(|s| {
            s.split_whitespace()
                .filter_map(|w| w.parse().ok())
                .collect::<Vec<_>>()
        })
        .collect();
    pids.sort_unstable();
    pids
}

/// Whether process `pid` exists (and is not a zombie).
pub fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| {
        !s.rsplit(')')
            .next()
            .unwrap_or("")
            .trim_start()
            .starts_with('Z')
    })
}

/// Reads one response: status line, headers, and Content-Length bytes of body.
pub fn read_response(s: &mut UnixStream) -> Option<(u16, String)> {
    let mut buf = Vec::new();
    let mut byte = [0u8; 1];
    while !buf.ends_with(b"\r\n\r\n") {
        if s.read(&mut byte).ok()? == 0 {
            return None;
        }
        buf.push(byte[0]);
    }
    let head = String::from_utf8_lossy(&buf).into_owned();
    let status = head.split_whitespace().nth(1)?.parse().ok()?;
    let length: usize = head
        .lines()
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case("content-length")
                .then(|| v.trim().parse().ok())?
        })
        .unwrap_or(0);
    let mut body = vec![0u8; length];
    s.read_exact(&mut body).ok()?;
    Some((status, String::from_utf8_lossy(&body).into_owned()))
}

/// Debian's curl on `socket`: `(status, body)`.
pub fn curl(socket: &Path, method: &str, name: &str, body: Option<&str>) -> (u16, String) {
    let mut c = std::process::Command::new("curl");
    c.args(["-sS", "--max-time", "90", "--unix-socket"])
        .arg(socket)
        .args(["-X", method, "-w", "\n%{http_code}"]);
    if let Some(b) = body {
        c.args(["-H", "Content-Type: application/json", "--data-binary", b]);
    }
    let out = c
        .arg(format!("http://localhost/api/v1/{name}"))
        .output()
        .expect("curl (Debian's package `curl`) must be installed");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, code) = text.rsplit_once('\n').unwrap_or(("", &text));
    (code.trim().parse().unwrap_or(0), body.to_string())
}
