//! What a misbehaving client can make the server hold or wait for is bounded: a client
//! silent mid-message is dropped, DMA regions are capped, fds beyond what a message may carry
//! are refused and closed, an oversized message is refused, and a DMA_MAP of a file its
//! client could still shrink, or of a range past the end of its file, is refused.

use std::sync::mpsc;

use vmm_sys_util::sock_ctrl_msg::ScmSocket;

use super::*;
use crate::vfio_user::server::{serve_with, ServerLimits, MAX_DMA_REGIONS, MESSAGE_TIMEOUT};
use crate::vfio_user::wire::tests::{named_memfd, open_fds_to};

/// An epf device served with `limits` on one end of a socketpair; the server's result comes
/// on the channel (so a test that waits for it can give up instead of hanging).
fn limited_server(limits: ServerLimits) -> (UnixStream, mpsc::Receiver<Result<(), ServerError>>) {
    let (a, b) = UnixStream::pair().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let regions = Arc::new(MappedRegions::new());
        let mut dev = EpfUserDevice::new(EpfConfig::default(), regions.clone()).unwrap();
        let _ = tx.send(serve_with(b, &mut dev, regions, None, limits));
    });
    (a, rx)
}

#[test]
fn the_defaults_are_the_documented_limits() {
    let d = ServerLimits::default();
    assert_eq!(d.message_timeout, Duration::from_secs(10));
    assert_eq!(d.message_timeout, MESSAGE_TIMEOUT);
    assert_eq!(d.max_dma_regions, 65536);
    assert_eq!(d.max_dma_regions, MAX_DMA_REGIONS);
    assert_eq!(d.reply_timeout, Duration::from_secs(10));
}

#[test]
fn a_client_silent_mid_message_is_dropped_within_the_timeout() {
    const TIMEOUT: Duration = Duration::from_millis(300);
    let limits = ServerLimits {
        message_timeout: TIMEOUT,
        ..ServerLimits::default()
    };
    let (a, served) = limited_server(limits);
    let raw = RawPeer { s: a };
    raw.negotiate();
    // Idle between messages, for longer than the timeout: still served.
    std::thread::sleep(TIMEOUT * 2);
    assert!(served.try_recv().is_err(), "an idle client was dropped");
    raw.send(Header::command(2, cmd::DEVICE_GET_INFO, 0), &[]);
    assert!(!raw.recv().header.is_error());
    // Half a header, then nothing.
    let t = Instant::now();
    raw.send_raw(&Header::command(3, cmd::DEVICE_GET_INFO, 0).encode()[..8]);
    let result = served
        .recv_timeout(Duration::from_secs(10))
        .expect("the server still waits for a client that stalled mid-message");
    let waited = t.elapsed();
    assert!(
        waited >= TIMEOUT && waited < PROMPT,
        "gave up after {waited:?}"
    );
    let err = result.unwrap_err();
    assert!(matches!(err, ServerError::Stalled(_)), "{err:?}");
    assert!(
        err.to_string()
            .contains("sent 8 of the 16 bytes of a message and nothing more"),
        "{err}"
    );
    // The connection is closed.
    let mut b = [0u8; 1];
    assert_eq!(std::io::Read::read(&mut &raw.s, &mut b).unwrap(), 0);
}

#[test]
fn a_client_silent_mid_payload_is_dropped_too() {
    const TIMEOUT: Duration = Duration::from_millis(300);
    let limits = ServerLimits {
        message_timeout: TIMEOUT,
        ..ServerLimits::default()
    };
    let (a, served) = limited_server(limits);
    let raw = RawPeer { s: a };
    raw.negotiate();
    // A REGION_WRITE announcing 4 data bytes that never come.
    raw.send_raw(&Header::command(2, cmd::REGION_WRITE, 20).encode());
    raw.send_raw(&[0; 16]);
    let result = served
        .recv_timeout(Duration::from_secs(10))
        .expect("the server still waits for a client that stalled mid-message");
    assert!(matches!(result, Err(ServerError::Stalled(_))), "{result:?}");
}

