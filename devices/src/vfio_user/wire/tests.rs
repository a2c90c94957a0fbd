use super::*;

#[test]
fn header_round_trips_and_sizes_are_checked() {
    let h = Header {
        msg_id: 0xbeef,
        command: cmd::REGION_READ,
        size: 40,
        flags: flags::TYPE_REPLY | flags::ERROR,
        error: 22,
    };
    let b = h.encode();
    assert_eq!(&b[..4], &[0xef, 0xbe, 9, 0]);
    assert_eq!(Header::decode(&b), h);
    assert_eq!(h.payload_len(MAX_MESSAGE).unwrap(), 24);
    let tiny = Header { size: 15, ..h };
    assert!(tiny.payload_len(MAX_MESSAGE).is_err());
    let huge = Header {
        size: u32::MAX,
        ..h
    };
    let err = huge.payload_len(MAX_MESSAGE).unwrap_err();
    assert!(err.to_string().contains("exceeds"), "{err}");
}

#[test]
fn short_payloads_are_errors_not_panics() {
    for len in 0..DmaMap::SIZE {
        assert!(DmaMap::decode(&vec![0; len]).is_err(), "len {len}");
    }
    assert!(RegionInfoMsg::decode(&[0; 31]).is_err());
    assert!(IrqInfoMsg::decode(&[0; 15]).is_err());
    assert!(DeviceInfo::decode(&[0; 12]).is_err());
    assert!(RegionAccess::decode(&[0; 15], "x").is_err());
    assert!(Version::decode(&[0; 3]).is_err());
    let m = DmaMap {
        flags: 3,
        offset: 0x1000,
        address: 0x8000_0000,
        size: 0x2000,
    };
    assert_eq!(DmaMap::decode(&m.encode()).unwrap(), m);
}

#[test]
fn version_json_is_nul_terminated_and_parsed() {
    let v = Version {
        major: 0,
        minor: 1,
        json: Capabilities::ours().to_json(),
    };
    let b = v.encode();
    assert_eq!(b.last(), Some(&0));
    let back = Version::decode(&b).unwrap();
    assert_eq!(back, v);
    assert_eq!(
        Capabilities::from_json(&back.json).unwrap(),
        Capabilities::ours()
    );
    assert_eq!(
        Capabilities::from_json("").unwrap(),
        Capabilities::default()
    );
    assert!(Version::decode(&[0, 0, 1, 0, b'{']).is_err());
    assert!(Capabilities::from_json("[1]").is_err());
    assert!(Capabilities::from_json(r#"{"capabilities":{"max_msg_fds":-1}}"#).is_err());
}

#[test]
fn sparse_mmap_chain_is_walked_safely() {
    let mut p = RegionInfoMsg {
        cap_offset: 32,
        ..Default::default()
    }
    .encode();
    p.extend(encode_sparse_mmap(&[(0, 0x1000), (0x2000, 0x1000)]));
    assert_eq!(
        find_sparse_mmap(&p, 32).unwrap(),
        Some(vec![(0, 0x1000), (0x2000, 0x1000)])
    );
    // Claims a billion areas but holds two: an error, not a giant allocation.
    p[32 + 8..32 + 12].copy_from_slice(&1_000_000_000u32.to_le_bytes());
    assert!(find_sparse_mmap(&p, 32).is_err());
    // A capability whose `next` points at itself.
    let mut l = RegionInfoMsg::default().encode();
    l.extend_from_slice(&7u16.to_le_bytes());
    l.extend_from_slice(&1u16.to_le_bytes());
    l.extend_from_slice(&32u32.to_le_bytes());
    assert!(find_sparse_mmap(&l, 32).is_err());
    assert!(find_sparse_mmap(&l, 4).is_err());
    assert!(find_sparse_mmap(&l, 4000).is_err());
    assert_eq!(find_sparse_mmap(&l, 0).unwrap(), None);
}
