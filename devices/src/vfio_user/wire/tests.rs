use super::*;

#[test]
fn header_round_trips_and_sizes_are_checked() {
    let h = Header {
        msg_id: 0xbeef,
        command: cmd::REGION_READ,
        size: 40,
        flags: flags::TYPE_REPLY | flags::ERROR,
        error: 22,
    };
    let b = h.encode();
    assert_eq!(&b[..4], &[0xef, 0xbe, 9, 0]);
    assert_eq!(Header::decode(&b), h);
    assert_eq!(h.payload_len(MAX_MESSAGE).unwrap(), 24);
    let tiny = Header { size: 15, ..h };
    assert!(tiny.payload_len(MAX_MESSAGE).is_err());
    let huge = Header {
        size: u32::MAX,
        ..h
    };
    let err = huge.payload_len(MAX_MESSAGE).unwrap_err();
    assert!(err.to_string().contains("exceeds"), "{err}");
}

#[test]
fn short_payloads_are_errors_not_panics() {
    for len in 0..DmaMap::SIZE {
        assert!(DmaMap::decode(&vec![0; len]).is_err(), "len {len}");
    }
    assert!(RegionInfoMsg::decode(&[0; 31]).is_err());
    assert!(IrqInfoMsg::decode(&[0; 15]).is_err());
    assert!(DeviceInfo::decode(&[0; 12]).is_err());
    assert!(RegionAccess::decode(&[0; 15], "x").is_err());
    assert!(Version::decode(&[0; 3]).is_err());
    let m = DmaMap {
        flags: 3,
        offset: 0x1000,
        address: 0x8000_0000,
        size: 0x2000,
    };
    assert_eq!(DmaMap::decode(&m.encode()).unwrap(), m);
}

