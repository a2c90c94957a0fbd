//! Target `vfio_user_client`: the VMM's vfio-user [`Client`] against a scripted server that
//! answers each request with fuzz-chosen messages: replies with the right or a wrong id,
//! command, type and flags, error replies, payloads built from the protocol's structures
//! with fuzz-chosen fields or raw bytes, fds attached, server-initiated commands (DMA_READ
//! and DMA_WRITE mostly aimed at the windows the client mapped), duplicate replies, truncated
//! streams and hang-ups. The client runs a fuzz-chosen sequence of requests (info, region
//! reads and writes, interrupts, DMA map/unmap, reset).
//!
//! The script always answers or hangs up, so:
//! - no request ever times out (every wait ends with a reply, an error or the hang-up);
//! - once a request fails because the connection broke (malformed reply, hang-up), every
//!   later request fails too, without a reply being waited for;
//! - an error reply to the request becomes `Refused` with the errno the server sent;
//! - a server's DMA_READ/DMA_WRITE is served only inside a window of a DMA_MAP the client
//!   sent, with the access it allows, never once the DMA_UNMAP's reply was sent, and a
//!   DMA_READ returns what earlier DMA_WRITEs left in guest RAM (the model in [`dma`]);
//! - a successful REGION_READ returns exactly the data bytes of the replies to it;
//! - `region_info` returns the region asked for, without the CAPS flag, with mmap areas
//!   and an fd only for a mappable region; `irq_info` the index asked for;
//! - nothing panics, whatever the server sends.

use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use devices::vfio::region as region_flags;
use devices::vfio_user::wire::{
    self, cmd, encode_sparse_mmap, flags, Capabilities, DeviceInfo, Header, IrqInfoMsg,
    RegionAccess, RegionInfoMsg, Version, HEADER_SIZE, MAX_MESSAGE,
};
use devices::vfio_user::{Client, ClientError};
use vmm_sys_util::eventfd::EventFd;

use crate::vfio_user_server::{ignore_sigpipe, memfd};
use crate::{Input, Seed};
use dma::{DmaModel, RAM_LEN};

mod dma;

/// Long enough never to fire on a loaded machine: the script always answers or hangs up,
/// so a timeout is a finding (a request that waits for nothing).
const TIMEOUT: Duration = Duration::from_secs(10);

/// A message the scripted server sent.
#[derive(Clone, Debug)]
struct Sent {
    header: Header,
    payload: Vec<u8>,
}

/// What the scripted server puts in a reply to `req` when the script asks for a
/// structured one.
fn structured(s: &mut Input<'_>, req: &wire::Message) -> Vec<u8> {
    match req.header.command {
        cmd::VERSION => {
            let json = match s.u8() % 4 {
                0 => Capabilities::ours().to_json(),
                1 => String::new(),
                2 => format!(
                    r#"{{"capabilities":{{"max_msg_fds":{},"max_data_xfer_size":{},"pgsizes":4096}}}}"#,
                    s.u8() % 4,
                    1u64 << (s.u8() % 34)
                ),
                _ => String::from_utf8_lossy(s.short_bytes(200)).into_owned(),
            };
            Version {
                major: u16::from(s.u8() % 2),
                minor: u16::from(s.u8() % 3),
                json,
            }
            .encode()
        }
        cmd::DEVICE_GET_INFO => DeviceInfo {
            flags: s.u32(),
            num_regions: s.u32(),
            num_irqs: s.u32(),
        }
        .encode(),
        cmd::DEVICE_GET_REGION_INFO => {
            let asked = RegionInfoMsg::decode(&req.payload).unwrap_or_default();
            let areas: Vec<(u64, u64)> = (0..s.u8() % 4).map(|_| (s.u64(), s.u64())).collect();
            let with_cap = s.bool();
            let cap = encode_sparse_mmap(&areas);
            let msg = RegionInfoMsg {
                argsz: match s.u8() % 4 {
                    0 => s.u32(),
                    _ => (RegionInfoMsg::SIZE + if with_cap { cap.len() } else { 0 }) as u32,
                },
                flags: s.u32() & 0xf,
                index: if s.bool() { s.u32() } else { asked.index },
                cap_offset: if s.bool() {
                    u32::from(s.u16())
                } else {
                    RegionInfoMsg::SIZE as u32 * u32::from(with_cap)
                },
                size: s.u64(),
                offset: s.u64(),
            };
            let mut out = msg.encode();
            if with_cap {
                out.extend_from_slice(&cap);
            }
            out
        }
        cmd::REGION_READ | cmd::REGION_WRITE => {
            let (asked, _) = RegionAccess::decode(&req.payload, "request").unwrap_or_default();
            let echo = RegionAccess {
                count: if s.bool() { s.u32() } else { asked.count },
                ..asked
            };
            let data = if req.header.command == cmd::REGION_READ {
                let n = (asked.count as usize).min(1 << 16);
                match s.u8() % 4 {
                    0 => s.bytes(n).to_vec(),
                    1 => vec![0xa5; n.saturating_sub(1)],
                    _ => (0..n).map(|i| i as u8).collect(),
                }
            } else {
                Vec::new()
            };
            echo.encode(&data)
        }
        cmd::DEVICE_GET_IRQ_INFO => {
            let asked = IrqInfoMsg::decode(&req.payload).unwrap_or_default();
            IrqInfoMsg {
                flags: s.u32(),
                index: if s.bool() { s.u32() } else { asked.index },
                count: s.u32(),
            }
            .encode()
        }
        _ => Vec::new(),
    }
}

