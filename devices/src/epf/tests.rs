use std::sync::Mutex;
use std::time::{Duration, Instant};

use std::sync::Arc;

use guest_abi::epf::pattern::splitmix64;
use guest_abi::epf::{caps, command, flags, irq_type, reg, status, CLASS_OTHERS, REG_BAR};

use super::transfer::{DMA_CHUNK, DMA_FAULTS};
use super::*;
use crate::pci::config::{cap_id, command as cmd_bits, offset};
use crate::pci::device::{Effects, PciDevice};
use crate::pci::dma::{DmaProt, DmaSpace, IommuDma, MappedRegions};
use crate::pci::RoutingChange;

/// Guest RAM the device may reach.
const RAM: u64 = 0x1000_0000;
const RAM_LEN: u64 = 0x10_0000;

struct Rig {
    dev: EpfTest,
    mem: Arc<MappedRegions>,
    irqs: Arc<Mutex<Vec<EpfIrq>>>,
}

fn rig_with(cfg: EpfConfig) -> Rig {
    let mem = Arc::new(MappedRegions::new());
    mem.insert_anonymous(RAM, RAM_LEN, DmaProt::READ_WRITE)
        .unwrap();
    let irqs: Arc<Mutex<Vec<EpfIrq>>> = Arc::default();
    let sink = irqs.clone();
    let dev = EpfTest::new(
        cfg,
        mem.clone(),
        Box::new(move |irq: EpfIrq| sink.lock().unwrap().push(irq)),
    )
    .unwrap();
    let mut rig = Rig { dev, mem, irqs };
    // What pci_endpoint_test's probe does: memory decode and bus mastering on, MSI on.
    rig.cfg_write16(
        offset::COMMAND,
        cmd_bits::MEMORY_SPACE | cmd_bits::BUS_MASTER,
    );
    rig.enable_msi(5); // MME = 5: 32 vectors
    rig
}

fn rig() -> Rig {
    rig_with(EpfConfig::default())
}

impl Rig {
    fn cfg_write16(&mut self, at: usize, v: u16) -> Effects {
        self.dev
            .config_write(at / 4, (at % 4) as u64, &v.to_le_bytes())
    }

    fn cfg_write32(&mut self, at: usize, v: u32) -> Effects {
        self.dev.config_write(at / 4, 0, &v.to_le_bytes())
    }

    fn enable_msi(&mut self, mme: u16) -> Effects {
        let at = self.dev.msi().offset();
        self.cfg_write32(at + 4, 0xfee0_0000);
        self.cfg_write16(at + 0xc, 0x40);
        self.cfg_write16(at + 2, 1 | mme << 4)
    }

    fn enable_msix(&mut self) -> Effects {
        let at = self.dev.msix().offset();
        self.cfg_write16(at + 2, 1 << 15)
    }

    fn write(&mut self, r: u64, v: u32) -> Effects {
        self.dev.bar_write(REG_BAR, r, &v.to_le_bytes())
    }

    fn read(&mut self, r: u64) -> u32 {
        let mut b = [0u8; 4];
        self.dev.bar_read(REG_BAR, r, &mut b);
        u32::from_le_bytes(b)
    }

    fn transfer(&mut self, command: u32, src: u64, dst: u64, size: u32) -> u32 {
        self.write(reg::SRC_ADDR_LO, src as u32);
        self.write(reg::SRC_ADDR_HI, (src >> 32) as u32);
        self.write(reg::DST_ADDR_LO, dst as u32);
        self.write(reg::DST_ADDR_HI, (dst >> 32) as u32);
        self.write(reg::SIZE, size);
        self.write(reg::COMMAND, command);
        self.read(reg::STATUS)
    }

    fn irqs(&self) -> Vec<EpfIrq> {
        std::mem::take(&mut *self.irqs.lock().unwrap())
    }

    fn mem_read(&self, iova: u64, len: usize) -> Vec<u8> {
        let mut v = vec![0u8; len];
        self.mem.read(iova, &mut v).unwrap();
        v
    }
}

#[test]
fn crc32_matches_linux_convention() {
    // The usual CRC-32 of "123456789" is 0xcbf43926; Linux crc32_le(~0) leaves it
    // un-inverted.
    assert_eq!(checksum(b"123456789"), !0xcbf4_3926);
    assert_eq!(checksum(b""), 0xffff_ffff);
    assert_eq!(
        !checksum(b"The quick brown fox jumps over the lazy dog"),
        0x414f_a339
    );
    // Incremental equals one-shot.
    let data: Vec<u8> = (0..1000u32).map(|i| (i * 7) as u8).collect();
    assert_eq!(
        crc32_le(crc32_le(!0, &data[..333]), &data[333..]),
        checksum(&data)
    );
}

