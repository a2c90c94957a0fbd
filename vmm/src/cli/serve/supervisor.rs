//! serve's supervisor thread: it checks each config against the host as `vmm run` would, and
//! starts each booted VM's `vmm run` child, reaps it and frees its private folder, on the API
//! thread's behalf (a channel). It stays unfiltered because it forks and execs, and because
//! the host checks read limits, sysfs and the files a config names, none of which the API
//! thread's seccomp list allows. It reads no request bytes (the API thread parses the JSON and
//! hands over the typed config), but its check does parse what the config names: the kernel's
//! and initramfs' headers, as `vmm run` does before it builds (the child, which serves the
//! VM's own API, is filtered). The
//! children's death signal fires when the thread that forked them ends, so this one thread
//! outlives every child it starts.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::DirBuilderExt;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use api::client::Client;
use api::{Endpoint, Method};

use crate::cli::run::RunArgs;
use crate::cli::vm_config::VmConfigJson;
use crate::seccomp::SeccompLevel;

/// How long a child may take to answer vmm.ping on its socket after it starts.
const START_WITHIN: Duration = Duration::from_secs(30);
/// How often the supervisor looks whether the child has exited, between requests.
const REAP_EVERY: Duration = Duration::from_millis(100);
/// How long the stderr copier may take to hand over the child's last line after its exit.
const LAST_LINE_WITHIN: Duration = Duration::from_secs(2);
/// The child's socket and report, inside its private folder.
const SOCKET: &str = "vm.sock";
const REPORT: &str = "report.json";

/// How a VM's process ended.
#[derive(Clone, Debug)]
pub struct Exited {
    /// Its exit status, or 128+N after signal N.
    pub status: i32,
    /// Why it failed, when it said so (its last `vmm: ...` line) or was killed.
    pub error: Option<String>,
    /// Its `--report`, when it wrote one.
    pub report: Option<serde_json::Value>,
}

/// What vm.boot led to.
pub enum Booted {
    /// The child answers on this socket.
    Running(PathBuf),
    /// The child ended before its socket answered.
    Exited(Exited),
}

enum Request {
    Check(Box<VmConfigJson>, Sender<Result<RunArgs, String>>),
    Boot(Vec<String>, Sender<Result<Booted, String>>),
    Poll(Sender<Option<Exited>>),
    Stop {
        terminate: bool,
        grace: Duration,
        reply: Sender<Option<Exited>>,
    },
    Free(Sender<()>),
}

/// The API thread's handle on the supervisor thread; dropping it stops any child (SIGTERM,
/// then SIGKILL), frees its folder and joins the thread.
pub struct Supervisor {
    tx: Option<Sender<Request>>,
    thread: Option<JoinHandle<()>>,
}

impl Supervisor {
    /// Starts the thread; children get `--seccomp level` unless their arguments say.
    pub fn start(level: SeccompLevel) -> std::io::Result<Supervisor> {
        sweep_dead_folders();
        let (tx, rx) = mpsc::channel();
        let thread = std::thread::Builder::new()
            .name("vmm-supervisor".into())
            .spawn(move || supervise(&rx, level))?;
        Ok(Supervisor {
            tx: Some(tx),
            thread: Some(thread),
        })
    }

    fn call<T>(&self, request: impl FnOnce(Sender<T>) -> Request) -> Option<T> {
        let (reply, answer) = mpsc::channel();
        self.tx.as_ref()?.send(request(reply)).ok()?;
        answer.recv().ok()
    }

    /// `config.check()`: what `vmm run` would refuse on this host, refused.
    pub fn check(&self, config: &VmConfigJson) -> Result<RunArgs, String> {
        self.call(|reply| Request::Check(Box::new(config.clone()), reply))
            .unwrap_or_else(|| Err(GONE.into()))
    }

