//! DMA checks with the pci-epf-test device over pages spread across all of RAM.
//!
//! Pages: the first free page of RAM (not page 0 with the real-mode IVT/BDA, not the probe
//! image, boot structures, command line or initrd), the first free page of every further GiB
//! that has RAM, and the last page of the highest RAM range. Each page is saved, the device
//! WRITEs its pattern there (STATUS, CHECKSUM and the contents are checked), and the page is
//! restored. On the last page the probe also fills a buffer for a READ with the right CHECKSUM
//! (must succeed) and one with a wrong CHECKSUM (must fail). Every command must raise exactly
//! one interrupt.
//!
//! Guest instructions are what costs here (the emulated KVM runs a few million a second), so
//! the per-page work is kept to few of them: save and restore are one `rep movsq` each, the
//! pattern and CRC check is one pass of about 37 instructions a word (crc.rs), and the READ
//! buffer is the verified WRITE pattern XOR a constant word (one instruction a word), whose
//! CRC follows from the WRITE's by linearity instead of a second CRC pass.

use core::arch::asm;
use core::ptr::addr_of;

use guest_abi::epf::pattern;
use guest_abi::epf::{command, status};
use guest_abi::probe::OPT_EXPECT_DMA;

use crate::apic::ApicError;
use crate::boot::{MemEntry, E820_RAM, GIB, PAGE};
use crate::console::Line;
use crate::crc::{check_page, xor_mask_crc, PAGE_BYTES};
use crate::epf::{self, Epf};
use crate::io::phys;
use crate::{apic, paging};

const WORDS: u64 = PAGE / 8;
const _: () = assert!(PAGE == PAGE_BYTES && PAGE.is_multiple_of(64));

/// XOR-ed into every word of the last page (holding the verified WRITE pattern) to make the
/// READ buffer: unlike anything the device wrote, and its CRC is the WRITE's CRC ^
/// [`READ_MASK_CRC`].
const READ_MASK: u64 = 0x6a09_e667_f3bc_c908;
const READ_MASK_CRC: u32 = xor_mask_crc(READ_MASK, WORDS);
// A mask that left the CRC alone would let a device that READs stale data pass.
const _: () = assert!(READ_MASK_CRC != 0);
pub const MAX_REGIONS: usize = paging::MAX_GIB as usize + 1;

core::arch::global_asm!(
    r#"
    .section .nozero.dma, "aw", @nobits
    .balign 4096
    .globl probe_dma_save
probe_dma_save:
    .skip 4096
"#,
    options(att_syntax)
);

extern "C" {
    static probe_dma_save: u8;
    static __image_start: u8;
    static __image_end: u8;
}

/// The probe's own image: code, data, stacks, page tables (never a DMA target).
pub fn image() -> (u64, u64) {
    // Linker symbols: only their addresses are taken.
    (addr_of!(__image_start) as u64, addr_of!(__image_end) as u64)
}

/// Which transfer failed.
#[derive(Clone, Copy)]
pub enum Op {
    Write,
    Read,
    /// READ with a wrong CHECKSUM, which must fail.
    BadRead,
}

impl Op {
    fn name(self) -> &'static str {
        match self {
            Op::Write => "write to ",
            Op::Read => "read from ",
            Op::BadRead => "read with a wrong checksum from ",
        }
    }
}

/// Why the DMA check failed.
#[derive(Clone, Copy)]
pub enum Error {
    /// [`OPT_EXPECT_DMA`]`=1` and no pci-epf-test function on bus 0.
    NoDevice,
    Apic(ApicError),
    /// Setting the device up failed.
    Epf(epf::Error),
    NoRegions,
    NoIrq {
        op: Op,
        addr: u64,
        status: u32,
    },
    Status {
        op: Op,
        addr: u64,
        status: u32,
    },
    Data {
        addr: u64,
        want: u64,
        got: u64,
    },
    Checksum {
        addr: u64,
        device: u32,
        guest: u32,
    },
    IrqCount {
        want: u64,
        got: u64,
    },
}

