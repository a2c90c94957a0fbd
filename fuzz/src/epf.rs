//! Target `epf`: the pci-epf-test model ([`EpfTest`]) with its DMA going through a
//! [`MappedRegions`] over a memfd, driven by configuration writes (bus mastering, MSI,
//! MSI-X, INTx disable), register-block and MSI-X table accesses of any width and offset,
//! whole commands (READ, WRITE, COPY, interrupts) with fuzz-chosen addresses and sizes, and
//! regions mapped and unmapped in between.
//!
//! Invariants:
//! - every DMA the model makes succeeds exactly when the whole access lies inside mapped
//!   regions that allow its direction (a model of the map, not the map's own lookup);
//! - memory changes only where a successful DMA write said it would (the memfd is compared
//!   with a shadow copy after every operation), and a DMA read returns the bytes there;
//! - no DMA happens while bus mastering is off; a command's reads stay inside
//!   `[SRC, SRC + SIZE)` and its writes inside `[DST, DST + SIZE)`, at most SIZE bytes each;
//! - STATUS says success exactly when the transfer was possible (and, for READ, the checksum
//!   matched); WRITE leaves the pattern and its checksum, COPY leaves a copy of the source;
//! - interrupts are raised only for enabled MSI/MSI-X vectors, INTx only while not disabled;
//! - the register block reads back what was written except CAPS and the read-only slots.

mod memory;

use std::sync::{Arc, Mutex};

use devices::epf::{
    checksum, crc32_le, fill_pattern, EpfConfig, EpfIrq, EpfTest, MSIX_TABLE_OFFSET,
};
use devices::pci::{DmaDirection, MappedRegions, PciDevice};
use guest_abi::epf::{command, irq_type, reg, status};

use crate::{Input, Seed};
use memory::{map, region, Checked, Memory, State, MEM};

fn bar_write32(dev: &mut EpfTest, at: u64, v: u32) {
    dev.bar_write(0, at, &v.to_le_bytes());
}

fn bar_read32(dev: &mut EpfTest, at: u64) -> u32 {
    let mut b = [0u8; 4];
    dev.bar_read(0, at, &mut b);
    u32::from_le_bytes(b)
}

