//! Boots hand-assembled guests through the real KVM path: loader, register setup, vCPU
//! threads, buses, devices, exit handling. Guest code is a few instructions: under this
//! project's emulated nested KVM every guest instruction is slow.

use std::borrow::Cow;
use std::sync::Arc;
use std::time::{Duration, Instant};

use devices::serial::SharedBuffer;
use devices::GuestMarks;
use vmm_sys_util::eventfd::EventFd;

use super::*;
use crate::arch::x86_64::regs::EntryMode;
use crate::builder::{self, VmConfig};
use crate::loader::tests::{tiny_bzimage, tiny_elf};
use crate::loader::{BootProtocol, BootSetup, ImageSource, KernelFormat};
use crate::memory::layout::MIB;
use crate::memory::{Backing, GuestMemory, MemoryLayout, MemorySpec};
use crate::passthrough::Failure;
use crate::pin::PinChoice;
use crate::platform::{Platform, SerialIn, SerialOut};
use crate::vstate::pause::PauseGate;
use crate::vstate::vcpu::{self, Vcpu};
use crate::vstate::vm::Vm;

/// 64-bit: 'K' to COM1, ready mark, exit status 7, hlt.
const GUEST64: &[u8] = &[
    0x66, 0xba, 0xf8, 0x03, // mov dx, 0x3f8
    0xb0, b'K', // mov al, 'K'
    0xee, // out dx, al
    0x66, 0xba, 0x40, 0x04, // mov dx, 0x440
    0xb0, 0x01, // mov al, 1 (ready)
    0xee, // out dx, al
    0x66, 0xba, 0xf4, 0x00, // mov dx, 0xf4
    0xb0, 0x07, // mov al, 7
    0xee, // out dx, al
    0xf4, // hlt
];

/// 32-bit PVH: first byte of hvm_start_info (at EBX) and 'P' to COM1, ready mark, cli; hlt.
const GUEST_PVH: &[u8] = &[
    0x66, 0xba, 0xf8, 0x03, // mov dx, 0x3f8
    0x8a, 0x03, // mov al, [ebx]
    0xee, // out dx, al
    0xb0, b'P', // mov al, 'P'
    0xee, // out dx, al
    0x66, 0xba, 0x40, 0x04, // mov dx, 0x440
    0xb0, 0x01, // mov al, 1
    0xee, // out dx, al
    0xfa, // cli
    0xf4, // hlt
];

/// 64-bit, bzImage entry: type_of_loader from the zero page (RSI) to COM1, exit status 3.
const GUEST_BZ: &[u8] = &[
    0x66, 0xba, 0xf8, 0x03, // mov dx, 0x3f8
    0x8a, 0x86, 0x10, 0x02, 0x00, 0x00, // mov al, [rsi + 0x210]
    0xee, // out dx, al
    0x66, 0xba, 0xf4, 0x00, // mov dx, 0xf4
    0xb0, 0x03, // mov al, 3
    0xee, // out dx, al
    0xf4, // hlt
];

const PVH_OFFSET: usize = 0x100;
pub(crate) const LOAD_ADDR: u64 = 0x10_0000;

/// An ELF holding both guests, like the probe guest: 64-bit entry at 1 MiB, PVH entry 0x100
/// bytes later.
fn dual_entry_elf() -> Vec<u8> {
    let mut code = GUEST64.to_vec();
    code.resize(PVH_OFFSET, 0xf4);
    code.extend_from_slice(GUEST_PVH);
    tiny_elf(
        &code,
        LOAD_ADDR,
        Some((LOAD_ADDR + PVH_OFFSET as u64) as u32),
    )
}

/// A 64 MiB guest of `kernel` on `cpus` vCPUs, its serial output into `out`.
pub(crate) fn config(
    kernel: Vec<u8>,
    protocol: BootProtocol,
    cpus: u8,
    out: &SharedBuffer,
) -> VmConfig {
    VmConfig {
        layout: MemoryLayout::new(64 * MIB).unwrap(),
        cpus,
        guest_numa: None,
        memory: MemorySpec::new(Backing::Anon),
        zone_memory: vec![MemorySpec::new(Backing::Anon)],
        zones: Vec::new(),
        numa: Vec::new(),
        backing_reason: "test".into(),
        kernel: ImageSource::Bytes {
            name: "test guest".into(),
            data: Cow::Owned(kernel),
        },
        initrd: None,
        cmdline: "console=ttyS0".into(),
        boot_protocol: protocol,
        serial_out: SerialOut::Buffer(out.clone()),
        serial_buffer: crate::platform::DEFAULT_BUFFER_BYTES,
        serial_in: SerialIn::None,
        devices: Default::default(),
        pin: PinChoice::Auto,
        pin_options: Default::default(),
        test_faults: Vec::new(),
        timeout: None,
        seccomp: Default::default(),
    }
}