#[test]
fn pattern_is_deterministic_and_chunk_independent() {
    let mut whole = vec![0u8; 100];
    fill_pattern(0x1234, 0, &mut whole);
    let mut parts = vec![0u8; 100];
    fill_pattern(0x1234, 0, &mut parts[..13]);
    fill_pattern(0x1234, 13, &mut parts[13..]);
    assert_eq!(whole, parts);
    let mut other = vec![0u8; 100];
    fill_pattern(0x1238, 0, &mut other);
    assert_ne!(whole, other, "seeded from the address");
    assert!(whole.iter().any(|&b| b != whole[0]));
}

#[test]
fn identity_bars_and_capabilities() {
    let mut r = rig();
    let d = &mut r.dev;
    assert_eq!(d.config_read(0), 0xb500_104c);
    assert_eq!(d.config_read(2) >> 8, CLASS_OTHERS);
    assert_eq!(d.config().read_u8(offset::INTERRUPT_PIN), 1);
    // BAR0 sizes as a 4 KiB 32-bit non-prefetchable memory BAR.
    d.config_write(4, 0, &u32::MAX.to_le_bytes());
    assert_eq!(d.config_read(4), 0xffff_f000);
    let caps = d.config().capabilities();
    assert_eq!(
        caps.iter().map(|c| c.0).collect::<Vec<_>>(),
        [cap_id::MSI, cap_id::MSIX]
    );
    // MSI-X: 32 entries, table at BAR0+0x400, PBA at BAR0+0x800.
    let msix = caps[1].1;
    assert_eq!(d.config().read_u16(msix + 2) & 0x7ff, 31);
    assert_eq!(d.config().read_u32(msix + 4), 0x400);
    assert_eq!(d.config().read_u32(msix + 8), 0x800);
    assert_eq!(d.bars().len(), 1);
    // Bad vector counts are refused.
    let mem = Arc::new(MappedRegions::new());
    for cfg in [
        EpfConfig {
            msi_vectors: 32,
            msix_vectors: 65,
        },
        EpfConfig {
            msi_vectors: 32,
            msix_vectors: 0,
        },
        EpfConfig {
            msi_vectors: 3,
            msix_vectors: 1,
        },
    ] {
        assert!(EpfTest::new(cfg, mem.clone(), Box::new(|_: EpfIrq| {})).is_err());
    }
}

#[test]
fn registers_read_and_write() {
    let mut r = rig();
    // The host's BAR test: a pattern to MAGIC reads back.
    r.write(reg::MAGIC, 0xa0a0_a0a0);
    assert_eq!(r.read(reg::MAGIC), 0xa0a0_a0a0);
    for at in [
        reg::SRC_ADDR_LO,
        reg::SRC_ADDR_HI,
        reg::DST_ADDR_LO,
        reg::DST_ADDR_HI,
        reg::SIZE,
        reg::CHECKSUM,
        reg::IRQ_TYPE,
        reg::IRQ_NUMBER,
        reg::FLAGS,
    ] {
        r.write(at, 0x1234_5678 ^ at as u32);
        assert_eq!(r.read(at), 0x1234_5678 ^ at as u32, "register {at:#x}");
    }
    // CAPS is read-only; the doorbell slots after it read 0.
    let caps = caps::UNALIGNED_ACCESS | caps::MSI | caps::MSIX | caps::INTX;
    assert_eq!(r.read(reg::CAPS), caps);
    r.write(reg::CAPS, 0);
    r.write(0x34, 7);
    assert_eq!(r.read(reg::CAPS), caps);
    assert_eq!(r.read(0x34), 0);
    // Narrow and unaligned accesses.
    r.dev.bar_write(REG_BAR, reg::MAGIC + 1, &[0x55, 0x66]);
    assert_eq!(r.read(reg::MAGIC), 0xa066_55a0);
    let mut w = [0u8; 2];
    r.dev.bar_read(REG_BAR, reg::MAGIC + 2, &mut w);
    assert_eq!(w, [0x66, 0xa0]);
    // An 8-byte access covers two registers.
    r.dev
        .bar_write(REG_BAR, reg::SIZE, &0x0000_0002_0000_0001u64.to_le_bytes());
    assert_eq!((r.read(reg::SIZE), r.read(reg::CHECKSUM)), (1, 2));
    // Outside the registers and the MSI-X areas: zeros; other BARs: all ones.
    assert_eq!(r.read(0x100), 0);
    assert_eq!(r.read(0xffc), 0);
    let mut b = [0u8; 4];
    r.dev.bar_read(2, 0, &mut b);
    assert_eq!(b, [0xff; 4]);
    assert!(r.dev.bar_write(2, 0, &[1]).is_empty());
    // Past the end of the BAR, even at the top of the offset space, nothing panics.
    r.dev.bar_write(REG_BAR, u64::MAX - 1, &[1, 2, 3, 4]);
    r.dev.bar_read(REG_BAR, u64::MAX - 1, &mut b);
    assert_eq!(r.dev.reg(0x1000), 0);
}