#[test]
fn version_json_is_nul_terminated_and_parsed() {
    let v = Version {
        major: 0,
        minor: 1,
        json: Capabilities::ours().to_json(),
    };
    let b = v.encode();
    assert_eq!(b.last(), Some(&0));
    let back = Version::decode(&b).unwrap();
    assert_eq!(back, v);
    assert_eq!(
        Capabilities::from_json(&back.json).unwrap(),
        Capabilities::ours()
    );
    assert_eq!(
        Capabilities::from_json("").unwrap(),
        Capabilities::default()
    );
    assert!(Version::decode(&[0, 0, 1, 0, b'{']).is_err());
    assert!(Capabilities::from_json("[1]").is_err());
    assert!(Capabilities::from_json(r#"{"capabilities":{"max_msg_fds":-1}}"#).is_err());
}

#[test]
fn our_capabilities_are_the_spec_s_object() {
    assert_eq!(
        Capabilities::ours().to_json(),
        r#"{"capabilities":{"max_msg_fds":64,"max_data_xfer_size":1048576,"max_dma_maps":65535,"pgsizes":4096}}"#
    );
}

#[test]
fn peer_capabilities_ignore_what_is_not_used() {
    let caps = Capabilities::from_json(
        r#" {"capabilities":{"max_msg_fds":8,"max_data_xfer_size":1048576,
            "migration":{"pgsize":4096,"max_bitmap_size":1e6},"twin_socket":{"supported":false},
            "list":[1,-2.5,"x\n\u0041",null,true],"max_dma_maps":5000000000,
            "pgsizes":12288,"pgsizes":8192}, "other":[]} "#,
    )
    .unwrap();
    assert_eq!(
        caps,
        Capabilities {
            max_msg_fds: 8,
            max_data_xfer_size: 1 << 20,
            max_dma_maps: u32::MAX,
            pgsizes: 8192,
        }
    );
    assert_eq!(
        Capabilities::from_json(r#"{"version":1}"#).unwrap(),
        Capabilities::default()
    );
    let some = Capabilities::from_json(r#"{"capabilities":{"max_msg_fds":2}}"#).unwrap();
    assert_eq!(
        some,
        Capabilities {
            max_msg_fds: 2,
            ..Capabilities::default()
        }
    );
}

#[test]
fn bad_capabilities_are_refused_with_what_is_wrong() {
    let err = |json: &str| match Capabilities::from_json(json) {
        Err(WireError::Invalid(msg)) => msg,
        other => panic!("{json:?}: {other:?}"),
    };
    for bad in [
        "{",
        "{\"a\"}",
        "{\"a\":}",
        "[1,]",
        "01x",
        "\"abc",
        "tru",
        "{} {}",
        "-",
        "1.",
        "\"\\u12\"",
        "\"\\q\"",
    ] {
        assert!(
            err(bad).starts_with("version JSON does not parse: "),
            "{bad:?}"
        );
    }
    assert!(err(&"[".repeat(10_000)).starts_with("version JSON does not parse: "));
    assert_eq!(err("[1]"), "version JSON is not an object");
    assert_eq!(err("7"), "version JSON is not an object");
    assert_eq!(
        err(r#"{"capabilities":[8]}"#),
        "version JSON: \"capabilities\" is not an object"
    );
    for (name, value) in [
        ("max_msg_fds", "-1"),
        ("max_data_xfer_size", "1.0"),
        ("max_dma_maps", "1e6"),
        ("pgsizes", "null"),
        ("pgsizes", "\"4096\""),
        ("max_msg_fds", "18446744073709551616"),
    ] {
        assert_eq!(
            err(&format!(r#"{{"capabilities":{{"{name}":{value}}}}}"#)),
            format!("version JSON: {name} is not a non-negative integer"),
        );
    }
}

#[test]
fn sparse_mmap_chain_is_walked_safely() {
    let mut p = RegionInfoMsg {
        cap_offset: 32,
        ..Default::default()
    }
    .encode();
    p.extend(encode_sparse_mmap(&[(0, 0x1000), (0x2000, 0x1000)]));
    assert_eq!(
        find_sparse_mmap(&p, 32).unwrap(),
        Some(vec![(0, 0x1000), (0x2000, 0x1000)])
    );
    // Claims a billion areas but holds two: an error, not a giant allocation.
    p[32 + 8..32 + 12].copy_from_slice(&1_000_000_000u32.to_le_bytes());
    assert!(find_sparse_mmap(&p, 32).is_err());
    // A capability whose `next` points at itself.
    let mut l = RegionInfoMsg::default().encode();
    l.extend_from_slice(&7u16.to_le_bytes());
    l.extend_from_slice(&1u16.to_le_bytes());
    l.extend_from_slice(&32u32.to_le_bytes());
    assert!(find_sparse_mmap(&l, 32).is_err());
    assert!(find_sparse_mmap(&l, 4).is_err());
    assert!(find_sparse_mmap(&l, 4000).is_err());
    assert_eq!(find_sparse_mmap(&l, 0).unwrap(), None);
}

/// Descriptors of this process that refer to the memfd called `name`: how a test sees that
/// the descriptors a peer sent were closed, however many other tests run alongside.
pub(crate) fn open_fds_to(name: &str) -> usize {
    let target = format!("/memfd:{name} ");
    std::fs::read_dir("/proc/self/fd")
        .expect("listing /proc/self/fd")
        .filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
        .filter(|p| p.to_string_lossy().starts_with(&target))
        .count()
}

/// A memfd called `name`, for [`open_fds_to`].
pub(crate) fn named_memfd(name: &str) -> std::os::fd::OwnedFd {
    use std::os::fd::FromRawFd;
    let c = std::ffi::CString::new(name).unwrap();
    // SAFETY: a plain memfd_create call with a valid NUL-terminated name.
    let fd = unsafe { libc::memfd_create(c.as_ptr(), libc::MFD_CLOEXEC) };
    assert!(fd >= 0, "memfd_create: {}", std::io::Error::last_os_error());
    // SAFETY: just created, owned by nobody else.
    unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) }
}

mod socket_limits {
    use std::os::fd::AsRawFd;
    use std::os::unix::net::UnixStream;
    use std::sync::mpsc;
    use std::time::{Duration, Instant};

    use vmm_sys_util::sock_ctrl_msg::ScmSocket;

    use super::super::*;
    use super::{named_memfd, open_fds_to};

    /// Sends `bytes` with `count` duplicates of `fd` attached.
    fn send_part(s: &UnixStream, bytes: &[u8], fd: i32, count: usize) {
        let fds = vec![fd; count];
        let n = s.send_with_fds(&[bytes], &fds).expect("sending a part");
        assert_eq!(n, bytes.len());
    }

    fn get_info(id: u16) -> Vec<u8> {
        let payload = [0u8; 8];
        let mut b = Header::command(id, cmd::DEVICE_GET_INFO, payload.len())
            .encode()
            .to_vec();
        b.extend_from_slice(&payload);
        b
    }

    #[test]
    fn fds_from_every_part_belong_to_the_message() {
        let name = "wire-fds-every-part";
        let (a, b) = UnixStream::pair().unwrap();
        let fd = named_memfd(name);
        let msg = get_info(1);
        send_part(&a, &msg[..4], fd.as_raw_fd(), 2);
        send_part(&a, &msg[4..20], fd.as_raw_fd(), 3);
        send_part(&a, &msg[20..], fd.as_raw_fd(), 0);
        let got = recv_message(&b, MAX_MESSAGE).unwrap();
        assert_eq!(got.fds.len(), 5);
        drop(fd);
        assert_eq!(open_fds_to(name), 5);
        drop(got);
        assert_eq!(open_fds_to(name), 0);
    }

    #[test]
    fn fds_piling_up_over_parts_are_refused_and_closed() {
        let name = "wire-fds-pile-up";
        let (a, b) = UnixStream::pair().unwrap();
        let fd = named_memfd(name);
        // 3 x 30 descriptors: each part is within a recvmsg's room, the message is not.
        let msg = get_info(1);
        send_part(&a, &msg[..8], fd.as_raw_fd(), 30);
        send_part(&a, &msg[8..17], fd.as_raw_fd(), 30);
        send_part(&a, &msg[17..], fd.as_raw_fd(), 30);
        // The next message is fine and must be read in step.
        a.send_with_fds(&[&get_info(2)[..]], &[fd.as_raw_fd()])
            .unwrap();
        drop(fd);
        let err = recv_message(&b, MAX_MESSAGE).unwrap_err();
        assert!(
            matches!(err, RecvError::TooManyFds { header } if header.msg_id == 1),
            "{err:?}"
        );
        assert!(
            err.to_string().contains("more than 64 file descriptors"),
            "{err}"
        );
        let next = recv_message(&b, MAX_MESSAGE).unwrap();
        assert_eq!((next.header.msg_id, next.fds.len()), (2, 1));
        drop(next);
        assert_eq!(open_fds_to(name), 0, "a refused descriptor stayed open");
    }

    #[test]
    fn more_fds_than_one_recvmsg_takes_are_refused_and_closed() {
        let name = "wire-fds-truncated";
        let (a, b) = UnixStream::pair().unwrap();
        let fd = named_memfd(name);
        send_part(&a, &get_info(7), fd.as_raw_fd(), MAX_FDS + 1);
        drop(fd);
        let err = recv_message(&b, MAX_MESSAGE).unwrap_err();
        assert!(matches!(err, RecvError::TooManyFds { .. }), "{err:?}");
        assert_eq!(open_fds_to(name), 0);
    }

    #[test]
    fn received_fds_are_close_on_exec() {
        let (a, b) = UnixStream::pair().unwrap();
        let fd = named_memfd("wire-fds-cloexec");
        send_part(&a, &get_info(1), fd.as_raw_fd(), 1);
        let got = recv_message(&b, MAX_MESSAGE).unwrap();
        // SAFETY: F_GETFD on a descriptor we own.
        let flags = unsafe { libc::fcntl(got.fds[0].as_raw_fd(), libc::F_GETFD) };
        assert_eq!(flags & libc::FD_CLOEXEC, libc::FD_CLOEXEC);
    }

    /// Runs `recv_message_with` on another thread, so a test without the timeout fails
    /// instead of hanging.
    fn recv_in_thread(
        b: UnixStream,
        timeout: Duration,
    ) -> mpsc::Receiver<(Result<Message, RecvError>, Duration)> {
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let t = Instant::now();
            let limits = RecvLimits {
                max_size: MAX_MESSAGE,
                message_timeout: Some(timeout),
            };
            let _ = tx.send((recv_message_with(&b, limits), t.elapsed()));
        });
        rx
    }

    #[test]
    fn a_peer_silent_mid_message_is_given_up_within_the_timeout() {
        const TIMEOUT: Duration = Duration::from_millis(200);
        for cut in [8, HEADER_SIZE + 3] {
            let (a, b) = UnixStream::pair().unwrap();
            let rx = recv_in_thread(b, TIMEOUT);
            // Idle before a message is fine, however long.
            std::thread::sleep(TIMEOUT * 2);
            assert!(rx.try_recv().is_err(), "gave up on an idle peer");
            let t = Instant::now();
            let msg = get_info(1);
            send_part(&a, &msg[..cut], -1, 0);
            let (got, _) = rx
                .recv_timeout(Duration::from_secs(5))
                .expect("still waiting for a peer that stalled mid-message");
            let waited = t.elapsed();
            let err = got.unwrap_err();
            assert!(
                matches!(err, RecvError::Stalled { got, .. } if got == cut),
                "{err:?}"
            );
            let want = if cut < HEADER_SIZE {
                HEADER_SIZE
            } else {
                msg.len()
            };
            assert!(
                err.to_string()
                    .contains(&format!("sent {cut} of the {want} bytes")),
                "{err}"
            );
            assert!(
                waited >= TIMEOUT && waited < Duration::from_secs(2),
                "{waited:?}"
            );
            drop(a);
        }
    }

    #[test]
    fn a_slow_but_steady_message_within_the_timeout_arrives() {
        let (a, b) = UnixStream::pair().unwrap();
        let rx = recv_in_thread(b, Duration::from_secs(5));
        let msg = get_info(3);
        for part in msg.chunks(5) {
            send_part(&a, part, -1, 0);
            std::thread::sleep(Duration::from_millis(20));
        }
        let (got, _) = rx.recv_timeout(Duration::from_secs(5)).unwrap();
        assert_eq!(got.unwrap().header.msg_id, 3);
    }
}
