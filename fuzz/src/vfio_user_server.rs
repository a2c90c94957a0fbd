//! Target `vfio_user_server`: the vfio-user server ([`serve`]) serving the pci-epf-test
//! device ([`EpfUserDevice`]) to a client that sends fuzz-chosen messages: well framed ones
//! with any header fields and payload, ones whose size field lies, and raw bytes, with
//! memfds and eventfds attached.
//!
//! Invariants, against the harness's own framing of the byte stream it sent:
//! - the server never panics or hangs; it returns `Ok` when the stream ends between whole
//!   messages and `MalformedRequest` when a size is impossible or a message is cut short;
//! - it answers every command that asks for an answer, once, in order, with its message id
//!   and command, and nothing else (replies and other message types get none);
//! - an error reply is only a header (size 16, ERROR flag, a non-zero errno); before a
//!   successful VERSION every other command is refused with EINVAL;
//! - successful replies have the shape their command defines (VERSION with our version and
//!   capabilities, DEVICE_GET_INFO with 9 regions and 5 interrupt indices, REGION_READ with
//!   the requested count of data and the echoed request, REGION_WRITE and DMA_UNMAP echoing
//!   theirs, DMA_MAP only with exactly one fd);
//! - the DMA regions left mapped do not overlap and are exactly those successful DMA_MAPs
//!   created and DMA_UNMAPs did not remove.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::sync::{Arc, Once};

use devices::epf::EpfConfig;
use devices::pci::MappedRegions;
use devices::vfio_user::wire::{
    self, cmd, dma_flags, flags, Capabilities, DeviceInfo, DmaMap, DmaUnmap, Header, RegionAccess,
    Version, HEADER_SIZE, MAX_MESSAGE,
};
use devices::vfio_user::{serve, EpfUserDevice, ServerError};
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::sock_ctrl_msg::ScmSocket;

use crate::{Input, Seed};

/// Bytes of the memfd a DMA_MAP may carry.
pub const MEMFD_LEN: u64 = 64 << 10;

/// A program's writes to a socket and a signal-free socket: libFuzzer's `main` does not
/// ignore SIGPIPE the way a Rust `main` does.
pub fn ignore_sigpipe() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        // SAFETY: setting a signal's disposition to SIG_IGN has no preconditions.
        unsafe { libc::signal(libc::SIGPIPE, libc::SIG_IGN) };
    });
}

/// A memfd of `len` bytes.
pub fn memfd(len: u64) -> OwnedFd {
    // SAFETY: memfd_create with a valid NUL-terminated name; the result is checked.
    let raw = unsafe {
        libc::memfd_create(
            c"vfio-user-fuzz".as_ptr(),
            libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING,
        )
    };
    assert!(raw >= 0, "memfd_create");
    // SAFETY: `raw` is a fresh descriptor we own.
    let fd = unsafe { OwnedFd::from_raw_fd(raw) };
    // SAFETY: ftruncate on our own memfd.
    assert_eq!(unsafe { libc::ftruncate(raw, len as libc::off_t) }, 0);
    // Sealed as the VMM seals guest RAM: servers map nothing else.
    let seals = libc::F_SEAL_SHRINK | libc::F_SEAL_GROW | libc::F_SEAL_SEAL;
    // SAFETY: F_ADD_SEALS on our own memfd takes an int and touches no memory.
    assert_eq!(unsafe { libc::fcntl(raw, libc::F_ADD_SEALS, seals) }, 0);
    fd
}

/// One chunk the client sends: bytes and the fds that go with them.
struct Chunk {
    bytes: Vec<u8>,
    fds: u8,
}

/// A message as the server must frame it.
struct Framed {
    header: Header,
    payload: Vec<u8>,
}

/// Frames `stream` the way the protocol says: the messages, and whether the stream ended
/// cleanly between messages.
fn frame(stream: &[u8]) -> (Vec<Framed>, bool) {
    let mut out = Vec::new();
    let mut at = 0;
    while at < stream.len() {
        let Some(h) = stream.get(at..at + HEADER_SIZE) else {
            return (out, false);
        };
        let header = Header::decode(h.try_into().unwrap());
        let size = header.size as usize;
        if !(HEADER_SIZE..=MAX_MESSAGE).contains(&size) {
            return (out, false);
        }
        let Some(payload) = stream.get(at + HEADER_SIZE..at + size) else {
            return (out, false);
        };
        out.push(Framed {
            header,
            payload: payload.to_vec(),
        });
        at += size;
    }
    (out, true)
}