#[test]
fn write_command_fills_memory_and_reports_its_crc() {
    let mut r = rig();
    r.write(reg::IRQ_TYPE, irq_type::MSI);
    r.write(reg::IRQ_NUMBER, 1);
    let dst = RAM + 0x1001; // unaligned on purpose (CAP_UNALIGNED_ACCESS)
    let st = r.transfer(command::WRITE, 0, dst, 5000);
    assert_eq!(st, status::WRITE_SUCCESS | status::IRQ_RAISED);
    assert_eq!(r.read(reg::COMMAND), 0, "command taken");
    let data = r.mem_read(dst, 5000);
    assert_eq!(r.read(reg::CHECKSUM), checksum(&data));
    let mut want = vec![0u8; 5000];
    fill_pattern(dst, 0, &mut want);
    assert_eq!(data, want);
    assert_eq!(r.irqs(), [EpfIrq::Msi { vector: 0 }]);
    // Bytes around the buffer are untouched.
    assert_eq!(r.mem_read(dst - 1, 1), [0]);
    assert_eq!(r.mem_read(dst + 5000, 1), [0]);
}

#[test]
fn read_command_checks_the_crc() {
    let mut r = rig();
    r.write(reg::IRQ_TYPE, irq_type::MSI);
    r.write(reg::IRQ_NUMBER, 3);
    let src = RAM + 0x8000;
    let data: Vec<u8> = (0..4096u32).map(|i| (i * 31 + 7) as u8).collect();
    r.mem.write(src, &data).unwrap();
    r.write(reg::CHECKSUM, checksum(&data));
    let st = r.transfer(command::READ, src, 0, 4096);
    assert_eq!(st, status::READ_SUCCESS | status::IRQ_RAISED);
    assert_eq!(r.irqs(), [EpfIrq::Msi { vector: 2 }]);
    // A wrong checksum fails without blaming the address.
    r.write(reg::CHECKSUM, checksum(&data) ^ 1);
    let st = r.transfer(command::READ, src, 0, 4096);
    assert_eq!(st, status::READ_FAIL | status::IRQ_RAISED);
    assert_eq!(r.dev.last_fault(), None);
}

#[test]
fn copy_command_copies() {
    let mut r = rig();
    r.write(reg::IRQ_NUMBER, 1);
    r.write(reg::IRQ_TYPE, irq_type::MSI);
    let (src, dst) = (RAM + 0x100, RAM + 0x9_0000);
    let data: Vec<u8> = (0..3000u32).map(|i| (i ^ (i >> 3)) as u8).collect();
    r.mem.write(src, &data).unwrap();
    let st = r.transfer(command::COPY, src, dst, 3000);
    assert_eq!(st, status::COPY_SUCCESS | status::IRQ_RAISED);
    assert_eq!(checksum(&r.mem_read(dst, 3000)), checksum(&data));
    assert_eq!(r.irqs().len(), 1);
}

#[test]
fn large_transfers_cross_dma_chunks() {
    let mut r = rig();
    r.write(reg::IRQ_NUMBER, 1);
    r.write(reg::IRQ_TYPE, irq_type::MSI);
    let size = 3 * DMA_CHUNK as u32 + 123;
    let st = r.transfer(command::WRITE, 0, RAM, size);
    assert_eq!(st, status::WRITE_SUCCESS | status::IRQ_RAISED);
    let crc = r.read(reg::CHECKSUM);
    assert_eq!(crc, checksum(&r.mem_read(RAM, size as usize)));
    // What the device wrote, it reads back with the same CRC (what pci_endpoint_test's
    // WRITE then READ tests rely on), and copies intact.
    let st = r.transfer(command::READ, RAM, 0, size);
    assert_eq!(st, status::READ_SUCCESS | status::IRQ_RAISED);
    let st = r.transfer(command::COPY, RAM, RAM + 0x8_0000, size);
    assert_eq!(st, status::COPY_SUCCESS | status::IRQ_RAISED);
    assert_eq!(checksum(&r.mem_read(RAM + 0x8_0000, size as usize)), crc);
}

