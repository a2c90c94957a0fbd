//! The pci-epf-test model ([`EpfTest`]) as a vfio-user device, and the process entry point
//! behind `vmm device epf --socket PATH`.
//!
//! Region 7 is configuration space and region 0 the register BAR, both through
//! `PciDevice`; the client (the VMM's passthrough model) writes configuration space through,
//! so the model's own MSI/MSI-X enable checks see what the guest did. Interrupts go to the
//! eventfds the client gave with SET_IRQS; the client traps the MSI-X table itself, so
//! masking is its business and every raised vector is signalled.

use std::fs::File;
use std::io::{self, Write};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicI32, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use pinning::class::{Classify, ErrorClass};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::server::{self, ServerError, UserDevice};
use super::wire::{irq_info_flags, irq_set};
use crate::epf::{EpfConfig, EpfError, EpfIrq, EpfTest, REG_BAR, REG_BAR_SIZE};
use crate::pci::config::CONFIG_SPACE_SIZE;
use crate::pci::device::PciDevice;
use crate::pci::dma::MappedRegions;
use crate::vfio::backend::{irq, region};
use crate::vfio::{IrqInfo, RegionInfo};

/// Regions of a VFIO PCI device: BAR0-5, ROM, config, VGA.
const NUM_REGIONS: u32 = 9;
/// Interrupt indices of a VFIO PCI device: INTx, MSI, MSI-X, ERR, REQ.
const NUM_IRQS: u32 = 5;

/// Eventfds per interrupt index, as the client set them.
#[derive(Default)]
struct IrqFds {
    intx: Vec<Option<File>>,
    msi: Vec<Option<File>>,
    msix: Vec<Option<File>>,
}

impl IrqFds {
    fn slots(&mut self, index: u32) -> Option<&mut Vec<Option<File>>> {
        match index {
            irq::INTX => Some(&mut self.intx),
            irq::MSI => Some(&mut self.msi),
            irq::MSIX => Some(&mut self.msix),
            _ => None,
        }
    }
}

/// Signals an eventfd once. A full counter (EAGAIN on a non-blocking eventfd) means the
/// interrupt is pending already, which is fine.
fn signal(f: &File) {
    let mut f = f;
    if let Err(e) = f.write_all(&1u64.to_ne_bytes()) {
        if e.kind() != io::ErrorKind::WouldBlock {
            tracing::warn!("pci-epf-test: signalling an interrupt eventfd: {e}");
        }
    }
}

/// [`EpfTest`] served over vfio-user.
pub struct EpfUserDevice {
    dev: EpfTest,
    cfg: EpfConfig,
    regions: Arc<MappedRegions>,
    irqs: Arc<Mutex<IrqFds>>,
}

impl std::fmt::Debug for EpfUserDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EpfUserDevice")
            .field("dev", &self.dev)
            .finish_non_exhaustive()
    }
}

impl EpfUserDevice {
    /// A device offering `cfg`'s vectors that does all DMA through `regions` (give the same
    /// object to [`server::serve`]).
    pub fn new(cfg: EpfConfig, regions: Arc<MappedRegions>) -> Result<Self, EpfError> {
        let irqs: Arc<Mutex<IrqFds>> = Arc::default();
        let dev = Self::build(cfg, &regions, &irqs)?;
        let mut me = EpfUserDevice {
            dev,
            cfg,
            regions,
            irqs,
        };
        me.size_irq_tables();
        Ok(me)
    }

    fn build(
        cfg: EpfConfig,
        regions: &Arc<MappedRegions>,
        irqs: &Arc<Mutex<IrqFds>>,
    ) -> Result<EpfTest, EpfError> {
        let sink_irqs = irqs.clone();
        let sink = move |irq: EpfIrq| {
            let fds = sink_irqs.lock().unwrap_or_else(PoisonError::into_inner);
            let slot = match irq {
                EpfIrq::Intx => fds.intx.first(),
                EpfIrq::Msi { vector } => fds.msi.get(usize::from(vector)),
                EpfIrq::Msix { vector } => fds.msix.get(usize::from(vector)),
            };
            match slot.and_then(Option::as_ref) {
                Some(f) => signal(f),
                None => tracing::debug!("pci-epf-test: {irq:?} has no eventfd, dropped"),
            }
        };
        EpfTest::new(cfg, regions.clone(), Box::new(sink))
    }

    fn size_irq_tables(&mut self) {
        let counts = [
            (irq::INTX, 1usize),
            (irq::MSI, usize::from(self.dev.msi().supported_vectors())),
            (irq::MSIX, usize::from(self.dev.msix().num_vectors())),
        ];
        let mut fds = self.irqs.lock().unwrap_or_else(PoisonError::into_inner);
        for (index, n) in counts {
            if let Some(slots) = fds.slots(index) {
                slots.resize_with(n, || None);
            }
        }
    }

