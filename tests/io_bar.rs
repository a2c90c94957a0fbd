//! A function whose only BAR is an I/O BAR, served over vfio-user by this project's own
//! server code from a thread of the test: `vmm run --user-device SOCKET` places the BAR in
//! the PCI port window, the probe guest lists the function and reads the value the server
//! put at the BAR's start through an `in` instruction, and the run passes without any
//! pci-epf-test DMA checks. A function the guest is told to expect but does not find fails the
//! run with a line naming it.

use std::os::fd::OwnedFd;
use std::os::unix::net::UnixListener;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use devices::pci::{BarKind, BarSpec, ConfigSpace, MappedRegions, PciHeader};
use devices::vfio::region;
use devices::vfio::{IrqInfo, RegionInfo};
use devices::vfio_user::{serve, UserDevice};
use guest_abi::exit;
use guest_abi::probe::{
    BAR_READ_PREFIX, DMA_SKIPPED_LINE, OPT_EXPECT_PCI, PCI_FUNCTION_PREFIX, RESULT_FAIL_PREFIX,
    RESULT_OK_LINE,
};

mod common;
use common::{stderr, stdout, vmm};

const VENDOR: u16 = 0x1234;
const DEVICE: u16 = 0x10ba;
/// Base class 0x08 (system peripheral), subclass 0x80 (other): what a GPIO block says.
const CLASS: u32 = 0x08_80_00;
const IO_BAR_SIZE: u64 = 0x20;
/// What the function's first register holds: the guest must print exactly this.
const FIRST_DWORD: u32 = 0xb0a7_d00d;

/// Regions and interrupt indices of a VFIO PCI device (BAR0-5, ROM, config, VGA; INTx, MSI,
/// MSI-X, ERR, REQ).
const NUM_REGIONS: u32 = 9;
const NUM_IRQS: u32 = 5;

/// A function with one I/O BAR0 (of [`IO_BAR_SIZE`] ports unless told otherwise), no
/// interrupts, counting BAR0 reads.
struct IoBarFunction {
    config: ConfigSpace,
    regs: Vec<u8>,
    bar_reads: Arc<AtomicUsize>,
}

impl IoBarFunction {
    fn new(size: u64, bar_reads: Arc<AtomicUsize>) -> Self {
        let mut config = ConfigSpace::new(&PciHeader {
            vendor_id: VENDOR,
            device_id: DEVICE,
            class_code: CLASS,
            ..PciHeader::default()
        });
        let io = BarSpec {
            kind: BarKind::Io,
            size,
            prefetchable: false,
        };
        config.add_bar(0, io).unwrap();
        let mut regs = vec![0u8; size as usize];
        regs[..4].copy_from_slice(&FIRST_DWORD.to_le_bytes());
        IoBarFunction {
            config,
            regs,
            bar_reads,
        }
    }

    /// The range `[offset, +len)` of a region of `size` bytes, or EINVAL.
    fn range(size: u64, offset: u64, len: usize) -> Result<std::ops::Range<usize>, i32> {
        match offset.checked_add(len as u64) {
            Some(end) if end <= size => Ok(offset as usize..end as usize),
            _ => Err(libc::EINVAL),
        }
    }
}

impl UserDevice for IoBarFunction {
    fn device_info(&self) -> (u32, u32) {
        (NUM_REGIONS, NUM_IRQS)
    }

    fn region_info(&self, index: u32) -> Result<RegionInfo, i32> {
        let size = match index {
            region::CONFIG => 256,
            0 => self.regs.len() as u64,
            i if i < NUM_REGIONS => 0,
            _ => return Err(libc::EINVAL),
        };
        Ok(RegionInfo::trapped(index, size))
    }

    fn region_read(&mut self, index: u32, offset: u64, data: &mut [u8]) -> Result<(), i32> {
        match index {
            region::CONFIG => {
                Self::range(256, offset, data.len())?;
                self.config.read(offset as usize, data);
            }
            0 => {
                let r = Self::range(self.regs.len() as u64, offset, data.len())?;
                data.copy_from_slice(&self.regs[r]);
                self.bar_reads.fetch_add(1, Ordering::SeqCst);
            }
            _ => return Err(libc::EINVAL),
        }
        Ok(())
    }

    fn region_write(&mut self, index: u32, offset: u64, data: &[u8]) -> Result<(), i32> {
        match index {
            region::CONFIG => {
                Self::range(256, offset, data.len())?;
                // The client writes whole or partial dwords, never across one.
                self.config.write_reg(offset as usize / 4, offset % 4, data);
            }
            0 => {
                let r = Self::range(self.regs.len() as u64, offset, data.len())?;
                self.regs[r].copy_from_slice(data);
            }
            _ => return Err(libc::EINVAL),
        }
        Ok(())
    }

    fn irq_info(&self, index: u32) -> Result<IrqInfo, i32> {
        if index >= NUM_IRQS {
            return Err(libc::EINVAL);
        }
        Ok(IrqInfo {
            index,
            flags: 0,
            count: 0,
        })
    }

