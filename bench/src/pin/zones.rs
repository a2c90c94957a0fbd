//! `pin-bench --numa-nodes A,B,...`: guest RAM split into one zone per listed host node, each
//! bound to its node before it is touched (as `vmm run --memory-zone ...,host_numa_node=N`
//! binds it) and filled by helpers on that node's CPUs within this process's affinity
//! ([`placement::pin_zones`], the very code `vmm run` places its helpers with). Each zone's
//! rate, thread share and placement are reported on its own, and its rate against the fastest
//! zone's: on a two-socket host, a zone well below the others is one filled from afar.
//!
//! A node may be listed more than once (`0,0`): two zones on one node. That runs the whole
//! multi-zone path (the thread budget split across zones, one queue and one placement check
//! per zone) on a one-node host, which is the only way to measure it there.

use pinning::engine::ZoneStats;
use pinning::topology::{HostTopology, NodeError};
use pinning::{Classify, ErrorClass};
use serde::Serialize;
use vm_memory::GuestAddress;
use vmm::memory::{MemorySpec, RamRange};
use vmm::placement::{Zone, ZoneReport};
use vmm::size::human;

/// Zone sizes are whole multiples of this (at least): one placement sample per 2 MiB, so a
/// zone boundary never splits a sample's huge page.
pub const ZONE_ALIGN: u64 = 2 << 20;

/// Why `--numa-nodes` cannot be measured here.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ZoneError {
    #[error("--numa-nodes: {0}")]
    Node(#[from] NodeError),
    #[error("--numa-nodes: --memory {memory} cannot be split into {zones} zones of whole {align} pages; give --memory {min} or more, or fewer nodes")]
    TooSmall {
        memory: String,
        zones: usize,
        align: String,
        min: String,
    },
}

impl Classify for ZoneError {
    /// The nodes and the size are the user's input; the cpuset is the user's setup.
    fn class(&self) -> ErrorClass {
        ErrorClass::User
    }
}

/// The zones of `memory` bytes over `nodes`, in their order, named `mem0`, `mem1`, ... (the
/// ids `vmm run --memory-zone` examples use): equal shares of whole `align` pages, the last
/// zone taking what is left. Every node is checked against `topology` first (it exists, is
/// online, has memory, and the cpuset and `Mems_allowed_list` allow it), so a bad node is
/// refused before any memory is mapped.
pub fn split(
    nodes: &[u32],
    memory: u64,
    align: u64,
    topology: &HostTopology,
) -> Result<Vec<Zone>, ZoneError> {
    for &node in nodes {
        topology.check_node(node)?;
    }
    let align = align.max(ZONE_ALIGN);
    let count = nodes.len() as u64;
    let share = (memory / count.max(1)) / align * align;
    if share == 0 {
        return Err(ZoneError::TooSmall {
            memory: human(memory),
            zones: nodes.len(),
            align: human(align),
            min: human(align.saturating_mul(count)),
        });
    }
    let mut start = 0;
    Ok(nodes
        .iter()
        .enumerate()
        .map(|(i, &node)| {
            let size = if i + 1 == nodes.len() {
                memory - start
            } else {
                share
            };
            let zone = Zone {
                id: format!("mem{i}"),
                ranges: vec![RamRange {
                    start: GuestAddress(start),
                    size,
                }],
                host_numa_node: Some(node),
                guest_numa_id: None,
            };
            start += size;
            zone
        })
        .collect())
}

/// What one run maps: each zone's ranges with `spec` bound to its node, or, without zones,
/// `memory` bytes from address 0 under `spec` as given.
pub fn memory_layout(
    spec: MemorySpec,
    memory: u64,
    zones: &[Zone],
) -> Vec<(MemorySpec, Vec<RamRange>)> {
    if zones.is_empty() {
        return vec![(spec, vec![RamRange::at_zero(memory)])];
    }
    zones
        .iter()
        .map(|z| {
            let spec = MemorySpec {
                host_numa_node: z.host_numa_node,
                ..spec
            };
            (spec, z.ranges.clone())
        })
        .collect()
}