impl Error {
    pub fn describe(self, line: Line) -> Line {
        match self {
            Error::NoDevice => line.s(text!("no pci-epf-test device (", OPT_EXPECT_DMA, "=1)")),
            Error::Apic(ApicError::X2apic) => line.s("the LAPIC is in x2APIC mode"),
            Error::Apic(ApicError::Unmapped(a)) => line.s("LAPIC at ").hex(a).s(" is not mapped"),
            Error::Epf(e) => e.describe(line),
            Error::NoRegions => line.s("no RAM page to test"),
            Error::NoIrq { op, addr, status } => line
                .s("no interrupt after ")
                .s(op.name())
                .hex(addr)
                .s(", status ")
                .hex(status as u64),
            Error::Status { op, addr, status } => line
                .s(op.name())
                .hex(addr)
                .s(": status ")
                .hex(status as u64),
            Error::Data { addr, want, got } => line
                .s("write: data at ")
                .hex(addr)
                .s(" is ")
                .hex(got)
                .s(", expected ")
                .hex(want),
            Error::Checksum {
                addr,
                device,
                guest,
            } => line
                .s("write to ")
                .hex(addr)
                .s(": device checksum ")
                .hex(device as u64)
                .s(", the page's is ")
                .hex(guest as u64),
            Error::IrqCount { want, got } => line
                .s(if got > want {
                    "extra interrupts: "
                } else {
                    "lost interrupts: "
                })
                .dec(got)
                .s(" for ")
                .dec(want)
                .s(" commands"),
        }
    }
}

/// The pages to test, ascending.
pub struct Regions {
    pages: [u64; MAX_REGIONS],
    n: usize,
}

impl Regions {
    pub fn pages(&self) -> &[u64] {
        self.pages.get(..self.n).unwrap_or(&[])
    }

    fn push(&mut self, page: u64) {
        let above_last = self.pages().last().is_none_or(|&last| page > last);
        if let (true, Some(slot)) = (above_last, self.pages.get_mut(self.n)) {
            *slot = page;
            self.n += 1;
        }
    }
}

fn overlap(page: u64, avoid: &[(u64, u64)]) -> Option<(u64, u64)> {
    avoid
        .iter()
        .copied()
        .find(|&(s, e)| s < e && page < e && s < page + PAGE)
}

/// The lowest page in [start, end) that overlaps nothing in `avoid`.
fn first_free(start: u64, end: u64, avoid: &[(u64, u64)]) -> Option<u64> {
    let mut page = start.next_multiple_of(PAGE);
    while page.checked_add(PAGE)? <= end {
        match overlap(page, avoid) {
            Some((_, e)) => page = e.next_multiple_of(PAGE),
            None => return Some(page),
        }
    }
    None
}

/// The highest page in [start, end) that overlaps nothing in `avoid`.
fn last_free(start: u64, end: u64, avoid: &[(u64, u64)]) -> Option<u64> {
    let low = start.next_multiple_of(PAGE);
    let mut top = end / PAGE * PAGE;
    while top >= low + PAGE {
        let page = top - PAGE;
        match overlap(page, avoid) {
            Some((s, _)) => top = s / PAGE * PAGE,
            None => return Some(page),
        }
    }
    None
}

/// Chooses the pages (see the module docs). `avoid`: what the probe still needs or that is
/// not its to clobber; the last page of RAM only avoids the probe image (it is restored before
/// anything else could read it).
pub fn choose(map: &[MemEntry], avoid: &[(u64, u64)], mapped: u64) -> Regions {
    let mut r = Regions {
        pages: [0; MAX_REGIONS],
        n: 0,
    };
    let ram = || map.iter().filter(|e| e.kind == E820_RAM);
    let top = ram().map(MemEntry::end).max().unwrap_or(0).min(mapped);
    for g in 0..top.div_ceil(GIB) {
        let (lo, hi) = (g * GIB, ((g + 1) * GIB).min(top));
        if let Some(page) = ram().find_map(|e| first_free(e.start.max(lo), e.end().min(hi), avoid))
        {
            r.push(page);
        }
    }
    if let Some(e) = ram().max_by_key(|e| e.end()) {
        if let Some(page) = last_free(e.start, e.end().min(mapped), &[image()]) {
            r.push(page);
        }
    }
    r
}

pub struct Report {
    pub regions: u64,
    /// Bytes the device moved: every WRITE and READ.
    pub bytes: u64,
}

/// Runs the checks; interrupts must be on.
pub fn run(epf: &Epf, regions: &Regions) -> Result<Report, Error> {
    let pages = regions.pages();
    let Some(&last) = pages.last() else {
        return Err(Error::NoRegions);
    };
    let irqs = apic::irq_count();
    let mut commands = 0;
    let mut bytes = 0;
    for &page in pages {
        save(page);
        let result = check_write(epf, page, &mut commands).and_then(|crc| {
            if page == last {
                check_read(epf, page, crc, &mut commands)
            } else {
                Ok(1)
            }
        });
        restore(page);
        bytes += result? * PAGE;
    }
    let got = apic::irq_count() - irqs;
    if got != commands {
        return Err(Error::IrqCount {
            want: commands,
            got,
        });
    }
    Ok(Report {
        regions: pages.len() as u64,
        bytes,
    })
}

