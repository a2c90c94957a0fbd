//! The DSDT: the namespace a hardware-reduced guest enumerates instead of probing, built with
//! `acpi_tables::aml`. It declares the PCI host bridge `\_SB.PCI0` (bus 0, its I/O and memory
//! windows, a `_PRT` for INTx lines) and COM1.
//!
//! Resource descriptors: ACPI 6.5 section 6.4; AML: section 20.

use acpi_tables::aml::{
    self, AddressSpace, AddressSpaceCacheable, Device, EISAName, Name, Package, ResourceTemplate,
    Scope, IO,
};
use acpi_tables::sdt::Sdt;
use acpi_tables::{Aml, AmlSink};
use devices::pci::bus::{CONFIG_IO_BASE, CONFIG_IO_LEN};
use guest_abi::ports;

use super::tables::{self, ECAM_BUSES};
use crate::arch::x86_64::mptable::PciIntx;
use crate::memory::layout::{MMIO32_ALLOC_END, MMIO32_START, PCI_IO_END, PCI_IO_START};
use crate::memory::MemoryLayout;

/// DSDT revision 2: integers are 64 bits (the 64-bit window needs it).
const DSDT_REVISION: u8 = 2;

/// `IRQNoFlags() { irq }`: the short IRQ descriptor, edge triggered and active high (ACPI
/// 6.5, 6.4.2.1). Written here because acpi_tables offers only the extended one, and COM1's
/// `_CRS` keeps the descriptor a PC's firmware gives it.
struct IrqNoFlags(u8);

impl Aml for IrqNoFlags {
    fn to_aml_bytes(&self, sink: &mut dyn AmlSink) {
        sink.byte(0x22);
        sink.word(1 << self.0);
    }
}

/// The DSDT for the windows of `layout` and the INTx lines in `intx`.
pub fn dsdt(layout: &MemoryLayout, intx: &[PciIntx]) -> Sdt {
    let mmio64 = layout.mmio64();
    let bus_numbers = AddressSpace::<u16>::new_bus_number(ECAM_BUSES.0.into(), ECAM_BUSES.1.into());
    let config_ports = IO::new(CONFIG_IO_BASE, CONFIG_IO_BASE, 1, CONFIG_IO_LEN as u8);
    // All of port space but the configuration ports, as a PC host bridge decodes it; the
    // window I/O BARs are placed in is a range of its own, so the guest sees where.
    let io_below = AddressSpace::<u16>::new_io(0, CONFIG_IO_BASE - 1, None);
    let io_above = AddressSpace::<u16>::new_io(
        CONFIG_IO_BASE + CONFIG_IO_LEN,
        PCI_IO_START as u16 - 1,
        None,
    );
    let io_bars = AddressSpace::<u16>::new_io(PCI_IO_START as u16, (PCI_IO_END - 1) as u16, None);
    let mmio32 = memory(MMIO32_START as u32, (MMIO32_ALLOC_END - 1) as u32);
    let mmio64 = memory(mmio64.start.0, mmio64.end() - 1);
    let crs = ResourceTemplate::new(vec![
        &bus_numbers,
        &config_ports,
        &io_below,
        &io_above,
        &io_bars,
        &mmio32,
        &mmio64,
    ]);
    // INTx: (device << 16 | 0xffff, pin 0..3, no link device, GSI).
    let routes: Vec<[u64; 3]> = intx
        .iter()
        .map(|i| {
            [
                u64::from(i.slot) << 16 | 0xffff,
                u64::from(i.pin.clamp(1, 4) - 1),
                i.gsi.into(),
            ]
        })
        .collect();
    let entries: Vec<Package> = routes
        .iter()
        .map(|[address, pin, gsi]| Package::new(vec![address, pin, &aml::ZERO, gsi]))
        .collect();
    let prt = Package::new(entries.iter().map(|e| e as &dyn Aml).collect());
    let (hid, cid) = (EISAName::new("PNP0A08"), EISAName::new("PNP0A03"));
    let pci0_names = [
        Name::new("_HID".into(), &hid),
        Name::new("_CID".into(), &cid),
        Name::new("_SEG".into(), &aml::ZERO),
        Name::new("_BBN".into(), &aml::ZERO),
        Name::new("_UID".into(), &aml::ZERO),
        Name::new("_CRS".into(), &crs),
        Name::new("_PRT".into(), &prt),
    ];
    let pci0 = Device::new("PCI0".into(), children(&pci0_names));

    let com1_ports = IO::new(
        ports::SERIAL_COM1,
        ports::SERIAL_COM1,
        1,
        ports::SERIAL_LEN as u8,
    );
    let com1_irq = IrqNoFlags(ports::SERIAL_IRQ as u8);
    let com1_crs = ResourceTemplate::new(vec![&com1_ports, &com1_irq]);
    let com1_hid = EISAName::new("PNP0501");
    let com1_names = [
        Name::new("_HID".into(), &com1_hid),
        Name::new("_UID".into(), &aml::ONE),
        Name::new("_CRS".into(), &com1_crs),
    ];
    let com1 = Device::new("COM1".into(), children(&com1_names));

    let sb = Scope::new("\\_SB_".into(), vec![&pci0, &com1]);
    let mut table = tables::sdt(b"DSDT", DSDT_REVISION);
    table.append_slice(&tables::bytes(&sb));
    table
}

/// `DWordMemory` or `QWordMemory`(ResourceProducer, PosDecode, MinFixed, MaxFixed,
/// NonCacheable, ReadWrite) over [min, max].
fn memory<T: Default>(min: T, max: T) -> AddressSpace<T> {
    AddressSpace::new_memory(AddressSpaceCacheable::NotCacheable, true, min, max, None)
}

fn children(names: &[Name]) -> Vec<&dyn Aml> {
    names.iter().map(|n| n as &dyn Aml).collect()
}