#[test]
fn dma_maps_beyond_the_cap_are_enospc() {
    let limits = ServerLimits {
        max_dma_regions: 4,
        ..ServerLimits::default()
    };
    let (a, served) = limited_server(limits);
    let client = Client::from_stream(a, "capped".into(), LONG).unwrap();
    let ram = Arc::new(memfd(0x10_0000));
    for i in 0..4u64 {
        client
            .dma_map(i * 0x1_0000, 0x1000, &ram, i * 0x1000, true, true)
            .unwrap();
    }
    let err = client
        .dma_map(0x10_0000, 0x1000, &ram, 0, true, true)
        .unwrap_err();
    assert_eq!(err.errno(), Some(libc::ENOSPC), "{err}");
    // Room again once one is unmapped; the connection went on.
    client.dma_unmap(0, 0x1000).unwrap();
    client
        .dma_map(0x10_0000, 0x1000, &ram, 0, true, true)
        .unwrap();
    drop(client);
    served.recv_timeout(LONG).unwrap().unwrap();
}

#[test]
fn dma_maps_of_unsealed_or_too_small_files_are_refused_and_map_nothing() {
    let rig = epf_rig();
    let c = &rig.client;
    // A client that can still shrink its file could make the device's next DMA a SIGBUS.
    let unsealed = Arc::new(unsealed_memfd(0x2000));
    let err = c
        .dma_map(0x10_0000, 0x1000, &unsealed, 0, true, true)
        .unwrap_err();
    assert_eq!(err.errno(), Some(libc::EPERM), "{err}");
    assert!(
        err.to_string().contains("sealed against shrinking"),
        "{err}"
    );
    // Sealed, but the range runs past the end of the file.
    let small = Arc::new(memfd(0x1000));
    for (len, offset) in [(0x2000, 0), (0x1000, 0x1000)] {
        let err = c
            .dma_map(0x10_0000, len, &small, offset, true, true)
            .unwrap_err();
        assert_eq!(
            err.errno(),
            Some(libc::EINVAL),
            "{len:#x} at {offset:#x}: {err}"
        );
        assert!(err.to_string().contains("past the end"), "{err}");
    }
    assert!(rig.regions.regions().is_empty());
    // The connection goes on: a sealed file of the right size maps.
    c.dma_map(0x10_0000, 0x1000, &small, 0, true, true).unwrap();
    assert_eq!(rig.regions.regions(), [(0x10_0000, 0x1000)]);
}

/// Sends `msg` with `fds` attached (all with its first byte).
fn send_with(raw: &RawPeer, msg: &[u8], fds: &[RawFd]) {
    assert_eq!(raw.s.send_with_fds(&[msg], fds).unwrap(), msg.len());
}

fn message(h: Header, payload: &[u8]) -> Vec<u8> {
    let mut m = h.encode().to_vec();
    m.extend_from_slice(payload);
    m
}

#[test]
fn fds_beyond_what_a_message_may_carry_are_refused_and_closed() {
    let name = "server-extra-fds";
    let (a, served) = limited_server(ServerLimits::default());
    let raw = RawPeer { s: a };
    raw.negotiate();
    let marked = named_memfd(name);
    let fd = marked.as_raw_fd();
    let ram = some_memfd();

    // A command that takes no fd, with one.
    send_with(
        &raw,
        &message(Header::command(2, cmd::DEVICE_GET_INFO, 0), &[]),
        &[fd],
    );
    let reply = raw.recv();
    assert_eq!((reply.header.msg_id, reply.header.is_error()), (2, true));
    assert_eq!(reply.header.error as i32, libc::EINVAL);

    // DMA_MAP with two: refused, and nothing mapped.
    let map = wire::DmaMap {
        flags: 3,
        offset: 0,
        address: 0x10000,
        size: 0x1000,
    }
    .encode();
    send_with(
        &raw,
        &message(Header::command(3, cmd::DMA_MAP, map.len()), &map),
        &[ram.as_raw_fd(), fd],
    );
    assert_eq!(raw.recv().header.error as i32, libc::EINVAL);

    // SET_IRQS whose fds come with three parts, 90 in all: more than a message may carry.
    let set = wire::IrqSet {
        flags: irq_set::DATA_EVENTFD | irq_set::ACTION_TRIGGER,
        index: irq::MSIX,
        start: 0,
        count: 90,
        data: Vec::new(),
    }
    .encode();
    let m = message(Header::command(4, cmd::DEVICE_SET_IRQS, set.len()), &set);
    send_with(&raw, &m[..10], &[fd; 30]);
    send_with(&raw, &m[10..20], &[fd; 30]);
    send_with(&raw, &m[20..], &[fd; 30]);
    let reply = raw.recv();
    assert_eq!(reply.header.msg_id, 4);
    assert_eq!(reply.header.error as i32, libc::EINVAL);

    // The connection goes on, and none of those descriptors stayed open in the server.
    raw.send(Header::command(5, cmd::DEVICE_GET_INFO, 0), &[]);
    assert!(!raw.recv().header.is_error());
    drop(marked);
    assert_eq!(
        open_fds_to(name),
        0,
        "descriptors the client sent stayed open"
    );
    drop(raw);
    served.recv_timeout(LONG).unwrap().unwrap();
}