fn script(input: &mut Input<'_>) -> Vec<Chunk> {
    let mut chunks = Vec::new();
    while !input.is_empty() && chunks.len() < 48 {
        let ctl = input.u8();
        let fds = (ctl >> 2) & 3;
        if ctl & 3 == 3 {
            chunks.push(Chunk {
                bytes: input.long_bytes(4096).to_vec(),
                fds,
            });
            continue;
        }
        let mut header = Header {
            msg_id: input.u16(),
            command: input.u16(),
            size: 0,
            flags: input.u32(),
            error: input.u32(),
        };
        let payload = input.long_bytes(64 << 10);
        header.size = if ctl & 3 == 2 {
            input.u32()
        } else {
            (HEADER_SIZE + payload.len()) as u32
        };
        let mut bytes = header.encode().to_vec();
        bytes.extend_from_slice(payload);
        chunks.push(Chunk { bytes, fds });
    }
    chunks
}

/// Runs one input.
pub fn run(data: &[u8]) {
    ignore_sigpipe();
    let mut input = Input::new(data);
    let chunks = script(&mut input);
    let stream: Vec<u8> = chunks.iter().flat_map(|c| c.bytes.clone()).collect();
    let (messages, clean) = frame(&stream);

    let (client, server_sock) = UnixStream::pair().expect("socketpair");
    let regions = Arc::new(MappedRegions::new());
    let server_regions = regions.clone();
    let server = std::thread::spawn(move || {
        let mut dev = EpfUserDevice::new(EpfConfig::default(), server_regions.clone())
            .expect("the default pci-epf-test device");
        serve(server_sock, &mut dev, server_regions)
    });
    let writer_sock = client.try_clone().expect("socket clone");
    let writer = std::thread::spawn(move || {
        let memfd = memfd(MEMFD_LEN);
        let eventfd = EventFd::new(libc::EFD_NONBLOCK).expect("eventfd");
        for c in &chunks {
            let fds: Vec<RawFd> = match c.fds {
                0 => vec![],
                1 => vec![memfd.as_raw_fd()],
                2 => vec![eventfd.as_raw_fd()],
                _ => vec![memfd.as_raw_fd(), eventfd.as_raw_fd()],
            };
            // The server may have stopped reading (a malformed message): then the rest
            // cannot be sent, which is fine.
            if writer_sock.send_with_fds(&[&c.bytes[..]], &fds).is_err() {
                break;
            }
        }
        let _ = writer_sock.shutdown(std::net::Shutdown::Write);
    });

    let mut replies = Vec::new();
    loop {
        match wire::recv_message(&client, MAX_MESSAGE) {
            Ok(m) => replies.push(m),
            Err(wire::RecvError::Closed) => break,
            // A server that stopped at a malformed message closes with our bytes unread,
            // which the kernel reports as a reset once its replies are read.
            Err(wire::RecvError::Io(e)) if !clean && e.raw_os_error() == Some(libc::ECONNRESET) => {
                break
            }
            Err(e) => panic!("the server's reply stream is malformed: {e}"),
        }
    }
    writer.join().expect("writer thread");
    let result = server.join().expect("the server panicked");
    match (&result, clean) {
        (Ok(()), true) | (Err(ServerError::MalformedRequest { .. }), false) => {}
        _ => panic!("serve returned {result:?} for a stream that is clean: {clean}"),
    }

    let mut replies = replies.into_iter();
    let mut negotiated = false;
    let mut mapped: Vec<(u64, u64)> = Vec::new();
    for m in &messages {
        let h = m.header;
        if h.kind() != flags::TYPE_COMMAND || h.flags & flags::NO_REPLY != 0 {
            // Still acted on; only the state the checks below need is tracked, so a
            // NO_REPLY VERSION or DMA_MAP ends the checks that depend on it.
            if h.kind() == flags::TYPE_COMMAND
                && matches!(h.command, cmd::VERSION | cmd::DMA_MAP | cmd::DMA_UNMAP)
            {
                return;
            }
            continue;
        }
        let r = replies.next().unwrap_or_else(|| {
            panic!(
                "no reply to message {} ({})",
                h.msg_id,
                cmd::name(h.command)
            )
        });
        let rh = r.header;
        assert_eq!(
            (rh.msg_id, rh.command),
            (h.msg_id, h.command),
            "reply order"
        );
        assert_eq!(rh.kind(), flags::TYPE_REPLY);
        assert!(r.fds.is_empty(), "the epf device has no region fds to send");
        if rh.is_error() {
            assert_eq!(
                rh.size as usize, HEADER_SIZE,
                "an error reply carries no payload"
            );
            assert_ne!(rh.error, 0, "an error reply without an errno");
            if !negotiated && h.command != cmd::VERSION {
                assert_eq!(rh.error as i32, libc::EINVAL, "a command before VERSION");
            }
            continue;
        }
        assert_eq!(rh.flags, flags::TYPE_REPLY);
        assert!(
            negotiated || h.command == cmd::VERSION,
            "{} before VERSION",
            cmd::name(h.command)
        );
        let p = &r.payload;
        match h.command {
            cmd::VERSION => {
                let v = Version::decode(p).expect("our VERSION reply decodes");
                assert_eq!(v.major, wire::VERSION_MAJOR);
                assert!(v.minor <= wire::VERSION_MINOR);
                assert_eq!(Capabilities::from_json(&v.json), Ok(Capabilities::ours()));
                negotiated = true;
            }
            cmd::DEVICE_GET_INFO => {
                let info = DeviceInfo::decode(p).expect("DEVICE_GET_INFO reply");
                assert_eq!((info.num_regions, info.num_irqs), (9, 5));
                assert_eq!(p.len(), DeviceInfo::SIZE);
            }
            cmd::REGION_READ => {
                let (req, _) = RegionAccess::decode(&m.payload, "request").unwrap();
                let (echo, data) = RegionAccess::decode(p, "reply").unwrap();
                assert_eq!(echo, req);
                assert_eq!(data.len(), req.count as usize);
            }
            cmd::REGION_WRITE => {
                let (req, data) = RegionAccess::decode(&m.payload, "request").unwrap();
                assert!(data.len() >= req.count as usize);
                let (echo, rest) = RegionAccess::decode(p, "reply").unwrap();
                assert_eq!(echo, req);
                assert!(rest.is_empty());
            }
            cmd::DMA_MAP => {
                let req = DmaMap::decode(&m.payload).unwrap();
                assert!(req.size > 0);
                mapped.push((req.address, req.size));
            }
            cmd::DMA_UNMAP => {
                let req = DmaUnmap::decode(&m.payload).unwrap();
                assert_eq!(p[..], req.encode()[..], "DMA_UNMAP echoes the request");
                if req.flags == dma_flags::UNMAP_ALL {
                    mapped.clear();
                } else {
                    let i = mapped
                        .iter()
                        .position(|&r| r == (req.address, req.size))
                        .expect("DMA_UNMAP of a region that was not mapped succeeded");
                    mapped.remove(i);
                }
            }
            cmd::DEVICE_GET_REGION_INFO
            | cmd::DEVICE_GET_IRQ_INFO
            | cmd::DEVICE_SET_IRQS
            | cmd::DEVICE_RESET => {}
            other => panic!("command {other} ({}) succeeded", cmd::name(other)),
        }
    }
    if clean {
        assert!(replies.next().is_none(), "a reply nobody asked for");
    }
    let mut left = regions.regions();
    for w in left.windows(2) {
        assert!(
            w[0].0 + w[0].1 <= w[1].0,
            "mapped regions overlap: {left:?}"
        );
    }
    left.sort();
    mapped.sort();
    assert_eq!(left, mapped, "mapped regions");
}

