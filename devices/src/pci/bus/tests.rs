use super::super::config::{offset, BarChange, BarKind, BarSpec};
use super::*;

/// A device with one 4 KiB memory BAR backed by bytes.
struct MemDevice {
    config: ConfigSpace,
    mem: Vec<u8>,
}

impl MemDevice {
    fn shared() -> Arc<Mutex<MemDevice>> {
        let config = super::super::config::with_mem_bar0(
            &PciHeader {
                vendor_id: 0x1af4,
                device_id: 0x1000,
                class_code: 0xff0000,
                revision_id: 1,
                interrupt_pin: 1,
                ..PciHeader::default()
            },
            0x1000,
        );
        Arc::new(Mutex::new(MemDevice {
            config,
            mem: vec![0; 0x1000],
        }))
    }
}

impl PciDevice for MemDevice {
    fn config_read(&mut self, reg: usize) -> u32 {
        self.config.read_reg(reg)
    }
    fn config_write(&mut self, reg: usize, offset: u64, data: &[u8]) -> Effects {
        Effects::bars(self.config.write_reg(reg, offset, data))
    }
    fn bars(&self) -> Vec<Bar> {
        self.config.bars().collect()
    }
    fn bar_read(&mut self, _bar: usize, offset: u64, data: &mut [u8]) {
        for (i, b) in data.iter_mut().enumerate() {
            *b = self.mem.get(offset as usize + i).copied().unwrap_or(0xff);
        }
    }
    fn bar_write(&mut self, _bar: usize, offset: u64, data: &[u8]) -> Effects {
        for (i, b) in data.iter().enumerate() {
            if let Some(m) = self.mem.get_mut(offset as usize + i) {
                *m = *b;
            }
        }
        Effects::default()
    }
}

fn cfg_addr(device: u8, function: u8, reg_offset: u8) -> u32 {
    ADDRESS_ENABLE | u32::from(device) << 11 | u32::from(function) << 8 | u32::from(reg_offset)
}

fn read32(io: &mut PciConfigIo, address: u32) -> u32 {
    io.write(0, &address.to_le_bytes());
    let mut d = [0u8; 4];
    io.read(4, &mut d);
    u32::from_le_bytes(d)
}

#[test]
fn host_bridge_and_absent_functions() {
    let mut io = PciConfigIo::new(Arc::new(PciBus::new()));
    assert_eq!(read32(&mut io, cfg_addr(0, 0, 0)), 0x0d57_8086);
    assert_eq!(read32(&mut io, cfg_addr(0, 0, 8)) >> 8, HOST_BRIDGE_CLASS);
    assert_eq!(
        read32(&mut io, cfg_addr(0, 0, 0xc)) >> 16 & 0xff,
        0,
        "header type 0"
    );
    // Absent slot, absent function, other bus: all ones.
    assert_eq!(read32(&mut io, cfg_addr(1, 0, 0)), u32::MAX);
    assert_eq!(read32(&mut io, cfg_addr(0, 1, 0)), u32::MAX);
    assert_eq!(read32(&mut io, cfg_addr(0, 0, 0) | 1 << 16), u32::MAX);
    // Without the enable bit, CONFIG_DATA is not a config cycle.
    assert_eq!(
        read32(&mut io, cfg_addr(0, 0, 0) & !ADDRESS_ENABLE),
        u32::MAX
    );
    // Writes to absent functions go nowhere and do not panic.
    io.write(0, &cfg_addr(31, 7, 0xfc).to_le_bytes());
    io.write(4, &[1, 2, 3, 4]);
}

#[test]
fn config_address_register() {
    let mut io = PciConfigIo::new(Arc::new(PciBus::new()));
    // Linux's type-1 probe: a byte to 0xCFB must not disturb CONFIG_ADDRESS, and a dword
    // of 0x80000000 must read back unchanged.
    io.write(0, &0x8000_0000u32.to_le_bytes());
    io.write(3, &[0x01]);
    let mut d = [0u8; 4];
    io.read(0, &mut d);
    assert_eq!(u32::from_le_bytes(d), 0x8000_0000);
    // Reserved bits 30:24 and 1:0 do not stick.
    io.write(0, &u32::MAX.to_le_bytes());
    assert_eq!(io.address, 0x80ff_fffc);
    // Narrow reads of 0xCF8..0xCFB are not CONFIG_ADDRESS.
    let mut b = [0u8; 2];
    io.read(0, &mut b);
    assert_eq!(b, [0xff; 2]);
    io.read(2, &mut b);
    assert_eq!(b, [0xff; 2]);
}