#[test]
fn unmapped_addresses_fail_with_the_right_bits() {
    let mut r = rig();
    r.write(reg::IRQ_NUMBER, 1);
    r.write(reg::IRQ_TYPE, irq_type::MSI);
    let hole = RAM + RAM_LEN + 0x1000;
    let cases = [
        (
            command::READ,
            hole,
            RAM,
            status::SRC_ADDR_INVALID | status::READ_FAIL,
        ),
        (
            command::WRITE,
            RAM,
            hole,
            status::DST_ADDR_INVALID | status::WRITE_FAIL,
        ),
        (
            command::COPY,
            hole,
            RAM,
            status::SRC_ADDR_INVALID | status::COPY_FAIL,
        ),
        (
            command::COPY,
            RAM,
            hole,
            status::DST_ADDR_INVALID | status::COPY_FAIL,
        ),
    ];
    for (cmd, src, dst, want) in cases {
        r.write(reg::CHECKSUM, 0);
        let st = r.transfer(cmd, src, dst, 64);
        assert_eq!(st, want | status::IRQ_RAISED, "command {cmd:#x}");
        assert_eq!(r.dev.last_fault().unwrap().fault_iova, hole);
        // The host still gets its interrupt, so a failure is reported, not a hang.
        assert_eq!(r.irqs(), [EpfIrq::Msi { vector: 0 }]);
        // A failed WRITE leaves CHECKSUM alone.
        assert_eq!(r.read(reg::CHECKSUM), 0);
    }
    // An address above 4 GiB (high register) that is not mapped.
    let st = r.transfer(command::WRITE, 0, RAM | 1 << 32, 16);
    assert_eq!(
        st,
        status::DST_ADDR_INVALID | status::WRITE_FAIL | status::IRQ_RAISED
    );
    // A transfer that wraps the 64-bit space.
    let st = r.transfer(command::READ, u64::MAX - 7, 0, 16);
    assert_eq!(
        st,
        status::SRC_ADDR_INVALID | status::READ_FAIL | status::IRQ_RAISED
    );
}

#[test]
fn access_straddling_the_end_of_a_mapping_fails() {
    let mut r = rig();
    r.write(reg::IRQ_NUMBER, 1);
    r.write(reg::IRQ_TYPE, irq_type::MSI);
    let end = RAM + RAM_LEN;
    // The last byte of the mapping works.
    let st = r.transfer(command::WRITE, 0, end - 1, 1);
    assert_eq!(st, status::WRITE_SUCCESS | status::IRQ_RAISED);
    // One byte more does not, and nothing of the buffer was written.
    let before = r.mem_read(end - 100, 100);
    let st = r.transfer(command::WRITE, 0, end - 100, 101);
    assert_eq!(
        st,
        status::DST_ADDR_INVALID | status::WRITE_FAIL | status::IRQ_RAISED
    );
    assert_eq!(r.mem_read(end - 100, 100), before);
    assert_eq!(r.dev.last_fault().unwrap().fault_iova, end);
    let st = r.transfer(command::READ, end - 8, 0, 9);
    assert_eq!(
        st,
        status::SRC_ADDR_INVALID | status::READ_FAIL | status::IRQ_RAISED
    );
    let st = r.transfer(command::COPY, RAM, end - 8, 9);
    assert_eq!(
        st,
        status::DST_ADDR_INVALID | status::COPY_FAIL | status::IRQ_RAISED
    );
    // Starting just before the mapping.
    let st = r.transfer(command::READ, RAM - 1, 0, 2);
    assert_eq!(
        st,
        status::SRC_ADDR_INVALID | status::READ_FAIL | status::IRQ_RAISED
    );
}

#[test]
fn dma_needs_bus_mastering() {
    let mut r = rig();
    r.write(reg::IRQ_NUMBER, 1);
    r.write(reg::IRQ_TYPE, irq_type::MSI);
    r.cfg_write16(offset::COMMAND, cmd_bits::MEMORY_SPACE);
    let st = r.transfer(command::WRITE, 0, RAM, 16);
    assert_eq!(
        st,
        status::DST_ADDR_INVALID | status::WRITE_FAIL | status::IRQ_RAISED
    );
    assert_eq!(
        r.dev.last_fault().unwrap().reason,
        "bus mastering is disabled in COMMAND"
    );
    assert_eq!(r.mem_read(RAM, 16), [0; 16]);
}

