//! Guest RAM is sealed against shrinking and growing before any of it reaches a device
//! server: every guest-RAM memfd of a paused run carries the seals (in the VMM and in the
//! server that mapped it), and a server that tries to truncate the files it receives fails
//! while the guest runs to its end; one that keeps them past the run keeps only zeroes.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::Stdio;

use devices::vfio_user::wire::{self, cmd, RecvError};
use guest_abi::probe::DMA_OK_PREFIX;

mod common;
use common::{run_with_report, stdout, vmm};

const SEALS: i32 = libc::F_SEAL_SHRINK | libc::F_SEAL_GROW | libc::F_SEAL_SEAL;

/// The seals of the file behind `path` (a /proc fd or map_files link), opened anew.
fn seals_of(path: &Path) -> i32 {
    let file = std::fs::File::open(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    // SAFETY: F_GET_SEALS on an fd we own; it only returns an int.
    unsafe { libc::fcntl(file.as_raw_fd(), libc::F_GET_SEALS) }
}

/// The links in `dir` (a /proc fd or map_files folder) that point at a memfd, with their
/// targets.
fn memfd_links(dir: &str) -> Vec<(PathBuf, String)> {
    std::fs::read_dir(dir)
        .unwrap()
        .filter_map(|e| {
            let path = e.ok()?.path();
            let target = std::fs::read_link(&path).ok()?;
            let target = target.to_string_lossy().into_owned();
            target.starts_with("/memfd:").then_some((path, target))
        })
        .collect()
}

#[test]
fn a_paused_2g_run_holds_only_guest_ram_memfds_sealed_against_shrink_and_grow() {
    let mut child = common::paused_run(
        "probe.hang probe.expect_dma=1",
        &["--memory", "2G", "--backing", "memfd"],
    );
    let pid = child.id();
    let ours = memfd_links(&format!("/proc/{pid}/fd"));
    // 2 GiB in shards of 1 GiB.
    assert_eq!(ours.len(), 2, "{ours:?}");
    for (path, target) in &ours {
        assert!(target.contains("vmm-guest-ram"), "{target}");
        assert_eq!(seals_of(path), SEALS, "{target} ({})", path.display());
    }
    // The epf server keeps no fd, only its mappings: each of the same sealed files.
    let children = std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children")).unwrap();
    let server: u32 = children.split_whitespace().next().unwrap().parse().unwrap();
    assert!(memfd_links(&format!("/proc/{server}/fd")).is_empty());
    let mapped = memfd_links(&format!("/proc/{server}/map_files"));
    assert!(!mapped.is_empty(), "the server mapped no guest RAM");
    for (path, target) in &mapped {
        assert!(target.contains("vmm-guest-ram"), "{target}");
        assert_eq!(seals_of(path), SEALS, "{target} ({})", path.display());
    }
    // SAFETY: signalling our own child, not yet reaped.
    unsafe { libc::kill(pid as i32, libc::SIGTERM) };
    assert_eq!(child.wait().unwrap().code(), Some(143));
}

/// What truncating one received file did: the errno of shrinking it to 0 and of growing it.
type Truncation = (Option<i32>, Option<i32>);

fn try_resize(fd: RawFd, to: libc::off_t) -> Option<i32> {
    // SAFETY: ftruncate on an fd received from the client and owned by this test.
    let ret = unsafe { libc::ftruncate(fd, to) };
    (ret != 0).then(|| std::io::Error::last_os_error().raw_os_error().unwrap())
}

/// A hostile peer in front of `vmm device epf`: it relays every message of the one client
/// of `listener` to `upstream`, after `on_dma_map` had each DMA_MAP. Returns what that gave.
fn proxy<T>(
    listener: UnixListener,
    upstream: PathBuf,
    mut on_dma_map: impl FnMut(&mut wire::Message) -> T,
) -> Vec<T> {
    let (client, _) = listener.accept().unwrap();
    let server = UnixStream::connect(upstream).unwrap();
    let (mut from_server, mut to_client) =
        (server.try_clone().unwrap(), client.try_clone().unwrap());
    // Replies carry no fds: a plain byte copy.
    let replies = std::thread::spawn(move || std::io::copy(&mut from_server, &mut to_client));
    let mut seen = Vec::new();
    loop {
        let mut msg = match wire::recv_message(&client, wire::MAX_MESSAGE) {
            Ok(msg) => msg,
            Err(RecvError::Closed) => break,
            Err(e) => panic!("relaying: {e}"),
        };
        if msg.header.command == cmd::DMA_MAP {
            seen.push(on_dma_map(&mut msg));
        }
        let fds: Vec<RawFd> = msg.fds.iter().map(|f| f.as_raw_fd()).collect();
        wire::send_message(&server, &msg.header, &msg.payload, &fds).unwrap();
    }
    server.shutdown(std::net::Shutdown::Write).unwrap();
    replies.join().unwrap().unwrap();
    seen
}

fn file_size(fd: RawFd) -> libc::off_t {
    // SAFETY: `stat` is plain data, for which all zeroes is a value.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: fstat of an open fd into a stat we own.
    assert_eq!(unsafe { libc::fstat(fd, &mut st) }, 0);
    st.st_size
}

/// Tries to shrink (to 0) and grow every file a DMA_MAP carries: what each try did.
fn truncate_files(msg: &mut wire::Message) -> Vec<Truncation> {
    msg.fds
        .iter()
        .map(|f| {
            let fd = f.as_raw_fd();
            (try_resize(fd, 0), try_resize(fd, file_size(fd) + 4096))
        })
        .collect()
}

/// A memfd of `len` bytes, with `seals` added.
fn memfd(len: libc::off_t, seals: i32) -> OwnedFd {
    // SAFETY: memfd_create with a NUL-terminated name; the result is checked and owned below.
    let raw = unsafe { libc::memfd_create(c"not-guest-ram".as_ptr(), libc::MFD_ALLOW_SEALING) };
    assert!(raw >= 0, "{}", std::io::Error::last_os_error());
    // SAFETY: a fresh fd nobody else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(raw) };
    assert_eq!(try_resize(raw, len), None);
    // SAFETY: F_ADD_SEALS on our own fd takes an int and touches no memory.
    assert_eq!(unsafe { libc::fcntl(raw, libc::F_ADD_SEALS, seals) }, 0);
    fd
}

/// A `vmm device epf` listening in `dir`, and the socket a proxy in front of it listens on:
/// the server, its socket, the proxy's socket and listener.
fn epf_server_and_proxy_socket(
    dir: &std::path::Path,
) -> (
    std::process::Child,
    std::path::PathBuf,
    std::path::PathBuf,
    UnixListener,
) {
    let (upstream, front) = (dir.join("epf.sock"), dir.join("proxy.sock"));
    let server = vmm()
        .args(["device", "epf", "--socket"])
        .arg(&upstream)
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    common::wait_for_socket(&upstream, "the epf server");
    let listener = UnixListener::bind(&front).unwrap();
    (server, upstream, front, listener)
}

#[test]
fn a_server_that_truncates_what_it_receives_cannot_and_the_guest_exits_0() {
    let dir = tempfile::tempdir().unwrap();
    let (server, upstream, front, listener) = epf_server_and_proxy_socket(dir.path());
    let proxy = std::thread::spawn(move || proxy(listener, upstream, truncate_files));
    let (out, _) = run_with_report(&["--user-device", front.to_str().unwrap(), "--memory", "512M"]);
    let serial = stdout(&out);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{serial}\n{}",
        common::stderr(&out)
    );
    assert!(serial.contains(DMA_OK_PREFIX), "{serial}");
    let tries: Vec<Truncation> = proxy.join().unwrap().concat();
    assert!(!tries.is_empty(), "no DMA_MAP carried a file");
    let eperm = Some(libc::EPERM);
    assert!(
        tries.iter().all(|&t| t == (eperm, eperm)),
        "a guest-RAM file could be resized: {tries:?}"
    );
    let mut server = server;
    assert!(server.wait().unwrap().success());
}

