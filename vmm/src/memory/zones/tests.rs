//! Zones and guest nodes: parsing Cloud Hypervisor's syntax, every refusal, the layout they
//! make (the 32-bit hole still applies) and guest memory mapped zone by zone.

use std::path::Path;

use pinning::topology::{HostNode, HostTopology};

use super::*;
use crate::memory::layout::{RamRange, GIB, MIB};
use crate::memory::{GuestMemory, MemoryLayout};

fn zone(s: &str) -> ZoneConfig {
    s.parse().unwrap()
}

fn node(s: &str) -> GuestNumaNode {
    s.parse().unwrap()
}

#[test]
fn cloud_hypervisor_syntax_parses() {
    assert_eq!(
        zone("id=mem0,size=4G,host_numa_node=1,shared=on,hugepages=off"),
        ZoneConfig {
            id: "mem0".into(),
            size: 4 * GIB,
            host_numa_node: Some(1),
            shared: true,
            hugepages: false,
        }
    );
    assert_eq!(
        node("guest_numa_id=0,cpus=[0-1,3],memory_zones=[mem0,mem1],distances=[1@20,2@30]"),
        GuestNumaNode {
            guest_numa_id: 0,
            cpus: vec![0, 1, 3],
            memory_zones: vec!["mem0".into(), "mem1".into()],
            distances: vec![(1, 20), (2, 30)],
        }
    );
    // One item without brackets, as Cloud Hypervisor also takes.
    assert_eq!(node("guest_numa_id=1,cpus=2").cpus, [2]);
}

#[test]
fn malformed_options_say_what_to_give() {
    let bad = |s: &str| s.parse::<ZoneConfig>().unwrap_err();
    assert!(bad("size=1G").contains("give the zone an id"));
    assert!(bad("id=a").contains("give the zone a size"));
    assert!(bad("id=a,size=1G,colour=red").contains("`colour`: not a key"));
    assert!(bad("id=a,size=1G,shared=yes").contains("shared=on or shared=off"));
    assert!(bad("id=a,size=1G,id=b").contains("given twice"));
    assert!(bad("id=a,size=1Q").contains("is not a size"));
    assert!(bad("id=a,size=1G,host_numa_node=-1").contains("host node number"));
    let bad = |s: &str| s.parse::<GuestNumaNode>().unwrap_err();
    assert!(bad("cpus=[0]").contains("guest_numa_id=N"));
    assert!(bad("guest_numa_id=0,cpus=[0-1").contains("without its `]`"));
    assert!(bad("guest_numa_id=0,cpus=[3-1]").contains("cpus=[0-1,3]"));
    assert!(bad("guest_numa_id=0,cpus=[300]").contains("cpus=[0-1,3]"));
    assert!(bad("guest_numa_id=0,distances=[1:20]").contains("NODE@DISTANCE"));
    assert!(bad("guest_numa_id=0,distances=[1@999]").contains("10 to 255"));
}

fn two_zones() -> Vec<ZoneConfig> {
    vec![zone("id=a,size=1G"), zone("id=b,size=1G")]
}

fn two_nodes() -> Vec<GuestNumaNode> {
    vec![
        node("guest_numa_id=0,cpus=[0],memory_zones=[a],distances=[1@20]"),
        node("guest_numa_id=1,cpus=[1],memory_zones=[b],distances=[0@20]"),
    ]
}

#[test]
fn zones_and_nodes_that_agree_are_taken() {
    assert_eq!(check(&two_zones(), &[], None, 1), Ok(2 * GIB));
    assert_eq!(check(&two_zones(), &[], Some(2 * GIB), 1), Ok(2 * GIB));
    assert_eq!(check(&two_zones(), &two_nodes(), None, 2), Ok(2 * GIB));
    assert_eq!(check(&[], &[], Some(GIB), 1), Ok(0));
}