#[test]
fn missing_iommu_mapping_fails_the_command() {
    let mut backing = vec![0u8; 0x3000];
    let host = (backing.as_mut_ptr() as u64 + 0xfff) & !0xfff;
    let model = Arc::new(pinning::model::IommuModel::new(8, None));
    pinning::backend::DmaMapper::map(&*model, 0x4000_0000, 0x1000, host).unwrap();
    // SAFETY: the one mapping points into `backing`, which outlives the device.
    let dma = Arc::new(unsafe { IommuDma::new(model) });
    let irqs: Arc<Mutex<Vec<EpfIrq>>> = Arc::default();
    let sink = irqs.clone();
    let dev = EpfTest::new(
        EpfConfig::default(),
        dma,
        Box::new(move |i: EpfIrq| sink.lock().unwrap().push(i)),
    )
    .unwrap();
    let mut r = Rig {
        dev,
        mem: Arc::new(MappedRegions::new()),
        irqs,
    };
    r.cfg_write16(
        offset::COMMAND,
        cmd_bits::MEMORY_SPACE | cmd_bits::BUS_MASTER,
    );
    r.write(reg::IRQ_TYPE, irq_type::INTX);
    let st = r.transfer(command::WRITE, 0, 0x4000_0000, 0x1000);
    assert_eq!(st, status::WRITE_SUCCESS | status::IRQ_RAISED);
    // The next page has no IOMMU mapping.
    let st = r.transfer(command::WRITE, 0, 0x4000_0800, 0x1000);
    assert_eq!(
        st,
        status::DST_ADDR_INVALID | status::WRITE_FAIL | status::IRQ_RAISED
    );
    assert_eq!(r.dev.last_fault().unwrap().fault_iova, 0x4000_1000);
    assert_eq!(r.irqs(), [EpfIrq::Intx, EpfIrq::Intx]);
    drop(r);
    drop(backing);
}

#[test]
fn raise_commands_pick_type_and_number() {
    let mut r = rig();
    // INTx.
    r.write(reg::IRQ_TYPE, irq_type::INTX);
    r.write(reg::IRQ_NUMBER, 0);
    r.write(reg::COMMAND, command::RAISE_INTX_IRQ);
    assert_eq!(r.read(reg::STATUS), status::IRQ_RAISED);
    assert_eq!(r.irqs(), [EpfIrq::Intx]);
    // INTx disabled in COMMAND: status set, nothing sent.
    r.cfg_write16(
        offset::COMMAND,
        cmd_bits::MEMORY_SPACE | cmd_bits::BUS_MASTER | cmd_bits::INTX_DISABLE,
    );
    r.write(reg::COMMAND, command::RAISE_INTX_IRQ);
    assert!(r.irqs().is_empty());
    // MSI 32 of 32.
    r.write(reg::IRQ_TYPE, irq_type::MSI);
    r.write(reg::IRQ_NUMBER, 32);
    r.write(reg::COMMAND, command::RAISE_MSI_IRQ);
    assert_eq!(r.irqs(), [EpfIrq::Msi { vector: 31 }]);
    // Number 0 and numbers beyond the enabled vectors are not raised.
    for n in [0, 33, u32::MAX] {
        r.write(reg::IRQ_NUMBER, n);
        r.write(reg::COMMAND, command::RAISE_MSI_IRQ);
        assert_eq!(r.read(reg::STATUS), status::IRQ_RAISED);
    }
    assert!(r.irqs().is_empty());
    // With only 4 MSI vectors enabled, number 5 is out of range.
    r.enable_msi(2);
    r.write(reg::IRQ_NUMBER, 5);
    r.write(reg::COMMAND, command::RAISE_MSI_IRQ);
    r.write(reg::IRQ_NUMBER, 4);
    r.write(reg::COMMAND, command::RAISE_MSI_IRQ);
    assert_eq!(r.irqs(), [EpfIrq::Msi { vector: 3 }]);
    // MSI-X only once enabled.
    r.write(reg::IRQ_TYPE, irq_type::MSIX);
    r.write(reg::IRQ_NUMBER, 7);
    r.write(reg::COMMAND, command::RAISE_MSIX_IRQ);
    assert!(r.irqs().is_empty());
    r.enable_msix();
    r.write(reg::COMMAND, command::RAISE_MSIX_IRQ);
    assert_eq!(r.irqs(), [EpfIrq::Msix { vector: 6 }]);
    // A transfer completes with the configured MSI-X vector.
    let st = r.transfer(command::WRITE, 0, RAM, 8);
    assert_eq!(st, status::WRITE_SUCCESS | status::IRQ_RAISED);
    assert_eq!(r.irqs(), [EpfIrq::Msix { vector: 6 }]);
}