    fn vectors(&self, index: u32) -> Option<u32> {
        match index {
            irq::INTX => Some(1),
            irq::MSI => Some(u32::from(self.dev.msi().supported_vectors())),
            irq::MSIX => Some(u32::from(self.dev.msix().num_vectors())),
            // ERR and REQ exist but offer no vectors.
            3 | 4 => Some(0),
            _ => None,
        }
    }

    /// Checks that `[offset, offset + len)` lies inside a region of `size` bytes.
    fn check(size: u64, offset: u64, len: usize) -> Result<(), i32> {
        match offset.checked_add(len as u64) {
            Some(end) if end <= size => Ok(()),
            _ => Err(libc::EINVAL),
        }
    }

    fn config_read(&mut self, offset: u64, data: &mut [u8]) {
        let mut done = 0;
        while done < data.len() {
            let at = offset as usize + done;
            let reg = at / 4;
            let shift = at % 4;
            let n = (4 - shift).min(data.len() - done);
            let value = self.dev.config_read(reg).to_le_bytes();
            data[done..done + n].copy_from_slice(&value[shift..shift + n]);
            done += n;
        }
    }

    /// Config writes go to the model as 4-, 2- or 1-byte accesses inside one dword, the only
    /// shapes `PciDevice::config_write` takes.
    fn config_write(&mut self, offset: u64, data: &[u8]) {
        let mut done = 0;
        while done < data.len() {
            let at = offset as usize + done;
            let left = data.len() - done;
            let n = if at % 4 == 0 && left >= 4 {
                4
            } else if at % 2 == 0 && left >= 2 {
                2
            } else {
                1
            };
            let _ = self
                .dev
                .config_write(at / 4, (at % 4) as u64, &data[done..done + n]);
            done += n;
        }
    }
}

impl UserDevice for EpfUserDevice {
    fn device_info(&self) -> (u32, u32) {
        (NUM_REGIONS, NUM_IRQS)
    }

    fn region_info(&self, index: u32) -> Result<RegionInfo, i32> {
        let rw = region::FLAG_READ | region::FLAG_WRITE;
        let (flags, size) = match index {
            region::CONFIG => (rw, CONFIG_SPACE_SIZE as u64),
            i if i == REG_BAR as u32 => (rw, REG_BAR_SIZE),
            i if i < NUM_REGIONS => (0, 0),
            _ => return Err(libc::EINVAL),
        };
        Ok(RegionInfo {
            index,
            flags,
            size,
            mmap_areas: Vec::new(),
            mmap_fd: None,
        })
    }

    fn region_read(&mut self, index: u32, offset: u64, data: &mut [u8]) -> Result<(), i32> {
        match index {
            region::CONFIG => {
                Self::check(CONFIG_SPACE_SIZE as u64, offset, data.len())?;
                self.config_read(offset, data);
            }
            i if i == REG_BAR as u32 => {
                Self::check(REG_BAR_SIZE, offset, data.len())?;
                self.dev.bar_read(REG_BAR, offset, data);
            }
            _ => Self::check(0, offset, data.len())?,
        }
        Ok(())
    }

    fn region_write(&mut self, index: u32, offset: u64, data: &[u8]) -> Result<(), i32> {
        match index {
            region::CONFIG => {
                Self::check(CONFIG_SPACE_SIZE as u64, offset, data.len())?;
                self.config_write(offset, data);
            }
            i if i == REG_BAR as u32 => {
                Self::check(REG_BAR_SIZE, offset, data.len())?;
                // A command runs inside this write; its interrupt goes to the eventfds.
                let _ = self.dev.bar_write(REG_BAR, offset, data);
            }
            _ => Self::check(0, offset, data.len())?,
        }
        Ok(())
    }

    fn irq_info(&self, index: u32) -> Result<IrqInfo, i32> {
        let count = self.vectors(index).ok_or(libc::EINVAL)?;
        let flags = match index {
            irq::INTX => irq_info_flags::EVENTFD,
            irq::MSI | irq::MSIX => irq_info_flags::EVENTFD | irq_info_flags::NORESIZE,
            _ => 0,
        };
        Ok(IrqInfo {
            index,
            flags,
            count,
        })
    }