fn save_area() -> u64 {
    // Only the address is taken.
    addr_of!(probe_dma_save) as u64
}

/// Copies a page, 8-byte aligned, with one `rep movsq` (one emulated instruction).
fn copy_page(dst: u64, src: u64) {
    // SAFETY: both pages are mapped and owned by the caller for the copy; DF is clear (ABI).
    unsafe {
        asm!(
            "rep movsq",
            inout("rcx") WORDS => _,
            inout("rdi") dst => _,
            inout("rsi") src => _,
            options(nostack, preserves_flags),
        );
    }
}

fn save(page: u64) {
    copy_page(save_area(), page);
}

fn restore(page: u64) {
    copy_page(page, save_area());
}

/// XORs `mask` into every word of the page at `page`, eight words a round.
fn xor_page(page: u64, mask: u64) {
    // SAFETY: the page is mapped and the caller's (saved, restored afterwards).
    unsafe {
        asm!(
            "2:",
            "xor qword ptr [{p} + {i} + 4096], {m}",
            "xor qword ptr [{p} + {i} + 4104], {m}",
            "xor qword ptr [{p} + {i} + 4112], {m}",
            "xor qword ptr [{p} + {i} + 4120], {m}",
            "xor qword ptr [{p} + {i} + 4128], {m}",
            "xor qword ptr [{p} + {i} + 4136], {m}",
            "xor qword ptr [{p} + {i} + 4144], {m}",
            "xor qword ptr [{p} + {i} + 4152], {m}",
            "add {i}, 64",
            "jnz 2b",
            p = in(reg) page,
            i = inout(reg) (PAGE as i64).wrapping_neg() => _,
            m = in(reg) mask,
            options(nostack),
        );
    }
}

fn transfer(epf: &Epf, op: Op, page: u64, checksum: u32, commands: &mut u64) -> Result<u32, Error> {
    let (cmd, src, dst) = match op {
        Op::Write => (command::WRITE, 0, page),
        Op::Read | Op::BadRead => (command::READ, page, 0),
    };
    *commands += 1;
    epf.transfer(cmd, src, dst, PAGE as u32, checksum)
        .map_err(|status| Error::NoIrq {
            op,
            addr: page,
            status,
        })
}

/// WRITE to `page`: STATUS, then every word against the pattern, then CHECKSUM. Returns the
/// page's CRC (equal to CHECKSUM).
fn check_write(epf: &Epf, page: u64, commands: &mut u64) -> Result<u32, Error> {
    let st = transfer(epf, Op::Write, page, 0, commands)?;
    const BAD: u32 = status::WRITE_FAIL | status::DST_ADDR_INVALID | status::SRC_ADDR_INVALID;
    if st & status::WRITE_SUCCESS == 0 || st & BAD != 0 {
        return Err(Error::Status {
            op: Op::Write,
            addr: page,
            status: st,
        });
    }
    let device = epf.checksum();
    let crc = check_page(page).map_err(|i| {
        let addr = page + i * 8;
        Error::Data {
            addr,
            want: pattern::word(page, i),
            got: phys::read64(addr),
        }
    })?;
    if crc != device {
        return Err(Error::Checksum {
            addr: page,
            device,
            guest: crc,
        });
    }
    Ok(crc)
}

/// READ from `page` after the guest filled it (the verified WRITE pattern, whose CRC is
/// `written_crc`, XOR [`READ_MASK`]): with its CHECKSUM it must succeed, with a wrong one fail.
/// Returns the pages moved (2).
fn check_read(epf: &Epf, page: u64, written_crc: u32, commands: &mut u64) -> Result<u64, Error> {
    xor_page(page, READ_MASK);
    let crc = written_crc ^ READ_MASK_CRC;
    let st = transfer(epf, Op::Read, page, crc, commands)?;
    const BAD: u32 = status::READ_FAIL | status::SRC_ADDR_INVALID | status::DST_ADDR_INVALID;
    if st & status::READ_SUCCESS == 0 || st & BAD != 0 {
        return Err(Error::Status {
            op: Op::Read,
            addr: page,
            status: st,
        });
    }
    let st = transfer(epf, Op::BadRead, page, crc ^ 1, commands)?;
    if st & status::READ_FAIL == 0 || st & (status::READ_SUCCESS | status::SRC_ADDR_INVALID) != 0 {
        return Err(Error::Status {
            op: Op::BadRead,
            addr: page,
            status: st,
        });
    }
    Ok(2)
}