#[test]
fn invalid_commands_and_irq_types_are_dropped() {
    let mut r = rig();
    r.write(reg::STATUS, status::READ_SUCCESS);
    // Unknown IRQ type: pci-epf-test drops the command with STATUS cleared.
    r.write(reg::IRQ_TYPE, 3);
    let st = r.transfer(command::WRITE, 0, RAM, 8);
    assert_eq!(st, 0);
    assert_eq!(r.mem_read(RAM, 8), [0; 8]);
    // Two command bits at once, or an unknown bit, is not a command.
    r.write(reg::IRQ_TYPE, irq_type::MSI);
    r.write(reg::IRQ_NUMBER, 1);
    for bad in [command::READ | command::WRITE, 1 << 20] {
        r.write(reg::COMMAND, bad);
        assert_eq!(r.read(reg::STATUS), 0);
        assert_eq!(r.read(reg::COMMAND), 0);
    }
    assert!(r.irqs().is_empty());
    // Doorbells are not supported: FAIL status and the interrupt.
    r.write(reg::COMMAND, command::ENABLE_DOORBELL);
    assert_eq!(
        r.read(reg::STATUS),
        status::DOORBELL_ENABLE_FAIL | status::IRQ_RAISED
    );
    r.write(reg::COMMAND, command::DISABLE_DOORBELL);
    assert_eq!(
        r.read(reg::STATUS),
        status::DOORBELL_DISABLE_FAIL | status::IRQ_RAISED
    );
    assert_eq!(r.irqs().len(), 2);
    // The host clears IRQ_RAISED by writing STATUS back.
    r.write(reg::STATUS, 0);
    assert_eq!(r.read(reg::STATUS), 0);
    // FLAGS.USE_DMA changes nothing.
    r.write(reg::FLAGS, flags::USE_DMA);
    let st = r.transfer(command::WRITE, 0, RAM, 8);
    assert_eq!(st, status::WRITE_SUCCESS | status::IRQ_RAISED);
}

#[test]
fn zero_size_transfers_touch_nothing() {
    let mut r = rig();
    r.write(reg::IRQ_NUMBER, 1);
    r.write(reg::IRQ_TYPE, irq_type::MSI);
    let st = r.transfer(command::WRITE, 0, 0xdead_0000, 0);
    assert_eq!(st, status::WRITE_SUCCESS | status::IRQ_RAISED);
    assert_eq!(r.read(reg::CHECKSUM), checksum(&[]));
}

#[test]
fn msi_and_msix_routing_changes_are_reported() {
    let mut r = rig_with(EpfConfig {
        msi_vectors: 4,
        msix_vectors: 8,
    });
    // MSI: programming while enabled changes everything.
    let at = r.dev.msi().offset();
    let e = r.cfg_write32(at + 4, 0xfee0_1000);
    assert_eq!(e.msi, RoutingChange::All);
    assert_eq!(r.dev.msi().message(0).unwrap().addr, 0xfee0_1000);
    // Per-vector mask bit 2.
    let e = r.cfg_write32(at + 0x10, 0x4);
    assert_eq!(e.msi, RoutingChange::Vector(2));
    assert!(r.dev.msi().message(2).unwrap().masked);
    // MSI-X table entry 3 through BAR0, then unmask it.
    let e = r.enable_msix();
    assert_eq!(e.msix, RoutingChange::All);
    let entry = MSIX_TABLE_OFFSET + 3 * 16;
    assert_eq!(r.write(entry, 0xfee0_2000).msix, RoutingChange::Vector(3));
    assert_eq!(r.write(entry + 8, 0x45).msix, RoutingChange::Vector(3));
    assert_eq!(r.read(entry + 12), 1, "entries reset masked");
    assert_eq!(r.write(entry + 12, 0).msix, RoutingChange::Vector(3));
    assert_eq!(r.read(entry), 0xfee0_2000);
    let v: Vec<_> = r.dev.msix().vectors().filter(|(_, m)| !m.masked).collect();
    assert_eq!(v.len(), 1);
    assert_eq!((v[0].0, v[0].1.addr, v[0].1.data), (3, 0xfee0_2000, 0x45));
    // Function mask through config space.
    let cap = r.dev.msix().offset();
    let e = r.cfg_write16(cap + 2, 1 << 15 | 1 << 14);
    assert_eq!(e.msix, RoutingChange::All);
    assert!(r.dev.msix().vectors().all(|(_, m)| m.masked));
    // The PBA is read-only and reads 0 (the device leaves pending to the sink).
    r.write(MSIX_PBA_OFFSET, u32::MAX);
    assert_eq!(r.read(MSIX_PBA_OFFSET), 0);
    // Register writes are not routing changes.
    assert!(r.write(reg::MAGIC, 1).is_empty());
}