/// A VM put together by the builder's stages up to `vcpus` (no passthrough device, nothing
/// pinned), ready to run.
struct TestVm {
    vcpus: Vec<Vcpu>,
    boot: BootSetup,
    platform: Platform,
    vm: Vm,
    _memory: GuestMemory,
}

impl TestVm {
    fn build(cfg: &VmConfig, marks: &Arc<GuestMarks>) -> Self {
        let (vm, memory, platform) = platform(cfg, marks);
        let boot = builder::load(cfg, &memory, &platform).unwrap();
        let vcpus = vcpu::create_all(&vm, cfg.cpus, &boot).unwrap();
        TestVm {
            vcpus,
            boot,
            platform,
            vm,
            _memory: memory,
        }
    }

    fn run(self, deadline: Option<Instant>) -> VmExit {
        let TestVm {
            vcpus,
            mut platform,
            vm,
            ..
        } = self;
        run_until_exit(
            vcpus,
            &mut platform,
            vm.exit(),
            deadline,
            None,
            &Arc::new(PauseGate::default()),
        )
        .unwrap()
    }
}

/// Stages `kvm`, `memory` and `devices` (no passthrough device asked for).
fn platform(cfg: &VmConfig, marks: &Arc<GuestMarks>) -> (Vm, GuestMemory, Platform) {
    let vm = Vm::new(cfg.cpus).unwrap();
    let memory = builder::memory(&vm, &cfg.layout, &cfg.zone_memory).unwrap();
    let (platform, passthrough) = builder::devices(&vm, cfg, marks, &Failure::default()).unwrap();
    assert!(passthrough.names.is_empty());
    (vm, memory, platform)
}

fn boot(cfg: &VmConfig) -> (TestVm, Arc<GuestMarks>) {
    let marks = Arc::new(GuestMarks::new(Instant::now()));
    (TestVm::build(cfg, &marks), marks)
}

fn deadline(secs: u64) -> Option<Instant> {
    Some(Instant::now() + Duration::from_secs(secs))
}

#[test]
fn long_mode_guest_prints_marks_ready_and_exits_7() {
    let out = SharedBuffer::new();
    let cfg = config(dual_entry_elf(), BootProtocol::Linux64, 1, &out);
    let (vm, marks) = boot(&cfg);
    assert_eq!(vm.boot.mode, EntryMode::Linux64);
    let exit = vm.run(deadline(60));
    assert!(matches!(exit, VmExit::GuestExit(7)), "{exit}");
    assert_eq!(out.contents(), b"K");
    let (first, ready) = (marks.first_output().unwrap(), marks.ready().unwrap());
    assert!(
        first <= ready,
        "first output {first:?} after ready {ready:?}"
    );
    eprintln!("64-bit guest: first output {first:?}, ready {ready:?}, exit {exit}");
}

#[test]
fn pvh_guest_sees_start_info_in_ebx_and_halt_is_reported() {
    let out = SharedBuffer::new();
    let cfg = config(dual_entry_elf(), BootProtocol::Auto, 1, &out);
    let (vm, marks) = boot(&cfg);
    assert_eq!(vm.boot.mode, EntryMode::Pvh);
    let exit = vm.run(deadline(60));
    assert!(matches!(exit, VmExit::Halted { cpu: 0 }), "{exit}");
    // 0x78: low byte of the hvm_start_info magic 0x336ec578.
    assert_eq!(out.contents(), [0x78, b'P']);
    assert!(marks.ready().is_some());
    eprintln!("PVH guest: exit {exit}, ready {:?}", marks.ready());
}