#[test]
fn every_inconsistency_is_refused_naming_it() {
    let z = two_zones();
    let n = two_nodes();
    let err = |zones: &[ZoneConfig], numa: &[GuestNumaNode], memory, cpus| {
        check(zones, numa, memory, cpus).unwrap_err()
    };
    let dup = [zone("id=a,size=1G"), zone("id=a,size=2G")];
    assert_eq!(
        err(&dup, &[], None, 1),
        ZoneError::DuplicateZone("a".into())
    );
    let e = err(&[zone("id=a,size=1025K")], &[], None, 1);
    assert!(matches!(e, ZoneError::ZoneSize { .. }), "{e}");
    let e = err(
        &[
            zone("id=a,size=1G,hugepages=on"),
            zone("id=b,size=1M,hugepages=on"),
        ],
        &[],
        None,
        1,
    );
    assert!(e.to_string().contains("2 MiB page size"), "{e}");
    let e = err(&z, &[], Some(GIB), 1);
    assert_eq!(
        e.to_string(),
        "--memory 1 GiB but the --memory-zone sizes add up to 2 GiB; leave --memory out or make it their sum"
    );
    let e = err(
        &[zone("id=a,size=32M"), zone("id=b,size=16M")],
        &[],
        None,
        1,
    );
    assert_eq!(e, ZoneError::TooSmall(48 * MIB));
    assert!(
        e.to_string()
            .contains("add up to 48 MiB, below the guest minimum of 64 MiB"),
        "{e}"
    );
    assert_eq!(err(&[], &n, None, 2), ZoneError::NumaWithoutZones);
    let mut dup = n.clone();
    dup[1].guest_numa_id = 0;
    assert_eq!(err(&z, &dup, None, 2), ZoneError::DuplicateNode(0));
    let mut unknown = n.clone();
    unknown[1].memory_zones.push("c".into());
    assert!(
        matches!(err(&z, &unknown, None, 2), ZoneError::UnknownZone { node: 1, ref zone } if zone == "c")
    );
    let mut twice = n.clone();
    twice[1].memory_zones.push("a".into());
    assert!(matches!(
        err(&z, &twice, None, 2),
        ZoneError::ZoneInTwoNodes {
            first: 0,
            second: 1,
            ..
        }
    ));
    let mut none = n.clone();
    none[1].memory_zones.clear();
    assert_eq!(err(&z, &none, None, 2), ZoneError::ZoneInNoNode("b".into()));
    assert!(matches!(
        err(&z, &n, None, 1),
        ZoneError::CpuOutOfRange {
            cpu: 1,
            cpus: 1,
            ..
        }
    ));
    let mut cpu_twice = n.clone();
    cpu_twice[1].cpus.push(0);
    assert!(matches!(
        err(&z, &cpu_twice, None, 2),
        ZoneError::CpuInTwoNodes { cpu: 0, .. }
    ));
    assert_eq!(err(&z, &n, None, 3), ZoneError::CpuInNoNode(2));
    let mut twice = n.clone();
    twice[0].cpus.push(0);
    assert!(
        matches!(err(&z, &twice, None, 2), ZoneError::ListedTwice { node: 0, ref what } if what == "vCPU 0"),
        "a vCPU listed twice in one node"
    );
    let mut twice = n.clone();
    twice[1].memory_zones.push("b".into());
    assert!(
        matches!(
            err(&z, &twice, None, 2),
            ZoneError::ListedTwice { node: 1, .. }
        ),
        "a zone listed twice in one node"
    );
    let mut gap = n.clone();
    gap[1].guest_numa_id = 2;
    gap[0].distances = vec![(2, 20)];
    gap[1].distances = vec![(0, 20)];
    assert_eq!(err(&z, &gap, None, 2), ZoneError::NodeIdGap(1));
    let mut empty = n.clone();
    empty.push(node("guest_numa_id=2"));
    assert_eq!(err(&z, &empty, None, 2), ZoneError::EmptyNode(2));
    let mut lopsided = n.clone();
    lopsided[1].distances = vec![(0, 30)];
    assert_eq!(
        err(&z, &lopsided, None, 2),
        ZoneError::AsymmetricDistance {
            a: 0,
            b: 1,
            ab: 20,
            ba: 30
        }
    );
    // A huge-page zone must start on a huge page: here 1 MiB in.
    let e = err(
        &[zone("id=a,size=65M"), zone("id=h,size=2M,hugepages=on")],
        &[],
        None,
        1,
    );
    assert_eq!(
        e,
        ZoneError::ZoneStart {
            id: "h".into(),
            start: 65 * MIB,
            page: 2 * MIB
        }
    );
    let mut far = n.clone();
    far[0].distances.push((5, 30));
    assert_eq!(
        err(&z, &far, None, 2),
        ZoneError::UnknownDistanceNode { node: 0, to: 5 }
    );
    for (to, d) in [(1, 10), (1, 9), (0, 20)] {
        let mut odd = n.clone();
        odd[0].distances = vec![(to, d)];
        assert!(
            matches!(err(&z, &odd, None, 2), ZoneError::BadDistance { .. }),
            "{to}@{d}"
        );
    }
}

