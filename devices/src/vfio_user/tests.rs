//! Client and server against each other over socketpairs, the epf device end to end, the
//! process entry point, and the client against small misbehaving servers written with raw
//! messages.

use std::fs::File;
use std::io::{ErrorKind, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::FileExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use guest_abi::epf::{command, irq_type, reg, status};
use pinning::class::{Classify, ErrorClass};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::server::{serve, UserDevice};
use super::wire::{
    self, cmd, flags, irq_set, Capabilities, Header, Message, RecvError, Version, MAX_MESSAGE,
};
use super::{run_epf_server, Client, ClientError, EpfServerError, EpfUserDevice, ServerError};
use crate::epf::{self, fill_pattern, EpfConfig};
use crate::pci::config::{cap_id, command as cmd_bits, offset as cfg_off};
use crate::pci::dma::MappedRegions;
use crate::vfio::types::{irq, region, IrqInfo, MmapArea, RegionInfo};
use crate::vfio::VfioBackendError;

mod epf_fd;
mod interop;
mod limits;
mod wedge;

const LONG: Duration = Duration::from_secs(10);
const SHORT: Duration = Duration::from_millis(200);
/// Far above SHORT, far below LONG: "quickly" and "within about the timeout".
const PROMPT: Duration = Duration::from_secs(2);

/// A memfd of `len` bytes sealed against shrinking and growing, as a server wants guest RAM.
fn memfd(len: u64) -> File {
    let f = unsealed_memfd(len);
    // SAFETY: F_ADD_SEALS on our own fd takes an int and touches no memory.
    let sealed = unsafe { libc::fcntl(f.as_raw_fd(), libc::F_ADD_SEALS, SEALS) };
    assert_eq!(
        sealed,
        0,
        "F_ADD_SEALS: {}",
        std::io::Error::last_os_error()
    );
    f
}

const SEALS: libc::c_int = libc::F_SEAL_SHRINK | libc::F_SEAL_GROW | libc::F_SEAL_SEAL;

/// A memfd of `len` bytes that takes seals and has none yet.
fn unsealed_memfd(len: u64) -> File {
    // SAFETY: a plain memfd_create call with a valid NUL-terminated name.
    let fd = unsafe { libc::memfd_create(c"vfio-user-test".as_ptr(), libc::MFD_ALLOW_SEALING) };
    assert!(fd >= 0, "memfd_create: {}", std::io::Error::last_os_error());
    // SAFETY: `fd` was just created and is owned by nobody else.
    let f = File::from(unsafe { OwnedFd::from_raw_fd(fd) });
    f.set_len(len).expect("sizing the memfd");
    f
}

/// An epf device served on one end of a socketpair, a client on the other.
struct EpfRig {
    client: Client,
    server: JoinHandle<Result<(), ServerError>>,
    regions: Arc<MappedRegions>,
}

fn epf_rig() -> EpfRig {
    let (a, b) = UnixStream::pair().expect("socketpair");
    let regions = Arc::new(MappedRegions::new());
    let server_regions = regions.clone();
    let server = std::thread::spawn(move || {
        let mut dev = EpfUserDevice::new(EpfConfig::default(), server_regions.clone())
            .expect("the default pci-epf-test device");
        serve(b, &mut dev, server_regions)
    });
    let client = Client::from_stream(a, "epf-test-socket".into(), LONG).expect("client");
    EpfRig {
        client,
        server,
        regions,
    }
}

impl EpfRig {
    fn bar_write(&self, r: u64, v: u32) {
        self.client
            .region_write(region::BAR0, r, &v.to_le_bytes())
            .expect("BAR0 write");
    }

    fn bar_read(&self, r: u64) -> u32 {
        let mut b = [0u8; 4];
        self.client
            .region_read(region::BAR0, r, &mut b)
            .expect("BAR0 read");
        u32::from_le_bytes(b)
    }

    fn cfg_read(&self, at: u64, len: usize) -> Vec<u8> {
        let mut b = vec![0u8; len];
        self.client
            .region_read(region::CONFIG, at, &mut b)
            .expect("config read");
        b
    }

    fn cfg_write(&self, at: u64, data: &[u8]) {
        self.client
            .region_write(region::CONFIG, at, data)
            .expect("config write");
    }

    /// Config offset of capability `id`, walking the list as a driver does.
    fn find_cap(&self, id: u8) -> u64 {
        let mut at = u64::from(self.cfg_read(cfg_off::CAPABILITIES_POINTER as u64, 1)[0]);
        for _ in 0..48 {
            assert_ne!(at, 0, "capability {id:#x} not found");
            let hdr = self.cfg_read(at, 2);
            if hdr[0] == id {
                return at;
            }
            at = u64::from(hdr[1]);
        }
        panic!("capability list loops");
    }

    /// Runs `cmd` with the given transfer registers; returns STATUS.
    fn run(&self, cmd: u32, dst: u64, size: u32, irq_kind: u32, irq_number: u32) -> u32 {
        self.bar_write(reg::DST_ADDR_LO, dst as u32);
        self.bar_write(reg::DST_ADDR_HI, (dst >> 32) as u32);
        self.bar_write(reg::SIZE, size);
        self.bar_write(reg::IRQ_TYPE, irq_kind);
        self.bar_write(reg::IRQ_NUMBER, irq_number);
        self.bar_write(reg::COMMAND, cmd);
        self.bar_read(reg::STATUS)
    }

    fn finish(self) {
        drop(self.client);
        let served = self.server.join().expect("server thread panicked");
        assert!(served.is_ok(), "server ended with {served:?}");
    }
}

fn eventfd_count(e: &EventFd) -> Option<u64> {
    match e.read() {
        Ok(n) => Some(n),
        Err(err) if err.kind() == ErrorKind::WouldBlock => None,
        Err(err) => panic!("reading eventfd: {err}"),
    }
}

#[test]
fn epf_round_trip_over_a_socketpair() {
    let rig = epf_rig();
    let c = &rig.client;

    assert_eq!(
        c.device_info().unwrap(),
        (wire::device_flags::RESET | wire::device_flags::PCI, 9, 5)
    );
    let rw = region::FLAG_READ | region::FLAG_WRITE;
    let cfg = c.region_info(region::CONFIG).unwrap();
    assert_eq!((cfg.index, cfg.flags, cfg.size), (region::CONFIG, rw, 4096));
    assert!(cfg.mmap_fd.is_none() && cfg.mmap_areas.is_empty());
    let bar0 = c.region_info(region::BAR0).unwrap();
    assert_eq!((bar0.flags, bar0.size), (rw, epf::REG_BAR_SIZE));
    assert_eq!(c.region_info(1).unwrap().size, 0);
    assert_eq!(c.region_info(9).unwrap_err().errno(), Some(libc::EINVAL));

    // Identity, whole and in odd pieces.
    let id = rig.cfg_read(0, 4);
    assert_eq!(
        u32::from_le_bytes(id.clone().try_into().unwrap()),
        0xb500_104c
    );
    assert_eq!(rig.cfg_read(2, 2), [0x00, 0xb5]);
    assert_eq!(rig.cfg_read(1, 3), id[1..]);
    // An access past the end is refused, not wrapped.
    let mut b = [0u8; 4];
    let err = c.region_read(region::CONFIG, 4094, &mut b).unwrap_err();
    assert_eq!(err.errno(), Some(libc::EINVAL), "{err}");

    // What the VMM does before the guest runs: decode and bus mastering on.
    let on = cmd_bits::MEMORY_SPACE | cmd_bits::BUS_MASTER;
    rig.cfg_write(cfg_off::COMMAND as u64, &on.to_le_bytes());
    assert_eq!(rig.cfg_read(cfg_off::COMMAND as u64, 2), on.to_le_bytes());

    // Guest RAM: a memfd, mapped at a high IOVA from file offset 0x1000.
    const IOVA: u64 = 0x1_0000_0000;
    const LEN: u64 = 0x10000;
    let ram = Arc::new(memfd(LEN + 0x1000));
    c.dma_map(IOVA, LEN, &ram, 0x1000, true, true).unwrap();
    assert_eq!(rig.regions.regions(), [(IOVA, LEN)]);
    // Mapping over it again is EEXIST, as the spec demands.
    let err = c
        .dma_map(IOVA + 0x1000, 0x1000, &ram, 0, true, true)
        .unwrap_err();
    assert_eq!(err.errno(), Some(libc::EEXIST), "{err}");

    // WRITE 8 KiB at IOVA + 0x100 (not page aligned), then check memory and checksum.
    let dst = IOVA + 0x100;
    let st = rig.run(command::WRITE, dst, 0x2000, irq_type::MSI, 1);
    assert_eq!(
        st & status::WRITE_SUCCESS,
        status::WRITE_SUCCESS,
        "status {st:#x}"
    );
    let mut got = vec![0u8; 0x2000];
    ram.read_exact_at(&mut got, 0x1000 + 0x100).unwrap();
    let mut want = vec![0u8; 0x2000];
    fill_pattern(dst, 0, &mut want);
    assert_eq!(got, want, "memfd does not hold the pattern");
    assert_eq!(rig.bar_read(reg::CHECKSUM), epf::checksum(&want));
    // The bytes just before the transfer are untouched.
    let mut before = [0xaau8; 0x100];
    ram.read_exact_at(&mut before, 0x1000).unwrap();
    assert_eq!(before, [0u8; 0x100]);

    // An IOVA outside every mapping fails the command.
    let st = rig.run(command::WRITE, 0x2_0000_0000, 0x100, irq_type::MSI, 1);
    assert_eq!(st & status::WRITE_SUCCESS, 0, "status {st:#x}");
    assert_eq!(
        st & (status::WRITE_FAIL | status::DST_ADDR_INVALID),
        status::WRITE_FAIL | status::DST_ADDR_INVALID
    );
    // So does one that runs past the end of the mapping.
    let st = rig.run(command::WRITE, IOVA + LEN - 0x10, 0x20, irq_type::MSI, 1);
    assert_ne!(st & status::WRITE_FAIL, 0, "status {st:#x}");

    // MSI-X vector 3 -> an eventfd, once MSI-X is enabled in config space.
    let info = c.irq_info(irq::MSIX).unwrap();
    assert_eq!(info.count, 32);
    assert_ne!(info.flags & wire::irq_info_flags::EVENTFD, 0);
    let efds: Vec<EventFd> = (0..4)
        .map(|_| EventFd::new(EFD_NONBLOCK).unwrap())
        .collect();
    let raw: Vec<RawFd> = efds.iter().map(|e| e.as_raw_fd()).collect();
    c.set_irqs(
        irq::MSIX,
        irq_set::DATA_EVENTFD | irq_set::ACTION_TRIGGER,
        0,
        4,
        &raw,
    )
    .unwrap();
    rig.run(command::RAISE_MSIX_IRQ, 0, 0, irq_type::MSIX, 4);
    assert_eq!(eventfd_count(&efds[3]), None, "MSI-X fired while disabled");
    let msix = rig.find_cap(cap_id::MSIX);
    rig.cfg_write(msix + 2, &(1u16 << 15).to_le_bytes());
    let st = rig.run(command::RAISE_MSIX_IRQ, 0, 0, irq_type::MSIX, 4);
    assert_ne!(st & status::IRQ_RAISED, 0);
    assert_eq!(eventfd_count(&efds[3]), Some(1));
    assert_eq!(eventfd_count(&efds[0]), None, "the wrong vector fired");
    // A transfer's completion interrupt goes to its vector too.
    let st = rig.run(command::WRITE, dst, 0x10, irq_type::MSIX, 1);
    assert_ne!(st & status::WRITE_SUCCESS, 0);
    assert_eq!(eventfd_count(&efds[0]), Some(1));
    // count 0 + DATA_NONE disables the index.
    c.set_irqs(
        irq::MSIX,
        irq_set::DATA_NONE | irq_set::ACTION_TRIGGER,
        0,
        0,
        &[],
    )
    .unwrap();
    rig.run(command::RAISE_MSIX_IRQ, 0, 0, irq_type::MSIX, 4);
    assert_eq!(eventfd_count(&efds[3]), None, "fired after being disabled");
    // Vectors past the device's count are refused.
    let err = c
        .set_irqs(
            irq::MSIX,
            irq_set::DATA_EVENTFD | irq_set::ACTION_TRIGGER,
            31,
            2,
            &raw[..2],
        )
        .unwrap_err();
    assert_eq!(err.errno(), Some(libc::EINVAL), "{err}");

    // After DMA_UNMAP the same command fails.
    c.dma_unmap(IOVA, LEN).unwrap();
    assert!(rig.regions.regions().is_empty());
    let st = rig.run(command::WRITE, dst, 0x2000, irq_type::MSI, 1);
    assert_ne!(st & status::WRITE_FAIL, 0, "status {st:#x}");
    let err = c.dma_unmap(IOVA, LEN).unwrap_err();
    assert_eq!(err.errno(), Some(libc::ENOENT), "{err}");

    // Reset brings the device back to power-on state.
    c.reset().unwrap();
    assert_eq!(rig.cfg_read(cfg_off::COMMAND as u64, 2), [0, 0]);
    rig.finish();
}

#[test]
fn dma_map_without_an_fd_is_refused() {
    // Our client always sends an fd, so speak the wire by hand.
    let regions = Arc::new(MappedRegions::new());
    let (a, b) = UnixStream::pair().unwrap();
    let server_regions = regions.clone();
    let server = std::thread::spawn(move || {
        let mut dev = EpfUserDevice::new(EpfConfig::default(), server_regions.clone())
            .expect("the default pci-epf-test device");
        serve(b, &mut dev, server_regions)
    });
    let raw = RawPeer { s: a };
    raw.negotiate();
    let map = wire::DmaMap {
        flags: 3,
        offset: 0,
        address: 0x10000,
        size: 0x1000,
    }
    .encode();
    raw.send(Header::command(2, cmd::DMA_MAP, map.len()), &map);
    let reply = raw.recv();
    assert_eq!(reply.header.msg_id, 2);
    assert!(reply.header.is_error());
    assert_eq!(reply.header.error as i32, libc::ENOTSUP);
    assert!(regions.regions().is_empty());
    // An unknown command is ENOSYS, and the connection goes on.
    raw.send(Header::command(3, 99, 0), &[]);
    assert_eq!(raw.recv().header.error as i32, libc::ENOSYS);
    // A message that cannot be framed ends the session with an error.
    let mut bad = Header::command(4, cmd::DEVICE_GET_INFO, 0).encode();
    bad[4..8].copy_from_slice(&8u32.to_le_bytes());
    (&raw.s).write_all(&bad).unwrap();
    let served = server.join().unwrap();
    assert!(
        matches!(served, Err(ServerError::MalformedRequest { .. })),
        "{served:?}"
    );
}

#[test]
fn parallel_requests_get_their_own_replies() {
    let rig = epf_rig();
    let ram = Arc::new(memfd(0x100_0000));
    const PER_THREAD: u64 = 32;
    std::thread::scope(|s| {
        for t in 0..4u64 {
            let (c, ram) = (&rig.client, &ram);
            s.spawn(move || {
                for i in 0..PER_THREAD {
                    let n = t * PER_THREAD + i;
                    let iova = 0x4000_0000 + n * 0x10000;
                    c.dma_map(iova, 0x10000, ram, n * 0x10000, true, true)
                        .unwrap_or_else(|e| panic!("thread {t} map {i}: {e}"));
                    // A request that fails must fail in this thread, not another.
                    let err = c
                        .dma_map(iova, 0x1000, ram, 0, true, true)
                        .expect_err("overlapping map succeeded");
                    assert_eq!(err.errno(), Some(libc::EEXIST), "thread {t}: {err}");
                }
            });
        }
        // Interleave another command: a misrouted reply would be noticed as a command
        // mismatch or a wrong value.
        let c = &rig.client;
        s.spawn(move || {
            for _ in 0..64 {
                let mut b = [0u8; 4];
                c.region_read(region::CONFIG, 0, &mut b).unwrap();
                assert_eq!(u32::from_le_bytes(b), 0xb500_104c);
            }
        });
    });
    let mapped = rig.regions.regions();
    assert_eq!(mapped.len(), 4 * PER_THREAD as usize);
    assert!(mapped.iter().all(|&(_, len)| len == 0x10000));
    rig.finish();
}

/// A device with a mappable, sparse BAR and a memfd behind it, to exercise the region-info
/// capability path, including a reply too large for the client's first argsz.
struct SparseDevice {
    backing: File,
    areas: usize,
}

impl UserDevice for SparseDevice {
    fn device_info(&self) -> (u32, u32) {
        (9, 0)
    }
    fn region_info(&self, index: u32) -> Result<RegionInfo, i32> {
        Ok(RegionInfo {
            index,
            flags: region::FLAG_READ | region::FLAG_MMAP,
            size: 0x100_0000,
            mmap_areas: (0..self.areas as u64)
                .map(|i| MmapArea {
                    offset: i * 0x2000,
                    size: 0x1000,
                })
                .collect(),
            mmap_fd: Some((self.backing.as_raw_fd(), 0x5000)),
        })
    }
    fn region_read(&mut self, _: u32, _: u64, _: &mut [u8]) -> Result<(), i32> {
        Err(libc::EIO)
    }
    fn region_write(&mut self, _: u32, _: u64, _: &[u8]) -> Result<(), i32> {
        Err(libc::EIO)
    }
    fn irq_info(&self, _: u32) -> Result<IrqInfo, i32> {
        Err(libc::EINVAL)
    }
    fn set_irqs(&mut self, _: u32, _: u32, _: u32, _: u32, _: Vec<OwnedFd>) -> Result<(), i32> {
        Err(libc::EINVAL)
    }
    fn reset(&mut self) -> Result<(), i32> {
        Ok(())
    }
}

#[test]
fn region_info_passes_the_mmap_fd_and_sparse_areas() {
    for areas in [3usize, 100] {
        let (a, b) = UnixStream::pair().unwrap();
        let backing = memfd(0x1000);
        backing.write_all_at(b"sparse", 0).unwrap();
        let server = std::thread::spawn(move || {
            let mut dev = SparseDevice { backing, areas };
            serve(b, &mut dev, Arc::new(MappedRegions::new()))
        });
        let client = Client::from_stream(a, "sparse".into(), LONG).unwrap();
        let info = client.region_info(2).unwrap();
        assert_eq!(info.flags, region::FLAG_READ | region::FLAG_MMAP);
        assert_eq!(info.mmap_areas.len(), areas);
        assert_eq!(
            info.mmap_areas[areas - 1],
            MmapArea {
                offset: (areas as u64 - 1) * 0x2000,
                size: 0x1000
            }
        );
        let (fd, offset) = info.mmap_fd.expect("no mmap fd");
        assert_eq!(offset, 0x5000);
        // The fd is a working duplicate of the device's memfd, valid while the client lives.
        // SAFETY: the client keeps `fd` open until it is dropped below; ManuallyDrop keeps
        // this File from closing it.
        let f = std::mem::ManuallyDrop::new(unsafe { File::from_raw_fd(fd) });
        let mut b = [0u8; 6];
        f.read_exact_at(&mut b, 0).unwrap();
        assert_eq!(&b, b"sparse");
        drop(client);
        server.join().unwrap().unwrap();
    }
}

/// The raw end of a socketpair: a fake server (or client) speaking messages by hand.
struct RawPeer {
    s: UnixStream,
}

impl RawPeer {
    fn recv(&self) -> Message {
        wire::recv_message(&self.s, MAX_MESSAGE).expect("raw peer: receiving")
    }

    fn send(&self, h: Header, payload: &[u8]) {
        wire::send_message(&self.s, &h, payload, &[]).expect("raw peer: sending");
    }

    fn send_raw(&self, bytes: &[u8]) {
        (&self.s).write_all(bytes).expect("raw peer: sending");
    }

    /// Negotiates as a client that states no capabilities, and checks the server agreed.
    fn negotiate(&self) {
        let v = Version {
            major: 0,
            minor: 1,
            json: String::new(),
        }
        .encode();
        self.send(Header::command(1, cmd::VERSION, v.len()), &v);
        assert!(!self.recv().header.is_error());
    }

    fn answer_version(&self) {
        let m = self.recv();
        assert_eq!(m.header.command, cmd::VERSION);
        let v = Version {
            major: 0,
            minor: 1,
            json: Capabilities::ours().to_json(),
        }
        .encode();
        self.send(Header::reply(&m.header, v.len()), &v);
    }

    /// Keeps the connection open, silent, until the client closes it.
    fn wait_for_close(&self) {
        loop {
            match wire::recv_message(&self.s, MAX_MESSAGE) {
                Ok(_) => continue,
                Err(RecvError::Closed) | Err(RecvError::Io(_)) => return,
                Err(e) => panic!("raw peer: {e}"),
            }
        }
    }
}

/// A client talking to `script` (after VERSION), with request timeout `timeout`.
fn fake_server(
    timeout: Duration,
    script: impl FnOnce(RawPeer) + Send + 'static,
) -> (Client, JoinHandle<()>) {
    let (a, b) = UnixStream::pair().unwrap();
    let fake = std::thread::spawn(move || {
        let peer = RawPeer { s: b };
        peer.answer_version();
        script(peer);
    });
    let client = Client::from_stream(a, "fake.sock".into(), timeout).expect("client");
    (client, fake)
}

fn some_memfd() -> Arc<File> {
    Arc::new(memfd(0x1000))
}

#[test]
fn error_reply_to_dma_map_is_an_error_with_its_errno() {
    let (client, fake) = fake_server(LONG, |p| {
        let m = p.recv();
        assert_eq!(m.header.command, cmd::DMA_MAP);
        assert_eq!(m.fds.len(), 1, "DMA_MAP came without its fd");
        p.send(Header::error_reply(&m.header, libc::ENOSPC), &[]);
        // The connection stays usable after an error reply.
        let m = p.recv();
        assert_eq!(m.header.command, cmd::DEVICE_GET_INFO);
        let info = wire::DeviceInfo {
            flags: 2,
            num_regions: 9,
            num_irqs: 5,
        }
        .encode();
        p.send(Header::reply(&m.header, info.len()), &info);
        p.wait_for_close();
    });
    let f = some_memfd();
    let err = client
        .dma_map(0x1000, 0x1000, &f, 0, true, true)
        .unwrap_err();
    assert_eq!(err.errno(), Some(libc::ENOSPC), "{err}");
    let text = err.to_string();
    assert!(
        text.contains("fake.sock") && text.contains("DMA_MAP"),
        "{text}"
    );
    assert_eq!(client.device_info().unwrap(), (2, 9, 5));
    drop(client);
    fake.join().unwrap();
}

#[test]
fn error_reply_then_silence_times_out_and_then_fails_fast() {
    let (client, fake) = fake_server(SHORT, |p| {
        let m = p.recv();
        p.send(Header::error_reply(&m.header, libc::EFAULT), &[]);
        p.wait_for_close();
    });
    let f = some_memfd();
    let err = client.dma_map(0, 0x1000, &f, 0, true, false).unwrap_err();
    assert_eq!(err.errno(), Some(libc::EFAULT));
    let t = Instant::now();
    let err = client.device_info().unwrap_err();
    let waited = t.elapsed();
    assert!(matches!(err, ClientError::Timeout { .. }), "{err}");
    assert_eq!(err.class(), ErrorClass::Device);
    assert!(waited >= SHORT && waited < PROMPT, "waited {waited:?}");
    // The connection is now considered dead: the next call does not wait again.
    let t = Instant::now();
    let err = client.dma_unmap(0, 0x1000).unwrap_err();
    assert!(t.elapsed() < SHORT / 2, "took {:?}", t.elapsed());
    assert!(matches!(err, ClientError::Broken { .. }), "{err}");
    assert!(err.to_string().contains("no reply"), "{err}");
    drop(client);
    fake.join().unwrap();
}

/// Runs one request against a fake that answers it with `bad` (raw bytes), expects a
/// malformed-reply error promptly, and a fast failure afterwards.
/// `attributed`: the bad reply names the request, so that request gets `Malformed`;
/// otherwise it fails as `Broken` by the malformed message.
fn expect_malformed(
    bad: impl FnOnce(&Header) -> Vec<u8> + Send + 'static,
    expect: &str,
    attributed: bool,
) {
    let (client, fake) = fake_server(LONG, move |p| {
        let m = p.recv();
        p.send_raw(&bad(&m.header));
        p.wait_for_close();
    });
    let t = Instant::now();
    let err = client.device_info().unwrap_err();
    assert!(t.elapsed() < PROMPT, "took {:?}", t.elapsed());
    if attributed {
        assert!(matches!(err, ClientError::Malformed { .. }), "{err}");
    } else {
        assert!(matches!(err, ClientError::Broken { .. }), "{err}");
    }
    assert!(err.to_string().contains(expect), "{err}");
    let t = Instant::now();
    let later = client.reset().unwrap_err();
    assert!(t.elapsed() < PROMPT);
    assert!(matches!(later, ClientError::Broken { .. }), "{later}");
    drop(client);
    fake.join().unwrap();
}

fn header_bytes(h: Header) -> Vec<u8> {
    h.encode().to_vec()
}

#[test]
fn reply_smaller_than_a_header_is_malformed() {
    expect_malformed(
        |h| {
            header_bytes(Header {
                size: 8,
                ..Header::reply(h, 0)
            })
        },
        "smaller than the 16-byte header",
        true,
    );
}

#[test]
fn reply_claiming_4_gib_is_refused_without_allocating_it() {
    expect_malformed(
        |h| {
            header_bytes(Header {
                size: u32::MAX,
                ..Header::reply(h, 0)
            })
        },
        "exceeds the limit",
        true,
    );
}

#[test]
fn reply_of_the_wrong_type_is_malformed() {
    expect_malformed(
        |h| {
            header_bytes(Header {
                flags: 7,
                ..Header::reply(h, 0)
            })
        },
        "has unknown type 7",
        true,
    );
}

#[test]
fn reply_to_an_unknown_msg_id_is_malformed() {
    expect_malformed(
        |h| {
            header_bytes(Header {
                msg_id: h.msg_id.wrapping_add(100),
                ..Header::reply(h, 0)
            })
        },
        "answers no request in flight",
        false,
    );
}

#[test]
fn reply_for_another_command_is_malformed() {
    expect_malformed(
        |h| {
            header_bytes(Header {
                command: cmd::DMA_UNMAP,
                ..Header::reply(h, 0)
            })
        },
        "is for DMA_UNMAP but the request was DEVICE_GET_INFO",
        true,
    );
}

#[test]
fn reply_with_a_short_payload_is_malformed() {
    expect_malformed(
        |h| {
            let mut b = header_bytes(Header::reply(h, 4));
            b.extend_from_slice(&[16, 0, 0, 0]);
            b
        },
        "bytes needed",
        true,
    );
}

#[test]
fn region_read_reply_with_too_little_data_is_malformed() {
    let (client, fake) = fake_server(LONG, |p| {
        let m = p.recv();
        let (req, _) = wire::RegionAccess::decode(&m.payload, "test").unwrap();
        assert_eq!(req.count, 8);
        // Echo count 8 but carry only 4 bytes.
        let payload = req.encode(&[1, 2, 3, 4]);
        p.send(Header::reply(&m.header, payload.len()), &payload);
        p.wait_for_close();
    });
    let mut b = [0u8; 8];
    let err = client.region_read(0, 0, &mut b).unwrap_err();
    assert!(matches!(err, ClientError::Malformed { .. }), "{err}");
    assert_eq!(b, [0; 8], "partial data leaked into the buffer");
    drop(client);
    fake.join().unwrap();
}

#[test]
fn server_closing_mid_request_fails_quickly() {
    let (client, fake) = fake_server(LONG, |p| {
        let _ = p.recv();
        // Half a reply, then gone.
        p.send_raw(
            &header_bytes(Header::reply(
                &Header::command(0, cmd::DEVICE_GET_INFO, 0),
                16,
            ))[..10],
        );
        drop(p);
    });
    let t = Instant::now();
    let err = client.device_info().unwrap_err();
    assert!(t.elapsed() < PROMPT, "took {:?}", t.elapsed());
    assert!(matches!(err, ClientError::Disconnected { .. }), "{err}");
    let t = Instant::now();
    let err = client.device_info().unwrap_err();
    assert!(t.elapsed() < PROMPT);
    assert!(matches!(err, ClientError::Broken { .. }), "{err}");
    fake.join().unwrap();
}

#[test]
fn server_dying_before_version_reply_fails_connect() {
    let (a, b) = UnixStream::pair().unwrap();
    let fake = std::thread::spawn(move || {
        let p = RawPeer { s: b };
        let _ = p.recv();
    });
    let t = Instant::now();
    let err = Client::from_stream(a, "dead".into(), LONG).unwrap_err();
    assert!(t.elapsed() < PROMPT);
    assert!(matches!(err, ClientError::Disconnected { .. }), "{err}");
    fake.join().unwrap();
}

#[test]
fn version_with_another_major_is_refused() {
    let (a, b) = UnixStream::pair().unwrap();
    let fake = std::thread::spawn(move || {
        let p = RawPeer { s: b };
        let m = p.recv();
        let v = Version {
            major: 1,
            minor: 0,
            json: String::new(),
        }
        .encode();
        p.send(Header::reply(&m.header, v.len()), &v);
        p.wait_for_close();
    });
    let err = Client::from_stream(a, "v".into(), LONG).unwrap_err();
    assert!(matches!(err, ClientError::Version { .. }), "{err}");
    assert_eq!(err.class(), ErrorClass::Device);
    assert!(err.to_string().contains("1.0"), "{err}");
    fake.join().unwrap();
}

#[test]
fn unknown_server_commands_are_refused_and_requests_go_on() {
    let (tx, rx) = std::sync::mpsc::channel();
    let (client, fake) = fake_server(LONG, move |p| {
        let m = p.recv();
        // Before answering, the server sends a command only clients send.
        let get_info = wire::DeviceInfo::default().encode();
        p.send(Header::command(77, cmd::DEVICE_GET_INFO, 16), &get_info);
        let refusal = p.recv();
        tx.send(refusal.header).unwrap();
        let info = wire::DeviceInfo::default().encode();
        p.send(Header::reply(&m.header, info.len()), &info);
        p.wait_for_close();
    });
    assert_eq!(client.device_info().unwrap(), (0, 0, 0));
    let refusal = rx.recv_timeout(PROMPT).unwrap();
    assert_eq!(refusal.msg_id, 77);
    assert_eq!(refusal.kind(), flags::TYPE_REPLY);
    assert!(refusal.is_error());
    assert_eq!(refusal.error as i32, libc::ENOTSUP);
    drop(client);
    fake.join().unwrap();
}

#[test]
fn set_irqs_splits_fds_by_the_servers_limit() {
    let (tx, rx) = std::sync::mpsc::channel();
    let (a, b) = UnixStream::pair().unwrap();
    let fake = std::thread::spawn(move || {
        let p = RawPeer { s: b };
        let m = p.recv();
        let caps = Capabilities {
            max_msg_fds: 3,
            ..Capabilities::default()
        };
        let v = Version {
            major: 0,
            minor: 1,
            json: caps.to_json(),
        }
        .encode();
        p.send(Header::reply(&m.header, v.len()), &v);
        for _ in 0..3 {
            let m = p.recv();
            let req = wire::IrqSet::decode(&m.payload).unwrap();
            tx.send((req.start, req.count, m.fds.len())).unwrap();
            p.send(Header::reply(&m.header, 0), &[]);
        }
        p.wait_for_close();
    });
    let client = Client::from_stream(a, "split".into(), LONG).unwrap();
    let efds: Vec<EventFd> = (0..7).map(|_| EventFd::new(0).unwrap()).collect();
    let raw: Vec<RawFd> = efds.iter().map(|e| e.as_raw_fd()).collect();
    client
        .set_irqs(
            irq::MSIX,
            irq_set::DATA_EVENTFD | irq_set::ACTION_TRIGGER,
            1,
            7,
            &raw,
        )
        .unwrap();
    let parts: Vec<_> = (0..3).map(|_| rx.recv_timeout(PROMPT).unwrap()).collect();
    assert_eq!(parts, [(1, 3, 3), (4, 3, 3), (7, 1, 1)]);
    drop(client);
    fake.join().unwrap();
}

#[test]
fn backend_errors_are_the_client_errors_unchanged() {
    let refused = || ClientError::Refused {
        device: "s".into(),
        op: "DMA_MAP".into(),
        errno: libc::EEXIST,
    };
    let backend = VfioBackendError::from(refused());
    assert_eq!(backend.to_string(), refused().to_string());
    assert_eq!(backend.class(), ErrorClass::Device);
    assert!(matches!(
        backend.downcast_ref::<ClientError>(),
        Some(ClientError::Refused {
            errno: libc::EEXIST,
            ..
        })
    ));
}

#[test]
fn no_server_at_the_socket_is_the_user_s_to_fix() {
    let path = socket_path("nobody");
    let err = Client::connect(&path, SHORT).unwrap_err();
    assert!(matches!(err, ClientError::Connect { .. }), "{err}");
    assert_eq!(err.class(), ErrorClass::User);
    assert!(
        err.to_string().contains(&path.display().to_string()),
        "{err}"
    );
}

/// `run_epf_server` owns the process's SIGTERM/SIGINT handlers: one at a time.
static PROCESS_SERVER: Mutex<()> = Mutex::new(());

fn socket_path(tag: &str) -> PathBuf {
    static N: AtomicU32 = AtomicU32::new(0);
    std::env::temp_dir().join(format!(
        "vfio-user-test-{}-{tag}-{}.sock",
        std::process::id(),
        N.fetch_add(1, Ordering::SeqCst)
    ))
}

fn wait_for_path(path: &Path) {
    let t = Instant::now();
    while !path.exists() {
        assert!(t.elapsed() < LONG, "{} never appeared", path.display());
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn spawn_server(path: &Path) -> JoinHandle<Result<(), EpfServerError>> {
    let p = path.to_path_buf();
    std::thread::spawn(move || run_epf_server(&p))
}

#[test]
fn epf_server_process_entry_serves_one_client_and_cleans_up() {
    let _one = PROCESS_SERVER.lock().unwrap_or_else(|e| e.into_inner());
    let path = socket_path("serve");
    // A stale socket file nobody listens on is replaced.
    drop(UnixListener::bind(&path).unwrap());
    assert!(path.exists());
    let server = spawn_server(&path);
    let t = Instant::now();
    let client = loop {
        match Client::connect(&path, LONG) {
            Ok(c) => break c,
            Err(_) if t.elapsed() < LONG => std::thread::sleep(Duration::from_millis(5)),
            Err(e) => panic!("{e}"),
        }
    };
    assert_eq!(client.name(), path.display().to_string());
    let mut id = [0u8; 4];
    client.region_read(region::CONFIG, 0, &mut id).unwrap();
    assert_eq!(u32::from_le_bytes(id), 0xb500_104c);
    drop(client);
    let served = server.join().unwrap();
    assert!(served.is_ok(), "{served:?}");
    assert!(!path.exists(), "socket file left behind");
}

#[test]
fn epf_server_refuses_paths_it_must_not_touch() {
    let _one = PROCESS_SERVER.lock().unwrap_or_else(|e| e.into_inner());
    // A regular file.
    let path = socket_path("file");
    std::fs::write(&path, b"precious").unwrap();
    let err = run_epf_server(&path).unwrap_err();
    assert!(matches!(err, EpfServerError::SocketPath { .. }), "{err}");
    assert_eq!(err.class(), ErrorClass::User);
    assert!(err.to_string().contains("not a socket"), "{err}");
    assert_eq!(std::fs::read(&path).unwrap(), b"precious");
    std::fs::remove_file(&path).unwrap();
    // A live socket.
    let path = socket_path("live");
    let listener = UnixListener::bind(&path).unwrap();
    let err = run_epf_server(&path).unwrap_err();
    assert!(err.to_string().contains("another server"), "{err}");
    assert!(path.exists(), "someone else's socket was removed");
    drop(listener);
    std::fs::remove_file(&path).unwrap();
}

#[test]
fn epf_server_exits_cleanly_on_sigterm() {
    let _one = PROCESS_SERVER.lock().unwrap_or_else(|e| e.into_inner());
    // While waiting for a client.
    let path = socket_path("term-idle");
    let server = spawn_server(&path);
    wait_for_path(&path);
    // SAFETY: sends SIGTERM to this process, whose handler run_epf_server installed before
    // the socket appeared.
    assert_eq!(unsafe { libc::kill(libc::getpid(), libc::SIGTERM) }, 0);
    let served = server.join().unwrap();
    assert!(served.is_ok(), "{served:?}");
    assert!(!path.exists(), "socket file left behind");

    // While serving a client.
    let path = socket_path("term-busy");
    let server = spawn_server(&path);
    wait_for_path(&path);
    let client = Client::connect(&path, LONG).unwrap();
    assert_eq!(client.device_info().unwrap().1, 9);
    // SAFETY: as above.
    assert_eq!(unsafe { libc::kill(libc::getpid(), libc::SIGINT) }, 0);
    let served = server.join().unwrap();
    assert!(served.is_ok(), "{served:?}");
    assert!(!path.exists(), "socket file left behind");
    let t = Instant::now();
    assert!(client.device_info().is_err());
    assert!(t.elapsed() < PROMPT);
}
