//! A pin with memory zones: every backend path (a parallel map that populates on the same
//! helper, type1's parallel populate then serial map) fills and maps each zone's chunks from
//! helpers pinned to that zone's CPUs, with the real `sched_setaffinity` on CPUs 0 and 1.

// A zone's ranges are a list, and one range in it is the common case, not a mistake.
#![allow(clippy::single_range_in_vec_init)]

use super::*;

/// Records each map with the CPUs the mapping thread may run on.
struct Placed {
    info: BackendInfo,
    maps: Mutex<Vec<(u64, Vec<usize>)>>,
}

impl Placed {
    fn new(info: BackendInfo) -> Arc<Self> {
        Arc::new(Self {
            info,
            maps: Mutex::default(),
        })
    }
}

impl PinBackend for Placed {
    fn describe(&self) -> BackendInfo {
        self.info
    }
    fn map(&self, piece: &Piece) -> Result<(), crate::backend::BackendError> {
        let cpus = crate::sys::affinity_cpus().unwrap();
        self.maps.lock().unwrap().push((piece.guest_addr, cpus));
        Ok(())
    }
    fn unmap(&self, _piece: &Piece) -> Result<(), crate::backend::BackendError> {
        Ok(())
    }
}

/// `low` on CPU 1, `high` (above the 4 GiB hole) on CPU 0.
fn zones(low: &AnonMapping, high: &AnonMapping) -> Vec<PinZone> {
    vec![
        PinZone {
            id: "near".into(),
            ranges: vec![0..low.len()],
            cpus: vec![1],
            host_numa_node: Some(0),
        },
        PinZone {
            id: "far".into(),
            ranges: vec![1 << 32..(1 << 32) + high.len()],
            cpus: vec![0],
            host_numa_node: Some(0),
        },
    ]
}

fn cpus_0_and_1() -> bool {
    let cpus = crate::sys::affinity_cpus().unwrap();
    let ok = cpus.contains(&0) && cpus.contains(&1);
    if !ok {
        eprintln!("skipped: this process may not run on CPUs 0 and 1 ({cpus:?})");
    }
    ok
}

#[test]
fn every_backend_path_maps_each_zones_chunks_from_its_cpus() {
    if !cpus_0_and_1() {
        return;
    }
    let (low, high) = (
        AnonMapping::new(24 * MIB).unwrap(),
        AnonMapping::new(16 * MIB).unwrap(),
    );
    let ram = ram(&low, &high);
    let parallel = BackendInfo::new(BackendKind::Iommufd);
    let serial = BackendInfo {
        map_threads: Some(1),
        populate_first: true,
        ..BackendInfo::new(BackendKind::Type1)
    };
    for info in [parallel, serial] {
        let backend = Placed::new(info);
        let options = PinOptions {
            zones: zones(&low, &high),
            ..options(4)
        };
        let pinned = Pinner::new(backend.clone(), limits(), options)
            .pin(ram.clone(), &CancelToken::new())
            .unwrap();
        let maps = backend.maps.lock().unwrap().clone();
        let mapped: u64 = pinned.chunks.iter().map(|c| c.end - c.start).sum();
        assert_eq!(mapped, 40 * MIB);
        assert!(!maps.is_empty());
        for (guest, cpus) in maps {
            let want = if guest < 1 << 32 { [1] } else { [0] };
            assert_eq!(
                cpus, want,
                "{:?}: guest {guest:#x} mapped elsewhere",
                info.kind
            );
        }
        let stats = &pinned.stats;
        let ids: Vec<_> = stats.zones.iter().map(|z| z.id.as_str()).collect();
        assert_eq!(ids, ["near", "far"]);
        assert_eq!(stats.zones[0].bytes, 24 * MIB);
        assert_eq!(stats.zones[1].cpus, [0]);
        // One CPU each: each zone's share is decided by its CPUs.
        assert!(stats.zones.iter().all(|z| z.threads == 1));
        assert!(stats
            .zones
            .iter()
            .all(|z| z.decided_by == DecidedBy::ZoneCpus));
        let json = serde_json::to_value(stats).unwrap();
        let zone = &json["zones"][1];
        for key in [
            "id",
            "cpus",
            "threads",
            "decided_by",
            "bytes",
            "elapsed_ms",
            "gibps",
        ] {
            assert!(zone.get(key).is_some(), "pin.zones[] lacks {key}: {zone}");
        }
        assert_eq!(zone["decided_by"], "zone_cpus");
        if info.populate_first {
            // The serial map takes the zones in turns, one thread moving between them.
            let map = &stats.map.zones;
            assert_eq!((stats.map.threads, map.len()), (1, 2));
        }
    }
}

#[test]
fn without_zones_the_stats_have_none() {
    let (low, high) = (
        AnonMapping::new(8 * MIB).unwrap(),
        AnonMapping::new(8 * MIB).unwrap(),
    );
    let backend = Placed::new(BackendInfo::new(BackendKind::Iommufd));
    let pinned = Pinner::new(backend, limits(), options(2))
        .pin(ram(&low, &high), &CancelToken::new())
        .unwrap();
    assert!(pinned.stats.zones.is_empty() && pinned.stats.map.zones.is_empty());
    let json = serde_json::to_value(&pinned.stats).unwrap();
    assert!(json.get("zones").is_none() && json["map"].get("zones").is_none());
}

#[test]
fn a_zone_outside_guest_ram_or_zones_that_miss_some_are_refused_before_any_work() {
    let (low, high) = (
        AnonMapping::new(8 * MIB).unwrap(),
        AnonMapping::new(8 * MIB).unwrap(),
    );
    let ram = ram(&low, &high);
    let mut outside = zones(&low, &high);
    outside[1].ranges = vec![(1 << 32) - 4096..(1 << 32) + high.len()];
    let mut missing = zones(&low, &high);
    missing.pop();
    for (zones, says) in [(outside, "not all guest RAM"), (missing, "exactly once")] {
        let backend = Placed::new(BackendInfo::new(BackendKind::Iommufd));
        let options = PinOptions {
            zones,
            ..options(2)
        };
        let err = Pinner::new(backend.clone(), limits(), options)
            .pin(ram.clone(), &CancelToken::new())
            .err()
            .unwrap();
        assert!(err.to_string().contains(says), "{err}");
        assert_eq!(err.class(), ErrorClass::Internal);
        assert!(backend.maps.lock().unwrap().is_empty());
    }
}
