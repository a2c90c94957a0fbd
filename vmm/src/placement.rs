//! The placement check after pinning: where guest RAM's pages actually are on the host, zone by
//! zone, sampled with `move_pages(2)` in query mode, against where they should be: a zone's
//! host node when it has one, else the nodes the process's own memory policy names (or its
//! cpuset allows, under the default policy). The report's `vm.zones[]` and summary line come
//! from here, and a zone below 100% gets one warning. Where the helpers that fill each zone run
//! is decided here too ([`pin_zones`]), so the check and the fill agree on a zone's node.

use pinning::pinner::PinZone;
use pinning::topology::HostTopology;
use serde::Serialize;

use crate::memory::numa::{self, Policy};
use crate::memory::{GuestMemory, RamRange};

/// One sample per 2 MiB: a huge page, so THP and hugetlb zones get one sample per page.
pub const SAMPLE_STEP: u64 = 2 << 20;

/// At most this many samples per zone (128 GiB at one per 2 MiB; larger zones are sampled
/// more sparsely): move_pages looks each page up in turn, so the check's cost follows the
/// sample count, and the bound keeps it below ~0.1 s whatever the guest's size (measured on
/// the build machine, `placement_cost` below: 8 GiB at one per 2 MiB, 4096 samples, 2-9 ms
/// on 4 KiB pages and 1-5 ms on THP; 64Ki samples 80 ms and 17 ms), while 64Ki samples still
/// tell a misplaced fraction to within about half a percent.
pub const MAX_SAMPLES: u64 = 1 << 16;

/// A zone of guest RAM as the placement check sees it. Without `--memory-zone` there is one,
/// `ram`, covering all RAM ([`Zone::all_ram`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Zone {
    pub id: String,
    pub ranges: Vec<RamRange>,
    pub host_numa_node: Option<u32>,
    pub guest_numa_id: Option<u32>,
}

impl Zone {
    /// The one zone of a VM without zones: all of `layout`'s RAM, on `host_numa_node` if the
    /// memory spec binds it, else placed by the process's policy.
    #[cfg(test)]
    pub fn all_ram(layout: &crate::memory::MemoryLayout, host_numa_node: Option<u32>) -> Self {
        Zone {
            id: crate::memory::layout::DEFAULT_ZONE.into(),
            ranges: layout.ram().to_vec(),
            host_numa_node,
            guest_numa_id: None,
        }
    }
}

/// The pin job's zones for `zones`: each filled by helpers on its host node's CPUs within this
/// process's affinity, because first touch places the page. A zone without a node, or on a
/// node none of whose CPUs the process may use (a memory-only node), is filled from anywhere.
/// `vmm run` with `--memory-zone` and `pin-bench --numa-nodes` both place their helpers here.
pub fn pin_zones(zones: &[Zone]) -> Vec<PinZone> {
    let topology = HostTopology::detect();
    let allowed = pinning::sys::affinity_cpus().unwrap_or_else(|e| {
        tracing::warn!("this process's CPU affinity: {e}; zone helpers run on any CPU");
        Vec::new()
    });
    zones
        .iter()
        .map(|z| PinZone {
            id: z.id.clone(),
            ranges: z.ranges.iter().map(|r| r.start.0..r.end()).collect(),
            cpus: z
                .host_numa_node
                .map_or_else(Vec::new, |n| topology.cpus_within(n, &allowed)),
            host_numa_node: z.host_numa_node,
        })
        .collect()
}

/// A zone in the report (`vm.zones[]`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ZoneReport {
    pub id: String,
    pub bytes: u64,
    pub host_numa_node: Option<u32>,
    pub guest_numa_id: Option<u32>,
    /// Samples that found a page, and those on the expected nodes.
    pub placement_sampled: u64,
    pub placement_on_node: u64,
    /// Samples that found no page (never touched): neither on the node nor elsewhere.
    pub placement_not_present: u64,
    /// Pages found per host node: `[[node, pages], ...]`.
    pub placement_per_node: Vec<(u32, u64)>,
    /// The nodes the pages should be on, and why: `bound to node 0`, `process policy bind 0`,
    /// `process policy default, cpuset nodes 0-1`.
    pub placement_nodes: Vec<u32>,
    pub placement_rule: String,
}

impl ZoneReport {
    /// Pages found on the expected nodes, in percent; `None` when no page was found.
    pub fn percent_on_node(&self) -> Option<f64> {
        (self.placement_sampled > 0)
            .then(|| 100.0 * self.placement_on_node as f64 / self.placement_sampled as f64)
    }