/// The scripted server: answers every message from the client with the script's next
/// steps; hangs up when the script ends.
fn serve(sock: UnixStream, script: Vec<u8>, sent: Arc<Mutex<Vec<Sent>>>) {
    let mut s = Input::new(&script);
    let memfd = memfd(1 << 16);
    let eventfd = EventFd::new(libc::EFD_NONBLOCK).expect("eventfd");
    let send = |header: Header, payload: &[u8], fd_sel: u8| {
        let fds: Vec<RawFd> = match fd_sel % 8 {
            5 => vec![memfd.as_raw_fd()],
            6 => vec![eventfd.as_raw_fd()],
            7 => vec![memfd.as_raw_fd(), eventfd.as_raw_fd()],
            _ => vec![],
        };
        sent.lock().unwrap().push(Sent {
            header,
            payload: payload.to_vec(),
        });
        wire::send_message(&sock, &header, payload, &fds).is_ok()
    };
    let mut pending: Option<wire::Message> = None;
    let mut dma = DmaModel::default();
    'messages: loop {
        let msg = match wire::recv_message(&sock, MAX_MESSAGE) {
            Ok(m) => m,
            Err(_) => return,
        };
        if msg.header.kind() == flags::TYPE_COMMAND {
            dma.request(&msg);
        } else {
            dma.answered(&msg);
        }
        // A request, or the client's answer to a server command: then the request before
        // it still waits, and replies are built for it.
        if msg.header.kind() == flags::TYPE_COMMAND || pending.is_none() {
            pending = Some(msg);
        }
        let req = pending.as_ref().expect("a request");
        // Steps for this message until one leaves the client something to answer or a
        // reply to deliver.
        for _ in 0..8 {
            if s.is_empty() {
                break 'messages;
            }
            let action = s.u8();
            let fd_sel = s.u8();
            match action % 8 {
                0..=3 => {
                    let id = if action & 0x10 != 0 {
                        s.u16()
                    } else {
                        req.header.msg_id
                    };
                    let command = if action & 0x20 != 0 {
                        s.u16()
                    } else {
                        req.header.command
                    };
                    let (kind_flags, error) = match s.u8() % 8 {
                        0..=4 => (flags::TYPE_REPLY, 0),
                        5 => (flags::TYPE_REPLY | flags::ERROR, u32::from(s.u8())),
                        6 => (flags::TYPE_REPLY | flags::ERROR, s.u32()),
                        _ => (s.u32(), s.u32()),
                    };
                    let payload = if action & 0x40 != 0 {
                        s.long_bytes(4096).to_vec()
                    } else {
                        structured(&mut s, req)
                    };
                    let header = Header {
                        msg_id: id,
                        command,
                        size: (HEADER_SIZE + payload.len()) as u32,
                        flags: kind_flags,
                        error,
                    };
                    dma.sending(&header, &req.header);
                    if !send(header, &payload, fd_sel) {
                        break 'messages;
                    }
                    // A command without NO_REPLY is answered; a NO_REPLY command is not, so
                    // the client still waits for its reply.
                    if header.kind() == flags::TYPE_COMMAND && header.flags & flags::NO_REPLY != 0 {
                        continue;
                    }
                    continue 'messages;
                }
                4 if action & 0x20 != 0 => {
                    let (header, payload) = dma.command(&mut s, action & 0x40 != 0);
                    if !send(header, &payload, fd_sel) {
                        break 'messages;
                    }
                    continue 'messages;
                }
                4 => {
                    let no_reply = action & 0x10 != 0;
                    let header = Header {
                        msg_id: s.u16(),
                        command: s.u16(),
                        size: HEADER_SIZE as u32,
                        flags: flags::TYPE_COMMAND | if no_reply { flags::NO_REPLY } else { 0 },
                        error: 0,
                    };
                    if !send(header, &[], fd_sel) {
                        break 'messages;
                    }
                    if no_reply {
                        continue;
                    }
                    continue 'messages;
                }
                5 => {
                    let raw = s.long_bytes(4096).to_vec();
                    let _ = vmm_sys_util::sock_ctrl_msg::ScmSocket::send_with_fds(
                        &sock,
                        &[&raw[..]],
                        &[],
                    );
                    break 'messages;
                }
                6 => {
                    // A reply and the same reply again.
                    let payload = structured(&mut s, req);
                    let header = Header::reply(&req.header, payload.len());
                    dma.sending(&header, &req.header);
                    for _ in 0..2 {
                        if !send(header, &payload, fd_sel) {
                            break 'messages;
                        }
                    }
                    continue 'messages;
                }
                _ => break 'messages,
            }
        }
        break;
    }
    let _ = sock.shutdown(std::net::Shutdown::Both);
}

