use std::path::PathBuf;
use std::time::Duration;

use pinning::topology::{CpusetMems, HostNode};
use pinning::DecidedBy;
use vmm::memory::Backing;

use super::*;

const MIB: u64 = 1 << 20;
const GIB: u64 = 1 << 30;

/// Two sockets, four CPUs each, 64 GiB each; the cpuset allows only `mems`.
fn two_sockets(mems: Option<Vec<u32>>) -> HostTopology {
    let node = |id: u32, cpus: std::ops::Range<usize>| HostNode {
        id,
        cpus: cpus.collect(),
        mem_total: 64 * GIB,
        online: true,
        distances: if id == 0 { vec![10, 21] } else { vec![21, 10] },
        free_huge_pages: Vec::new(),
    };
    HostTopology {
        nodes: vec![node(0, 0..4), node(1, 4..8)],
        mems_allowed: Some(vec![0, 1]),
        cpuset_mems: mems.map(|nodes| CpusetMems {
            nodes,
            file: PathBuf::from("/sys/fs/cgroup/vm.slice/cpuset.mems.effective"),
        }),
    }
}

#[test]
fn memory_is_split_into_one_zone_per_node_in_order_the_last_taking_the_rest() {
    let zones = split(&[1, 0], GIB + 6 * MIB, 4096, &two_sockets(None)).unwrap();
    let got: Vec<(&str, Option<u32>, u64, u64)> = zones
        .iter()
        .map(|z| {
            assert_eq!(z.ranges.len(), 1);
            (
                z.id.as_str(),
                z.host_numa_node,
                z.ranges[0].start.0,
                z.ranges[0].size,
            )
        })
        .collect();
    // Shares are whole 2 MiB pages: 515 MiB rounds down to 514 MiB.
    assert_eq!(
        got,
        vec![
            ("mem0", Some(1), 0, 514 * MIB),
            ("mem1", Some(0), 514 * MIB, 516 * MIB)
        ]
    );
    // A node listed twice is two zones on it; 1 GiB pages align the shares to 1 GiB.
    let zones = split(&[0, 0], 3 * GIB, GIB, &two_sockets(None)).unwrap();
    let sizes: Vec<u64> = zones.iter().map(|z| z.ranges[0].size).collect();
    assert_eq!(sizes, vec![GIB, 2 * GIB]);
    assert!(zones.iter().all(|z| z.host_numa_node == Some(0)));
}

#[test]
fn each_zone_maps_with_the_spec_bound_to_its_node() {
    let zones = split(&[0, 1], 256 * MIB, 4096, &two_sockets(None)).unwrap();
    let spec = MemorySpec {
        backing: Backing::Memfd,
        shard_bytes: Some(64 * MIB),
        host_numa_node: None,
    };
    let layout = memory_layout(spec, 256 * MIB, &zones);
    let nodes: Vec<Option<u32>> = layout.iter().map(|(s, _)| s.host_numa_node).collect();
    assert_eq!(nodes, vec![Some(0), Some(1)]);
    assert!(layout
        .iter()
        .all(|(s, _)| s.backing == Backing::Memfd && s.shard_bytes == Some(64 * MIB)));
    // Without zones: the spec as given over all the memory.
    let one = memory_layout(spec, 256 * MIB, &[]);
    assert_eq!(one.len(), 1);
    assert_eq!(one[0].0.host_numa_node, None);
    assert_eq!(one[0].1, vec![RamRange::at_zero(256 * MIB)]);
}

#[test]
fn a_node_the_host_lacks_or_the_cpuset_forbids_is_refused_naming_it() {
    let e = split(&[0, 7], GIB, 4096, &two_sockets(None)).unwrap_err();
    assert_eq!(e.class(), ErrorClass::User);
    assert_eq!(
        e.to_string(),
        "--numa-nodes: host NUMA node 7 does not exist on this host (its nodes: 0-1); give one of those"
    );
    let e = split(&[0, 1], GIB, 4096, &two_sockets(Some(vec![0]))).unwrap_err();
    assert_eq!(e.class(), ErrorClass::User);
    assert_eq!(
        e.to_string(),
        "--numa-nodes: host NUMA node 1 is outside this process's cpuset \
         (/sys/fs/cgroup/vm.slice/cpuset.mems.effective allows 0); give one of those nodes or \
         widen the cpuset"
    );
}

#[test]
fn memory_too_small_for_a_page_per_zone_is_refused_with_the_least_that_fits() {
    let e = split(&[0, 1], 2 * MIB, 4096, &two_sockets(None)).unwrap_err();
    assert_eq!(e.class(), ErrorClass::User);
    assert_eq!(
        e.to_string(),
        "--numa-nodes: --memory 2 MiB cannot be split into 2 zones of whole 2 MiB pages; give \
         --memory 4 MiB or more, or fewer nodes"
    );
}

fn stats(id: &str, threads: usize, gibps: f64) -> ZoneStats {
    ZoneStats {
        id: id.into(),
        cpus: vec![0, 1],
        threads,
        decided_by: DecidedBy::ZoneCpus,
        chunks: 4,
        bytes: 512 * MIB,
        elapsed: Duration::from_millis(100),
        gibps,
        unpinned: 0,
    }
}

fn report(id: &str, node: u32) -> ZoneReport {
    ZoneReport {
        id: id.into(),
        bytes: 512 * MIB,
        host_numa_node: Some(node),
        guest_numa_id: None,
        placement_sampled: 256,
        placement_on_node: 256,
        placement_not_present: 0,
        placement_per_node: vec![(node, 256)],
        placement_nodes: vec![node],
        placement_rule: format!("bound to node {node}"),
    }
}

#[test]
fn each_zone_rate_is_set_against_the_fastest_zone_and_warmups_are_not_counted() {
    let mut runs = ZoneRuns::default();
    // A warm-up round: stats but no placement, so not measured.
    runs.record(&[stats("mem0", 2, 99.0), stats("mem1", 2, 99.0)], None);
    for (a, b) in [(10.0, 4.0), (12.0, 6.0), (8.0, 5.0)] {
        runs.record(
            &[stats("mem0", 2, a), stats("mem1", 2, b)],
            Some(vec![report("mem0", 0), report("mem1", 1)]),
        );
    }
    let z = runs.finish();
    assert_eq!(z.len(), 2);
    assert_eq!(z[0].runs_gibps, vec![10.0, 12.0, 8.0]);
    assert_eq!((z[0].median_gibps, z[0].best_gibps), (10.0, 12.0));
    assert_eq!((z[1].median_gibps, z[1].best_gibps), (5.0, 6.0));
    assert_eq!((z[0].of_best_zone, z[1].of_best_zone), (1.0, 0.5));
    assert_eq!(z[1].host_numa_node, Some(1));
    assert_eq!(z[1].decided_by, "zone_cpus");
    let table = table(&z);
    assert!(
        table.contains("  mem1      1  512 MiB   0-1               2  zone_cpus            5.00        6.00     0.50  100.0% of 256 sampled pages on node 1\n"),
        "{table}"
    );
}
