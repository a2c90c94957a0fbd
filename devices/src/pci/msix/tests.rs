use super::super::config::{BarSpec, PciHeader};
use super::*;

fn config() -> ConfigSpace {
    let mut cs = ConfigSpace::new(&PciHeader {
        vendor_id: 1,
        device_id: 2,
        ..PciHeader::default()
    });
    cs.add_bar(
        0,
        BarSpec {
            kind: BarKind::Memory32,
            size: 0x1000,
            prefetchable: false,
        },
    )
    .unwrap();
    cs.add_bar(
        1,
        BarSpec {
            kind: BarKind::Io,
            size: 0x100,
            prefetchable: false,
        },
    )
    .unwrap();
    cs
}

const TABLE_AT: MsixLocation = MsixLocation {
    bar: 0,
    offset: 0x400,
};
const PBA_AT: MsixLocation = MsixLocation {
    bar: 0,
    offset: 0x800,
};

fn msix(vectors: u16) -> (ConfigSpace, MsixCap) {
    let mut cs = config();
    let m = MsixCap::add_to(&mut cs, vectors, TABLE_AT, PBA_AT).unwrap();
    (cs, m)
}

fn set_ctrl(cs: &mut ConfigSpace, m: &mut MsixCap, ctrl: u16) -> RoutingChange {
    let at = m.offset() + MSG_CTRL;
    cs.write_reg(at / 4, (at % 4) as u64, &ctrl.to_le_bytes());
    assert!(m.contains_reg(at / 4));
    m.update(cs)
}

fn program(m: &mut MsixCap, v: u16, addr: u64, data: u32, masked: bool) {
    let base = u64::from(v) * ENTRY_SIZE;
    m.table_write(base, &(addr as u32).to_le_bytes());
    m.table_write(base + 4, &((addr >> 32) as u32).to_le_bytes());
    m.table_write(base + 8, &data.to_le_bytes());
    m.table_write(base + 12, &u32::from(masked).to_le_bytes());
}

#[test]
fn capability_layout() {
    let (mut cs, mut m) = msix(20);
    let at = m.offset();
    assert_eq!(cs.capabilities(), [(cap_id::MSIX, at)]);
    assert_eq!(cs.read_u16(at + MSG_CTRL), 19);
    assert_eq!(cs.read_u32(at + TABLE), 0x400);
    assert_eq!(cs.read_u32(at + PBA), 0x800);
    // The table size and the BIR/offset fields are read-only.
    set_ctrl(&mut cs, &mut m, 0xffff);
    assert_eq!(cs.read_u16(at + MSG_CTRL), 0xc000 | 19);
    cs.write_reg((at + TABLE) / 4, 0, &[0; 4]);
    assert_eq!(cs.read_u32(at + TABLE), 0x400);
    assert_eq!(m.table(), (TABLE_AT, 20 * 16));
    assert_eq!(m.pba(), (PBA_AT, 8));
    assert_eq!(m.table_offset(0, 0x410), Some(0x10));
    assert_eq!(m.table_offset(0, 0x400 + 20 * 16), None);
    assert_eq!(m.table_offset(1, 0x410), None);
    assert_eq!(m.pba_offset(0, 0x804), Some(4));
    assert_eq!(m.pba_offset(0, 0x808), None);
}

#[test]
fn placement_rules() {
    let mut cs = config();
    let at = |bar, offset| MsixLocation { bar, offset };
    assert_eq!(
        MsixCap::add_to(&mut cs, 0, TABLE_AT, PBA_AT).unwrap_err(),
        MsixError::Vectors(0)
    );
    assert_eq!(
        MsixCap::add_to(&mut cs, 2049, TABLE_AT, PBA_AT).unwrap_err(),
        MsixError::Vectors(2049)
    );
    let reason = |r: Result<MsixCap, MsixError>| match r.unwrap_err() {
        MsixError::Placement { reason, .. } => reason,
        e => panic!("unexpected {e}"),
    };
    assert_eq!(
        reason(MsixCap::add_to(&mut cs, 4, at(2, 0), PBA_AT)),
        "no such BAR is registered"
    );
    assert_eq!(
        reason(MsixCap::add_to(&mut cs, 4, at(1, 0), PBA_AT)),
        "the BAR is an I/O BAR"
    );
    assert_eq!(
        reason(MsixCap::add_to(&mut cs, 4, at(0, 0x404), PBA_AT)),
        "the offset must be 8-byte aligned and below 4 GiB"
    );
    assert_eq!(
        reason(MsixCap::add_to(&mut cs, 256, TABLE_AT, PBA_AT)),
        "it does not fit in the BAR"
    );
    assert_eq!(
        reason(MsixCap::add_to(&mut cs, 4, TABLE_AT, at(0, 0x438))),
        "it overlaps the table"
    );
    // Nothing was added by the failed attempts.
    assert!(cs.capabilities().is_empty());
    MsixCap::add_to(&mut cs, 4, TABLE_AT, at(0, 0x440)).unwrap();
}