    fn set_irqs(&mut self, _: u32, _: u32, _: u32, count: u32, _: Vec<OwnedFd>) -> Result<(), i32> {
        // No vectors: only "disable all" makes sense.
        if count == 0 {
            Ok(())
        } else {
            Err(libc::EINVAL)
        }
    }

    fn reset(&mut self) -> Result<(), i32> {
        self.regs[..4].copy_from_slice(&FIRST_DWORD.to_le_bytes());
        Ok(())
    }
}

/// Listens on `socket` and serves one [`IoBarFunction`] with a BAR0 of `size` ports to one
/// client from a thread; the thread ends when the client disconnects.
fn serve_io_bar_function(
    socket: &std::path::Path,
    size: u64,
) -> (std::thread::JoinHandle<()>, Arc<AtomicUsize>) {
    let listener = UnixListener::bind(socket).unwrap();
    let reads = Arc::new(AtomicUsize::new(0));
    let mut dev = IoBarFunction::new(size, reads.clone());
    let server = std::thread::spawn(move || {
        let (stream, _) = listener.accept().unwrap();
        serve(stream, &mut dev, Arc::new(MappedRegions::new())).unwrap();
    });
    (server, reads)
}

#[test]
fn the_guest_reads_a_value_through_an_io_only_function_over_vfio_user() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("io-bar.sock");
    let (server, reads) = serve_io_bar_function(&socket, IO_BAR_SIZE);
    let expect = format!("{OPT_EXPECT_PCI}={VENDOR:04x}:{DEVICE:04x}");
    let out = vmm()
        .args(["run", "--quiet", "--memory", "256M", "--cmdline", &expect])
        .arg("--user-device")
        .arg(&socket)
        .env("RUST_LOG", "debug")
        .output()
        .unwrap();
    let (serial, log) = (stdout(&out), stderr(&out));
    assert_eq!(out.status.code(), Some(0), "{serial}\n{log}");
    server.join().unwrap();
    // The VMM placed BAR0 at the first port of the PCI I/O window ...
    assert!(
        log.contains("BAR0 (I/O, 0x20 bytes) at 0xc000"),
        "no placement in the log:\n{log}"
    );
    // ... the guest found it there ...
    let listed = format!(
        "{PCI_FUNCTION_PREFIX}00:01.0 {VENDOR:04x}:{DEVICE:04x} class {CLASS:06x} bar0 io 0xc000 size 0x20"
    );
    assert!(serial.lines().any(|l| l == listed), "{serial}");
    // ... and read the server's value through it.
    let read = format!("{BAR_READ_PREFIX}00:01.0 bar0 io 0xc000: {FIRST_DWORD:#x}");
    assert!(serial.lines().any(|l| l == read), "{serial}");
    assert!(reads.load(Ordering::SeqCst) >= 1);
    assert!(serial.lines().any(|l| l == RESULT_OK_LINE), "{serial}");
}

#[test]
fn the_default_command_line_asks_no_dma_checks_of_a_function_that_is_not_a_pci_epf_test() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("io-bar.sock");
    let (server, _) = serve_io_bar_function(&socket, IO_BAR_SIZE);
    let out = vmm()
        .args(["run", "--quiet", "--memory", "256M", "--user-device"])
        .arg(&socket)
        .output()
        .unwrap();
    let serial = stdout(&out);
    assert_eq!(out.status.code(), Some(0), "{serial}\n{}", stderr(&out));
    server.join().unwrap();
    assert!(serial.lines().any(|l| l == DMA_SKIPPED_LINE), "{serial}");
}

#[test]
fn a_function_the_guest_expects_but_does_not_find_fails_the_run_naming_it() {
    let expect = format!("{OPT_EXPECT_PCI}={VENDOR:04x}:{DEVICE:04x}");
    let out = vmm()
        .args(["run", "--quiet", "--memory", "256M", "--cmdline", &expect])
        .output()
        .unwrap();
    let serial = stdout(&out);
    assert_eq!(
        out.status.code(),
        Some(exit::CHECK_FAILED.into()),
        "{serial}"
    );
    let line = format!(
        "{RESULT_FAIL_PREFIX}no pci function {VENDOR:04x}:{DEVICE:04x} on bus 0 ({OPT_EXPECT_PCI})"
    );
    assert!(serial.lines().any(|l| l == line), "{serial}");
}

#[test]
fn an_io_bar_larger_than_the_port_window_is_refused_naming_the_device_and_bar() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("io-bar.sock");
    // 64 KiB: a valid I/O BAR, but the window holds 16 KiB of ports.
    let (server, _) = serve_io_bar_function(&socket, 0x1_0000);
    let out = vmm()
        .args(["run", "--quiet", "--memory", "256M", "--user-device"])
        .arg(&socket)
        .output()
        .unwrap();
    let log = stderr(&out);
    assert_eq!(out.status.code(), Some(2), "{log}");
    server.join().unwrap();
    let want = format!(
        "vmm: {}: BAR0 (0x10000 bytes of I/O space) is larger than the whole pci-io window \
         0xc000..0x10000, so this VMM cannot place it: leave the device out",
        socket.display()
    );
    assert!(log.lines().any(|l| l == want), "{log}");
}
