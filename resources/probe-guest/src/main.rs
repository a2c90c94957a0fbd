//! The probe guest: a freestanding x86_64 kernel that reports what the VMM gave it.
//!
//! Entered through the 64-bit Linux boot protocol (`_start`, the ELF entry) or PVH (the
//! `XEN_ELFNOTE_PHYS32_ENTRY` note); see `entry.S`. It prints `probe: ` lines on COM1, writes
//! boot marks and exits through the debug-exit port. The numbers and strings it shares with the
//! VMM (ports, marks, exit statuses, pci-epf-test registers, options, output prefixes) come
//! from the `guest-abi` crate, which the VMM builds too; the contract is documented in the
//! `vmm-resources` crate (resources/src/lib.rs) and resources/README.md.
//!
//! Everything here runs under an instruction emulator at a few million instructions per
//! second: no big loops, no `core::fmt`, and only instructions that emulator implements.

#![no_std]
#![no_main]

#[macro_use]
mod text;

mod acpi;
mod apic;
mod boot;
mod console;
mod cpu;
mod crc;
mod dma;
mod epf;
mod io;
mod mem;
mod mp;
mod msix_pba;
mod paging;
mod pci;

use core::cell::UnsafeCell;

use boot::{BootError, BootInfo, MemEntry, E820_RAM, GIB, PROTO_PVH};
use console::Line;
use guest_abi::ports::BOOT_MARKS;
use guest_abi::probe::{
    DMA_FAIL, DMA_OK, DMA_SKIPPED, OPT_DMA_IRQ, OPT_EXPECT_CPUS, OPT_EXPECT_DMA, OPT_EXPECT_MEM,
    OPT_EXPECT_PCI, OPT_FAULT, OPT_HANG, RESULT_FAIL, RESULT_OK,
};
use guest_abi::{exit, marks};
use io::{outb, phys};

core::arch::global_asm!(include_str!("entry.S"), options(att_syntax));

const MIB: u64 = 1 << 20;
const PAGE: u64 = 4096;
const CMDLINE_MAX: u64 = 4096;
/// Never mapped (PML4 entry 1): [`OPT_FAULT`] reads it.
const UNMAPPED: u64 = 1 << 40;

/// A global used on one CPU with interrupts off.
#[repr(transparent)]
struct Global<T>(UnsafeCell<T>);
// SAFETY: the probe is single-threaded; exceptions end the run, and the only interrupt
// handler (apic.rs) touches no `Global`.
unsafe impl<T> Sync for Global<T> {}

impl<T> Global<T> {
    /// # Safety
    /// No other reference to the value may be alive.
    #[allow(clippy::mut_from_ref)]
    unsafe fn get(&self) -> &mut T {
        &mut *self.0.get()
    }
}

static BOOT: Global<BootInfo> = Global(UnsafeCell::new(BootInfo::empty()));

