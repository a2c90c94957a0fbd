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
mod checks;
mod cmdline;
mod console;
mod cpu;
mod crc;
mod dma;
mod epf;
mod global;
mod io;
mod map;
mod mem;
mod memtest;
mod mp;
mod msix_pba;
mod numa;
mod paging;
mod pci;

use boot::{BootError, BootInfo, MemEntry, E820_RAM, GIB, MIB, PAGE, PROTO_PVH};
use checks::{Checks, Failure};
use cmdline::DmaOptions;
use console::Line;
use global::Global;
use guest_abi::ports::BOOT_MARKS;
use guest_abi::probe::{DMA_FAIL, DMA_OK, DMA_SKIPPED, RESULT_FAIL};
use guest_abi::{exit, marks};
use io::outb;

core::arch::global_asm!(include_str!("entry.S"), options(att_syntax));

static BOOT: Global<BootInfo> = Global::new(BootInfo::empty());

#[no_mangle]
extern "C" fn probe_main(proto: u64, boot_ptr: u64) -> ! {
    let entry = if proto == PROTO_PVH { "pvh" } else { "linux64" };
    Line::new().s("hello (entry=").s(entry).s(")").end();
    outb(BOOT_MARKS, marks::ENTRY);
    cpu::init();

    let mut checks = Checks::new();
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

    let cmdline = cmdline::read_cmdline(info.cmdline, mapped, &mut checks);
    Line::new().s("cmdline \"").bytes(cmdline).s("\"").end();
    let dma_opts = cmdline::dma_options(cmdline, &mut checks);

    map::check_map(info, &mut checks);
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

    map::initrd(info, mapped, &mut checks);

    let bus = pci::enumerate_bus0(mapped);
    if bus.functions == 0 {
        Line::new().s("pci none").end();
    }
    if let Err(e) = acpi::check(info.rsdp, mapped, &bus) {
        checks.fail(Failure::Ecam(e));
    }
    if let Err(e) = numa::check(info.rsdp, mapped, cmdline) {
        checks.fail(Failure::Numa(e));
    }

    let pages = memtest::memtest(info.map(), mapped, &mut checks);
    Line::new().s("memtest ok: ").dec(pages).s(" pages").end();

    let cmdline_area = (info.cmdline, info.cmdline + cmdline.len() as u64 + 1);
    dma_check(&bus, info, cmdline_area, mapped, dma_opts, &mut checks);

    cmdline::expectations(cmdline, ram / MIB, cpus, &bus, &mut checks);
    checks.finish()
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