#[test]
fn bzimage_guest_reads_its_zero_page() {
    let out = SharedBuffer::new();
    let cfg = config(tiny_bzimage(GUEST_BZ, 2047), BootProtocol::Auto, 1, &out);
    let (vm, _marks) = boot(&cfg);
    assert_eq!(vm.boot.format, KernelFormat::BzImage);
    let exit = vm.run(deadline(60));
    assert!(matches!(exit, VmExit::GuestExit(3)), "{exit}");
    assert_eq!(out.contents(), [0xff], "type_of_loader read through RSI");
}

#[test]
fn two_cpus_boot_and_stop_cleanly() {
    let out = SharedBuffer::new();
    let cfg = config(dual_entry_elf(), BootProtocol::Linux64, 2, &out);
    let (vm, _marks) = boot(&cfg);
    let exit = vm.run(deadline(60));
    // The AP never got a SIPI; it was parked in KVM_RUN and had to be kicked out.
    assert!(matches!(exit, VmExit::GuestExit(7)), "{exit}");
}

#[test]
fn triple_fault_is_reported_with_rip() {
    let out = SharedBuffer::new();
    // ud2 with a zero-limit IDT: #UD -> #GP -> #DF -> triple fault.
    let cfg = config(
        tiny_elf(&[0x0f, 0x0b], LOAD_ADDR, None),
        BootProtocol::Auto,
        1,
        &out,
    );
    let (vm, _marks) = boot(&cfg);
    let exit = vm.run(deadline(60));
    eprintln!("ud2 guest: {exit}");
    match exit {
        VmExit::Fault(crate::vstate::vcpu::VcpuFault::Shutdown { cpu: 0, .. }) => {}
        other => panic!("expected a shutdown fault, got {other}"),
    }
}

#[test]
fn deadline_and_stop_handle_end_a_spinning_guest() {
    // jmp $
    let spin = || tiny_elf(&[0xeb, 0xfe], LOAD_ADDR, None);
    let out = SharedBuffer::new();
    let (vm, _) = boot(&config(spin(), BootProtocol::Auto, 1, &out));
    let t = Instant::now();
    let exit = vm.run(Some(Instant::now() + Duration::from_millis(300)));
    assert!(matches!(exit, VmExit::Timeout), "{exit}");
    assert!(
        t.elapsed() < Duration::from_secs(10),
        "stopping took {:?}",
        t.elapsed()
    );

    let (vm, _) = boot(&config(spin(), BootProtocol::Auto, 1, &out));
    let stop = vm.vm.stop_handle();
    let stopper = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(200));
        stop.request(devices::ExitReason::Signal(libc::SIGTERM));
    });
    let exit = vm.run(deadline(60));
    stopper.join().unwrap();
    assert!(matches!(exit, VmExit::Signal(libc::SIGTERM)), "{exit}");
}

#[test]
fn a_vcpu_count_kvm_cannot_give_is_refused_with_the_range() {
    let err = Vm::new(0).err().unwrap();
    assert!(err.to_string().starts_with("0 vCPUs requested"), "{err}");
    assert_eq!(pinning::Classify::class(&err), pinning::ErrorClass::User);
}

/// The probe guest from resources/, through both entries. It checks the E820 total, the MP
/// table's CPU count, the initrd and memory spread over all of RAM, then exits with status 0.
fn boot_probe(
    protocol: BootProtocol,
    mem_size: u64,
    cpus: u8,
    initrd: Option<Vec<u8>>,
    cmdline: &str,
) -> (VmExit, String, Arc<GuestMarks>) {
    assert!(
        !vmm_resources::PROBE_GUEST.is_empty(),
        "resources/ did not build the probe guest"
    );
    let out = SharedBuffer::new();
    let mut cfg = config(vmm_resources::PROBE_GUEST.to_vec(), protocol, cpus, &out);
    cfg.cmdline = cmdline.into();
    cfg.initrd = initrd.map(|data| ImageSource::Bytes {
        name: "test initrd".into(),
        data: Cow::Owned(data),
    });
    cfg.layout = MemoryLayout::new(mem_size).unwrap();
    let (vm, marks) = boot(&cfg);
    let exit = vm.run(deadline(120));
    let text = String::from_utf8_lossy(&out.contents()).into_owned();
    (exit, text, marks)
}