#[test]
fn bar_moves_are_reported() {
    let mut r = rig();
    let e = r.cfg_write32(offset::BAR0, 0xc000_0000);
    assert_eq!(e.bars.len(), 1);
    assert_eq!((e.bars[0].old, e.bars[0].new), (Some(0), Some(0xc000_0000)));
    let e = r.cfg_write16(offset::COMMAND, cmd_bits::BUS_MASTER);
    assert_eq!((e.bars[0].old, e.bars[0].new), (Some(0xc000_0000), None));
    assert_eq!(r.dev.bars()[0].addr, 0xc000_0000);
}

#[test]
fn arbitrary_guest_accesses_do_not_panic() {
    let mut r = rig();
    let mut seed = 0x1234_5678_9abc_def0u64;
    let mut next = move || {
        seed = splitmix64(seed);
        seed
    };
    for _ in 0..20_000 {
        let x = next();
        let len = [1, 2, 3, 4, 8][(x % 5) as usize];
        let value = next().to_le_bytes();
        let off = (x >> 8) % 0x1100;
        let mut buf = [0u8; 8];
        match (x >> 32) % 4 {
            0 => {
                r.dev.bar_write((x >> 40) as usize % 7, off, &value[..len]);
            }
            1 => r.dev.bar_read((x >> 40) as usize % 7, off, &mut buf[..len]),
            2 => {
                r.dev
                    .config_write((off / 4) as usize, x >> 48 & 7, &value[..len]);
            }
            _ => {
                r.dev.config_read((off / 4) as usize);
            }
        }
    }
}

/// Guest memory of 4 GiB, never touched: reading it maps the zero page, so a 4 GiB READ
/// costs time but no memory.
const BIG: u64 = 0x1_0000_0000;
const BIG_LEN: u64 = 1 << 32;
/// Far longer than any transfer here needs.
const LONG: Duration = Duration::from_secs(60);
/// Well under a second, far above what the inline part of a transfer takes.
const PROMPT: Duration = Duration::from_millis(500);

/// A rig with [`BIG`] mapped read-only, and a READ of SIZE 4 GiB - 1 from it started.
fn big_read() -> (Rig, Duration) {
    let mut r = rig();
    r.mem
        .insert_anonymous(BIG, BIG_LEN, DmaProt::READ_ONLY)
        .unwrap();
    r.write(reg::IRQ_NUMBER, 1);
    r.write(reg::IRQ_TYPE, irq_type::MSI);
    r.write(reg::SRC_ADDR_LO, BIG as u32);
    r.write(reg::SRC_ADDR_HI, (BIG >> 32) as u32);
    r.write(reg::SIZE, u32::MAX);
    r.write(reg::STATUS, 0);
    let t = Instant::now();
    r.write(reg::COMMAND, command::READ);
    (r, t.elapsed())
}

#[test]
fn a_4_gib_transfer_returns_from_the_command_write_at_once() {
    let (mut r, took) = big_read();
    assert!(took < PROMPT, "the COMMAND write took {took:?}");
    assert!(r.dev.busy());
    assert_eq!(r.read(reg::STATUS), 0, "done already?");
    assert!(r.irqs().is_empty());
    // A command written meanwhile waits in COMMAND, as on the real endpoint.
    r.write(reg::COMMAND, command::RAISE_MSI_IRQ);
    assert_eq!(r.read(reg::COMMAND), command::RAISE_MSI_IRQ);
    assert!(r.irqs().is_empty());
    // Unmapping the memory under the transfer fails it at its next chunk; then the waiting
    // command runs (clearing STATUS, as the real command handler does).
    r.mem.remove(BIG, BIG_LEN).unwrap();
    assert!(r.dev.wait_idle(LONG), "the transfer never finished");
    let fault = r.dev.last_fault().expect("no DMA fault");
    assert!(fault.fault_iova >= BIG + INLINE_BYTES, "{fault}");
    assert_eq!(
        r.irqs(),
        [EpfIrq::Msi { vector: 0 }, EpfIrq::Msi { vector: 0 }]
    );
    assert_eq!(r.read(reg::COMMAND), 0);
    assert_eq!(r.read(reg::STATUS), status::IRQ_RAISED);
}

