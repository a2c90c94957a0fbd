//! The memory map and the initrd: the E820 map (printed, then checked for order, overlaps and
//! RAM where the boot protocols put things) and the initrd (in RAM, summed).

use crate::boot::{self, BootInfo, MemEntry, E820_RAM, MIB};
use crate::checks::{Checks, Failure};
use crate::console::Line;
use crate::io::phys;

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

pub fn check_map(info: &BootInfo, checks: &mut Checks) {
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
pub fn is_ram(map: &[MemEntry], addr: u64, len: u64) -> bool {
    map.iter()
        .any(|e| e.kind == E820_RAM && e.start <= addr && addr.saturating_add(len) <= e.end())
}

pub fn initrd(info: &BootInfo, mapped: u64, checks: &mut Checks) {
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