/// Whether `e` says the connection is broken (every later request must fail).
fn fatal(e: &ClientError) -> bool {
    match e {
        ClientError::Malformed { .. }
        | ClientError::Disconnected { .. }
        | ClientError::Broken { .. } => true,
        // These leave the stream intact (nothing was sent); the rest break it.
        ClientError::Send { source, .. } => !matches!(
            source.raw_os_error(),
            Some(libc::EBADF | libc::EINVAL | libc::ETOOMANYREFS | libc::EMSGSIZE)
        ),
        _ => false,
    }
}

/// Runs one input.
pub fn run(data: &[u8]) {
    ignore_sigpipe();
    let mut input = Input::new(data);
    let ops_len = usize::from(input.u16());
    let mut ops = Input::new(input.bytes(ops_len));
    let script = input.rest().to_vec();
    let sent: Arc<Mutex<Vec<Sent>>> = Arc::default();
    let (client_sock, server_sock) = UnixStream::pair().expect("socketpair");
    let server_sent = sent.clone();
    let server = std::thread::spawn(move || serve(server_sock, script, server_sent));
    let client = match Client::from_stream(client_sock, "fuzz".into(), TIMEOUT) {
        Ok(c) => Some(c),
        Err(e) => {
            assert!(
                !matches!(e, ClientError::Timeout { .. }),
                "negotiation timed out: {e}"
            );
            None
        }
    };
    if let Some(client) = client {
        exercise(&client, &mut ops, &sent);
    }
    server.join().expect("the scripted server panicked");
}