/// Runs one input.
pub fn run(data: &[u8]) {
    let mut input = Input::new(data);
    let mem = Memory::new();
    let regions = Arc::new(MappedRegions::new());
    let state = Arc::new(Mutex::new(State {
        shadow: vec![0; MEM],
        ..State::default()
    }));
    for _ in 0..1 + input.u8() % 3 {
        let r = region(&mut input);
        map(&mem, &regions, &state, r);
    }
    let irqs: Arc<Mutex<Vec<EpfIrq>>> = Arc::default();
    let sink = irqs.clone();
    let cfg = EpfConfig {
        msi_vectors: 1 << (input.u8() % 6),
        msix_vectors: 1 + u16::from(input.u8() % 64),
    };
    let dma = Arc::new(Checked {
        map: regions.clone(),
        state: state.clone(),
    });
    let mut dev = EpfTest::new(
        cfg,
        dma,
        Box::new(move |irq| sink.lock().unwrap().push(irq)),
    )
    .expect("a valid pci-epf-test configuration");
    let mut regs = [0u32; 16];
    regs[(reg::CAPS / 4) as usize] = bar_read32(&mut dev, reg::CAPS);

    let mut ops = 0;
    while !input.is_empty() && ops < 64 {
        ops += 1;
        state.lock().unwrap().log.clear();
        irqs.lock().unwrap().clear();
        let mut command_run = None;
        match input.u8() % 8 {
            0 => {
                let r = usize::from(input.u8()) % 80;
                let off = u64::from(input.u8() % 5);
                let data = input.access().to_vec();
                let _ = dev.config_write(r, off, &data);
            }
            // Bus mastering, memory decode, INTx enable or disable; MSI and MSI-X enables.
            1 => {
                let cmd = input.u16() & 0x0406 | 0x2;
                let _ = dev.config_write(1, 0, &cmd.to_le_bytes());
                let msi = dev.msi().offset();
                let _ = dev.config_write(msi / 4, 2, &(input.u16() & 0x71).to_le_bytes());
                let msix = dev.msix().offset();
                let _ = dev.config_write(msix / 4, 2, &(input.u16() & 0xc000).to_le_bytes());
            }
            2 => {
                let bar = if input.u8() == 0xff { 1 } else { 0 };
                let off = match input.u8() % 4 {
                    0..=1 => u64::from(input.u8() % 0x40),
                    2 => u64::from(input.u16() % 0x1000),
                    _ => u64::MAX - u64::from(input.u8()),
                };
                let data = input.access().to_vec();
                let mut runs = false;
                for (i, &b) in data.iter().enumerate() {
                    let Some(at) = off.checked_add(i as u64) else {
                        break;
                    };
                    if bar == 0 && at < reg::CAPS {
                        let r = &mut regs[(at / 4) as usize];
                        let shift = at % 4 * 8;
                        *r = (*r & !(0xff << shift)) | (u32::from(b) << shift);
                        runs |= at / 4 == reg::COMMAND / 4;
                    }
                }
                // The command runs once the whole access is written.
                if runs {
                    command_run = Some(regs);
                }
                let _ = dev.bar_write(bar, off, &data);
            }
            3 => {
                let off = u64::from(input.u8() % 0x48);
                let mut buf = vec![0u8; input.width()];
                dev.bar_read(0, off, &mut buf);
                if command_run.is_none() {
                    for (i, &b) in buf.iter().enumerate() {
                        let at = off + i as u64;
                        let want = if at < 0x40 {
                            (regs[(at / 4) as usize] >> (at % 4 * 8)) as u8
                        } else {
                            0
                        };
                        assert_eq!(b, want, "register byte {at:#x}");
                    }
                }
            }
            // A whole command, the way the host driver issues one.
            4 | 5 => {
                let src = match input.u8() % 3 {
                    0 => {
                        let base = state.lock().unwrap().regions.first().map_or(0, |r| r.iova);
                        base.wrapping_add(u64::from(input.u8()))
                    }
                    1 => u64::from(input.u32()),
                    _ => input.u64(),
                };
                let dst = match input.u8() % 3 {
                    0 => {
                        let base = state.lock().unwrap().regions.last().map_or(0, |r| r.iova);
                        base.wrapping_add(u64::from(input.u16() % 0x2000))
                    }
                    1 => u64::from(input.u32()),
                    _ => input.u64(),
                };
                let size = match input.u8() % 4 {
                    0 => u32::from(input.u8()),
                    1 | 2 => u32::from(input.u16()) * 4,
                    _ => input.u32(),
                };
                let cmd = 1u32 << (input.u8() % 9);
                let kind = u32::from(input.u8() % 4);
                let number = u32::from(input.u8() % 40);
                let checksum_in = if input.bool() {
                    input.u32()
                } else {
                    // The checksum of what is there, so READ can succeed.
                    let st = state.lock().unwrap();
                    st.resolve(src, u64::from(size), DmaDirection::Read)
                        .map_or(0, |p| {
                            p.iter()
                                .fold(!0, |c, &(off, n)| crc32_le(c, &st.shadow[off..off + n]))
                        })
                };
                for (at, v) in [
                    (reg::SRC_ADDR_LO, src as u32),
                    (reg::SRC_ADDR_HI, (src >> 32) as u32),
                    (reg::DST_ADDR_LO, dst as u32),
                    (reg::DST_ADDR_HI, (dst >> 32) as u32),
                    (reg::SIZE, size),
                    (reg::CHECKSUM, checksum_in),
                    (reg::IRQ_TYPE, kind),
                    (reg::IRQ_NUMBER, number),
                ] {
                    bar_write32(&mut dev, at, v);
                    regs[(at / 4) as usize] = v;
                }
                regs[(reg::COMMAND / 4) as usize] = cmd;
                command_run = Some(regs);
                bar_write32(&mut dev, reg::COMMAND, cmd);
            }
            6 => {
                let r = region(&mut input);
                if input.bool() {
                    map(&mem, &regions, &state, r);
                } else {
                    let mut st = state.lock().unwrap();
                    // Unmap an existing region (or a bogus range, refused).
                    let pick = usize::from(input.u8());
                    let (iova, len) = match st.regions.get(pick % st.regions.len().max(1)) {
                        Some(o) if pick & 0x80 == 0 => (o.iova, o.len),
                        _ => (r.iova, r.len),
                    };
                    let found = st
                        .regions
                        .iter()
                        .position(|o| o.iova == iova && o.len == len);
                    let res = regions.remove(iova, len);
                    assert_eq!(res.is_ok(), found.is_some(), "unmap {iova:#x}+{len:#x}");
                    if let Some(i) = found {
                        st.regions.remove(i);
                    }
                }
            }
            _ => {
                // MSI-X table entries, through the BAR.
                let entry = u64::from(input.u8() % 64);
                let word = u64::from(input.u8() % 4);
                let _ = dev.bar_write(
                    0,
                    MSIX_TABLE_OFFSET + entry * 16 + word * 4,
                    &input.u32().to_le_bytes(),
                );
            }
        }
        check_after(&mut dev, &mem, &state, &irqs, command_run, &mut regs);
    }
}

