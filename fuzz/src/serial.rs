//! Target `serial`: the COM1 16550 ([`SerialDevice`]) on a port bus at 0x3f8 and directly
//! (any offset, any width), with host input enqueued between guest accesses.
//!
//! Invariants, against a model of the UART's registers (the 16550 rules vm-superio follows):
//! - every byte the guest writes to THR outside loopback and with DLAB clear reaches the
//!   output, in order, and nothing else does;
//! - the receive FIFO holds at most 64 bytes; `enqueue` takes what fits (nothing in
//!   loopback mode), and RBR reads return the enqueued and looped-back bytes in order,
//!   then 0; LSR.DR is set exactly while the FIFO holds bytes;
//! - the scratch, LCR, MCR, IER (valid bits) and divisor latch registers read back what was
//!   written; reads at offsets 8 and above read 0xff and writes there change nothing;
//! - an access spanning several registers acts on each in turn (an 8-bit ISA bus);
//! - the first transmitted byte sets the first-output mark.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use devices::serial::SharedBuffer;
use devices::{Bus, BusDevice, GuestMarks, SerialDevice};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::{Input, Seed};

const FIFO: usize = 64;
const COM1: u64 = 0x3f8;

struct Model {
    fifo: VecDeque<u8>,
    out: Vec<u8>,
    lcr: u8,
    mcr: u8,
    ier: u8,
    scr: u8,
    dll: u8,
    dlh: u8,
}

impl Default for Model {
    /// vm-superio's reset state: divisor 12 (9600 baud), 8N1, OUT2.
    fn default() -> Self {
        Model {
            fifo: VecDeque::new(),
            out: Vec::new(),
            lcr: 0x03,
            mcr: 0x08,
            ier: 0,
            scr: 0,
            dll: 0x0c,
            dlh: 0,
        }
    }
}

impl Model {
    fn dlab(&self) -> bool {
        self.lcr & 0x80 != 0
    }

    fn looped(&self) -> bool {
        self.mcr & 0x10 != 0
    }

    fn write(&mut self, reg: u64, v: u8) {
        match reg {
            0 if self.dlab() => self.dll = v,
            1 if self.dlab() => self.dlh = v,
            0 if self.looped() => {
                if self.fifo.len() < FIFO {
                    self.fifo.push_back(v);
                }
            }
            0 => self.out.push(v),
            1 => self.ier = v & 0x0f,
            3 => self.lcr = v,
            4 => self.mcr = v,
            7 => self.scr = v,
            _ => {}
        }
    }

    /// The value a read of `reg` must return, or `None` for registers whose value the model
    /// does not track (IIR, MSR).
    fn read(&mut self, reg: u64) -> Option<u8> {
        Some(match reg {
            0 if self.dlab() => self.dll,
            1 if self.dlab() => self.dlh,
            0 => self.fifo.pop_front().unwrap_or(0),
            1 => self.ier,
            3 => self.lcr,
            4 => self.mcr,
            // Only DR is modelled; THRE and TEMT are always set in this model.
            5 => return None,
            7 => self.scr,
            8.. => 0xff,
            _ => return None,
        })
    }
}

