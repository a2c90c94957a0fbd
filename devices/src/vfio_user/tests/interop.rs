//! The client against fake servers that do what other implementations (libvfio-user, the
//! `vfio_user` crate) do and this project's own server does not: DMA by message, capabilities
//! that limit the client, region info that does not fit, INTx that is not maskable, devices
//! without reset.

use std::sync::mpsc;

use super::*;
use crate::vfio::VfioBackend;
use crate::vfio_user::wire::{irq_info_flags, DmaAccess, DmaMap, IrqInfoMsg, RegionInfoMsg};
use crate::vfio_user::DmaMemory;
use crate::vfio_user::UserBackend;

/// A client whose server answers VERSION with `json` (then runs `script`).
fn fake_with_caps(
    json: String,
    script: impl FnOnce(RawPeer) + Send + 'static,
) -> (Client, JoinHandle<()>) {
    let (a, b) = UnixStream::pair().unwrap();
    let fake = std::thread::spawn(move || {
        let p = RawPeer { s: b };
        let m = p.recv();
        assert_eq!(m.header.command, cmd::VERSION);
        let v = Version {
            major: 0,
            minor: 0,
            json,
        }
        .encode();
        p.send(Header::reply(&m.header, v.len()), &v);
        script(p);
    });
    let client = Client::from_stream(a, "fake.sock".into(), LONG).expect("client");
    (client, fake)
}

/// "Guest RAM" for a window mapped without an fd.
struct TestRam(Mutex<Vec<u8>>);

impl DmaMemory for TestRam {
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> std::io::Result<()> {
        let ram = self.0.lock().unwrap();
        let at = offset as usize;
        buf.copy_from_slice(&ram[at..at + buf.len()]);
        Ok(())
    }
    fn write_at(&self, offset: u64, data: &[u8]) -> std::io::Result<()> {
        let mut ram = self.0.lock().unwrap();
        let at = offset as usize;
        ram[at..at + data.len()].copy_from_slice(data);
        Ok(())
    }
}

impl RawPeer {
    /// Sends a server-to-client command and returns the client's reply.
    fn ask(&self, id: u16, command: u16, payload: &[u8]) -> Message {
        self.send(Header::command(id, command, payload.len()), payload);
        let r = self.recv();
        assert_eq!(r.header.kind(), flags::TYPE_REPLY, "{:?}", r.header);
        assert_eq!((r.header.msg_id, r.header.command), (id, command));
        r
    }
}

fn errno_of(m: &Message) -> Option<i32> {
    m.header.is_error().then_some(m.header.error as i32)
}