fn exercise(client: &Client, ops: &mut Input<'_>, sent: &Mutex<Vec<Sent>>) {
    let memfd = Arc::new(std::fs::File::from(memfd(RAM_LEN)));
    let eventfds: Vec<EventFd> = (0..3)
        .map(|_| EventFd::new(libc::EFD_NONBLOCK).expect("eventfd"))
        .collect();
    let mut broken = false;
    let mut n = 0;
    while !ops.is_empty() && n < 64 {
        n += 1;
        let first_sent = sent.lock().unwrap().len();
        let mut empty = false;
        let op = ops.u8() % 9;
        let index = u32::from(ops.u8() % 10);
        let result: Result<(), ClientError> = match op {
            0 => client.device_info().map(|_| ()),
            1 => client.region_info(index).map(|info| {
                assert_eq!(info.index, index);
                assert_eq!(info.flags & wire::REGION_FLAG_CAPS, 0);
                let mmap = info.flags & region_flags::FLAG_MMAP != 0;
                assert!(mmap || (info.mmap_areas.is_empty() && info.mmap_fd.is_none()));
                if let Some((fd, _)) = info.mmap_fd {
                    // The client keeps it open while it lives.
                    // SAFETY: fcntl(F_GETFD) only inspects the descriptor.
                    let flags = unsafe { libc::fcntl(fd, libc::F_GETFD) };
                    assert!(flags >= 0, "region fd closed");
                }
            }),
            2 => {
                let offset = ops.u64();
                let mut buf = vec![0u8; usize::from(ops.u16()) % 4097];
                empty = buf.is_empty();
                client.region_read(index, offset, &mut buf).map(|()| {
                    let replies = sent.lock().unwrap()[first_sent..].to_vec();
                    let data: Vec<u8> = replies
                        .iter()
                        .filter(|m| m.header.command == cmd::REGION_READ && !m.header.is_error())
                        .filter(|m| m.header.kind() == flags::TYPE_REPLY)
                        .filter_map(|m| RegionAccess::decode(&m.payload, "reply").ok())
                        .flat_map(|(echo, d)| d[..d.len().min(echo.count as usize)].to_vec())
                        .collect();
                    // (A duplicate of the last reply may follow.)
                    assert!(
                        data.starts_with(&buf),
                        "region_read returned bytes the server did not send"
                    );
                })
            }
            3 => {
                let offset = ops.u64();
                let data = ops.short_bytes(255).to_vec();
                empty = data.is_empty();
                client.region_write(index, offset, &data)
            }
            4 => client
                .irq_info(index)
                .map(|info| assert_eq!(info.index, index)),
            5 => {
                let fds: Vec<RawFd> = eventfds
                    .iter()
                    .take(usize::from(ops.u8() % 4))
                    .map(|e| e.as_raw_fd())
                    .collect();
                let flags = ops.u32();
                let start = u32::from(ops.u8());
                let count = u32::from(ops.u8() % 4);
                client.set_irqs(index, flags, start, count, &fds)
            }
            6 => {
                let iova = ops.u64();
                let size = ops.u64();
                let off = ops.u64();
                client.dma_map(iova, size, &memfd, off, ops.bool(), ops.bool())
            }
            7 => client.dma_unmap(ops.u64(), ops.u64()),
            _ => client.reset(),
        };
        match &result {
            // Reads and writes of nothing send nothing and succeed.
            Ok(()) => assert!(!broken || empty, "op {op} succeeded on a broken connection"),
            Err(e) => {
                assert!(
                    !matches!(e, ClientError::Timeout { .. }),
                    "op {op} timed out: {e}"
                );
                if broken {
                    // Refused before anything is sent: a bad argument, or one the server's
                    // capabilities or device flags rule out.
                    let invalid = matches!(
                        e,
                        ClientError::Invalid { .. } | ClientError::Unsupported { .. }
                    );
                    assert!(fatal(e) || invalid, "op {op} on a broken connection: {e}");
                }
                if let ClientError::Refused { errno, .. } = e {
                    let replies = sent.lock().unwrap();
                    assert!(
                        replies[first_sent..].iter().any(|m| m.header.is_error()
                            && m.header.kind() == flags::TYPE_REPLY
                            && m.header.error as i32 == *errno),
                        "Refused with errno {errno} the server did not send"
                    );
                }
                broken |= fatal(e);
            }
        }
    }
}

/// Encodes a reply step of [`serve`]'s script: a structured reply with the request's id
/// and command, a success, no fds; `body` is the structured payload's own bytes.
fn reply(s: &mut Seed, body: impl FnOnce(&mut Seed)) {
    s.u8(0).u8(0).u8(0);
    body(s);
}