#[test]
fn turning_bus_mastering_off_fails_a_running_transfer() {
    let (mut r, _) = big_read();
    r.cfg_write16(offset::COMMAND, cmd_bits::MEMORY_SPACE);
    assert!(r.dev.wait_idle(LONG), "the transfer never finished");
    assert_eq!(
        r.read(reg::STATUS),
        status::SRC_ADDR_INVALID | status::READ_FAIL | status::IRQ_RAISED
    );
    assert_eq!(
        r.dev.last_fault().unwrap().reason,
        "bus mastering is disabled in COMMAND"
    );
    assert_eq!(r.irqs(), [EpfIrq::Msi { vector: 0 }]);
}

#[test]
fn dropping_the_device_stops_a_running_transfer_without_an_interrupt() {
    let (r, _) = big_read();
    let Rig { dev, irqs, .. } = r;
    let t = Instant::now();
    drop(dev);
    assert!(t.elapsed() < PROMPT, "stopping took {:?}", t.elapsed());
    assert!(irqs.lock().unwrap().is_empty());
}

#[test]
fn a_large_transfer_completes_on_the_dma_thread() {
    const AT: u64 = 0x2000_0000;
    const LEN: u64 = 32 << 20;
    let mut r = rig();
    r.mem
        .insert_anonymous(AT, LEN, DmaProt::READ_WRITE)
        .unwrap();
    r.write(reg::IRQ_NUMBER, 2);
    r.write(reg::IRQ_TYPE, irq_type::MSI);
    let size = 8 * INLINE_BYTES as u32 + 123;
    r.transfer(command::WRITE, 0, AT, size);
    assert!(r.dev.wait_idle(LONG));
    assert_eq!(
        r.read(reg::STATUS),
        status::WRITE_SUCCESS | status::IRQ_RAISED
    );
    let crc = r.read(reg::CHECKSUM);
    assert_eq!(crc, checksum(&r.mem_read(AT, size as usize)));
    assert_eq!(r.irqs(), [EpfIrq::Msi { vector: 1 }]);
    r.write(reg::CHECKSUM, crc);
    r.transfer(command::READ, AT, 0, size);
    assert!(r.dev.wait_idle(LONG));
    assert_eq!(
        r.read(reg::STATUS),
        status::READ_SUCCESS | status::IRQ_RAISED
    );
    r.transfer(command::COPY, AT, AT + LEN / 2, size);
    assert!(r.dev.wait_idle(LONG));
    assert_eq!(
        r.read(reg::STATUS),
        status::COPY_SUCCESS | status::IRQ_RAISED
    );
    assert_eq!(checksum(&r.mem_read(AT + LEN / 2, size as usize)), crc);
    assert_eq!(r.irqs().len(), 2);
}

#[test]
fn a_guest_flooding_dma_faults_gets_a_bounded_number_of_log_lines() {
    use crate::ratelimit::{capture, DEFAULT_BURST};
    capture::install();
    // An address no other test uses, to tell this test's lines from theirs.
    const HOLE: u64 = 0x7777_0000_0000;
    const COMMANDS: u64 = 2000;
    let mut r = rig();
    r.write(reg::IRQ_NUMBER, 1);
    r.write(reg::IRQ_TYPE, irq_type::MSI);
    let suppressed = DMA_FAULTS.suppressed();
    for _ in 0..COMMANDS {
        // Every command still fails visibly to the guest; only the log is limited.
        let st = r.transfer(command::WRITE, 0, HOLE, 64);
        assert_eq!(
            st,
            status::DST_ADDR_INVALID | status::WRITE_FAIL | status::IRQ_RAISED
        );
    }
    assert_eq!(r.irqs().len() as u64, COMMANDS);
    let lines = capture::lines_with(&format!("at IOVA {HOLE:#x} "));
    // One window of the limit (other tests share it), or two if the loop straddled a
    // window's end; not one line per fault.
    let most = 2 * u64::from(DEFAULT_BURST);
    assert!(lines.len() as u64 <= most, "{} lines", lines.len());
    assert!(DMA_FAULTS.suppressed() - suppressed >= COMMANDS - most);
}