#[test]
fn the_client_serves_dma_read_and_write_from_its_windows_with_bounds_checks() {
    const SHARED: u64 = 0x10000;
    const IN_BAND: u64 = 0x20000;
    let (done_tx, done_rx) = mpsc::channel();
    let (unmapped_tx, unmapped_rx) = mpsc::channel();
    let (client, fake) = fake_server(LONG, move |p| {
        // The shared window comes with its fd, the in-band one without (offset 0).
        let m = p.recv();
        assert_eq!((m.header.command, m.fds.len()), (cmd::DMA_MAP, 1));
        p.send(Header::reply(&m.header, 0), &[]);
        let m = p.recv();
        assert_eq!((m.header.command, m.fds.len()), (cmd::DMA_MAP, 0));
        let map = DmaMap::decode(&m.payload).unwrap();
        assert_eq!((map.address, map.size, map.offset), (IN_BAND, 0x1000, 0));
        assert_eq!(map.flags, wire::dma_flags::READ);
        p.send(Header::reply(&m.header, 0), &[]);

        // Write then read back through the shared window.
        let at = SHARED + 0x10;
        let w = DmaAccess {
            address: at,
            count: 5,
        }
        .encode(b"hello");
        let r = p.ask(1, cmd::DMA_WRITE, &w);
        assert_eq!(errno_of(&r), None);
        assert_eq!(
            r.payload,
            DmaAccess {
                address: at,
                count: 5
            }
            .encode(&[])
        );
        let r = p.ask(
            2,
            cmd::DMA_READ,
            &DmaAccess {
                address: at,
                count: 5,
            }
            .encode(&[]),
        );
        assert_eq!(
            r.payload,
            DmaAccess {
                address: at,
                count: 5
            }
            .encode(b"hello")
        );
        // The last byte of a window is in it; one past it is not.
        let last = DmaAccess {
            address: SHARED + 0x1fff,
            count: 1,
        }
        .encode(&[]);
        assert_eq!(errno_of(&p.ask(3, cmd::DMA_READ, &last)), None);
        let across = DmaAccess {
            address: SHARED + 0x1ff0,
            count: 0x20,
        }
        .encode(&[]);
        assert_eq!(
            errno_of(&p.ask(4, cmd::DMA_READ, &across)),
            Some(libc::EFAULT)
        );
        let wrapping = DmaAccess {
            address: u64::MAX - 1,
            count: 4,
        }
        .encode(&[]);
        assert_eq!(
            errno_of(&p.ask(5, cmd::DMA_READ, &wrapping)),
            Some(libc::EFAULT)
        );
        let unmapped = DmaAccess {
            address: 0x50000,
            count: 4,
        }
        .encode(&[]);
        assert_eq!(
            errno_of(&p.ask(6, cmd::DMA_READ, &unmapped)),
            Some(libc::EFAULT)
        );
        // More than the client offered in max_data_xfer_size, and a count the data
        // does not match, are refused before anything is looked up.
        let huge = DmaAccess {
            address: SHARED,
            count: MAX_DATA + 1,
        }
        .encode(&[]);
        assert_eq!(
            errno_of(&p.ask(7, cmd::DMA_READ, &huge)),
            Some(libc::EINVAL)
        );
        let short = DmaAccess {
            address: SHARED,
            count: 8,
        }
        .encode(b"abc");
        assert_eq!(
            errno_of(&p.ask(8, cmd::DMA_WRITE, &short)),
            Some(libc::EINVAL)
        );
        assert_eq!(
            errno_of(&p.ask(9, cmd::DMA_READ, &[0u8; 7])),
            Some(libc::EINVAL)
        );

        // The in-band window: readable, not writable.
        let r = p.ask(
            10,
            cmd::DMA_READ,
            &DmaAccess {
                address: IN_BAND + 8,
                count: 4,
            }
            .encode(&[]),
        );
        assert_eq!(
            r.payload,
            DmaAccess {
                address: IN_BAND + 8,
                count: 4
            }
            .encode(&[8, 9, 10, 11])
        );
        let w = DmaAccess {
            address: IN_BAND,
            count: 1,
        }
        .encode(&[1]);
        assert_eq!(errno_of(&p.ask(11, cmd::DMA_WRITE, &w)), Some(libc::EPERM));
        // A command asking for no reply gets none: the next reply is for the next command.
        let quiet = Header {
            flags: flags::TYPE_COMMAND | flags::NO_REPLY,
            ..Header::command(12, cmd::DMA_WRITE, 21)
        };
        p.send(
            quiet,
            &DmaAccess {
                address: SHARED,
                count: 5,
            }
            .encode(b"quiet"),
        );
        let r = p.ask(
            13,
            cmd::DMA_READ,
            &DmaAccess {
                address: SHARED,
                count: 5,
            }
            .encode(&[]),
        );
        assert_eq!(
            r.payload,
            DmaAccess {
                address: SHARED,
                count: 5
            }
            .encode(b"quiet")
        );
        done_tx.send(()).unwrap();

        // After DMA_UNMAP is answered the window is gone.
        let m = p.recv();
        assert_eq!(m.header.command, cmd::DMA_UNMAP);
        p.send(Header::reply(&m.header, m.payload.len()), &m.payload);
        unmapped_rx.recv_timeout(LONG).expect("dma_unmap returning");
        let gone = DmaAccess {
            address: SHARED,
            count: 1,
        }
        .encode(&[]);
        assert_eq!(
            errno_of(&p.ask(14, cmd::DMA_READ, &gone)),
            Some(libc::EFAULT)
        );
        done_tx.send(()).unwrap();
        p.wait_for_close();
    });
    let caller = Arc::new(memfd(0x3000));
    let ram = caller.try_clone().unwrap();
    client
        .dma_map(SHARED, 0x2000, &caller, 0x1000, true, true)
        .unwrap();
    // The caller's reference may go once the mapping is made: the window holds the file.
    drop(caller);
    let bytes: Vec<u8> = (0..0x1000).map(|i| i as u8).collect();
    let in_band = Arc::new(TestRam(Mutex::new(bytes)));
    client
        .dma_map_in_band(IN_BAND, 0x1000, in_band, true, false)
        .unwrap();
    done_rx.recv_timeout(LONG).expect("the fake's DMA requests");
    // What vm.counters shows for the device: the bytes mapped, the DMA served, the messages.
    let counted: std::collections::HashMap<_, _> =
        client.counters().snapshot().into_iter().collect();
    assert_eq!(counted["dma_map_bytes"], 0x3000, "{counted:?}");
    for key in [
        "dma_read_bytes",
        "dma_write_bytes",
        "messages_sent",
        "messages_received",
    ] {
        assert!(counted[key] > 0, "{key}: {counted:?}");
    }
    // The server's DMA_WRITE landed in the file, at the mapping's offset.
    let mut got = [0u8; 5];
    ram.read_exact_at(&mut got, 0x1000).unwrap();
    assert_eq!(&got, b"quiet");
    ram.read_exact_at(&mut got, 0x1010).unwrap();
    assert_eq!(&got, b"hello");
    client.dma_unmap(SHARED, 0x2000).unwrap();
    unmapped_tx.send(()).unwrap();
    done_rx.recv_timeout(LONG).expect("the fake's last request");
    drop(client);
    fake.join().unwrap();
}