#[test]
fn data_port_access_widths() {
    let mut io = PciConfigIo::new(Arc::new(PciBus::new()));
    io.write(0, &cfg_addr(0, 0, 0).to_le_bytes());
    let mut b = [0u8; 1];
    let mut w = [0u8; 2];
    for (port, want) in [(4, 0x86), (5, 0x80), (6, 0x57), (7, 0x0d)] {
        io.read(port, &mut b);
        assert_eq!(b[0], want, "byte at 0xcf{:x}", 8 + port);
    }
    io.read(4, &mut w);
    assert_eq!(u16::from_le_bytes(w), 0x8086);
    io.read(6, &mut w);
    assert_eq!(u16::from_le_bytes(w), 0x0d57);
    // A word at 0xCFF would cross the dword; 3 and 8 byte accesses are not valid.
    io.read(7, &mut w);
    assert_eq!(w, [0xff; 2]);
    let mut t = [0u8; 3];
    io.read(4, &mut t);
    assert_eq!(t, [0xff; 3]);
    let mut q = [0u8; 8];
    io.read(4, &mut q);
    assert_eq!(q, [0xff; 8]);
    // Past the ports.
    io.read(8, &mut b);
    assert_eq!(b, [0xff]);
}

#[test]
fn writes_reach_the_device_and_report_bar_moves() {
    let bus = Arc::new(PciBus::new());
    let dev = MemDevice::shared();
    let addr = bus.add_device(dev.clone()).unwrap();
    assert_eq!(addr, PciAddress::slot(1));
    assert_eq!(addr.to_string(), "00:01.0");
    let seen: Arc<Mutex<Vec<(PciAddress, Effects)>>> = Arc::default();
    let sink = seen.clone();
    let mut io = PciConfigIo::new(bus.clone()).with_effects_handler(Arc::new(move |a, e| {
        sink.lock().unwrap().push((a, e));
    }));
    // BAR sizing through the ports.
    io.write(0, &cfg_addr(1, 0, offset::BAR0 as u8).to_le_bytes());
    io.write(4, &u32::MAX.to_le_bytes());
    let mut d = [0u8; 4];
    io.read(4, &mut d);
    assert_eq!(u32::from_le_bytes(d), 0xffff_f000);
    io.write(4, &0xc000_0000u32.to_le_bytes());
    assert!(seen.lock().unwrap().is_empty(), "not decoding yet");
    // Enable memory decode with a word write at 0xCFC (COMMAND).
    io.write(0, &cfg_addr(1, 0, offset::COMMAND as u8).to_le_bytes());
    io.write(4, &2u16.to_le_bytes());
    // A byte write to the interrupt line at 0xCFC + 0 of register 0x3c.
    io.write(
        0,
        &cfg_addr(1, 0, offset::INTERRUPT_LINE as u8).to_le_bytes(),
    );
    io.write(4, &[9]);
    assert_eq!(lock(&dev).config.read_u8(offset::INTERRUPT_LINE), 9);
    let seen = seen.lock().unwrap();
    assert_eq!(seen.len(), 1);
    let (a, e) = &seen[0];
    assert_eq!(*a, addr);
    assert_eq!(
        e.bars,
        [BarChange {
            index: 0,
            spec: BarSpec {
                kind: BarKind::Memory32,
                size: 0x1000,
                prefetchable: false
            },
            old: None,
            new: Some(0xc000_0000)
        }]
    );
    assert_eq!(lock(&dev).bars()[0].addr, 0xc000_0000);
}

#[test]
fn slots() {
    let bus = PciBus::new();
    // The host bridge holds slot 0.
    assert_eq!(bus.add_device(MemDevice::shared()), Ok(PciAddress::slot(1)));
    for _ in 0..30 {
        bus.add_device(MemDevice::shared()).unwrap();
    }
    assert_eq!(bus.add_device(MemDevice::shared()), Err(PciBusError::Full));
    assert_eq!(bus.devices().len(), 32);
    assert!(bus.device(PciAddress::slot(31)).is_some());
    assert!(bus
        .device(PciAddress {
            bus: 0,
            device: 31,
            function: 1
        })
        .is_none());
}

#[test]
fn bar_region_forwards_accesses() {
    let dev = MemDevice::shared();
    let mut region = PciBarRegion::new(PciAddress::slot(3), dev.clone(), 0, None);
    region.write(0x10, &[1, 2, 3, 4]);
    let mut d = [0u8; 2];
    region.read(0x11, &mut d);
    assert_eq!(d, [2, 3]);
    assert_eq!(lock(&dev).mem[0x13], 4);
}