/// Encodes one well-framed message for [`run`]'s script.
pub fn message(s: &mut Seed, fds: u8, id: u16, command: u16, payload: &[u8]) {
    s.u8(fds << 2)
        .u16(id)
        .u16(command)
        .u32(flags::TYPE_COMMAND)
        .u32(0);
    s.long_bytes(payload);
}

/// Seeds: a VMM's session (negotiation, info, DMA_MAP, config and BAR accesses that run an
/// epf WRITE into the mapped memory, interrupts, unmap), and some broken streams.
pub fn seeds() -> Vec<(&'static str, Vec<u8>)> {
    use devices::vfio_user::wire::{IrqInfoMsg, IrqSet, RegionInfoMsg};
    use guest_abi::epf::{command, reg};
    let version = Version {
        major: 0,
        minor: 1,
        json: Capabilities::ours().to_json(),
    }
    .encode();
    let region_write = |region: u32, offset: u64, data: &[u8]| {
        RegionAccess {
            offset,
            region,
            count: data.len() as u32,
        }
        .encode(data)
    };
    let map = DmaMap {
        flags: dma_flags::READ | dma_flags::WRITE,
        offset: 0,
        address: 0x10_0000,
        size: MEMFD_LEN,
    }
    .encode();
    let mut out = Vec::new();

    let mut s = Seed::new();
    message(&mut s, 0, 1, cmd::VERSION, &version);
    message(
        &mut s,
        0,
        2,
        cmd::DEVICE_GET_INFO,
        &DeviceInfo::default().encode(),
    );
    let ri = RegionInfoMsg {
        argsz: 1056,
        index: 7,
        ..RegionInfoMsg::default()
    };
    message(&mut s, 0, 3, cmd::DEVICE_GET_REGION_INFO, &ri.encode());
    let ii = IrqInfoMsg {
        index: 1,
        ..IrqInfoMsg::default()
    };
    message(&mut s, 0, 4, cmd::DEVICE_GET_IRQ_INFO, &ii.encode());
    message(&mut s, 1, 5, cmd::DMA_MAP, &map);
    // Bus mastering and memory decode, then an epf WRITE of 4 KiB to the mapped memory.
    message(
        &mut s,
        0,
        6,
        cmd::REGION_WRITE,
        &region_write(7, 4, &6u16.to_le_bytes()),
    );
    for (i, (at, v)) in [
        (reg::DST_ADDR_LO, 0x10_0000u32),
        (reg::DST_ADDR_HI, 0),
        (reg::SIZE, 0x1000),
        (reg::IRQ_TYPE, 1),
        (reg::IRQ_NUMBER, 1),
        (reg::COMMAND, command::WRITE),
    ]
    .into_iter()
    .enumerate()
    {
        message(
            &mut s,
            0,
            7 + i as u16,
            cmd::REGION_WRITE,
            &region_write(0, at, &v.to_le_bytes()),
        );
    }
    let read = RegionAccess {
        offset: reg::STATUS,
        region: 0,
        count: 8,
    }
    .encode(&[]);
    message(&mut s, 0, 20, cmd::REGION_READ, &read);
    let set = IrqSet {
        flags: wire::irq_set::DATA_EVENTFD | wire::irq_set::ACTION_TRIGGER,
        index: 1,
        start: 0,
        count: 1,
        data: Vec::new(),
    };
    message(&mut s, 2, 21, cmd::DEVICE_SET_IRQS, &set.encode());
    let unmap = DmaUnmap {
        flags: 0,
        address: 0x10_0000,
        size: MEMFD_LEN,
    };
    message(&mut s, 0, 22, cmd::DMA_UNMAP, &unmap.encode());
    message(&mut s, 0, 23, cmd::DEVICE_RESET, &[]);
    out.push(("session", s.0));

    // Commands before VERSION, an unknown command, a reply and a NO_REPLY command, then a
    // message whose size lies.
    let mut s = Seed::new();
    message(
        &mut s,
        0,
        1,
        cmd::DEVICE_GET_INFO,
        &DeviceInfo::default().encode(),
    );
    message(&mut s, 0, 2, cmd::VERSION, &version);
    message(&mut s, 0, 3, 99, &[1, 2, 3]);
    s.u8(0)
        .u16(4)
        .u16(cmd::DEVICE_RESET)
        .u32(flags::TYPE_REPLY)
        .u32(0)
        .long_bytes(&[]);
    s.u8(0)
        .u16(5)
        .u16(cmd::DEVICE_RESET)
        .u32(flags::NO_REPLY)
        .u32(0)
        .long_bytes(&[]);
    s.u8(2)
        .u16(6)
        .u16(cmd::REGION_READ)
        .u32(0)
        .u32(0)
        .long_bytes(&read)
        .u32(8);
    out.push(("lies", s.0));

    // DMA_MAP without an fd, with two, overlapping, and UNMAP_ALL; raw garbage last.
    let mut s = Seed::new();
    message(&mut s, 0, 1, cmd::VERSION, &version);
    message(&mut s, 0, 2, cmd::DMA_MAP, &map);
    message(&mut s, 3, 3, cmd::DMA_MAP, &map);
    message(&mut s, 1, 4, cmd::DMA_MAP, &map);
    message(&mut s, 1, 5, cmd::DMA_MAP, &map);
    let all = DmaUnmap {
        flags: dma_flags::UNMAP_ALL,
        address: 0,
        size: 0,
    };
    message(&mut s, 0, 6, cmd::DMA_UNMAP, &all.encode());
    s.u8(3).long_bytes(&[0xff; 20]);
    out.push(("dma-maps", s.0));
    out
}