const MAX_DATA: u64 = wire::MAX_DATA_XFER as u64;

#[test]
fn version_proposes_no_migration_and_the_servers_limits_bind_dma_map() {
    // What the `vfio_user` crate's server answers, plus limits of its own choosing.
    let json = r#"{"capabilities":{"max_msg_fds":1,"max_data_xfer_size":1048576,
        "migration":{"pgsize":4096},"max_dma_maps":2,"pgsizes":2105344}}"#;
    let (tx, rx) = mpsc::channel();
    let (a, b) = UnixStream::pair().unwrap();
    let fake = std::thread::spawn(move || {
        let p = RawPeer { s: b };
        let m = p.recv();
        tx.send(Version::decode(&m.payload).unwrap()).unwrap();
        let v = Version {
            major: 0,
            minor: 0,
            json: json.into(),
        }
        .encode();
        p.send(Header::reply(&m.header, v.len()), &v);
        for _ in 0..2 {
            let m = p.recv();
            assert_eq!(m.header.command, cmd::DMA_MAP);
            p.send(Header::reply(&m.header, 0), &[]);
        }
        p.wait_for_close();
    });
    let client = Client::from_stream(a, "fake.sock".into(), LONG).unwrap();
    let ours = rx.recv().unwrap();
    assert_eq!((ours.major, ours.minor), (0, 1));
    let proposed = serde_json::from_str::<serde_json::Value>(&ours.json).unwrap();
    let caps = proposed.get("capabilities").unwrap();
    for name in [
        "max_msg_fds",
        "max_data_xfer_size",
        "max_dma_maps",
        "pgsizes",
    ] {
        assert!(
            caps.get(name).and_then(|v| v.as_u64()).is_some(),
            "{name} in {}",
            ours.json
        );
    }
    assert!(caps.get("migration").is_none(), "{}", ours.json);
    assert!(caps.get("twin_socket").is_none(), "{}", ours.json);

    let peer = client.peer();
    assert_eq!((peer.max_msg_fds, peer.max_dma_maps), (1, 2));
    assert_eq!(peer.min_pgsize(), Some(0x2000));
    let f = Arc::new(memfd(0x10000));
    // Not a multiple of the server's smallest page (8 KiB): refused without a message.
    let err = client
        .dma_map(0x1000, 0x2000, &f, 0, true, true)
        .unwrap_err();
    assert!(matches!(err, ClientError::Invalid { .. }), "{err}");
    assert!(err.to_string().contains("8192-byte pages"), "{err}");
    for i in 0..2 {
        client
            .dma_map(i * 0x2000, 0x2000, &f, 0, true, true)
            .unwrap();
    }
    let err = client
        .dma_map(0x8000, 0x2000, &f, 0, true, true)
        .unwrap_err();
    assert!(matches!(err, ClientError::Unsupported { .. }), "{err}");
    assert!(err.to_string().contains("at most 2 DMA mappings"), "{err}");
    drop(client);
    fake.join().unwrap();
}