#[test]
fn probe_guest_boots_through_the_64bit_entry_with_two_cpus() {
    let (exit, text, marks) = boot_probe(
        BootProtocol::Linux64,
        256 * MIB,
        2,
        None,
        "probe.expect_mem=255 probe.expect_cpus=2",
    );
    eprintln!("{text}");
    assert!(matches!(exit, VmExit::GuestExit(0)), "{exit}\n{text}");
    assert!(text.contains("probe: hello (entry=linux64)"), "{text}");
    assert!(text.contains("probe: cpus 2 (mp table)"), "{text}");
    assert!(text.contains("probe: result ok"), "{text}");
    assert!(marks.ready().is_some() && marks.first_output().is_some());
    assert!(marks
        .other_marks()
        .iter()
        .any(|m| m.byte == guest_abi::marks::ENTRY));
}

#[test]
fn probe_guest_boots_through_pvh_with_6g_and_an_initrd() {
    let initrd: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
    let sum: u32 = initrd
        .iter()
        .map(|&b| u32::from(b))
        .fold(0u32, u32::wrapping_add);
    let (exit, text, _marks) = boot_probe(
        BootProtocol::Auto,
        6 * crate::memory::layout::GIB,
        1,
        Some(initrd),
        "probe.expect_mem=6143 probe.expect_cpus=1",
    );
    eprintln!("{text}");
    assert!(matches!(exit, VmExit::GuestExit(0)), "{exit}\n{text}");
    assert!(text.contains("probe: hello (entry=pvh)"), "{text}");
    assert!(
        text.contains(&format!("100000 bytes, sum {sum:#x}")),
        "{text}"
    );
    assert!(text.contains("probe: result ok"), "{text}");
}

