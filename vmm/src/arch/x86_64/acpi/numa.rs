//! The guest's NUMA topology as ACPI tells it: the SRAT gives each proximity domain its
//! CPUs (Local APIC affinity) and its RAM ranges (memory affinity), the SLIT the relative
//! distance between every two domains. `acpi::build` places and lists both only when it is
//! given a [`GuestNuma`]; without one the guest sees no NUMA at all, as before.
//!
//! Layouts: ACPI 6.5 sections 5.2.16 (SRAT) and 5.2.17 (SLIT). Proximity domain `i` is
//! `nodes[i]`: the SLIT indexes its matrix by domain, so domains run 0, 1, ... in order.

use acpi_tables::sdt::Sdt;
use acpi_tables::slit::SLIT;
use acpi_tables::srat::MemoryAffinity;
use acpi_tables::Aml;

use super::tables::{oem_table_id, sdt, OEM_ID, OEM_REVISION};
use crate::memory::layout::{MemoryLayout, RamRange};
use crate::memory::zones::GuestNumaNode;
pub use crate::memory::zones::LOCAL_DISTANCE;

/// The distance between two nodes when `--numa` gives it in neither direction (Cloud
/// Hypervisor's default too).
pub const DEFAULT_REMOTE_DISTANCE: u8 = 20;

/// SRAT revision of ACPI 6.5 (from revision 2 on, a proximity domain is 32 bits wide).
const SRAT_REVISION: u8 = 3;
/// SRAT structure type of a Processor Local APIC/SAPIC Affinity.
pub const SRAT_LAPIC_AFFINITY: u8 = 0;
/// Its length.
pub const SRAT_LAPIC_AFFINITY_LEN: u8 = 16;
/// The "enabled" flag of an SRAT affinity structure.
pub const SRAT_ENABLED: u32 = 1;

/// The guest's NUMA nodes, as the SRAT and SLIT describe them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GuestNuma {
    /// Node `i` is proximity domain `i`.
    pub nodes: Vec<GuestNumaDesc>,
    /// `distances[i][j]`: from domain `i` to domain `j`, [`LOCAL_DISTANCE`] on the diagonal.
    pub distances: Vec<Vec<u8>>,
}

/// One guest NUMA node.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GuestNumaDesc {
    pub proximity_domain: u32,
    /// Its CPUs' Local APIC IDs (the vCPU indexes, as in the MADT).
    pub apic_ids: Vec<u32>,
    /// Its RAM: the ranges of its memory zones in the guest layout.
    pub memory: Vec<RamRange>,
}

/// A guest NUMA description the tables cannot carry.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum NumaError {
    #[error("guest NUMA: no nodes given; give at least one --numa, or none to have no NUMA")]
    NoNodes,
    #[error("guest NUMA: node {index} has id {id}; guest_numa_id must run 0, 1, 2... in order")]
    IdOrder { index: usize, id: u32 },
    #[error("guest NUMA: CPU {cpu} does not exist with {cpus} vCPUs; name CPUs 0..{cpus} only")]
    NoSuchCpu { cpu: u32, cpus: u8 },
    #[error("guest NUMA: CPU {cpu} is in more than one node; give each CPU to one node")]
    CpuTwice { cpu: u32 },
    #[error("guest NUMA: CPU {cpu} is in no node; give each CPU to one node")]
    CpuInNoNode { cpu: u8 },
    #[error("guest NUMA: node {node} has an empty memory range at {addr:#x}; drop it")]
    EmptyRange { node: u32, addr: u64 },
    #[error(
        "guest NUMA: the distance matrix must be {nodes} x {nodes}, one row and column per node"
    )]
    DistanceShape { nodes: usize },
    #[error("guest NUMA: distance {from}->{to} is {got}; a node's distance to itself is 10, to another 11..=255")]
    BadDistance { from: usize, to: usize, got: u8 },
    #[error("guest NUMA: distance {a}->{b} is {ab} but {b}->{a} is {ba}; give both directions the same distance")]
    Asymmetric { a: usize, b: usize, ab: u8, ba: u8 },
}

impl GuestNuma {
    /// The topology `--numa` gives over `layout`'s zones, or none without `--numa`. Node `i`
    /// is the one with `guest_numa_id` `i` ([`GuestNuma::check`] refuses gaps); its CPUs are
    /// APIC ids (vCPU `n` has APIC id `n`), its memory its zones' ranges in address order; a
    /// distance given one way only holds both ways, one given neither way is
    /// [`DEFAULT_REMOTE_DISTANCE`].
    pub fn from_nodes(nodes: &[GuestNumaNode], layout: &MemoryLayout) -> Option<GuestNuma> {
        if nodes.is_empty() {
            return None;
        }
        let mut nodes: Vec<&GuestNumaNode> = nodes.iter().collect();
        nodes.sort_by_key(|n| n.guest_numa_id);
        let given = |from: &GuestNumaNode, to: u32| {
            from.distances
                .iter()
                .find(|&&(t, _)| t == to)
                .map(|&(_, d)| d)
        };
        let distances = nodes
            .iter()
            .map(|a| {
                nodes
                    .iter()
                    .map(|b| match a.guest_numa_id == b.guest_numa_id {
                        true => LOCAL_DISTANCE,
                        false => given(a, b.guest_numa_id)
                            .or_else(|| given(b, a.guest_numa_id))
                            .unwrap_or(DEFAULT_REMOTE_DISTANCE),
                    })
                    .collect()
            })
            .collect();
        let nodes = nodes
            .iter()
            .map(|n| GuestNumaDesc {
                proximity_domain: n.guest_numa_id,
                apic_ids: n.cpus.iter().map(|&c| u32::from(c)).collect(),
                memory: layout
                    .zones()
                    .iter()
                    .filter(|z| n.memory_zones.contains(&z.id))
                    .flat_map(|z| z.ranges.iter().copied())
                    .collect(),
            })
            .collect();
        Some(GuestNuma { nodes, distances })
    }