/// A failed check. The first one is the result; every one is printed when found.
#[derive(Clone, Copy)]
enum Failure {
    Boot(&'static str, u64),
    BadPvhMagic(u32),
    MapEmpty,
    MapTooLong(u64),
    MapEntryEmpty(usize),
    MapUnsorted(usize),
    MapOverlap(usize),
    NoRamAt(u64),
    Unmapped(&'static str, u64),
    InitrdNotRam(u64, u64),
    Memtest {
        addr: u64,
        wrote: u64,
        read: u64,
    },
    BadOption(&'static str),
    ExpectMem {
        want: u64,
        got: u64,
    },
    ExpectCpus {
        want: u64,
        got: Option<u64>,
    },
    /// [`OPT_EXPECT_PCI`]: no function with this vendor (low half) and device ID.
    ExpectPci(u32),
    Dma(dma::Error),
    MsixPba(msix_pba::Error),
    Ecam(acpi::Error),
}

impl Failure {
    fn describe(self, line: Line) -> Line {
        match self {
            Failure::Boot(what, at) => line.s(what).s(" pointer ").hex(at).s(" is out of range"),
            Failure::BadPvhMagic(m) => line.s("hvm_start_info magic ").hex(m as u64),
            Failure::MapEmpty => line.s("e820 map is empty"),
            Failure::MapTooLong(n) => line
                .s("e820 map has ")
                .dec(n)
                .s(" entries, the probe reads 128"),
            Failure::MapEntryEmpty(i) => line.s("e820 entry ").dec(i as u64).s(" is empty"),
            Failure::MapUnsorted(i) => line.s("e820 map is not sorted at entry ").dec(i as u64),
            Failure::MapOverlap(i) => line
                .s("e820 entries ")
                .dec(i as u64 - 1)
                .s(" and ")
                .dec(i as u64)
                .s(" overlap"),
            Failure::NoRamAt(a) => line.s("no RAM at ").hex(a),
            Failure::Unmapped(what, a) => line
                .s(what)
                .s(" at ")
                .hex(a)
                .s(" is beyond the page tables"),
            Failure::InitrdNotRam(a, n) => {
                line.s("initrd ").hex(a).s(" +").hex(n).s(" is not in RAM")
            }
            Failure::Memtest { addr, wrote, read } => line
                .s("memtest mismatch at ")
                .hex(addr)
                .s(": wrote ")
                .hex(wrote)
                .s(", read ")
                .hex(read),
            Failure::BadOption(o) => line.s("bad value for ").s(o),
            Failure::ExpectMem { want, got } => line
                .s("expected ")
                .dec(want)
                .s(" MiB of RAM, found ")
                .dec(got),
            Failure::ExpectCpus {
                want,
                got: Some(got),
            } => line.s("expected ").dec(want).s(" cpus, found ").dec(got),
            Failure::ExpectCpus { want, got: None } => {
                line.s("expected ").dec(want).s(" cpus, found no MP table")
            }
            Failure::ExpectPci(id) => line
                .s("no pci function ")
                .hexw(id.into(), 4)
                .s(":")
                .hexw((id >> 16).into(), 4)
                .s(text!(" on bus 0 (", OPT_EXPECT_PCI, ")")),
            Failure::Dma(e) => e.describe(line.s("dma: ")),
            Failure::MsixPba(e) => e.describe(line.s("msix pba: ")),
            Failure::Ecam(e) => e.describe(line),
        }
    }
}

struct Checks {
    first: Option<Failure>,
    /// [`OPT_HANG`]: stay alive after the result instead of exiting.
    hang: bool,
}

impl Checks {
    fn fail(&mut self, f: Failure) {
        f.describe(Line::new().s("check failed: ")).end();
        self.record(f);
    }

    /// A failure already reported in its own line.
    fn record(&mut self, f: Failure) {
        if self.first.is_none() {
            self.first = Some(f);
        }
    }

    /// Ready mark, result line, exit.
    fn finish(&self) -> ! {
        outb(BOOT_MARKS, marks::READY);
        match self.first {
            None => {
                Line::new().s(RESULT_OK).end();
                if self.hang {
                    Line::new().s(text!("hanging (", OPT_HANG, ")")).end();
                    cpu::idle_forever()
                }
                cpu::exit(exit::OK)
            }
            Some(f) => {
                f.describe(Line::new().s(RESULT_FAIL)).end();
                cpu::exit(exit::CHECK_FAILED)
            }
        }
    }
}

#[no_mangle]
extern "C" fn probe_main(proto: u64, boot_ptr: u64) -> ! {
    let entry = if proto == PROTO_PVH { "pvh" } else { "linux64" };
    Line::new().s("hello (entry=").s(entry).s(")").end();
    outb(BOOT_MARKS, marks::ENTRY);
    cpu::init();

    let mut checks = Checks {
        first: None,
        hang: false,
    };
    // SAFETY: the only reference to BOOT.
    let info = unsafe { BOOT.get() };
    let read = if proto == PROTO_PVH {
        boot::read_pvh(boot_ptr, info)
    } else {
        boot::read_linux(boot_ptr, info)
    };
    if let Err(e) = read {
        checks.fail(match e {
            BootError::PointerOutOfRange(what, at) => Failure::Boot(what, at),
            BootError::BadPvhMagic(m) => Failure::BadPvhMagic(m),
        });
        checks.finish();
    }

    // Own page tables before anything above 1 GiB is touched.
    let ram_top = info
        .map()
        .iter()
        .filter(|e| e.kind == E820_RAM)
        .map(MemEntry::end)
        .max()
        .unwrap_or(0);
    let mapped = paging::build(ram_top.div_ceil(GIB));

    let cmdline = read_cmdline(info.cmdline, mapped, &mut checks);
    Line::new().s("cmdline \"").bytes(cmdline).s("\"").end();
    let dma_opts = dma_options(cmdline, &mut checks);

    check_map(info, &mut checks);
    let (ram, ranges) = info
        .map()
        .iter()
        .filter(|e| e.kind == E820_RAM)
        .fold((0u64, 0u64), |(sum, n), e| (sum + e.size, n + 1));
    Line::new()
        .s("ram ")
        .dec(ram / MIB)
        .s(" MiB in ")
        .dec(ranges)
        .s(" ranges, top ")
        .hex(ram_top)
        .end();
    if ram_top > mapped {
        Line::new()
            .s("note: RAM above ")
            .hex(mapped)
            .s(" is not mapped and not tested")
            .end();
    }

    let cpus = mp::count_cpus();
    match cpus {
        Some(n) => Line::new().s("cpus ").dec(n).s(" (mp table)").end(),
        None => Line::new().s("cpus unknown (no mp table)").end(),
    }

    initrd(info, mapped, &mut checks);

    let bus = pci::enumerate_bus0(mapped);
    if bus.functions == 0 {
        Line::new().s("pci none").end();
    }
    if let Err(e) = acpi::check(info.rsdp, mapped, &bus) {
        checks.fail(Failure::Ecam(e));
    }

    let pages = memtest(info.map(), mapped, &mut checks);
    Line::new().s("memtest ok: ").dec(pages).s(" pages").end();

    let cmdline_area = (info.cmdline, info.cmdline + cmdline.len() as u64 + 1);
    dma_check(&bus, info, cmdline_area, mapped, dma_opts, &mut checks);

    expectations(cmdline, ram / MIB, cpus, &bus, &mut checks);
    checks.finish()
}

fn read_cmdline(ptr: u64, mapped: u64, checks: &mut Checks) -> &'static [u8] {
    if ptr == 0 {
        return &[];
    }
    if ptr.saturating_add(CMDLINE_MAX) > mapped {
        checks.fail(Failure::Unmapped("cmdline", ptr));
        return &[];
    }
    let mut len = 0;
    while len < CMDLINE_MAX && phys::u8(ptr + len) != 0 {
        len += 1;
    }
    // SAFETY: identity mapped, non-null, read-only from here on.
    unsafe { core::slice::from_raw_parts(ptr as *const u8, len as usize) }
}

fn type_name(kind: u32) -> Option<&'static str> {
    match kind {
        1 => Some("ram"),
        2 => Some("reserved"),
        3 => Some("acpi"),
        4 => Some("nvs"),
        5 => Some("unusable"),
        _ => None,
    }
}

fn check_map(info: &BootInfo, checks: &mut Checks) {
    let map = info.map();
    for e in map {
        let line = Line::new()
            .s("e820 ")
            .hex16(e.start)
            .s("-")
            .hex16(e.end().wrapping_sub(1))
            .s(" ");
        match type_name(e.kind) {
            Some(name) => line.s(name).end(),
            None => line.s("type ").dec(e.kind as u64).end(),
        }
    }
    if map.is_empty() {
        checks.fail(Failure::MapEmpty);
        return;
    }
    if info.reported_entries > boot::MAX_ENTRIES as u64 {
        checks.fail(Failure::MapTooLong(info.reported_entries));
    }
    let mut prev: Option<&MemEntry> = None;
    for (i, e) in map.iter().enumerate() {
        if e.size == 0 {
            checks.fail(Failure::MapEntryEmpty(i));
        }
        if let Some(prev) = prev {
            if e.start < prev.start {
                checks.fail(Failure::MapUnsorted(i));
            } else if e.start < prev.end() {
                checks.fail(Failure::MapOverlap(i));
            }
        }
        prev = Some(e);
    }
    for addr in [0, MIB] {
        if !is_ram(map, addr, 1) {
            checks.fail(Failure::NoRamAt(addr));
        }
    }
}

/// Whether [addr, addr + len) lies in one RAM entry.
fn is_ram(map: &[MemEntry], addr: u64, len: u64) -> bool {
    map.iter()
        .any(|e| e.kind == E820_RAM && e.start <= addr && addr.saturating_add(len) <= e.end())
}

fn initrd(info: &BootInfo, mapped: u64, checks: &mut Checks) {
    let (addr, size) = (info.initrd, info.initrd_size);
    if size == 0 {
        Line::new().s("initrd none").end();
        return;
    }
    if addr.saturating_add(size) > mapped {
        checks.fail(Failure::Unmapped("initrd", addr));
        return;
    }
    if addr == 0 || !is_ram(info.map(), addr, size) {
        checks.fail(Failure::InitrdNotRam(addr, size));
        return;
    }
    Line::new()
        .s("initrd ")
        .hex(addr)
        .s(" ")
        .dec(size)
        .s(" bytes, sum ")
        .hex(byte_sum(addr, size) as u64)
        .end();
}

/// 32-bit additive checksum of the bytes, eight at a time (about one instruction a byte).
fn byte_sum(start: u64, len: u64) -> u32 {
    const LOW_BYTES: u64 = 0x00ff_00ff_00ff_00ff;
    let end = start + len;
    let mut at = start;
    let mut sum = 0u32;
    while at < end && !at.is_multiple_of(8) {
        sum = sum.wrapping_add(phys::u8(at) as u32);
        at += 1;
    }
    let mut words = (end - at) / 8;
    while words > 0 {
        // Four 16-bit lanes, each gaining at most 510 a word: fold them every 128 words.
        let batch = words.min(128);
        let mut lanes = 0u64;
        for _ in 0..batch {
            let w = phys::read64(at);
            lanes += (w & LOW_BYTES) + ((w >> 8) & LOW_BYTES);
            at += 8;
        }
        words -= batch;
        let folded =
            (lanes & 0xffff) + ((lanes >> 16) & 0xffff) + ((lanes >> 32) & 0xffff) + (lanes >> 48);
        sum = sum.wrapping_add(folded as u32);
    }
    while at < end {
        sum = sum.wrapping_add(phys::u8(at) as u32);
        at += 1;
    }
    sum
}

const MAX_TEST_PAGES: usize = 2 + paging::MAX_GIB as usize;

struct MemtestState {
    pages: [u64; MAX_TEST_PAGES],
    saved: [[u64; 2]; MAX_TEST_PAGES],
}

static MEMTEST: Global<MemtestState> = Global(UnsafeCell::new(MemtestState {
    pages: [0; MAX_TEST_PAGES],
    saved: [[0; 2]; MAX_TEST_PAGES],
}));

fn pattern(addr: u64) -> u64 {
    (addr ^ 0x5a5a_5a5a_5a5a_5a5a).rotate_left(17) ^ 0xc3a5_c85c_97cb_3127
}

/// Writes a distinct pattern to the first and last 8 bytes of each test page, reads all of them
/// back, then restores what was there. Test pages: the one at 2 MiB, the first RAM page of every
/// GiB above the first, and the last page of the highest RAM range.
fn memtest(map: &[MemEntry], mapped: u64, checks: &mut Checks) -> u64 {
    // SAFETY: the only reference to MEMTEST.
    let st = unsafe { MEMTEST.get() };
    let mut n = 0;
    let mut last = 0;
    let mut add = |page: u64| {
        if page + PAGE <= mapped && page > last {
            if let Some(slot) = st.pages.get_mut(n) {
                *slot = page;
                n += 1;
                last = page;
            }
        }
    };

    if is_ram(map, 2 * MIB, PAGE) {
        add(2 * MIB);
    } else {
        checks.fail(Failure::NoRamAt(2 * MIB));
    }
    let top_entry = map
        .iter()
        .filter(|e| e.kind == E820_RAM)
        .max_by_key(|e| e.end());
    let top = top_entry.map_or(0, MemEntry::end);
    for g in 1..top.div_ceil(GIB) {
        let (lo, hi) = (g * GIB, (g + 1) * GIB);
        for e in map.iter().filter(|e| e.kind == E820_RAM) {
            let first = e.start.max(lo).next_multiple_of(PAGE);
            if first + PAGE <= e.end().min(hi) {
                add(first);
                break;
            }
        }
    }
    if let Some(e) = top_entry {
        let end = e.end() / PAGE * PAGE;
        if end >= e.start + PAGE {
            add(end - PAGE);
        }
    }

    // Write all, then check all (aliasing shows), then restore in reverse order.
    let words = |page: &u64| [*page, *page + PAGE - 8];
    for (page, saved) in st.pages.iter().zip(st.saved.iter_mut()).take(n) {
        for (addr, saved) in words(page).into_iter().zip(saved.iter_mut()) {
            *saved = phys::read64(addr);
            phys::write64(addr, pattern(addr));
        }
    }
    for page in st.pages.iter().take(n) {
        for addr in words(page) {
            let read = phys::read64(addr);
            if read != pattern(addr) {
                checks.fail(Failure::Memtest {
                    addr,
                    wrote: pattern(addr),
                    read,
                });
            }
        }
    }
    for (page, saved) in st.pages.iter().zip(st.saved.iter()).take(n).rev() {
        for (addr, saved) in words(page).into_iter().zip(saved.iter()) {
            phys::write64(addr, *saved);
        }
    }
    n as u64
}

struct DmaOptions {
    /// [`OPT_EXPECT_DMA`]`=1`: no pci-epf-test device is a failure.
    expect: bool,
    /// [`OPT_DMA_IRQ`]`=msi`: use MSI even if the device has MSI-X.
    msi: bool,
}

fn dma_options(cmdline: &[u8], checks: &mut Checks) -> DmaOptions {
    const EXPECT: &[u8] = text!(OPT_EXPECT_DMA, "=").as_bytes();
    const IRQ: &[u8] = text!(OPT_DMA_IRQ, "=").as_bytes();
    let mut opts = DmaOptions {
        expect: false,
        msi: false,
    };
    for word in cmdline.split(|&b| b == b' ') {
        if let Some(value) = word.strip_prefix(EXPECT) {
            match value {
                b"0" => opts.expect = false,
                b"1" => opts.expect = true,
                _ => checks.fail(Failure::BadOption(OPT_EXPECT_DMA)),
            }
        } else if let Some(value) = word.strip_prefix(IRQ) {
            match value {
                b"msi" => opts.msi = true,
                b"msix" => opts.msi = false,
                _ => checks.fail(Failure::BadOption(OPT_DMA_IRQ)),
            }
        }
    }
    opts
}

/// Drives the pci-epf-test device if bus 0 has one (see dma.rs) and prints one result line:
/// `dma ok: ..`, `dma FAIL: ..` or `dma skipped: ..`.
fn dma_check(
    bus: &pci::Bus,
    info: &BootInfo,
    cmdline: (u64, u64),
    mapped: u64,
    opts: DmaOptions,
    checks: &mut Checks,
) {
    let Some(f) = bus.epf else {
        if opts.expect {
            let e = dma::Error::NoDevice;
            e.describe(Line::new().s(DMA_FAIL)).end();
            checks.record(Failure::Dma(e));
        } else {
            Line::new().s(DMA_SKIPPED).end();
        }
        return;
    };
    let avoid = [
        (0, PAGE),
        dma::image(),
        info.areas[0],
        info.areas[1],
        info.areas[2],
        cmdline,
        (info.initrd, info.initrd + info.initrd_size),
    ];
    let result = apic::init(mapped)
        .map_err(dma::Error::Apic)
        .and_then(|lapic| epf::setup(&f, bus, &lapic, mapped, opts.msi).map_err(dma::Error::Epf))
        .and_then(|epf| {
            let regions = dma::choose(info.map(), &avoid, mapped);
            let mut line = Line::new().s("dma pages");
            for &page in regions.pages() {
                line = line.s(" ").hex(page);
            }
            line.end();
            cpu::enable_interrupts();
            let result = dma::run(&epf, &regions);
            cpu::disable_interrupts();
            result.map(|report| (report, epf))
        });
    match result {
        Ok((report, epf)) => {
            Line::new()
                .s(DMA_OK)
                .dec(report.regions)
                .s(" regions, ")
                .dec(report.bytes)
                .s(" bytes, irq ok")
                .end();
            cpu::enable_interrupts();
            let pba = msix_pba::check(&epf);
            cpu::disable_interrupts();
            if let Some(e) = pba {
                checks.record(Failure::MsixPba(e));
            }
        }
        Err(e) => {
            e.describe(Line::new().s(DMA_FAIL)).end();
            checks.record(Failure::Dma(e));
        }
    }
}

/// [`OPT_EXPECT_MEM`], [`OPT_EXPECT_CPUS`], [`OPT_EXPECT_PCI`], [`OPT_FAULT`] (a deliberate
/// page fault, to test how the VMM reports an exception) and [`OPT_HANG`].
fn expectations(
    cmdline: &[u8],
    ram_mib: u64,
    cpus: Option<u64>,
    bus: &pci::Bus,
    checks: &mut Checks,
) {
    const MEM: &[u8] = text!(OPT_EXPECT_MEM, "=").as_bytes();
    const CPUS: &[u8] = text!(OPT_EXPECT_CPUS, "=").as_bytes();
    const PCI: &[u8] = text!(OPT_EXPECT_PCI, "=").as_bytes();
    const FAULT: &[u8] = OPT_FAULT.as_bytes();
    const HANG: &[u8; OPT_HANG.len()] = &text::join(&[OPT_HANG]);
    for word in cmdline.split(|&b| b == b' ') {
        if word == HANG {
            checks.hang = true;
        } else if word == FAULT {
            Line::new().s("fault: reading ").hex(UNMAPPED).end();
            phys::read64(UNMAPPED);
        } else if let Some(value) = word.strip_prefix(MEM) {
            match parse_dec(value) {
                Some(want) if want != ram_mib => {
                    checks.fail(Failure::ExpectMem { want, got: ram_mib })
                }
                Some(_) => {}
                None => checks.fail(Failure::BadOption(OPT_EXPECT_MEM)),
            }
        } else if let Some(value) = word.strip_prefix(CPUS) {
            match parse_dec(value) {
                Some(want) if Some(want) != cpus => {
                    checks.fail(Failure::ExpectCpus { want, got: cpus })
                }
                Some(_) => {}
                None => checks.fail(Failure::BadOption(OPT_EXPECT_CPUS)),
            }
        } else if let Some(value) = word.strip_prefix(PCI) {
            match parse_pci_id(value) {
                Some(id) if !bus.listed().iter().any(|&(_, got)| got == id) => {
                    checks.fail(Failure::ExpectPci(id))
                }
                Some(_) => {}
                None => checks.fail(Failure::BadOption(OPT_EXPECT_PCI)),
            }
        }
    }
}

/// `VVVV:DDDD` as the vendor/device dword of configuration space (vendor in the low half).
fn parse_pci_id(s: &[u8]) -> Option<u32> {
    let (vendor, device) = (s.get(..4)?, s.get(5..)?);
    if s.get(4) != Some(&b':') || device.len() != 4 {
        return None;
    }
    Some(parse_hex(vendor)? | parse_hex(device)? << 16)
}

fn parse_hex(s: &[u8]) -> Option<u32> {
    let mut v = 0u32;
    for &b in s {
        let digit = match b {
            b'0'..=b'9' => b - b'0',
            b'a'..=b'f' => b - b'a' + 10,
            b'A'..=b'F' => b - b'A' + 10,
            _ => return None,
        };
        v = v << 4 | u32::from(digit);
    }
    Some(v)
}

fn parse_dec(s: &[u8]) -> Option<u64> {
    if s.is_empty() || s.len() > 18 {
        return None;
    }
    let mut v = 0u64;
    for &b in s {
        if !b.is_ascii_digit() {
            return None;
        }
        v = v * 10 + (b - b'0') as u64;
    }
    Some(v)
}

#[panic_handler]
fn panic(info: &core::panic::PanicInfo) -> ! {
    let line = Line::new().s("panic");
    let line = match info.location() {
        Some(l) => line.s(" at ").s(l.file()).s(":").dec(l.line() as u64),
        None => line,
    };
    match info.message().as_str() {
        Some(m) => line.s(": ").s(m).end(),
        None => line.end(),
    }
    Line::new().s(text!(RESULT_FAIL, "panic")).end();
    cpu::exit(exit::EXCEPTION)
}