    /// Starts `vmm run ARGS` in a fresh private folder; returns once its API answers.
    pub fn boot(&self, args: Vec<String>) -> Result<Booted, String> {
        self.call(|reply| Request::Boot(args, reply))
            .unwrap_or_else(|| Err(GONE.into()))
    }

    /// How the child ended, once it has.
    pub fn poll(&self) -> Option<Exited> {
        self.call(Request::Poll).flatten()
    }

    /// Waits for the child to exit (after SIGTERM if `terminate`), killing it after `grace`.
    pub fn stop(&self, terminate: bool, grace: Duration) -> Option<Exited> {
        self.call(|reply| Request::Stop {
            terminate,
            grace,
            reply,
        })
        .flatten()
    }

    /// Removes the last child's private folder.
    pub fn free(&self) {
        self.call(Request::Free);
    }
}

impl Drop for Supervisor {
    fn drop(&mut self) {
        self.tx = None;
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// What a request answers once the supervisor thread is gone.
pub const GONE: &str = "serve's supervisor thread has ended; restart vmm serve";

/// One child and its folder.
struct Current {
    child: Child,
    dir: PathBuf,
    last_line: Receiver<Option<String>>,
    exited: Option<Exited>,
}

fn supervise(rx: &Receiver<Request>, level: SeccompLevel) {
    let mut cur: Option<Current> = None;
    loop {
        match rx.recv_timeout(REAP_EVERY) {
            Ok(Request::Check(config, reply)) => {
                let _ = reply.send(config.check());
            }
            Ok(Request::Boot(args, reply)) => {
                free(&mut cur);
                let _ = reply.send(boot(&args, level, &mut cur));
            }
            Ok(Request::Poll(reply)) => {
                let _ = reply.send(cur.as_mut().and_then(reap));
            }
            Ok(Request::Stop {
                terminate,
                grace,
                reply,
            }) => {
                let _ = reply.send(cur.as_mut().map(|c| stop(c, terminate, grace)));
            }
            Ok(Request::Free(reply)) => {
                free(&mut cur);
                let _ = reply.send(());
            }
            Err(RecvTimeoutError::Timeout) => {
                cur.as_mut().map(reap);
            }
            Err(RecvTimeoutError::Disconnected) => break,
        }
    }
    free(&mut cur);
}

/// Stops the child if it still runs, and removes its folder.
fn free(cur: &mut Option<Current>) {
    if let Some(mut c) = cur.take() {
        stop(&mut c, true, crate::cli::api_run::SHUTDOWN_WITHIN);
        if let Err(e) = std::fs::remove_dir_all(&c.dir) {
            eprintln!("vmm: cannot remove {}: {e}", c.dir.display());
        }
    }
}

/// The child's exit, reaped, once it has exited.
fn reap(c: &mut Current) -> Option<Exited> {
    if c.exited.is_none() {
        if let Ok(Some(status)) = c.child.try_wait() {
            c.exited = Some(exited(c, status, None));
        }
    }
    c.exited.clone()
}

fn exited(c: &Current, status: std::process::ExitStatus, killed: Option<String>) -> Exited {
    let code = status
        .code()
        .or_else(|| status.signal().map(|s| 128 + s))
        .unwrap_or(1);
    let last = c.last_line.recv_timeout(LAST_LINE_WITHIN).ok().flatten();
    let report = std::fs::read_to_string(c.dir.join(REPORT))
        .ok()
        .and_then(|s| serde_json::from_str(&s).ok());
    Exited {
        status: code,
        error: killed.or(last),
        report,
    }
}

fn stop(c: &mut Current, terminate: bool, grace: Duration) -> Exited {
    if let Some(e) = reap(c) {
        return e;
    }
    if terminate {
        let pid = c.child.id() as libc::pid_t;
        // SAFETY: kill(2) on our own unreaped child's pid (it cannot have been reused).
        unsafe { libc::kill(pid, libc::SIGTERM) };
    }
    let deadline = Instant::now() + grace;
    while Instant::now() < deadline {
        if let Some(e) = reap(c) {
            return e;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let _ = c.child.kill();
    let why = format!(
        "the VM's process (pid {}) did not exit within {} s of being asked to stop, and was killed",
        c.child.id(),
        grace.as_secs()
    );
    let e = match c.child.wait() {
        Ok(status) => exited(c, status, Some(why)),
        Err(_) => Exited {
            status: 128 + libc::SIGKILL,
            error: Some(why),
            report: None,
        },
    };
    c.exited = Some(e.clone());
    e
}

/// Where the private folders go: $XDG_RUNTIME_DIR, else the temp folder.
fn private_base() -> PathBuf {
    std::env::var_os("XDG_RUNTIME_DIR")
        .map(PathBuf::from)
        .filter(|p| p.is_dir())
        .unwrap_or_else(std::env::temp_dir)
}

/// The first part of every private folder's name; `vmm-serve-PID-N`.
const PRIVATE_PREFIX: &str = "vmm-serve-";

/// Removes the private folders a `vmm serve` that no longer runs left behind (it was killed
/// with SIGKILL and could not): ours (same owner), named for a pid with no process. A pid
/// reused since is left alone, which errs on the side of keeping.
fn sweep_dead_folders() {
    let base = private_base();
    let Ok(entries) = std::fs::read_dir(&base) else {
        return;
    };
    // SAFETY: geteuid has no preconditions.
    let euid = unsafe { libc::geteuid() };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(pid) = name
            .to_str()
            .and_then(|n| n.strip_prefix(PRIVATE_PREFIX))
            .and_then(|rest| rest.split_once('-'))
            .and_then(|(pid, n)| n.parse::<u32>().ok().and(pid.parse::<u32>().ok()))
        else {
            continue;
        };
        let ours = std::fs::symlink_metadata(entry.path())
            .is_ok_and(|m| m.is_dir() && std::os::unix::fs::MetadataExt::uid(&m) == euid);
        if ours && !Path::new(&format!("/proc/{pid}")).exists() {
            match std::fs::remove_dir_all(entry.path()) {
                Ok(()) => tracing::info!(
                    "removed {}, left by a vmm serve that was killed",
                    entry.path().display()
                ),
                Err(e) => tracing::warn!(
                    "cannot remove {}, left by a vmm serve that was killed: {e}",
                    entry.path().display()
                ),
            }
        }
    }
}

/// A private folder (0700) for one child, under [`private_base`].
fn private_dir() -> std::io::Result<PathBuf> {
    let base = private_base();
    let mut n = 0u32;
    loop {
        let dir = base.join(format!("{PRIVATE_PREFIX}{}-{n}", std::process::id()));
        // mkdir fails on anything already there, so the folder is ours alone.
        match std::fs::DirBuilder::new().mode(0o700).create(&dir) {
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists && n < 1000 => n += 1,
            other => return other.map(|()| dir),
        }
    }
}

fn boot(args: &[String], level: SeccompLevel, cur: &mut Option<Current>) -> Result<Booted, String> {
    let dir = private_dir().map_err(|e| {
        format!("cannot create a private folder for the VM: {e}; set XDG_RUNTIME_DIR or TMPDIR to a writable folder")
    })?;
    let (child, last_line) = match spawn(args, &dir, level) {
        Ok(c) => c,
        Err(e) => {
            let _ = std::fs::remove_dir_all(&dir);
            return Err(e);
        }
    };
    let c = cur.insert(Current {
        child,
        dir,
        last_line,
        exited: None,
    });
    let socket = c.dir.join(SOCKET);
    let deadline = Instant::now() + START_WITHIN;
    loop {
        if let Some(e) = reap(c) {
            return Ok(Booted::Exited(e));
        }
        if answers(&socket) {
            return Ok(Booted::Running(socket));
        }
        if Instant::now() > deadline {
            let e = stop(c, true, crate::cli::api_run::SHUTDOWN_WITHIN);
            return Ok(Booted::Exited(Exited {
                error: Some(format!(
                    "the VM's process did not answer on its API socket within {} s, and was stopped",
                    START_WITHIN.as_secs()
                )),
                ..e
            }));
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Whether vmm.ping on `socket` answers 200.
fn answers(socket: &Path) -> bool {
    let ping = Endpoint::VmmPing;
    Client::connect(socket, Duration::from_secs(1))
        .and_then(|mut c| c.request(Method::Get, &ping.path(), None))
        .is_ok_and(|r| r.status == 200)
}

fn spawn(
    args: &[String],
    dir: &Path,
    level: SeccompLevel,
) -> Result<(Child, Receiver<Option<String>>), String> {
    let exe = std::env::current_exe()
        .map_err(|e| format!("cannot find the vmm executable to start the VM with: {e}"))?;
    let mut cmd = Command::new(&exe);
    cmd.arg("run")
        .args(args)
        .arg("--api-socket")
        .arg(dir.join(SOCKET))
        .arg("--report")
        .arg(dir.join(REPORT))
        .arg("--quiet");
    // The config's own `vmm.seccomp`, if it has one, is the VM's level.
    if !args
        .iter()
        .any(|a| a == "--seccomp" || a.starts_with("--seccomp="))
    {
        use clap::ValueEnum;
        if let Some(v) = level.to_possible_value() {
            cmd.args(["--seccomp", v.get_name()]);
        }
    }
    cmd.stdin(Stdio::null())
        .stderr(Stdio::piped())
        // Its own process group: a Ctrl-C at serve's terminal is serve's to handle (it shuts
        // the VM down), not the guest's.
        .process_group(0);
    let parent = std::process::id() as libc::pid_t;
    // SAFETY: between fork and exec the closure only makes async-signal-safe calls
    // (signal, prctl, getppid, _exit) and allocates nothing.
    unsafe {
        cmd.pre_exec(move || {
            // serve's handlers only record a signal; the child must die of SIGTERM until its
            // own are in place.
            libc::signal(libc::SIGTERM, libc::SIG_DFL);
            libc::signal(libc::SIGINT, libc::SIG_DFL);
            // SIGTERM, not SIGKILL: the child then undoes its pinning and stops its device
            // server itself.
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            if libc::getppid() != parent {
                libc::_exit(1);
            }
            Ok(())
        })
    };
    let mut child = cmd
        .spawn()
        .map_err(|e| format!("cannot start {} run: {e}", exe.display()))?;
    let (tx, rx) = mpsc::channel();
    if let Some(pipe) = child.stderr.take() {
        let copier = std::thread::Builder::new()
            .name("vmm-vm-stderr".into())
            .spawn(move || {
                let _ = tx.send(copy_stderr(pipe));
            });
        if let Err(e) = copier {
            let _ = child.kill();
            let _ = child.wait();
            return Err(format!("cannot start a thread for the VM's stderr: {e}"));
        }
    }
    Ok((child, rx))
}

/// Copies the child's stderr to ours, line by line; returns why it failed: its last
/// `vmm: ...` line, else the last `error: ...` of a command line it refused.
fn copy_stderr(pipe: impl std::io::Read) -> Option<String> {
    let mut reader = BufReader::new(pipe);
    let (mut line, mut failure, mut refused) = (Vec::new(), None, None);
    while reader.read_until(b'\n', &mut line).is_ok_and(|n| n > 0) {
        let _ = std::io::stderr().write_all(&line);
        let text = String::from_utf8_lossy(&line);
        let text = text.trim_end();
        if let Some(rest) = text.strip_prefix("vmm: ") {
            failure = Some(rest.to_string());
        } else if let Some(rest) = text.strip_prefix("error: ") {
            refused = Some(rest.to_string());
        }
        line.clear();
    }
    failure.or(refused)
}