fn topo() -> HostTopology {
    let node = |id, online, mem_total, free_2m| HostNode {
        id,
        cpus: vec![id as usize],
        mem_total,
        online,
        distances: vec![10, 20, 20],
        free_huge_pages: vec![(2 * MIB, free_2m)],
    };
    HostTopology {
        nodes: vec![
            node(0, true, 8 * GIB, 0),
            node(1, true, 8 * GIB, 512),
            node(2, false, 0, 0),
        ],
        mems_allowed: Some(vec![0, 1]),
        cpuset_mems: None,
    }
}

#[test]
fn host_nodes_are_checked_against_the_topology() {
    let t = topo();
    assert_eq!(
        check_host(&[zone("id=a,size=1G,host_numa_node=1,hugepages=on")], &t),
        Ok(())
    );
    assert_eq!(check_host(&[zone("id=a,size=1G")], &t), Ok(()));
    let e = check_host(&[zone("id=far,size=1G,host_numa_node=7")], &t).unwrap_err();
    assert!(
        e.to_string()
            .starts_with("--memory-zone id=far,host_numa_node=7: host NUMA node 7 does not exist"),
        "{e}"
    );
    let e = check_host(&[zone("id=a,size=1G,host_numa_node=2")], &t).unwrap_err();
    assert!(e.to_string().contains("node 2 is offline"), "{e}");
    let e = check_host(&[zone("id=a,size=1G,host_numa_node=0,hugepages=on")], &t).unwrap_err();
    assert_eq!(
        e,
        ZoneError::NoHugePages {
            zone: "a".into(),
            node: 0,
            needed: 512,
            free: 0,
            page: 2 * MIB
        }
    );
    assert!(
        e.to_string()
            .contains("/sys/devices/system/node/node0/hugepages/hugepages-2048kB/nr_hugepages"),
        "{e}"
    );
    // Two zones that each fit node 1's 512 free pages, but not together.
    let e = check_host(
        &[
            zone("id=a,size=1G,host_numa_node=1,hugepages=on"),
            zone("id=b,size=2M,host_numa_node=1,hugepages=on"),
        ],
        &t,
    )
    .unwrap_err();
    assert!(
        matches!(e, ZoneError::NoHugePages { ref zone, needed: 513, free: 512, .. } if zone == "b"),
        "{e}"
    );
    assert!(e.to_string().contains("nr_hugepages by 1 "), "{e}");
    let mut t = t;
    t.mems_allowed = Some(vec![0]);
    let e = check_host(&[zone("id=a,size=1G,host_numa_node=1")], &t).unwrap_err();
    assert!(e.to_string().contains("Mems_allowed_list"), "{e}");
}

#[test]
fn each_zone_gets_the_backing_its_flags_choose() {
    let thp = ThpPolicy::read(Path::new("/nonexistent"));
    let anon = MemorySpec {
        backing: Backing::Anon,
        shard_bytes: Some(GIB),
        host_numa_node: None,
    };
    assert_eq!(
        zone("id=a,size=1G").spec(anon, &thp),
        MemorySpec::new(Backing::Anon)
    );
    assert_eq!(
        zone("id=a,size=1G,shared=on").spec(anon, &thp).backing,
        Backing::Memfd
    );
    assert_eq!(
        zone("id=a,size=1G,shared=on").spec(anon, &thp).shard_bytes,
        Some(GIB)
    );
    assert_eq!(
        zone("id=a,size=1G,hugepages=on").spec(anon, &thp).backing,
        Backing::Hugetlb
    );
    let memfd = MemorySpec::new(Backing::Memfd);
    assert_eq!(
        zone("id=a,size=1G,shared=off").spec(memfd, &thp).backing,
        Backing::Memfd
    );
}