/// Runs one input.
pub fn run(data: &[u8]) {
    let mut input = Input::new(data);
    let irq = EventFd::new(EFD_NONBLOCK).expect("eventfd");
    let out = SharedBuffer::new();
    let marks = Arc::new(GuestMarks::new(Instant::now()));
    let serial = Arc::new(Mutex::new(SerialDevice::new(
        irq.try_clone().expect("eventfd clone"),
        Box::new(out.clone()),
        marks.clone(),
    )));
    let bus = Bus::new("pio");
    bus.insert(serial.clone(), COM1, 8).unwrap();
    let mut m = Model::default();
    let mut ops = 0;
    while !input.is_empty() && ops < 1024 {
        ops += 1;
        let op = input.u8();
        match op % 6 {
            // Through the bus: a port in 0x3f0..0x408, any width.
            0 | 1 => {
                let port = COM1 - 8 + u64::from(input.u8() % 24);
                let len = input.width();
                let handled = (COM1..COM1 + 8).contains(&port);
                if op.is_multiple_of(6) {
                    let data = input.bytes(len).to_vec();
                    if handled {
                        for (i, &b) in data.iter().enumerate() {
                            m.write(port - COM1 + i as u64, b);
                        }
                    }
                    assert_eq!(bus.write(port, &data), handled);
                } else {
                    let mut buf = vec![0u8; len];
                    assert_eq!(bus.read(port, &mut buf), handled);
                    for (i, &b) in buf.iter().enumerate() {
                        let want = if handled {
                            let reg = port - COM1 + i as u64;
                            let lsr_dr = u8::from(!m.fifo.is_empty());
                            match m.read(reg) {
                                Some(v) => Some(v),
                                None if reg == 5 => {
                                    assert_eq!(b & 1, lsr_dr, "LSR.DR");
                                    None
                                }
                                None => None,
                            }
                        } else {
                            Some(0xff)
                        };
                        if let Some(want) = want {
                            assert_eq!(b, want, "read of port {port:#x} byte {i}");
                        }
                    }
                }
            }
            // Directly, at any offset.
            2 => {
                let off = match input.u8() {
                    0xff => u64::MAX - u64::from(input.u8() % 16),
                    b => u64::from(b % 16),
                };
                let data = input.access().to_vec();
                for (i, &b) in data.iter().enumerate() {
                    if let Some(reg) = off.checked_add(i as u64) {
                        m.write(reg, b);
                    }
                }
                serial.lock().unwrap().write(off, &data);
            }
            3 => {
                let off = match input.u8() {
                    0xff => u64::MAX - u64::from(input.u8() % 16),
                    b => u64::from(b % 16),
                };
                let mut buf = vec![0u8; input.width()];
                serial.lock().unwrap().read(off, &mut buf);
                for (i, &b) in buf.iter().enumerate() {
                    let reg = off.saturating_add(i as u64);
                    if reg != 5 {
                        if let Some(want) = m.read(reg) {
                            assert_eq!(b, want, "direct read at {off:#x}+{i}");
                        }
                    }
                }
            }
            // Host input.
            4 => {
                let bytes = input.short_bytes(100).to_vec();
                let mut dev = serial.lock().unwrap();
                let room = dev.fifo_capacity();
                assert_eq!(room, FIFO - m.fifo.len(), "FIFO capacity");
                let taken = dev.enqueue(&bytes);
                let want = if m.looped() { 0 } else { bytes.len().min(room) };
                assert_eq!(
                    taken,
                    want,
                    "enqueue of {} bytes with {room} free",
                    bytes.len()
                );
                m.fifo.extend(&bytes[..taken]);
                assert_eq!(dev.fifo_capacity(), FIFO - m.fifo.len());
            }
            _ => {
                // Drain the interrupt counter, as KVM's irqfd would.
                let _ = irq.read();
            }
        }
        assert_eq!(out.contents(), m.out, "serial output");
        assert_eq!(
            marks.first_output().is_some(),
            !m.out.is_empty(),
            "first-output mark"
        );
    }
}

/// Seeds: a driver's init, output, loopback test and input.
pub fn seeds() -> Vec<(&'static str, Vec<u8>)> {
    let out_b = |s: &mut Seed, reg: u8, bytes: &[u8]| {
        s.u8(0).u8(8 + reg).width(bytes.len()).bytes(bytes);
    };
    let in_b = |s: &mut Seed, reg: u8, len: usize| {
        s.u8(1).u8(8 + reg).width(len);
    };
    let mut out = Vec::new();

    // Linux's 8250 init: divisor, 8N1, FIFO, loopback test, then output and input.
    let mut s = Seed::new();
    out_b(&mut s, 3, &[0x80]);
    out_b(&mut s, 0, &[0x01]);
    out_b(&mut s, 1, &[0x00]);
    in_b(&mut s, 0, 1);
    out_b(&mut s, 3, &[0x03]);
    out_b(&mut s, 2, &[0xc7]);
    out_b(&mut s, 4, &[0x1f]);
    out_b(&mut s, 0, &[0xa5]);
    in_b(&mut s, 5, 1);
    in_b(&mut s, 0, 1);
    in_b(&mut s, 6, 1);
    out_b(&mut s, 4, &[0x0b]);
    out_b(&mut s, 1, &[0x05]);
    for &b in b"hello\n" {
        out_b(&mut s, 0, &[b]);
    }
    s.u8(4).short_bytes(b"ls -l\r");
    in_b(&mut s, 2, 1);
    in_b(&mut s, 5, 1);
    for _ in 0..7 {
        in_b(&mut s, 0, 1);
    }
    s.u8(5);
    out.push(("linux-init", s.0));

    // Wide and misplaced accesses, FIFO overflow, the scratch register.
    let mut s = Seed::new();
    out_b(&mut s, 7, &[0x5a]);
    in_b(&mut s, 4, 4);
    in_b(&mut s, 6, 4);
    out_b(&mut s, 6, &[1, 2, 3, 4]);
    s.u8(4).short_bytes(&[b'x'; 100]);
    s.u8(4).short_bytes(b"y");
    s.u8(2).u8(0xff).u8(2).width(4).u32(0x4142_4344);
    s.u8(3).u8(0xff).u8(1).width(4);
    s.u8(3).u8(5).width(8);
    in_b(&mut s, 0, 16);
    in_b(&mut s, 0xf0 - 8, 2);
    out.push(("odd", s.0));
    out
}