/// The checks after every operation; `command` holds the registers a command ran with.
fn check_after(
    dev: &mut EpfTest,
    mem: &Memory,
    state: &Mutex<State>,
    irqs: &Mutex<Vec<EpfIrq>>,
    command: Option<[u32; 16]>,
    regs: &mut [u32; 16],
) {
    let st = state.lock().unwrap();
    assert!(
        mem.bytes() == &st.shadow[..],
        "memory changed outside the DMA writes"
    );
    let bus_master = dev.config_read(1) & 0x4 != 0;
    let log = st.log.clone();
    if !bus_master {
        assert!(log.is_empty(), "DMA with bus mastering off: {log:?}");
    }
    for irq in irqs.lock().unwrap().iter() {
        match *irq {
            EpfIrq::Intx => assert_eq!(dev.config_read(1) & 0x400, 0, "INTx while disabled"),
            EpfIrq::Msi { vector } => assert!(vector < dev.msi().enabled_vectors()),
            EpfIrq::Msix { vector } => {
                assert!(dev.msix().enabled() && vector < dev.msix().num_vectors())
            }
        }
    }
    let Some(r) = command else {
        return;
    };
    let get = |at: u64| r[(at / 4) as usize];
    let (cmd, size, kind) = (
        get(reg::COMMAND),
        u64::from(get(reg::SIZE)),
        get(reg::IRQ_TYPE),
    );
    let src = u64::from(get(reg::SRC_ADDR_HI)) << 32 | u64::from(get(reg::SRC_ADDR_LO));
    let dst = u64::from(get(reg::DST_ADDR_HI)) << 32 | u64::from(get(reg::DST_ADDR_LO));
    let mut moved = [0u64; 2];
    for &(dir, iova, len, _) in &log {
        let (base, i) = match dir {
            DmaDirection::Read => (src, 0),
            DmaDirection::Write => (dst, 1),
        };
        let inside = iova >= base && iova - base + len <= size;
        assert!(
            inside,
            "{dir} DMA {iova:#x}+{len:#x} outside {base:#x}+{size:#x}"
        );
        moved[i] += len;
    }
    assert!(
        moved[0] <= size && moved[1] <= size,
        "moved {moved:?} for SIZE {size:#x}"
    );
    let status_now = bar_read32(dev, reg::STATUS);
    assert_eq!(
        bar_read32(dev, reg::COMMAND),
        0,
        "COMMAND clears when a command runs"
    );
    regs[(reg::COMMAND / 4) as usize] = 0;
    regs[(reg::STATUS / 4) as usize] = status_now;
    regs[(reg::CHECKSUM / 4) as usize] = bar_read32(dev, reg::CHECKSUM);
    if cmd == 0 || kind > irq_type::MSIX {
        return;
    }
    let failed = log.iter().any(|e| !e.3);
    let all_ok = |dir| st.resolve(if dir == DmaDirection::Read { src } else { dst }, size, dir);
    match cmd {
        command::READ => {
            let ok = bus_master && all_ok(DmaDirection::Read).is_some();
            assert_eq!(failed, !ok && size > 0 && bus_master);
            if ok {
                let data: Vec<u8> = all_ok(DmaDirection::Read)
                    .unwrap()
                    .iter()
                    .flat_map(|&(o, n)| st.shadow[o..o + n].to_vec())
                    .collect();
                let matched = crc32_le(!0, &data) == get(reg::CHECKSUM);
                let want = if matched {
                    status::READ_SUCCESS
                } else {
                    status::READ_FAIL
                };
                assert_eq!(status_now & 0x3f, want, "READ status {status_now:#x}");
            } else if size > 0 {
                assert_eq!(
                    status_now & (status::READ_FAIL | status::SRC_ADDR_INVALID),
                    status::READ_FAIL | status::SRC_ADDR_INVALID
                );
            }
        }
        command::WRITE => {
            let ok = size == 0 || (bus_master && all_ok(DmaDirection::Write).is_some());
            if ok {
                assert_eq!(status_now & 0x3f, status::WRITE_SUCCESS, "WRITE status");
                let mut pattern = vec![0u8; size as usize];
                fill_pattern(dst, 0, &mut pattern);
                assert_eq!(bar_read32(dev, reg::CHECKSUM), checksum(&pattern));
                // Only where no two pieces alias the same memory (two IOVAs may map it).
                let distinct = |p: &Vec<(usize, usize)>| {
                    let mut p = p.clone();
                    p.sort();
                    p.windows(2).all(|w| w[0].0 + w[0].1 <= w[1].0)
                };
                if let Some(p) = all_ok(DmaDirection::Write).filter(distinct) {
                    let got: Vec<u8> = p
                        .iter()
                        .flat_map(|&(o, n)| st.shadow[o..o + n].to_vec())
                        .collect();
                    assert!(
                        got == pattern,
                        "WRITE left something other than the pattern"
                    );
                }
            } else {
                assert_eq!(
                    status_now & (status::WRITE_FAIL | status::DST_ADDR_INVALID),
                    status::WRITE_FAIL | status::DST_ADDR_INVALID
                );
            }
        }
        command::COPY => {
            let ok = size == 0
                || (bus_master
                    && all_ok(DmaDirection::Read).is_some()
                    && all_ok(DmaDirection::Write).is_some());
            // A copy whose source and destination overlap in memory need not be exact.
            if ok {
                assert_eq!(status_now & 0x3f, status::COPY_SUCCESS, "COPY status");
            } else {
                assert_ne!(
                    status_now & status::COPY_FAIL,
                    0,
                    "COPY status {status_now:#x}"
                );
            }
        }
        _ => {}
    }
    if matches!(
        cmd,
        command::READ
            | command::WRITE
            | command::COPY
            | command::RAISE_INTX_IRQ
            | command::RAISE_MSI_IRQ
            | command::RAISE_MSIX_IRQ
            | command::ENABLE_DOORBELL
            | command::DISABLE_DOORBELL
    ) {
        assert_ne!(
            status_now & status::IRQ_RAISED,
            0,
            "IRQ_RAISED after command {cmd:#x}"
        );
    }
}

