//! `run_epf_server_on_fd` (`vmm device epf --socket-fd N`): it serves the client already on
//! the other end of a socketpair, ends when that end closes, and refuses a descriptor that is
//! not a connected Unix stream socket before it touches it.

use std::os::fd::IntoRawFd;
use std::os::unix::net::UnixDatagram;

use super::*;
use crate::vfio_user::run_epf_server_on_fd;

#[test]
fn epf_server_on_an_inherited_socket_serves_its_client_and_ends_when_it_hangs_up() {
    let _one = PROCESS_SERVER.lock().unwrap_or_else(|e| e.into_inner());
    let (ours, theirs) = UnixStream::pair().unwrap();
    let fd = theirs.into_raw_fd();
    let server = std::thread::spawn(move || run_epf_server_on_fd(fd));
    let client = Client::from_stream(ours, "pair".into(), LONG).unwrap();
    let mut id = [0u8; 4];
    client.region_read(region::CONFIG, 0, &mut id).unwrap();
    assert_eq!(u32::from_le_bytes(id), 0xb500_104c);
    drop(client);
    let served = server.join().unwrap();
    assert!(served.is_ok(), "{served:?}");
}

#[test]
fn epf_server_refuses_a_descriptor_that_is_not_a_connected_unix_stream_socket() {
    let _one = PROCESS_SERVER.lock().unwrap_or_else(|e| e.into_inner());
    let refused = |fd: RawFd, needle: &str| {
        let err = run_epf_server_on_fd(fd).unwrap_err();
        assert!(matches!(err, EpfServerError::SocketFd { .. }), "{err}");
        assert_eq!(err.class(), ErrorClass::User);
        let msg = err.to_string();
        assert!(msg.starts_with(&format!("--socket-fd {fd}: ")), "{msg}");
        assert!(msg.contains(needle), "{needle:?} not in {msg}");
    };
    // Not open (above any fd limit, so no other test's descriptor can have that number).
    refused(1 << 30, "not an open descriptor");
    // Open, but a file; a datagram socket; a stream socket never connected.
    let file = File::open("/dev/null").unwrap();
    refused(file.as_raw_fd(), "not a socket");
    let (dgram, _peer) = UnixDatagram::pair().unwrap();
    refused(dgram.as_raw_fd(), "not a Unix stream socket");
    let path = socket_path("unconnected");
    let listener = UnixListener::bind(&path).unwrap();
    refused(listener.as_raw_fd(), "not connected");
    std::fs::remove_file(&path).unwrap();
    // None of them was closed or taken.
    for fd in [file.as_raw_fd(), dgram.as_raw_fd(), listener.as_raw_fd()] {
        // SAFETY: F_GETFD only reads the flags of a descriptor this test owns.
        let flags = unsafe { libc::fcntl(fd, libc::F_GETFD) };
        assert!(flags >= 0, "fd {fd} closed");
    }
}