    /// The one warning a zone with pages off its nodes gets: how many, and where they are.
    pub fn warning(&self) -> Option<String> {
        let pct = self.percent_on_node().filter(|&p| p < 100.0)?;
        let elsewhere = self.placement_sampled - self.placement_on_node;
        let found = numa::Placement {
            sampled: self.placement_sampled,
            per_node: self.placement_per_node.clone(),
            not_present: self.placement_not_present,
        };
        Some(format!(
            "zone {}: {elsewhere} of {} sampled pages ({:.1}%) are not on node {} ({}); found: \
             {}. The node may have run short of free memory (see `numastat -m`)",
            self.id,
            self.placement_sampled,
            100.0 - pct,
            numa::node_list(&self.placement_nodes),
            self.placement_rule,
            found.shares()
        ))
    }

    /// The summary line's text for this zone.
    pub fn describe(&self) -> String {
        let nodes = numa::node_list(&self.placement_nodes);
        let absent = match self.placement_not_present {
            0 => String::new(),
            n => format!(", {n} samples not present"),
        };
        match self.percent_on_node() {
            Some(p) => format!(
                "{} {p:.1}% of {} sampled pages on node {nodes} ({}){absent}",
                self.id, self.placement_sampled, self.placement_rule
            ),
            None => format!(
                "{} no page present to sample ({}){absent}",
                self.id, self.placement_rule
            ),
        }
    }
}

/// Samples every zone of `memory` and returns their reports, warning once for each zone with
/// pages elsewhere. `policy` is the process's (read on the main thread, whose policy the
/// helpers inherited) and `allowed` its cpuset's nodes.
pub fn check(
    memory: &GuestMemory,
    zones: &[Zone],
    policy: &Policy,
    allowed: &[u32],
) -> Vec<ZoneReport> {
    zones
        .iter()
        .map(|z| {
            let (nodes, rule) = expected(z.host_numa_node, policy, allowed);
            let p = memory
                .placement(&z.ranges, SAMPLE_STEP, MAX_SAMPLES)
                .unwrap_or_else(|e| {
                    tracing::warn!("zone {}: sampling page placement failed: {e}", z.id);
                    numa::Placement::default()
                });
            let report = ZoneReport {
                id: z.id.clone(),
                bytes: z.ranges.iter().map(|r| r.size).sum(),
                host_numa_node: z.host_numa_node,
                guest_numa_id: z.guest_numa_id,
                placement_sampled: p.sampled,
                placement_on_node: p.on(&nodes),
                placement_not_present: p.not_present,
                placement_per_node: p.per_node.clone(),
                placement_nodes: nodes,
                placement_rule: rule,
            };
            if let Some(w) = report.warning() {
                tracing::warn!("{w}");
            }
            report
        })
        .collect()
}

