//! The fake device an input describes: its config bytes (identity, BAR flag bits, a
//! capability chain with MSI, MSI-X or anything at fuzz-chosen places, loops included), its
//! BAR regions and their mmap areas; for `vfio_msix`, always an MSI-X capability whose table
//! and PBA lie in memory BARs.

use devices::vfio::MmapArea;

use super::backend::FakeBar;
use crate::Input;

/// Which operations an input mostly makes.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Focus {
    Config,
    Msix,
}

pub struct Device {
    pub config_size: u64,
    pub cfg: Vec<u8>,
    pub bars: [FakeBar; 6],
}

/// Writes `bytes` at `pos`, as far as the space goes.
fn put(cfg: &mut [u8], pos: usize, bytes: &[u8]) {
    for (i, &b) in bytes.iter().enumerate() {
        if let Some(c) = cfg.get_mut(pos + i) {
            *c = b;
        }
    }
}

pub fn device(input: &mut Input<'_>, focus: Focus) -> Device {
    let config_size = match input.u8() % 4 {
        1 => 256,
        2 => u64::from(input.u16()),
        _ => 4096,
    };
    let mut cfg = vec![0u8; config_size.clamp(256, 4096) as usize];
    put(&mut cfg, 0, &input.u32().to_le_bytes());
    put(&mut cfg, 8, &input.u32().to_le_bytes());
    put(&mut cfg, 0x2c, &input.u32().to_le_bytes());
    cfg[0x3d] = input.u8();
    let mut bars: [FakeBar; 6] = Default::default();
    for (i, bar) in bars.iter_mut().enumerate() {
        let flags = input.u8();
        cfg[0x10 + 4 * i] = flags & 0xf;
        let sel = input.u8();
        bar.size = match sel >> 6 {
            0 => 0,
            3 => input.u64(),
            _ => 1 << (sel % 64),
        };
        if flags & 0x80 != 0 {
            for _ in 0..1 + (flags >> 5 & 1) {
                bar.mmap_areas.push(MmapArea {
                    offset: u64::from(input.u32()),
                    size: u64::from(input.u32()) % (16 << 20),
                });
            }
        }
    }
    let caps = usize::from(input.u8() % 5);
    let mut list: Vec<(usize, Vec<u8>, Option<u8>)> = Vec::new();
    for _ in 0..caps {
        let pos = usize::from(input.u8() & 0xfc);
        let (id, body): (u8, Vec<u8>) = match input.u8() % 4 {
            0 => (0x05, input.u16().to_le_bytes().to_vec()),
            1 => {
                let mut b = input.u16().to_le_bytes().to_vec();
                b.extend(input.u32().to_le_bytes());
                b.extend(input.u32().to_le_bytes());
                (0x11, b)
            }
            2 => (input.u8(), input.short_bytes(16).to_vec()),
            _ => (input.u8(), Vec::new()),
        };
        let next = input.bool().then(|| input.u8());
        let mut bytes = vec![id, 0];
        bytes.extend(body);
        list.push((pos, bytes, next));
    }
    if focus == Focus::Msix {
        // A memory BAR0 (and a 64-bit BAR2) that hold the table and PBA somewhere inside.
        cfg[0x10] = 0;
        bars[0].size = 0x1000 << (input.u8() % 9);
        cfg[0x18] = 4;
        bars[2].size = 0x4000;
        let n = input.u16() & 0x7ff;
        let table = (input.u32() % bars[0].size as u32) & !7;
        let pba = (input.u32() & 0x3ff8) | if input.bool() { 2 } else { 0 };
        let mut bytes = vec![0x11, 0];
        bytes.extend(n.to_le_bytes());
        bytes.extend(table.to_le_bytes());
        bytes.extend(pba.to_le_bytes());
        list.insert(0, (0x40, bytes, None));
    }
    for k in 0..list.len() {
        let next = list.get(k + 1).map_or(0, |c| c.0 as u8);
        let (pos, mut bytes, over) = list[k].clone();
        bytes[1] = over.unwrap_or(next);
        put(&mut cfg, pos, &bytes);
    }
    cfg[0x34] = list.first().map_or_else(|| input.u8(), |c| c.0 as u8);
    if !list.is_empty() || input.bool() {
        cfg[6] |= 0x10;
    }
    Device {
        config_size,
        cfg,
        bars,
    }
}

pub fn memfd() -> Option<i32> {
    // SAFETY: a plain syscall with a NUL-terminated name; the fd is closed by the harness.
    let fd = unsafe { libc::memfd_create(c"vfio-pci-fuzz".as_ptr(), libc::MFD_CLOEXEC) };
    (fd >= 0).then_some(fd)
}