/// One zone's results for one thread count.
#[derive(Clone, Debug, Serialize)]
pub struct ZoneResult {
    pub id: String,
    pub host_numa_node: Option<u32>,
    pub bytes: u64,
    /// The CPUs its helpers ran on (empty: anywhere, as for a node with no CPUs this process
    /// may use).
    pub cpus: Vec<usize>,
    pub threads: usize,
    pub decided_by: String,
    pub runs_gibps: Vec<f64>,
    pub median_gibps: f64,
    pub best_gibps: f64,
    /// Its median over the fastest zone's median (1 for the fastest).
    pub of_best_zone: f64,
    /// Where the last measured run's pages were (`vm.zones[]`'s fields).
    pub placement: Option<ZoneReport>,
}

/// The zones' results run by run for one thread count.
#[derive(Debug, Default)]
pub struct ZoneRuns {
    zones: Vec<ZoneResult>,
}

impl ZoneRuns {
    /// Takes one run's per-zone stats (matched by id) and, for a measured run, its rates and
    /// placement.
    pub fn record(&mut self, stats: &[ZoneStats], placement: Option<Vec<ZoneReport>>) {
        for (i, s) in stats.iter().enumerate() {
            if self.zones.len() <= i {
                self.zones.push(ZoneResult {
                    id: s.id.clone(),
                    host_numa_node: None,
                    bytes: 0,
                    cpus: Vec::new(),
                    threads: 0,
                    decided_by: String::new(),
                    runs_gibps: Vec::new(),
                    median_gibps: 0.0,
                    best_gibps: 0.0,
                    of_best_zone: 0.0,
                    placement: None,
                });
            }
            let z = &mut self.zones[i];
            (z.bytes, z.cpus, z.threads) = (s.bytes, s.cpus.clone(), s.threads);
            z.decided_by = s.decided_by.to_string();
            if let Some(reports) = &placement {
                z.runs_gibps.push(s.gibps);
                z.placement = reports.iter().find(|r| r.id == s.id).cloned();
                z.host_numa_node = z.placement.as_ref().and_then(|p| p.host_numa_node);
            }
        }
    }

    /// The results, each zone's median set against the fastest zone's.
    pub fn finish(mut self) -> Vec<ZoneResult> {
        for z in &mut self.zones {
            z.median_gibps = super::median(&z.runs_gibps);
            z.best_gibps = z.runs_gibps.iter().copied().fold(0.0, f64::max);
        }
        let best = self
            .zones
            .iter()
            .map(|z| z.median_gibps)
            .fold(0.0, f64::max);
        for z in &mut self.zones {
            z.of_best_zone = if best > 0.0 {
                z.median_gibps / best
            } else {
                0.0
            };
        }
        self.zones
    }
}

/// The table's lines for one thread count's zones (none without zones).
pub fn table(zones: &[ZoneResult]) -> String {
    if zones.is_empty() {
        return String::new();
    }
    let mut out = String::from(
        "  zone   node  bytes     cpus        threads  decided_by   median GiB/s  best GiB/s  of best  placement\n",
    );
    for z in zones {
        let node = z.host_numa_node.map_or("-".into(), |n| n.to_string());
        let cpus = if z.cpus.is_empty() {
            "any".to_string()
        } else {
            pinning::topology::node_list(z.cpus.iter().map(|&c| c as u32))
        };
        let placement = match &z.placement {
            Some(p) => match p.percent_on_node() {
                Some(pct) => format!(
                    "{pct:.1}% of {} sampled pages on node {node}",
                    p.placement_sampled
                ),
                None => "no page present to sample".into(),
            },
            None => "not sampled".into(),
        };
        out.push_str(&format!(
            "  {:<6} {:>4}  {:<8}  {:<10}  {:>7}  {:<11}  {:>12.2}  {:>10.2}  {:>7.2}  {placement}\n",
            z.id,
            node,
            human(z.bytes),
            cpus,
            z.threads,
            z.decided_by,
            z.median_gibps,
            z.best_gibps,
            z.of_best_zone,
        ));
    }
    out
}

#[cfg(test)]
mod tests;