    fn set_irqs(
        &mut self,
        index: u32,
        flags: u32,
        start: u32,
        count: u32,
        fds: Vec<OwnedFd>,
    ) -> Result<(), i32> {
        let vectors = self.vectors(index).ok_or(libc::EINVAL)?;
        let data = flags & irq_set::DATA_MASK;
        let action = flags & irq_set::ACTION_MASK_ALL;
        if action != irq_set::ACTION_TRIGGER {
            // INTx here is a pulse that needs no unmask; accept the VMM's resample fd and
            // mask requests so a level-triggered setup works, and ignore them.
            return if index == irq::INTX {
                Ok(())
            } else {
                Err(libc::ENOTSUP)
            };
        }
        let mut table = self.irqs.lock().unwrap_or_else(PoisonError::into_inner);
        let Some(slots) = table.slots(index) else {
            // ERR/REQ: only "disable all" makes sense.
            return if data == irq_set::DATA_NONE && count == 0 {
                Ok(())
            } else {
                Err(libc::EINVAL)
            };
        };
        if data == irq_set::DATA_NONE && count == 0 {
            slots.iter_mut().for_each(|s| *s = None);
            return Ok(());
        }
        let end = start.checked_add(count).ok_or(libc::EINVAL)?;
        if end > vectors {
            return Err(libc::EINVAL);
        }
        let range = start as usize..end as usize;
        match data {
            irq_set::DATA_NONE => {
                // The client fires the vectors itself.
                for f in slots[range].iter().flatten() {
                    signal(f);
                }
            }
            irq_set::DATA_EVENTFD if fds.is_empty() => {
                slots[range].iter_mut().for_each(|s| *s = None);
            }
            irq_set::DATA_EVENTFD => {
                if fds.len() != range.len() {
                    return Err(libc::EINVAL);
                }
                for (slot, fd) in slots[range].iter_mut().zip(fds) {
                    *slot = Some(File::from(fd));
                }
            }
            _ => return Err(libc::ENOTSUP),
        }
        Ok(())
    }

    fn reset(&mut self) -> Result<(), i32> {
        // A fresh model is the reset state; the client's eventfds and DMA mappings stay, as
        // they do across a VFIO device reset.
        self.dev = Self::build(self.cfg, &self.regions, &self.irqs).map_err(|e| {
            tracing::warn!("pci-epf-test: reset: {e}");
            libc::EIO
        })?;
        Ok(())
    }
}

/// Why `vmm device epf --socket PATH` stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum EpfServerError {
    #[error("{}: {what}", .path.display())]
    SocketPath { path: PathBuf, what: String },
    #[error("{}: cannot listen on it: {source}; check that its directory exists and is writable", .socket.display())]
    Bind {
        socket: PathBuf,
        #[source]
        source: io::Error,
    },
    /// The stop eventfd and the signal handlers are process-wide, so one server at a time.
    #[error("{}: another vfio-user epf server already runs in this process", .socket.display())]
    AlreadyRunning { socket: PathBuf },
    #[error("{}: {op}: {source}", .socket.display())]
    Io {
        socket: PathBuf,
        op: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("{}: {source}", .socket.display())]
    Model {
        socket: PathBuf,
        #[source]
        source: EpfError,
    },
    #[error(transparent)]
    Serve(#[from] ServerError),
}

impl Classify for EpfServerError {
    fn class(&self) -> ErrorClass {
        match self {
            EpfServerError::SocketPath { .. } | EpfServerError::Bind { .. } => ErrorClass::User,
            EpfServerError::AlreadyRunning { .. }
            | EpfServerError::Io { .. }
            | EpfServerError::Model { .. } => ErrorClass::Internal,
            EpfServerError::Serve(e) => e.class(),
        }
    }
}

/// The eventfd the signal handler writes; -1 when no server runs.
static STOP_FD: AtomicI32 = AtomicI32::new(-1);

extern "C" fn on_stop_signal(_: libc::c_int) {
    let fd = STOP_FD.load(Ordering::SeqCst);
    if fd >= 0 {
        let one = 1u64.to_ne_bytes();
        // SAFETY: write(2) is async-signal-safe; `one` is a valid 8-byte buffer. The result
        // is ignored: a full counter already means "stop".
        unsafe { libc::write(fd, one.as_ptr().cast(), one.len()) };
    }
}

/// SIGTERM/SIGINT handlers that write the stop eventfd while installed; the previous
/// handlers come back on drop.
struct StopSignals {
    stop: EventFd,
    old: Vec<(libc::c_int, libc::sigaction)>,
}

impl StopSignals {
    fn install(socket: &Path) -> Result<Self, EpfServerError> {
        let io_err = |op: &'static str, source| EpfServerError::Io {
            socket: socket.to_path_buf(),
            op,
            source,
        };
        let stop =
            EventFd::new(EFD_NONBLOCK).map_err(|e| io_err("creating the stop eventfd", e))?;
        if STOP_FD
            .compare_exchange(-1, stop.as_raw_fd(), Ordering::SeqCst, Ordering::SeqCst)
            .is_err()
        {
            return Err(EpfServerError::AlreadyRunning {
                socket: socket.to_path_buf(),
            });
        }
        let mut me = StopSignals {
            stop,
            old: Vec::new(),
        };
        for sig in [libc::SIGTERM, libc::SIGINT] {
            // SAFETY: zeroed sigaction structs are valid (empty mask, no flags); the handler
            // only performs an async-signal-safe write; `old` receives the previous action.
            let res = unsafe {
                let mut act: libc::sigaction = std::mem::zeroed();
                act.sa_sigaction = on_stop_signal as extern "C" fn(libc::c_int) as usize;
                libc::sigemptyset(&mut act.sa_mask);
                let mut old: libc::sigaction = std::mem::zeroed();
                let r = libc::sigaction(sig, &act, &mut old);
                if r == 0 {
                    me.old.push((sig, old));
                }
                r
            };
            if res != 0 {
                return Err(io_err(
                    "installing the SIGTERM/SIGINT handlers",
                    io::Error::last_os_error(),
                ));
            }
        }
        Ok(me)
    }
}