/// The nodes the pages of memory bound to `host_numa_node` (or not bound) belong on, and the
/// rule that says so; `allowed` (the cpuset's nodes) rules under the default policy.
pub fn expected(
    host_numa_node: Option<u32>,
    policy: &Policy,
    allowed: &[u32],
) -> (Vec<u32>, String) {
    match (host_numa_node, &policy.nodes) {
        (Some(n), _) => (vec![n], format!("bound to node {n}")),
        (None, Some(nodes)) => (
            nodes.clone(),
            format!("process policy {}", policy.describe()),
        ),
        (None, None) => (
            allowed.to_vec(),
            format!(
                "process policy {}, cpuset nodes {}",
                policy.describe(),
                numa::node_list(allowed)
            ),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::{Backing, MemoryLayout, MemorySpec};
    use vm_memory::{Bytes, GuestAddress};

    const MIB: u64 = 1 << 20;

    #[test]
    fn a_populated_zone_is_all_on_its_node_and_untouched_pages_count_apart() {
        let layout = MemoryLayout::new(64 * MIB).unwrap();
        let spec = MemorySpec {
            host_numa_node: Some(0),
            ..MemorySpec::new(Backing::Anon)
        };
        let m = GuestMemory::new(spec, layout.ram()).unwrap();
        // The first 32 MiB touched, the rest not.
        for addr in (0..32 * MIB).step_by(4096) {
            m.mem.write_obj(1u8, GuestAddress(addr)).unwrap();
        }
        let zone = Zone::all_ram(&layout, Some(0));
        let r = check(&m, &[zone], &Policy::current(), &[0]).remove(0);
        assert_eq!(r.id, "ram");
        assert_eq!(r.bytes, 64 * MIB);
        assert_eq!(
            (r.placement_sampled, r.placement_on_node),
            (16, 16),
            "{r:?}"
        );
        assert_eq!(r.placement_not_present, 16);
        assert_eq!(r.percent_on_node(), Some(100.0));
        assert_eq!(
            r.describe(),
            "ram 100.0% of 16 sampled pages on node 0 (bound to node 0), 16 samples not present"
        );
    }

    #[test]
    fn pages_off_the_expected_nodes_are_counted_elsewhere() {
        let layout = MemoryLayout::new(64 * MIB).unwrap();
        let m = GuestMemory::new(MemorySpec::new(Backing::Anon), layout.ram()).unwrap();
        for addr in (0..64 * MIB).step_by(4096) {
            m.mem.write_obj(1u8, GuestAddress(addr)).unwrap();
        }
        // A policy naming only node 1: this host's node-0 pages are all elsewhere.
        let bind1 = Policy::new("bind", Some(vec![1]));
        let r = check(&m, &[Zone::all_ram(&layout, None)], &bind1, &[0, 1]).remove(0);
        assert_eq!((r.placement_sampled, r.placement_on_node), (32, 0), "{r:?}");
        assert_eq!(r.placement_per_node, vec![(0, 32)]);
        assert_eq!(r.percent_on_node(), Some(0.0));
        assert!(r.describe().contains("(process policy bind 1)"), "{r:?}");
        assert_eq!(
            r.warning().unwrap(),
            "zone ram: 32 of 32 sampled pages (100.0%) are not on node 1 (process policy bind 1); \
             found: node 0 100.0%. The node may have run short of free memory (see `numastat -m`)"
        );
        // The default policy: any node the cpuset allows.
        let default = Policy::new("default", None);
        let r = check(&m, &[Zone::all_ram(&layout, None)], &default, &[0]).remove(0);
        assert_eq!(r.placement_on_node, 32);
        assert_eq!(r.placement_rule, "process policy default, cpuset nodes 0");
        assert_eq!(r.warning(), None);
    }

    #[test]
    fn a_zone_never_touched_says_so_rather_than_a_percentage() {
        let layout = MemoryLayout::new(64 * MIB).unwrap();
        let m = GuestMemory::new(MemorySpec::new(Backing::Memfd), layout.ram()).unwrap();
        let r = check(
            &m,
            &[Zone::all_ram(&layout, None)],
            &Policy::current(),
            &[0],
        )
        .remove(0);
        assert_eq!(r.percent_on_node(), None);
        assert!(r.describe().contains("no page present to sample"), "{r:?}");
        assert_eq!(r.warning(), None);
    }

    #[test]
    fn a_zone_on_a_node_is_filled_from_that_nodes_cpus_and_one_without_from_anywhere() {
        let layout = MemoryLayout::new(64 * MIB).unwrap();
        let on0 = Zone {
            id: "a".into(),
            ..Zone::all_ram(&layout, Some(0))
        };
        let anywhere = Zone {
            id: "b".into(),
            ..Zone::all_ram(&layout, None)
        };
        let pz = pin_zones(&[on0, anywhere]);
        let allowed = pinning::sys::affinity_cpus().unwrap();
        let node0 = HostTopology::detect().node(0).unwrap().cpus.clone();
        let want: Vec<usize> = node0.into_iter().filter(|c| allowed.contains(c)).collect();
        assert!(!want.is_empty(), "this host runs on node 0's CPUs");
        assert_eq!(
            (pz[0].id.as_str(), &pz[0].cpus, pz[0].host_numa_node),
            ("a", &want, Some(0))
        );
        assert_eq!(pz[0].ranges, vec![0..64 * MIB]);
        assert_eq!(
            (pz[1].id.as_str(), pz[1].cpus.len(), pz[1].host_numa_node),
            ("b", 0, None)
        );
    }

    /// The cost the timeline's `placement` phase adds: 8 GiB populated (4 KiB and THP pages,
    /// 4096 samples), and the bound itself (64Ki samples over the same 8 GiB). Run by
    /// hand: `cargo test --release -p vmm --lib placement_cost -- --ignored --nocapture`.
    #[test]
    #[ignore = "maps and populates 8 GiB; a measurement, run by hand"]
    fn placement_cost() {
        use std::time::Instant;
        const GIB: u64 = 1 << 30;
        for backing in [Backing::Anon, Backing::Thp] {
            let layout = MemoryLayout::new(8 * GIB).unwrap();
            let m = GuestMemory::new(MemorySpec::new(backing), layout.ram()).unwrap();
            for r in m.ram.regions() {
                // SAFETY: populating this test's own fresh mapping; contents stay zero.
                let rc = unsafe {
                    libc::madvise(
                        r.host_addr as *mut libc::c_void,
                        r.size as usize,
                        libc::MADV_POPULATE_WRITE,
                    )
                };
                assert_eq!(rc, 0);
            }
            let zone = Zone::all_ram(&layout, None);
            let t = Instant::now();
            let r = check(&m, &[zone], &Policy::current(), &[0]).remove(0);
            let took = t.elapsed();
            eprintln!(
                "8 GiB {}: {} samples in {took:?}",
                backing.name(),
                r.placement_sampled
            );
            assert_eq!(r.placement_sampled, 4096);
            // The bound: MAX_SAMPLES samples (one per 128 KiB here), what a zone of 128 GiB
            // or more costs.
            let t = Instant::now();
            let p = m.placement(layout.ram(), 128 << 10, MAX_SAMPLES).unwrap();
            let took = t.elapsed();
            eprintln!(
                "8 GiB {}: {} samples in {took:?}",
                backing.name(),
                p.sampled
            );
            assert_eq!(p.sampled, MAX_SAMPLES);
        }
    }
}