#[test]
fn unusable_server_capabilities_are_a_version_error() {
    for json in [
        r#"{"capabilities":{"pgsizes":0}}"#,
        r#"{"capabilities":{"max_dma_maps":0}}"#,
        r#"{"capabilities":{"max_msg_fds":0}}"#,
    ] {
        let (a, b) = UnixStream::pair().unwrap();
        let fake = std::thread::spawn(move || {
            let p = RawPeer { s: b };
            let m = p.recv();
            let v = Version {
                major: 0,
                minor: 1,
                json: json.into(),
            }
            .encode();
            p.send(Header::reply(&m.header, v.len()), &v);
            p.wait_for_close();
        });
        let err = Client::from_stream(a, "v".into(), LONG).unwrap_err();
        assert!(matches!(err, ClientError::Version { .. }), "{json}: {err}");
        fake.join().unwrap();
    }
}

/// Region info whose capability does not fit the client's first argsz, answered as
/// libvfio-user does: the needed argsz, no CAPS flag, no capability.
#[test]
fn region_info_that_does_not_fit_is_asked_again_even_without_the_caps_flag() {
    let areas: Vec<(u64, u64)> = (0..70).map(|i| (i * 0x2000, 0x1000)).collect();
    let cap = wire::encode_sparse_mmap(&areas);
    let needed = (RegionInfoMsg::SIZE + cap.len()) as u32;
    let (tx, rx) = mpsc::channel();
    let (client, fake) = fake_server(LONG, move |p| {
        let fixed = |argsz, flags, cap_offset| RegionInfoMsg {
            argsz,
            flags,
            index: 0,
            cap_offset,
            size: 70 * 0x2000,
            offset: 0,
        };
        let rw_mmap = region::FLAG_READ | region::FLAG_WRITE | region::FLAG_MMAP;
        let m = p.recv();
        let first = RegionInfoMsg::decode(&m.payload).unwrap();
        let reply = fixed(needed, rw_mmap, 0).encode();
        p.send(Header::reply(&m.header, reply.len()), &reply);
        let m = p.recv();
        let second = RegionInfoMsg::decode(&m.payload).unwrap();
        tx.send((first.argsz, second.argsz)).unwrap();
        let mut reply = fixed(needed, rw_mmap | wire::REGION_FLAG_CAPS, 32).encode();
        reply.extend_from_slice(&cap);
        let fd = memfd(0x1000);
        wire::send_message(
            &p.s,
            &Header::reply(&m.header, reply.len()),
            &reply,
            &[fd.as_raw_fd()],
        )
        .unwrap();
        p.wait_for_close();
    });
    let info = client.region_info(0).unwrap();
    let (first, second) = rx
        .recv_timeout(PROMPT)
        .expect("the client did not ask again");
    assert!(first < needed, "the first argsz {first} already fit");
    assert_eq!(second, needed);
    assert_eq!(info.mmap_areas.len(), 70);
    assert_eq!(
        info.mmap_areas[69],
        MmapArea {
            offset: 69 * 0x2000,
            size: 0x1000
        }
    );
    drop(client);
    fake.join().unwrap();
}

#[test]
fn a_sparse_area_past_the_region_is_passed_on_for_the_pci_model_to_trap() {
    let (client, fake) = fake_server(LONG, move |p| {
        let m = p.recv();
        let cap = wire::encode_sparse_mmap(&[(0, 0x1000), (0x1000, 0x1001)]);
        let mut reply = RegionInfoMsg {
            argsz: (RegionInfoMsg::SIZE + cap.len()) as u32,
            flags: region::FLAG_READ | region::FLAG_MMAP | wire::REGION_FLAG_CAPS,
            index: 0,
            cap_offset: 32,
            size: 0x2000,
            offset: 0,
        }
        .encode();
        reply.extend_from_slice(&cap);
        let fd = memfd(0x2000);
        wire::send_message(
            &p.s,
            &Header::reply(&m.header, reply.len()),
            &reply,
            &[fd.as_raw_fd()],
        )
        .unwrap();
        p.wait_for_close();
    });
    // Not a broken connection: the device stays usable, and vfio/pci/mmap.rs traps the area.
    let info = client.region_info(0).unwrap();
    assert_eq!(
        info.mmap_areas[1],
        MmapArea {
            offset: 0x1000,
            size: 0x1001
        }
    );
    drop(client);
    fake.join().unwrap();
}