fn range(start: u64, size: u64) -> RamRange {
    RamRange {
        start: vm_memory::GuestAddress(start),
        size,
    }
}

#[test]
fn zones_lie_in_order_from_zero_and_the_hole_splits_one() {
    let ids = |v: &[(&str, u64)]| {
        v.iter()
            .map(|(i, s)| (i.to_string(), *s))
            .collect::<Vec<_>>()
    };
    let l = MemoryLayout::with_zones(&ids(&[("a", 2 * GIB), ("b", 2 * GIB), ("c", GIB)])).unwrap();
    // The address map is the sum's: RAM ranges, E820 and MMIO windows alike.
    let sum = MemoryLayout::new(5 * GIB).unwrap();
    assert_eq!(
        (l.ram(), l.e820(), l.mmio64()),
        (sum.ram(), sum.e820(), sum.mmio64())
    );
    let z = l.zones();
    assert_eq!(z.len(), 3);
    assert_eq!(z[0].ranges, [range(0, 2 * GIB)]);
    assert_eq!(z[1].ranges, [range(2 * GIB, GIB), range(4 * GIB, GIB)]);
    assert_eq!(z[2].ranges, [range(5 * GIB, GIB)]);
    // Linear offsets run on across the hole.
    assert_eq!(
        linear_spans(&l),
        [0..2 * GIB, 2 * GIB..4 * GIB, 4 * GIB..5 * GIB]
    );
    // Every RAM byte in one zone.
    let zoned: u64 = z.iter().flat_map(|z| &z.ranges).map(|r| r.size).sum();
    assert_eq!(zoned, l.ram_size());
    // Without zones, one zone holds all RAM.
    let plain = MemoryLayout::new(6 * GIB).unwrap();
    assert_eq!(plain.zones().len(), 1);
    assert_eq!(plain.zones()[0].id, "ram");
    assert_eq!(plain.zones()[0].ranges, plain.ram());
    assert!(MemoryLayout::with_zones(&ids(&[("a", 32 * MIB)])).is_err());
    assert!(MemoryLayout::with_zones(&ids(&[("a", u64::MAX), ("b", u64::MAX)])).is_err());
}

#[test]
fn each_zone_is_mapped_with_its_own_backing_and_no_pin_chunk_crosses_a_zone_border() {
    let sizes = [("a".to_string(), 96 * MIB), ("b".to_string(), 64 * MIB)];
    let l = MemoryLayout::with_zones(&sizes).unwrap();
    let specs = [
        MemorySpec::new(Backing::Anon),
        MemorySpec::new(Backing::Memfd),
    ];
    let zones: Vec<_> = specs
        .iter()
        .zip(l.zones())
        .map(|(s, z)| (*s, z.ranges.clone()))
        .collect();
    let m = GuestMemory::zoned(&zones).unwrap();
    assert_eq!(m.size(), 160 * MIB);
    // One vm-memory region per zone range; only the memfd zone has a file.
    assert_eq!(vm_memory::GuestMemoryBackend::iter(&m.mem).count(), 2);
    assert_eq!(m.files().count(), 1);
    let regions = m.ram.regions();
    assert_eq!(regions.len(), 2);
    assert!(regions[0].file.is_none() && regions[1].file.is_some());
    // The pin job is cut where zone b starts, so no chunk spans both zones.
    assert_eq!(m.ram.region_cuts(), [96 * MIB]);
    assert_eq!(linear_spans(&l), [0..96 * MIB, 96 * MIB..160 * MIB]);
    // Guest accesses cross the border as one address space.
    use vm_memory::{Bytes, GuestAddress};
    let at = GuestAddress(96 * MIB - 2);
    m.mem.write_obj(0x1122_3344_u32, at).unwrap();
    assert_eq!(m.mem.read_obj::<u32>(at).unwrap(), 0x1122_3344);
}
