//! Polled 16550 output on COM1 and a tiny line formatter (no `core::fmt`: it is large, slow
//! under emulation, and its prebuilt code uses SSE instructions the emulator lacks).

use guest_abi::ports::SERIAL_COM1 as COM1;
use guest_abi::probe::LINE_PREFIX;

use crate::io::{inb, outb};

const LSR: u16 = COM1 + 5;
const LSR_THR_EMPTY: u8 = 0x20;

/// Sends one byte, waiting (boundedly) for the transmitter holding register to empty.
pub fn putc(byte: u8) {
    let mut spins = 0u32;
    while inb(LSR) & LSR_THR_EMPTY == 0 && spins < 10_000 {
        spins += 1;
    }
    outb(COM1, byte);
}

pub fn puts(s: &str) {
    for &b in s.as_bytes() {
        putc(b);
    }
}

/// One output line: starts with [`LINE_PREFIX`], ends with CR LF when `end` is called.
#[must_use = "a line is finished with .end()"]
pub struct Line;

impl Line {
    pub fn new() -> Line {
        puts(LINE_PREFIX);
        Line
    }

    /// Text as is.
    pub fn s(self, s: &str) -> Line {
        puts(s);
        self
    }

    /// Bytes from the guest (command line): printable ASCII as is, anything else as `?`.
    pub fn bytes(self, bytes: &[u8]) -> Line {
        for &b in bytes {
            putc(if (0x20..0x7f).contains(&b) { b } else { b'?' });
        }
        self
    }

    /// `0x` and the shortest hex form.
    pub fn hex(self, v: u64) -> Line {
        let digits = if v == 0 {
            1
        } else {
            (64 - v.leading_zeros()).div_ceil(4)
        };
        puts("0x");
        hex_digits(v, digits)
    }

    /// `0x` and exactly 16 hex digits.
    pub fn hex16(self, v: u64) -> Line {
        puts("0x");
        hex_digits(v, 16)
    }

    /// Exactly `digits` hex digits, no prefix.
    pub fn hexw(self, v: u64, digits: u32) -> Line {
        hex_digits(v, digits)
    }

    pub fn dec(self, v: u64) -> Line {
        // Divisions by constants, or by a divisor the loop condition proves non-zero: no
        // division-by-zero panic path (which would drag in core::fmt).
        let mut pow = 1u64;
        while pow <= v / 10 {
            pow *= 10;
        }
        while pow > 0 {
            putc(b'0' + ((v / pow) % 10) as u8);
            pow /= 10;
        }
        self
    }

    pub fn end(self) {
        puts("\r\n");
    }
}

fn hex_digits(v: u64, digits: u32) -> Line {
    let mut i = digits;
    while i > 0 {
        i -= 1;
        let nibble = if i < 16 { (v >> (i * 4)) & 0xf } else { 0 } as u8;
        putc(if nibble < 10 {
            b'0' + nibble
        } else {
            b'a' + nibble - 10
        });
    }
    Line
}
