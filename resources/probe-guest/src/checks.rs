//! The outcome of the run: every failed check is printed as found, the first one is the
//! result, and [`Checks::finish`] writes the ready mark and the result line and exits.

use guest_abi::ports::BOOT_MARKS;
use guest_abi::probe::{OPT_EXPECT_PCI, OPT_FLOOD, OPT_HANG, RESULT_FAIL, RESULT_OK};
use guest_abi::{exit, marks};

use crate::console::Line;
use crate::io::outb;
use crate::{acpi, cpu, dma, msix_pba, numa};

/// A failed check. The first one is the result; every one is printed when found.
#[derive(Clone, Copy)]
pub enum Failure {
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
    Numa(numa::Error),
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
            Failure::Numa(e) => e.describe(line),
        }
    }
}

pub struct Checks {
    first: Option<Failure>,
    /// [`OPT_HANG`]: stay alive after the result instead of exiting.
    pub hang: bool,
    /// [`OPT_FLOOD`]: print lines forever after the result instead of exiting.
    pub flood: bool,
}

impl Checks {
    pub const fn new() -> Self {
        Self {
            first: None,
            hang: false,
            flood: false,
        }
    }

    pub fn fail(&mut self, f: Failure) {
        f.describe(Line::new().s("check failed: ")).end();
        self.record(f);
    }

    /// A failure already reported in its own line.
    pub fn record(&mut self, f: Failure) {
        if self.first.is_none() {
            self.first = Some(f);
        }
    }

    /// Ready mark, result line, exit.
    pub fn finish(&self) -> ! {
        outb(BOOT_MARKS, marks::READY);
        match self.first {
            None => {
                Line::new().s(RESULT_OK).end();
                if self.hang {
                    Line::new().s(text!("hanging (", OPT_HANG, ")")).end();
                    cpu::idle_forever()
                }
                if self.flood {
                    Line::new().s(text!("flooding (", OPT_FLOOD, ")")).end();
                    let mut n = 0u64;
                    loop {
                        Line::new().s("flood ").dec(n).end();
                        n += 1;
                    }
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