#[test]
fn table_writes_report_the_vector() {
    let (mut cs, mut m) = msix(4);
    // Entries reset masked.
    assert!(m.message(3).unwrap().masked);
    assert_eq!(
        m.table_write(16 + 8, &0x55u32.to_le_bytes()),
        RoutingChange::Vector(1)
    );
    // Rewriting the same value changes nothing.
    assert_eq!(
        m.table_write(16 + 8, &0x55u32.to_le_bytes()),
        RoutingChange::Unchanged
    );
    // A 64-bit address write in one access.
    assert_eq!(
        m.table_write(32, &0x1_fee0_0004u64.to_le_bytes()),
        RoutingChange::Vector(2)
    );
    // Byte-wide write to the vector control clears the mask.
    assert_eq!(m.table_write(32 + 12, &[0]), RoutingChange::Vector(2));
    // An access spanning two entries changes both.
    assert_eq!(m.table_write(8, &[1; 16]), RoutingChange::All);
    // Reserved bits read 0: address bits 1:0, vector control bits 31:1.
    let mut b = [0u8; 16];
    m.table_read(32, &mut b);
    assert_eq!(u32::from_le_bytes(b[0..4].try_into().unwrap()), 0xfee0_0004);
    assert_eq!(u32::from_le_bytes(b[4..8].try_into().unwrap()), 1);
    assert_eq!(u32::from_le_bytes(b[12..16].try_into().unwrap()), 0);
    m.table_read(12, &mut b[..4]);
    assert_eq!(u32::from_le_bytes(b[..4].try_into().unwrap()), 1);
    // Past the table: reads 0, writes dropped.
    let mut b = [0xaau8; 8];
    m.table_read(4 * 16, &mut b);
    assert_eq!(b, [0; 8]);
    assert_eq!(m.table_write(4 * 16, &[0xff; 8]), RoutingChange::Unchanged);
    assert_eq!(
        m.table_write(u64::MAX, &[0xff; 8]),
        RoutingChange::Unchanged
    );
    m.table_read(u64::MAX - 2, &mut b);
    // Nothing routes while MSI-X is off.
    assert_eq!(m.vectors().count(), 0);
    assert_eq!(set_ctrl(&mut cs, &mut m, CTRL_ENABLE), RoutingChange::All);
    assert_eq!(m.vectors().count(), 4);
}

#[test]
fn enable_and_function_mask() {
    let (mut cs, mut m) = msix(2);
    program(&mut m, 0, 0xfee0_0000, 0x40, false);
    program(&mut m, 1, 0xfee0_1000, 0x41, true);
    // Function mask while disabled is not a routing change.
    assert_eq!(
        set_ctrl(&mut cs, &mut m, CTRL_FUNCTION_MASK),
        RoutingChange::Unchanged
    );
    assert_eq!(
        set_ctrl(&mut cs, &mut m, CTRL_ENABLE | CTRL_FUNCTION_MASK),
        RoutingChange::All
    );
    assert!(m.enabled() && m.function_masked);
    assert!(m.vectors().all(|(_, msg)| msg.masked));
    assert_eq!(set_ctrl(&mut cs, &mut m, CTRL_ENABLE), RoutingChange::All);
    let v: Vec<_> = m.vectors().collect();
    assert_eq!(
        v,
        [
            (
                0,
                MsiMessage {
                    addr: 0xfee0_0000,
                    data: 0x40,
                    masked: false
                }
            ),
            (
                1,
                MsiMessage {
                    addr: 0xfee0_1000,
                    data: 0x41,
                    masked: true
                }
            )
        ]
    );
    assert_eq!(
        set_ctrl(&mut cs, &mut m, CTRL_ENABLE),
        RoutingChange::Unchanged
    );
}

#[test]
fn masked_vectors_pend_until_unmasked() {
    // 70 vectors: the table runs to 0x860, and the PBA needs two qwords.
    let mut cs = config();
    let pba = MsixLocation {
        bar: 0,
        offset: 0xc00,
    };
    let mut m = MsixCap::add_to(&mut cs, 70, TABLE_AT, pba).unwrap();
    assert_eq!(m.pba(), (pba, 16));
    program(&mut m, 0, 0xfee0_0000, 0x40, false);
    program(&mut m, 65, 0xfee0_2000, 0x42, true);
    assert_eq!(m.trigger(0), Delivery::Disabled);
    assert_eq!(m.trigger(70), Delivery::NoSuchVector);
    set_ctrl(&mut cs, &mut m, CTRL_ENABLE);
    assert!(matches!(m.trigger(0), Delivery::Send(msg) if msg.data == 0x40));
    assert_eq!(m.trigger(65), Delivery::Pending);
    assert!(m.is_pending(65));
    // PBA bit 65 is bit 1 of the second qword.
    let mut q = [0u8; 8];
    m.pba_read(8, &mut q);
    assert_eq!(u64::from_le_bytes(q), 0x2);
    m.pba_read(0, &mut q);
    assert_eq!(u64::from_le_bytes(q), 0);
    assert!(m.take_deliverable().is_empty(), "still masked");
    // Function mask holds vector 0 too.
    set_ctrl(&mut cs, &mut m, CTRL_ENABLE | CTRL_FUNCTION_MASK);
    assert_eq!(m.trigger(0), Delivery::Pending);
    assert!(m.take_deliverable().is_empty());
    set_ctrl(&mut cs, &mut m, CTRL_ENABLE);
    let ready = m.take_deliverable();
    assert_eq!(ready.len(), 1);
    assert_eq!(ready[0].0, 0);
    assert!(!m.is_pending(0));
    // Unmasking vector 65 releases it.
    assert_eq!(m.table_write(65 * 16 + 12, &[0]), RoutingChange::Vector(65));
    let ready = m.take_deliverable();
    assert_eq!(ready.iter().map(|r| r.0).collect::<Vec<_>>(), [65]);
    assert!(m.take_deliverable().is_empty());
    m.pba_read(8, &mut q);
    assert_eq!(u64::from_le_bytes(q), 0);
}