/// Tier 3 (slow): a real Linux bzImage reaches its banner. Under this project's emulated KVM
/// the decompressor alone takes ~40 s. Run with
/// `VMM_TEST_BZIMAGE=/path/to/vmlinuz cargo test -p vmm --lib -- --ignored linux_bzimage`
/// (`VMM_TEST_BZIMAGE_SECS` sets the deadline, default 240 s).
#[test]
#[ignore = "slow: boots a Linux bzImage to its banner (about a minute under emulation); needs VMM_TEST_BZIMAGE"]
fn linux_bzimage_reaches_its_banner() {
    let path = std::env::var_os("VMM_TEST_BZIMAGE")
        .expect("set VMM_TEST_BZIMAGE to a bzImage (e.g. Debian's vmlinuz)");
    let out = SharedBuffer::new();
    let mut cfg = config(Vec::new(), BootProtocol::Auto, 2, &out);
    cfg.kernel = ImageSource::Path(path.into());
    cfg.cmdline = "console=ttyS0 earlyprintk=serial,ttyS0 panic=-1 reboot=k".into();
    cfg.layout = MemoryLayout::new(512 * MIB).unwrap();
    let (vm, marks) = boot(&cfg);
    assert_eq!(vm.boot.format, KernelFormat::BzImage);
    // An xz-compressed kernel decompresses much more slowly than the Debian cloud one.
    let secs = std::env::var("VMM_TEST_BZIMAGE_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(240);
    let exit = vm.run(deadline(secs));
    let text = String::from_utf8_lossy(&out.contents()).into_owned();
    eprintln!(
        "{text}\n--- exit: {exit}; first output {:?}",
        marks.first_output()
    );
    assert!(text.contains("Linux version"), "no banner; exit {exit}");
    assert!(text.contains("Command line: console=ttyS0"), "{text}");
}

/// A passthrough function in this process: a config space with one BAR0 (4 KiB of memory
/// unless built [`LegacyFunction::with_bar0`]) and INTA only (no MSI/MSI-X), recording BAR
/// accesses and the INTx fds it was given.
struct LegacyFunction {
    config: std::sync::Mutex<devices::pci::ConfigSpace>,
    bar0_size: u64,
    bar_reads: std::sync::atomic::AtomicUsize,
    /// (region, offset, bytes) of every BAR write.
    bar_writes: std::sync::Mutex<Vec<(u32, u64, Vec<u8>)>>,
    intx: std::sync::Mutex<Option<(EventFd, EventFd)>>,
}

impl LegacyFunction {
    fn with_bar0(spec: devices::pci::BarSpec) -> Arc<Self> {
        use devices::pci::{ConfigSpace, PciHeader};
        let mut space = ConfigSpace::new(&PciHeader {
            vendor_id: 0x1234,
            device_id: 0x5678,
            interrupt_pin: 1,
            ..PciHeader::default()
        });
        space.add_bar(0, spec).unwrap();
        Arc::new(LegacyFunction {
            config: std::sync::Mutex::new(space),
            bar0_size: spec.size,
            bar_reads: Default::default(),
            bar_writes: Default::default(),
            intx: Default::default(),
        })
    }

    fn reads(&self) -> usize {
        self.bar_reads.load(std::sync::atomic::Ordering::SeqCst)
    }
}

impl devices::vfio::VfioBackend for LegacyFunction {
    fn name(&self) -> &str {
        "legacy-function"
    }
    fn counts(&self) -> Result<(u32, u32), devices::vfio::VfioBackendError> {
        Ok((9, 1))
    }
    fn region_info(
        &self,
        index: u32,
    ) -> Result<devices::vfio::RegionInfo, devices::vfio::VfioBackendError> {
        let size = match index {
            7 => 256,
            0 => self.bar0_size,
            _ => 0,
        };
        Ok(devices::vfio::RegionInfo::trapped(index, size))
    }
    fn region_read(
        &self,
        index: u32,
        offset: u64,
        data: &mut [u8],
    ) -> Result<(), devices::vfio::VfioBackendError> {
        if index == 7 {
            self.config.lock().unwrap().read(offset as usize, data);
        } else {
            self.bar_reads
                .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            data.fill(0x5a);
        }
        Ok(())
    }
    fn region_write(
        &self,
        index: u32,
        offset: u64,
        data: &[u8],
    ) -> Result<(), devices::vfio::VfioBackendError> {
        if index == 7 {
            let mut c = self.config.lock().unwrap();
            c.write_reg((offset / 4) as usize, offset % 4, data);
        } else {
            let write = (index, offset, data.to_vec());
            self.bar_writes.lock().unwrap().push(write);
        }
        Ok(())
    }
    fn irq_info(
        &self,
        index: u32,
    ) -> Result<devices::vfio::IrqInfo, devices::vfio::VfioBackendError> {
        Ok(devices::vfio::IrqInfo {
            index,
            flags: 0,
            count: u32::from(index == 0),
        })
    }
    fn enable_irq(&self, _: u32, _: &[&EventFd]) -> Result<(), devices::vfio::VfioBackendError> {
        Ok(())
    }
    fn enable_intx(
        &self,
        trigger: &EventFd,
        unmask: &EventFd,
    ) -> Result<(), devices::vfio::VfioBackendError> {
        *self.intx.lock().unwrap() =
            Some((trigger.try_clone().unwrap(), unmask.try_clone().unwrap()));
        Ok(())
    }
    fn disable_irq(&self, _: u32) -> Result<(), devices::vfio::VfioBackendError> {
        Ok(())
    }
    fn reset(&self) -> Result<(), devices::vfio::VfioBackendError> {
        Ok(())
    }
}

#[test]
fn a_legacy_passthrough_function_gets_a_bar_on_the_mmio_bus_and_a_resampled_intx_line() {
    use devices::pci::{BarKind, BarSpec};
    let function = LegacyFunction::with_bar0(BarSpec {
        kind: BarKind::Memory32,
        size: 4096,
        prefetchable: false,
    });
    let out = SharedBuffer::new();
    let cfg = config(dual_entry_elf(), BootProtocol::Auto, 1, &out);
    let marks = Arc::new(GuestMarks::new(Instant::now()));
    let (_vm, memory, mut platform) = platform(&cfg, &marks);
    let model = devices::vfio::VfioPciDevice::new(function.clone()).unwrap();
    let addr = platform.attach_vfio(model).unwrap();
    assert_eq!(addr.device, 1, "after the host bridge");
    // KVM took the trigger/resample pair (KVM_IRQFD with KVM_IRQFD_FLAG_RESAMPLE) for GSI 10,
    // and the MP table will describe the line.
    assert!(function.intx.lock().unwrap().is_some());
    let lines = platform.intx_lines();
    assert_eq!(
        lines,
        [crate::arch::x86_64::mptable::PciIntx {
            slot: 1,
            pin: 1,
            gsi: 10
        }]
    );
    // BAR0 was placed at the bottom of the 32-bit MMIO window and decodes there.
    let mut b = [0u8; 4];
    assert!(platform
        .mmio
        .read(crate::memory::layout::MMIO32_START, &mut b));
    assert_eq!(b, [0x5a; 4]);
    assert_eq!(function.reads(), 1);
    // The guest moves the BAR through the 0xCF8/0xCFC ports: decoding off, new base,
    // decoding on. The MMIO bus follows: the old window is gone, the new one reaches BAR0.
    let cfg_write = |reg: u32, value: u32| {
        let address = 0x8000_0000 | u32::from(addr.device) << 11 | reg;
        assert!(platform.pio.write(0xcf8, &address.to_le_bytes()));
        assert!(platform.pio.write(0xcfc, &value.to_le_bytes()));
    };
    cfg_write(0x04, 0);
    cfg_write(0x10, 0xc010_0000);
    cfg_write(0x04, 2);
    let mut b = [0u8; 4];
    platform
        .mmio
        .read(crate::memory::layout::MMIO32_START, &mut b);
    assert_eq!(b, [0xff; 4], "the old window no longer decodes");
    assert!(platform.mmio.read(0xc010_0000, &mut b));
    assert_eq!(b, [0x5a; 4]);
    assert_eq!(function.reads(), 2);
    builder::load(&cfg, &memory, &platform).unwrap();
}

#[test]
fn an_io_bar_is_placed_in_the_pio_window_follows_the_io_decode_bit_and_moves() {
    use crate::memory::layout::PCI_IO_START;
    use devices::pci::{BarKind, BarSpec};
    let function = LegacyFunction::with_bar0(BarSpec {
        kind: BarKind::Io,
        size: 0x20,
        prefetchable: false,
    });
    let out = SharedBuffer::new();
    let cfg = config(dual_entry_elf(), BootProtocol::Auto, 1, &out);
    let marks = Arc::new(GuestMarks::new(Instant::now()));
    let (_vm, _memory, mut platform) = platform(&cfg, &marks);
    let model = devices::vfio::VfioPciDevice::new(function.clone()).unwrap();
    let addr = platform.attach_vfio(model).unwrap();
    let pio = platform.pio.clone();
    let cfg_write = |reg: u32, value: u32| {
        let address = 0x8000_0000 | u32::from(addr.device) << 11 | reg;
        assert!(pio.write(0xcf8, &address.to_le_bytes()));
        assert!(pio.write(0xcfc, &value.to_le_bytes()));
    };
    let cfg_read = |reg: u32| {
        let address = 0x8000_0000 | u32::from(addr.device) << 11 | reg;
        assert!(pio.write(0xcf8, &address.to_le_bytes()));
        let mut b = [0u8; 4];
        assert!(pio.read(0xcfc, &mut b));
        u32::from_le_bytes(b)
    };
    // Placed at the window's first port, I/O decoding on, the register says I/O.
    assert_eq!(cfg_read(0x10), PCI_IO_START as u32 | 1);
    assert_eq!(cfg_read(0x04) & 1, 1);
    // Reads and writes anywhere in it reach the device's region 0 at the offset.
    let mut b = [0u8; 4];
    assert!(pio.read(PCI_IO_START + 0x1c, &mut b));
    assert_eq!((b, function.reads()), ([0x5a; 4], 1));
    assert!(pio.write(PCI_IO_START + 0x10, &[0xab, 0xcd]));
    assert_eq!(
        function.bar_writes.lock().unwrap().as_slice(),
        [(0, 0x10, vec![0xab, 0xcd])]
    );
    assert!(!pio.read(PCI_IO_START + 0x20, &mut b), "past its end");
    // I/O decoding off (memory decoding left on): the ports are gone.
    cfg_write(0x04, 2);
    assert!(!pio.read(PCI_IO_START, &mut b));
    // Moved while off, then on again: only the new base decodes.
    cfg_write(0x10, 0xd000);
    assert!(!pio.read(0xd000, &mut b), "not while I/O decoding is off");
    cfg_write(0x04, 3);
    assert!(!pio.read(PCI_IO_START, &mut b));
    assert!(pio.read(0xd004, &mut b));
    // Moved while decoding: the bus follows at once.
    cfg_write(0x10, 0xe000);
    assert!(!pio.read(0xd004, &mut b));
    assert!(pio.read(0xe01c, &mut b));
    assert_eq!(function.reads(), 3);
    // Nothing of it reached the MMIO bus.
    assert!(!platform.mmio.read(PCI_IO_START, &mut b));
}