/// What the VMM does when a server refuses its file: a peer that swaps the guest-RAM file of
/// every DMA_MAP for an unsealed one, or for a sealed one too small for the range, gets it
/// refused by the epf server, and `vmm run` stops before the guest runs with the server's
/// reason, exit 2, the server left with nothing mapped.
#[test]
fn a_dma_map_of_an_unsealed_or_too_small_file_is_refused_and_vmm_exits_2_naming_why() {
    type Swap = fn(&mut wire::Message);
    let unsealed: Swap = |msg| msg.fds[0] = memfd(file_size(msg.fds[0].as_raw_fd()), 0);
    let too_small: Swap = |msg| msg.fds[0] = memfd(4096, SEALS);
    for (swap, server_says, vmm_says) in [
        (
            unsealed,
            "not sealed against shrinking",
            "not sealed against shrinking",
        ),
        (too_small, "runs past the end", "past the end of the file"),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let (upstream, front) = (dir.path().join("epf.sock"), dir.path().join("proxy.sock"));
        let server = common::epf_server(&upstream);
        let listener = UnixListener::bind(&front).unwrap();
        let proxy = std::thread::spawn(move || proxy(listener, upstream, swap));
        let (out, _) =
            run_with_report(&["--user-device", front.to_str().unwrap(), "--memory", "512M"]);
        let err = common::stderr(&out);
        assert_eq!(out.status.code(), Some(2), "{err}");
        assert!(err.contains(vmm_says), "{err}");
        assert!(!stdout(&out).contains(DMA_OK_PREFIX), "the guest ran");
        assert!(!proxy.join().unwrap().is_empty());
        let mut server = server;
        assert!(server.wait().unwrap().success());
        let mut log = String::new();
        std::io::Read::read_to_string(&mut server.stderr.take().unwrap(), &mut log).unwrap();
        assert!(
            log.lines()
                .any(|l| l.contains("refusing DMA_MAP") && l.contains(server_says)),
            "{log}"
        );
        let end = log
            .lines()
            .rfind(|l| l.contains("DMA_MAP requests from"))
            .unwrap();
        assert_eq!(common::server_counts(end).2, 0, "{end}");
    }
}