/// Seeds: a well-behaved server for a VMM's start-up sequence, then servers that refuse,
/// misnumber, send commands and hang up.
pub fn seeds() -> Vec<(&'static str, Vec<u8>)> {
    let mut out = Vec::new();
    let ops = |ops: &[u8]| {
        let mut s = Seed::new();
        s.long_bytes(ops);
        s
    };
    let version = |s: &mut Seed| {
        reply(s, |s| {
            s.u8(0).u8(0).u8(1);
        })
    };

    // device_info, region_info(7), region_read(7, 0, 4), region_write, irq_info(1),
    // set_irqs(1), dma_map, dma_unmap, reset.
    let mut op_bytes = Seed::new();
    op_bytes.u8(0).u8(0);
    op_bytes.u8(1).u8(7);
    op_bytes.u8(2).u8(7).u64(0).u16(4);
    op_bytes.u8(3).u8(7).u64(4).short_bytes(&6u16.to_le_bytes());
    op_bytes.u8(4).u8(1);
    op_bytes.u8(5).u8(1).u8(1).u32(0x24).u8(0).u8(1);
    op_bytes
        .u8(6)
        .u8(0)
        .u64(0x10_0000)
        .u64(1 << 16)
        .u64(0)
        .u8(1)
        .u8(1);
    op_bytes.u8(7).u8(0).u64(0x10_0000).u64(1 << 16);
    op_bytes.u8(8).u8(0);
    let mut s = ops(&op_bytes.0);
    version(&mut s);
    reply(&mut s, |s| {
        s.u32(3).u32(9).u32(5);
    });
    // Region 7: 4 KiB config space, read/write, no caps.
    reply(&mut s, |s| {
        s.u8(0).u8(0).u8(1).u32(3).u8(0).u8(0).u64(4096).u64(0);
    });
    reply(&mut s, |s| {
        s.u8(0).u8(2);
    });
    reply(&mut s, |s| {
        s.u8(0);
    });
    reply(&mut s, |s| {
        s.u32(1).u8(0).u32(32);
    });
    for _ in 0..4 {
        reply(&mut s, |_| {});
    }
    out.push(("startup", s.0));

    // A mappable BAR with a sparse-mmap capability and an fd, then a misnumbered reply.
    let mut op_bytes = Seed::new();
    op_bytes.u8(1).u8(2);
    op_bytes.u8(0).u8(0);
    op_bytes.u8(0).u8(0);
    let mut s = ops(&op_bytes.0);
    version(&mut s);
    s.u8(0).u8(5).u8(0);
    s.u8(2).u64(0).u64(0x1000).u64(0x2000).u64(0x1000);
    s.u8(1).u8(1).u32(7).u8(0).u8(0).u64(0x4000).u64(0);
    s.u8(0x10).u8(0).u16(999).u8(0).u32(0).u32(0).u32(0);
    out.push(("sparse-then-bad-id", s.0));

    // An error reply, a server command (answered), a NO_REPLY command, a duplicate reply.
    let mut op_bytes = Seed::new();
    op_bytes.u8(8).u8(0).u8(8).u8(0).u8(8).u8(0).u8(8).u8(0);
    let mut s = ops(&op_bytes.0);
    version(&mut s);
    s.u8(0).u8(0).u8(5).u8(22);
    s.u8(4).u8(0).u16(7).u16(cmd::DMA_READ);
    reply(&mut s, |_| {});
    s.u8(0x14).u8(0).u16(8).u16(cmd::DMA_WRITE);
    reply(&mut s, |_| {});
    s.u8(6).u8(0);
    out.push(("refusals-and-commands", s.0));

    // DMA windows: the server writes and reads one while its DMA_MAP is in flight, is refused
    // a write to a read-only one, reads one while its DMA_UNMAP is in flight and, after the
    // reply, reads it again (refused) while a device_info waits.
    let mut op_bytes = Seed::new();
    op_bytes
        .u8(6)
        .u8(0)
        .u64(0x10_0000)
        .u64(0x2000)
        .u64(0x1000)
        .u8(1)
        .u8(1);
    op_bytes
        .u8(6)
        .u8(0)
        .u64(0x20_0000)
        .u64(0x1000)
        .u64(0)
        .u8(1)
        .u8(0);
    op_bytes.u8(7).u8(0).u64(0x10_0000).u64(0x2000);
    op_bytes.u8(0).u8(0);
    let mut s = ops(&op_bytes.0);
    version(&mut s);
    let pattern: Vec<u8> = (1..=8).collect();
    // DMA_WRITE: action, fd_sel, id, sel (1: at a window), pick, offset, count, data.
    s.u8(0x64)
        .u8(0)
        .u16(100)
        .u8(1)
        .u8(0)
        .u16(0x10)
        .u16(8)
        .bytes(&pattern);
    s.u8(0x24).u8(0).u16(101).u8(1).u8(0).u16(0x0c).u16(16);
    reply(&mut s, |_| {});
    s.u8(0x64)
        .u8(0)
        .u16(102)
        .u8(1)
        .u8(1)
        .u16(0)
        .u16(4)
        .bytes(&[9; 4]);
    reply(&mut s, |_| {});
    s.u8(0x24).u8(0).u16(103).u8(1).u8(0).u16(0x10).u16(8);
    reply(&mut s, |_| {});
    s.u8(0x24).u8(0).u16(104).u8(0).u8(0).u64(0x10_0010).u16(8);
    reply(&mut s, |s| {
        s.u32(0).u32(9).u32(5);
    });
    out.push(("dma-windows", s.0));

    // Truncated: raw half a header.
    let mut s = ops(&[0, 0]);
    version(&mut s);
    s.u8(5).u8(0).long_bytes(&[1, 0, 4, 0, 0x40]);
    out.push(("hang-up", s.0));
    out
}