    /// Refuses what the SRAT and SLIT could not say, or would say wrongly, for `cpus` vCPUs:
    /// callable before anything is built, so that bad input is refused early.
    pub fn check(&self, cpus: u8) -> Result<(), NumaError> {
        if self.nodes.is_empty() {
            return Err(NumaError::NoNodes);
        }
        let mut seen = vec![false; usize::from(cpus)];
        for (index, node) in self.nodes.iter().enumerate() {
            if node.proximity_domain as usize != index {
                return Err(NumaError::IdOrder {
                    index,
                    id: node.proximity_domain,
                });
            }
            for &cpu in &node.apic_ids {
                let slot = seen
                    .get_mut(cpu as usize)
                    .ok_or(NumaError::NoSuchCpu { cpu, cpus })?;
                if std::mem::replace(slot, true) {
                    return Err(NumaError::CpuTwice { cpu });
                }
            }
            if let Some(r) = node.memory.iter().find(|r| r.size == 0) {
                return Err(NumaError::EmptyRange {
                    node: node.proximity_domain,
                    addr: r.start.0,
                });
            }
        }
        if let Some(cpu) = seen.iter().position(|s| !s) {
            return Err(NumaError::CpuInNoNode { cpu: cpu as u8 });
        }
        self.check_distances()
    }

    fn check_distances(&self) -> Result<(), NumaError> {
        let n = self.nodes.len();
        let d = &self.distances;
        if d.len() != n || d.iter().any(|row| row.len() != n) {
            return Err(NumaError::DistanceShape { nodes: n });
        }
        for (from, row) in d.iter().enumerate() {
            for (to, &got) in row.iter().enumerate() {
                if (from == to) != (got == LOCAL_DISTANCE) || got < LOCAL_DISTANCE {
                    return Err(NumaError::BadDistance { from, to, got });
                }
            }
        }
        // The crate's SLIT sets both directions at once: ACPI allows an asymmetric matrix,
        // the crate cannot write one.
        for (from, row) in d.iter().enumerate() {
            for (to, &got) in row.iter().enumerate() {
                if d[to][from] != got {
                    return Err(NumaError::Asymmetric {
                        a: from,
                        b: to,
                        ab: got,
                        ba: d[to][from],
                    });
                }
            }
        }
        Ok(())
    }
}

/// The SRAT: for each node, one Local APIC affinity per CPU, then one memory affinity per
/// RAM range, all enabled.
///
/// Built on the generic `Sdt`, as the MADT is: the crate's `SRAT` takes only its own memory,
/// generic initiator and RISC-V structures and has no x86 Local APIC affinity, which is
/// written here; the memory affinities are the crate's.
pub fn srat(numa: &GuestNuma) -> Sdt {
    let mut body = Vec::new();
    // Reserved: 1 (for compatibility with older OSes), then 8 zero bytes.
    body.extend_from_slice(&1u32.to_le_bytes());
    body.extend_from_slice(&[0; 8]);
    for node in &numa.nodes {
        let domain = node.proximity_domain.to_le_bytes();
        for &apic in &node.apic_ids {
            // Type, length, domain bits 7:0, APIC ID, flags, SAPIC EID, domain bits 31:8,
            // clock domain. `check` keeps APIC IDs below MAX_CPUS, so they fit a byte.
            body.extend_from_slice(&[SRAT_LAPIC_AFFINITY, SRAT_LAPIC_AFFINITY_LEN]);
            body.extend_from_slice(&[domain[0], apic as u8]);
            body.extend_from_slice(&SRAT_ENABLED.to_le_bytes());
            body.push(0);
            body.extend_from_slice(&domain[1..]);
            body.extend_from_slice(&0u32.to_le_bytes());
        }
        for range in &node.memory {
            MemoryAffinity::new(node.proximity_domain, range.start.0, range.size)
                .enabled()
                .to_aml_bytes(&mut body);
        }
    }
    let mut table = sdt(b"SRAT", SRAT_REVISION);
    table.append_slice(&body);
    table
}

/// The SLIT: the distance matrix, domain by domain.
pub fn slit(numa: &GuestNuma) -> SLIT {
    let n = numa.nodes.len();
    let mut slit = SLIT::new(OEM_ID, oem_table_id(b"SLIT"), OEM_REVISION, n as u32);
    // The crate fills the diagonal with 10 and sets [a][b] and [b][a] together; setting the
    // diagonal again would throw its running checksum off.
    for a in 0..n {
        for b in a + 1..n {
            slit.set_distance(a, b, numa.distances[a][b]);
        }
    }
    slit
}