/// The distinct files (by inode) among `fds`.
fn distinct_files(fds: Vec<OwnedFd>) -> Vec<std::fs::File> {
    let mut seen = std::collections::HashSet::new();
    fds.into_iter()
        .map(std::fs::File::from)
        .filter(|f| {
            use std::os::unix::fs::MetadataExt;
            seen.insert(f.metadata().unwrap().ino())
        })
        .collect()
}

/// A peer cannot be made to give back a file it was sent. What `vmm run` can do, it does: at
/// its end every page of guest RAM's files is punched out, so a server that kept them (past
/// DMA_UNMAP, past the run) keeps only zeroes, not the guest's memory.
#[test]
fn a_server_that_keeps_the_files_it_received_finds_only_zeroes_after_the_run() {
    use std::os::unix::fs::FileExt;
    let dir = tempfile::tempdir().unwrap();
    let (server, upstream, front, listener) = epf_server_and_proxy_socket(dir.path());
    // The hostile part: a copy of every file a DMA_MAP carries, kept after the run.
    let keep = |msg: &mut wire::Message| -> Vec<OwnedFd> {
        msg.fds.iter().map(|f| f.try_clone().unwrap()).collect()
    };
    let proxy = std::thread::spawn(move || proxy(listener, upstream, keep));
    let (out, _) = run_with_report(&["--user-device", front.to_str().unwrap(), "--memory", "512M"]);
    let serial = stdout(&out);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{serial}\n{}",
        common::stderr(&out)
    );
    assert!(serial.contains(DMA_OK_PREFIX), "{serial}");
    let mut server = server;
    assert!(server.wait().unwrap().success());

    let kept = distinct_files(proxy.join().unwrap().into_iter().flatten().collect());
    assert!(!kept.is_empty(), "no DMA_MAP carried a file");
    let mut buf = vec![0u8; 1 << 20];
    for file in &kept {
        let len = file.metadata().unwrap().len();
        assert!(len > 0);
        let mut at = 0;
        while at < len {
            let n = file.read_at(&mut buf, at).unwrap();
            assert!(n > 0, "short file at {at:#x} of {len:#x}");
            let nonzero = buf[..n].iter().position(|&b| b != 0);
            assert!(
                nonzero.is_none(),
                "guest RAM left in a file the server kept, at {:#x}",
                at + nonzero.unwrap() as u64
            );
            at += n as u64;
        }
    }
}