/// Seeds: the `pci_endpoint_test` driver's READ, WRITE and COPY tests over mapped memory,
/// with MSI, MSI-X and INTx.
pub fn seeds() -> Vec<(&'static str, Vec<u8>)> {
    let mut out = Vec::new();
    // One read-write region of 64 KiB at IOVA 0x10_0000, memfd offset 0.
    let header = |s: &mut Seed, regions: u8| {
        s.u8(regions - 1);
        s.u8(0).u16(0x100).u8(0).u8(15).u8(0).u8(3);
        if regions > 1 {
            // A read-only 16 KiB region right after it, at memfd offset 64 KiB.
            s.u8(0).u16(0x110).u8(0).u8(3).u8(16).u8(0);
        }
        s.u8(5).u8(31); // 32 MSI, 32 MSI-X vectors
    };
    let enable = |s: &mut Seed, msi: u16, msix: u16| {
        s.u8(1).u16(0x0006).u16(msi).u16(msix);
    };
    let command = |s: &mut Seed, src_sel: u8, dst_sel: u8, size: u16, cmd_bit: u8, kind: u8| {
        s.u8(4).u8(src_sel).u8(0).u8(dst_sel).u16(0x100);
        s.u8(1).u16(size / 4).u8(cmd_bit).u8(kind).u8(1).u8(0);
    };
    let mut s = Seed::new();
    header(&mut s, 1);
    enable(&mut s, 0x51, 0);
    command(&mut s, 0, 0, 1024, 4, 1); // WRITE, MSI 1
    command(&mut s, 0, 0, 1024, 3, 1); // READ (checksum of what is there)
    command(&mut s, 0, 0, 4096, 5, 1); // COPY
    command(&mut s, 0, 0, 4096, 1, 1); // RAISE_MSI
    s.u8(3).u8(0).width(16);
    out.push(("msi-read-write-copy", s.0));

    let mut s = Seed::new();
    header(&mut s, 2);
    enable(&mut s, 0, 0x8000);
    s.u8(7).u8(0).u8(0).u32(0xfee0_0000);
    s.u8(7).u8(0).u8(2).u32(0x41);
    s.u8(7).u8(0).u8(3).u32(0);
    command(&mut s, 0, 0, 0x8000, 4, 2); // WRITE across both regions (the second is RO)
    command(&mut s, 0, 0, 0x8000, 3, 2);
    s.u8(6)
        .u8(0)
        .u16(0x100)
        .u8(0)
        .u8(15)
        .u8(0)
        .u8(3)
        .u8(0)
        .u8(0); // unmap the first
    command(&mut s, 0, 0, 64, 3, 2);
    out.push(("msix-two-regions", s.0));

    let mut s = Seed::new();
    header(&mut s, 1);
    enable(&mut s, 0, 0);
    s.u8(1).u16(0x0002).u16(0).u16(0); // bus mastering off
    command(&mut s, 0, 0, 64, 4, 0);
    s.u8(2).u8(0).u8(0).u8(0x04).width(4).u32(1); // RAISE_INTX through a raw write
    s.u8(2).u8(0).u8(3).u8(2).width(8).u64(u64::MAX);
    out.push(("intx-no-master", s.0));
    out
}