#[test]
fn an_oversized_message_gets_an_error_reply_and_ends_the_connection() {
    let (a, served) = limited_server(ServerLimits::default());
    let raw = RawPeer { s: a };
    raw.negotiate();
    let mut h = Header::command(9, cmd::REGION_WRITE, 0);
    h.size = u32::MAX;
    raw.send_raw(&h.encode());
    let reply = raw.recv();
    assert_eq!((reply.header.msg_id, reply.header.is_error()), (9, true));
    assert_eq!(reply.header.error as i32, libc::E2BIG);
    let result = served.recv_timeout(LONG).unwrap();
    assert!(
        matches!(result, Err(ServerError::MalformedRequest { .. })),
        "{result:?}"
    );
}

#[test]
fn a_4_gib_epf_transfer_does_not_hold_region_write() {
    use crate::pci::dma::DmaProt;
    const BIG: u64 = 0x1_0000_0000;
    // Guest memory the server maps itself (anonymous, never touched: reading it maps the zero
    // page, so the transfer costs time, not memory).
    let regions = Arc::new(MappedRegions::new());
    regions
        .insert_anonymous(BIG, 1 << 32, DmaProt::READ_ONLY)
        .unwrap();
    let (a, b) = UnixStream::pair().unwrap();
    let server_regions = regions.clone();
    let server = std::thread::spawn(move || {
        let mut dev = EpfUserDevice::new(EpfConfig::default(), server_regions.clone()).unwrap();
        serve(b, &mut dev, server_regions)
    });
    let rig = EpfRig {
        client: Client::from_stream(a, "epf-big".into(), LONG).unwrap(),
        server,
        regions,
    };
    let on = cmd_bits::MEMORY_SPACE | cmd_bits::BUS_MASTER;
    rig.cfg_write(cfg_off::COMMAND as u64, &on.to_le_bytes());
    rig.bar_write(reg::SRC_ADDR_LO, BIG as u32);
    rig.bar_write(reg::SRC_ADDR_HI, (BIG >> 32) as u32);
    rig.bar_write(reg::SIZE, u32::MAX);
    rig.bar_write(reg::IRQ_TYPE, irq_type::MSI);
    rig.bar_write(reg::IRQ_NUMBER, 1);
    let t = Instant::now();
    rig.bar_write(reg::COMMAND, command::READ);
    let took = t.elapsed();
    assert!(
        took < Duration::from_millis(500),
        "REGION_WRITE took {took:?}"
    );
    // The server answers while the transfer runs: it is not done yet.
    let t = Instant::now();
    assert_eq!(rig.bar_read(reg::STATUS), 0);
    assert!(t.elapsed() < Duration::from_millis(500));
    // A reset stops it promptly.
    let t = Instant::now();
    rig.client.reset().unwrap();
    assert!(
        t.elapsed() < Duration::from_millis(500),
        "reset took {:?}",
        t.elapsed()
    );
    rig.finish();
}