impl Drop for StopSignals {
    fn drop(&mut self) {
        for (sig, old) in self.old.drain(..).rev() {
            // SAFETY: restores the action saved by `install`.
            unsafe { libc::sigaction(sig, &old, std::ptr::null_mut()) };
        }
        STOP_FD.store(-1, Ordering::SeqCst);
    }
}

/// Removes the socket file when the server ends, however it ends (short of SIGKILL).
struct RemoveSocket(PathBuf);

impl Drop for RemoveSocket {
    fn drop(&mut self) {
        if let Err(e) = std::fs::remove_file(&self.0) {
            if e.kind() != io::ErrorKind::NotFound {
                tracing::warn!("removing {}: {e}", self.0.display());
            }
        }
    }
}

/// Makes `socket` free to bind: refuses anything that is not a socket and a socket someone
/// listens on; removes a stale socket file.
fn clear_stale_socket(socket: &Path) -> Result<(), EpfServerError> {
    let refuse = |what: String| EpfServerError::SocketPath {
        path: socket.to_path_buf(),
        what,
    };
    let meta = match std::fs::symlink_metadata(socket) {
        Ok(m) => m,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(refuse(format!("cannot inspect it: {e}"))),
    };
    if !meta.file_type().is_socket() {
        return Err(refuse(
            "exists and is not a socket; refusing to replace it (remove it or choose another path)"
                .to_string(),
        ));
    }
    match UnixStream::connect(socket) {
        Ok(_) => Err(refuse(
            "another server is listening on it; stop it or choose another path".to_string(),
        )),
        Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {
            std::fs::remove_file(socket)
                .map_err(|e| refuse(format!("removing the stale socket: {e}")))?;
            Ok(())
        }
        Err(e) => Err(refuse(format!("probing the existing socket: {e}"))),
    }
}

/// Serves a pci-epf-test device on `socket` to ONE client, until it disconnects or the
/// process gets SIGTERM/SIGINT; the socket file is removed on every way out. Prints one
/// line to stderr once it listens, nothing on stdout.
pub fn run_epf_server(socket: &Path) -> Result<(), EpfServerError> {
    let io_err = |op: &'static str, source| EpfServerError::Io {
        socket: socket.to_path_buf(),
        op,
        source,
    };
    let signals = StopSignals::install(socket)?;
    clear_stale_socket(socket)?;
    let listener = UnixListener::bind(socket).map_err(|source| EpfServerError::Bind {
        socket: socket.to_path_buf(),
        source,
    })?;
    let _remove = RemoveSocket(socket.to_path_buf());
    tracing::info!("vfio-user epf server listening on {}", socket.display());

    let regions = Arc::new(MappedRegions::new());
    let mut device =
        EpfUserDevice::new(EpfConfig::default(), regions.clone()).map_err(|source| {
            EpfServerError::Model {
                socket: socket.to_path_buf(),
                source,
            }
        })?;

    // Accept, unless asked to stop first.
    let mut pfd = [
        libc::pollfd {
            fd: listener.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        },
        libc::pollfd {
            fd: signals.stop.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        },
    ];
    loop {
        // SAFETY: `pfd` is a valid array of two pollfds for the duration of the call.
        let n = unsafe { libc::poll(pfd.as_mut_ptr(), pfd.len() as libc::nfds_t, -1) };
        if n >= 0 {
            break;
        }
        let e = io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::EINTR) {
            return Err(io_err("waiting for a client", e));
        }
    }
    if pfd[1].revents != 0 {
        tracing::info!("vfio-user epf server: stopped before a client connected");
        return Ok(());
    }
    let (stream, _) = listener.accept().map_err(|e| io_err("accepting", e))?;
    drop(listener);
    tracing::info!("vfio-user epf server: client connected");
    // SAFETY: the eventfd lives in `signals` until this function returns, past the borrow.
    let stop = unsafe { std::os::fd::BorrowedFd::borrow_raw(signals.stop.as_raw_fd()) };
    let result = server::serve_until(stream, &mut device, regions, Some(stop));
    tracing::info!("vfio-user epf server: done ({result:?})");
    Ok(result?)
}