#[test]
fn a_region_read_reply_for_another_offset_is_malformed() {
    let (client, fake) = fake_server(LONG, move |p| {
        let m = p.recv();
        let (req, _) = wire::RegionAccess::decode(&m.payload, "t").unwrap();
        let reply = wire::RegionAccess {
            offset: req.offset + 4,
            ..req
        }
        .encode(&[0; 4]);
        p.send(Header::reply(&m.header, reply.len()), &reply);
        p.wait_for_close();
    });
    let err = client.region_read(7, 0, &mut [0; 4]).unwrap_err();
    assert!(matches!(err, ClientError::Malformed { .. }), "{err}");
    assert!(err.to_string().contains("offset 0x4"), "{err}");
    drop(client);
    fake.join().unwrap();
}

/// INTx as the `vfio_user` crate's gpio example offers it (eventfd, not maskable) gets only
/// its trigger fd; a maskable one gets the unmask (resample) fd too.
#[test]
fn intx_gets_an_unmask_fd_only_when_the_server_says_it_is_maskable() {
    for (info_flags, want) in [
        (irq_info_flags::EVENTFD, vec![irq_set::ACTION_TRIGGER]),
        (
            irq_info_flags::EVENTFD | irq_info_flags::MASKABLE | irq_info_flags::AUTOMASKED,
            vec![irq_set::ACTION_TRIGGER, irq_set::ACTION_UNMASK],
        ),
    ] {
        let (tx, rx) = mpsc::channel();
        let n = want.len();
        let (client, fake) = fake_server(LONG, move |p| {
            let m = p.recv();
            assert_eq!(m.header.command, cmd::DEVICE_GET_IRQ_INFO);
            let info = IrqInfoMsg {
                flags: info_flags,
                index: irq::INTX,
                count: 1,
            }
            .encode();
            p.send(Header::reply(&m.header, info.len()), &info);
            for _ in 0..n {
                let m = p.recv();
                assert_eq!(m.header.command, cmd::DEVICE_SET_IRQS);
                let req = wire::IrqSet::decode(&m.payload).unwrap();
                tx.send((req.flags & irq_set::ACTION_MASK_ALL, m.fds.len()))
                    .unwrap();
                p.send(Header::reply(&m.header, 0), &[]);
            }
            p.wait_for_close();
        });
        let backend = UserBackend::new(Arc::new(client));
        let (t, u) = (EventFd::new(0).unwrap(), EventFd::new(0).unwrap());
        backend.enable_intx(&t, &u).unwrap();
        let got: Vec<u32> = rx
            .try_iter()
            .map(|(action, fds)| {
                assert_eq!(fds, 1);
                action
            })
            .collect();
        assert_eq!(got, want, "irq info flags {info_flags:#x}");
        drop(backend);
        fake.join().unwrap();
    }
}

#[test]
fn reset_is_not_sent_to_a_device_without_reset() {
    let (client, fake) = fake_with_caps(String::new(), |p| {
        let m = p.recv();
        assert_eq!(m.header.command, cmd::DEVICE_GET_INFO);
        let info = wire::DeviceInfo {
            flags: wire::device_flags::PCI,
            num_regions: 9,
            num_irqs: 5,
        }
        .encode();
        p.send(Header::reply(&m.header, info.len()), &info);
        // Nothing else may come: DEVICE_RESET here would fail the test.
        match wire::recv_message(&p.s, MAX_MESSAGE) {
            Err(RecvError::Closed) => {}
            other => panic!("expected the client to close, got {other:?}"),
        }
    });
    let err = client.reset().unwrap_err();
    assert!(matches!(err, ClientError::Unsupported { .. }), "{err}");
    assert_eq!(err.class(), ErrorClass::Device);
    // The device info is remembered: no second DEVICE_GET_INFO.
    assert!(client.reset().is_err());
    drop(client);
    fake.join().unwrap();
}
