//! Memory zones and guest NUMA nodes, in Cloud Hypervisor's syntax so users move between the
//! two: `--memory-zone id=mem0,size=4G[,host_numa_node=N][,shared=on][,hugepages=on]` and
//! `--numa guest_numa_id=0,cpus=[0-1],memory_zones=[mem0],distances=[1@20]`.
//!
//! A zone is a stretch of guest RAM with its own backing and shards, laid out in order from
//! guest address 0 ([`super::layout::MemoryLayout::with_zones`]). Everything about zones and
//! nodes that can be wrong is refused here, before any memory is touched: [`check`] on the
//! input alone, [`check_host`] against the host's topology.

use std::collections::BTreeSet;
use std::str::FromStr;

use pinning::topology::{HostTopology, NodeError};
use pinning::{Classify, ErrorClass};

use super::backing::Backing;
use super::layout::{MIN_MEM_SIZE, PAGE_SIZE};
use super::{MemorySpec, ThpPolicy};
use crate::size::{human, parse_size};

/// One `--memory-zone`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ZoneConfig {
    pub id: String,
    pub size: u64,
    /// The host node its memory must come from; `None`: the process's policy decides.
    pub host_numa_node: Option<u32>,
    /// Shareable memory (memfd), whatever `--backing` says.
    pub shared: bool,
    /// hugetlb pages (2 MiB), whatever `--backing` says.
    pub hugepages: bool,
}

/// One `--numa`: a node the guest sees, its vCPUs, its zones and its distances to others.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GuestNumaNode {
    pub guest_numa_id: u32,
    pub cpus: Vec<u8>,
    pub memory_zones: Vec<String>,
    /// `(other guest_numa_id, distance)`.
    pub distances: Vec<(u32, u8)>,
}

/// The smallest distance to another node (ACPI SLIT: 10 is a node to itself, below is
/// reserved).
pub const LOCAL_DISTANCE: u8 = 10;

/// Splits `a=1,b=[x,y],c=2` at the commas outside brackets into `(key, value)` pairs, each
/// key at most once and one of `known`.
fn params<'a>(text: &'a str, known: &[&str]) -> Result<Vec<(&'a str, &'a str)>, String> {
    let mut parts = Vec::new();
    let (mut depth, mut from) = (0i32, 0);
    for (i, c) in text.char_indices() {
        match c {
            '[' => depth += 1,
            ']' if depth == 0 => return Err(format!("`{text}`: a `]` without its `[`")),
            ']' => depth -= 1,
            ',' if depth == 0 => {
                parts.push(&text[from..i]);
                from = i + 1;
            }
            _ => {}
        }
    }
    if depth != 0 {
        return Err(format!("`{text}`: a `[` without its `]`"));
    }
    parts.push(&text[from..]);
    let mut out: Vec<(&str, &str)> = Vec::new();
    for part in parts.into_iter().filter(|p| !p.is_empty()) {
        let Some((key, value)) = part.split_once('=') else {
            return Err(format!("`{part}`: give key=value ({})", known.join(", ")));
        };
        if !known.contains(&key) {
            return Err(format!("`{key}`: not a key here; use {}", known.join(", ")));
        }
        if out.iter().any(|(k, _)| *k == key) {
            return Err(format!("`{key}` is given twice; give it once"));
        }
        out.push((key, value));
    }
    Ok(out)
}

fn on_off(key: &str, value: &str) -> Result<bool, String> {
    match value {
        "on" => Ok(true),
        "off" => Ok(false),
        _ => Err(format!("{key}={value}: give {key}=on or {key}=off")),
    }
}

fn number<T: FromStr>(key: &str, value: &str, what: &str) -> Result<T, String> {
    value
        .parse()
        .map_err(|_| format!("{key}={value}: give {what}"))
}

/// The items of `[a,b]` (brackets optional for one item).
fn list(value: &str) -> Vec<&str> {
    let inner = value
        .strip_prefix('[')
        .and_then(|v| v.strip_suffix(']'))
        .unwrap_or(value);
    inner.split(',').filter(|s| !s.is_empty()).collect()
}

impl FromStr for ZoneConfig {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        const KEYS: [&str; 5] = ["id", "size", "host_numa_node", "shared", "hugepages"];
        let mut zone = ZoneConfig {
            id: String::new(),
            size: 0,
            host_numa_node: None,
            shared: false,
            hugepages: false,
        };
        for (key, value) in params(s, &KEYS)? {
            match key {
                "id" => zone.id = value.to_string(),
                "size" => zone.size = parse_size(value).map_err(|e| format!("size={e}"))?,
                "host_numa_node" => {
                    zone.host_numa_node = Some(number(key, value, "a host node number")?)
                }
                "shared" => zone.shared = on_off(key, value)?,
                _ => zone.hugepages = on_off(key, value)?,
            }
        }
        if zone.id.is_empty() {
            return Err(format!("`{s}`: give the zone an id (id=mem0)"));
        }
        if zone.size == 0 {
            return Err(format!("`{s}`: give the zone a size (size=4G)"));
        }
        Ok(zone)
    }
}

impl FromStr for GuestNumaNode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        const KEYS: [&str; 4] = ["guest_numa_id", "cpus", "memory_zones", "distances"];
        let mut id = None;
        let mut node = GuestNumaNode {
            guest_numa_id: 0,
            cpus: Vec::new(),
            memory_zones: Vec::new(),
            distances: Vec::new(),
        };
        for (key, value) in params(s, &KEYS)? {
            match key {
                "guest_numa_id" => id = Some(number(key, value, "a guest node number")?),
                "cpus" => node.cpus = cpu_list(value)?,
                "memory_zones" => {
                    node.memory_zones = list(value).iter().map(|z| z.to_string()).collect()
                }
                _ => {
                    for item in list(value) {
                        let (to, d) = item.split_once('@').ok_or_else(|| {
                            format!("distances: `{item}`: give NODE@DISTANCE (1@20)")
                        })?;
                        node.distances.push((
                            number("distances", to, "NODE@DISTANCE with a guest node number")?,
                            number("distances", d, "NODE@DISTANCE with a distance of 10 to 255")?,
                        ));
                    }
                }
            }
        }
        node.guest_numa_id = id.ok_or_else(|| format!("`{s}`: give guest_numa_id=N"))?;
        Ok(node)
    }
}

/// `[0-1,3]`: vCPU numbers (each below 255, as `--cpus` is).
fn cpu_list(value: &str) -> Result<Vec<u8>, String> {
    let bad = || format!("cpus={value}: give vCPU numbers and ranges such as cpus=[0-1,3]");
    let mut cpus = Vec::new();
    for item in list(value) {
        let (a, b) = item.split_once('-').unwrap_or((item, item));
        let (a, b): (u8, u8) = (a.parse().map_err(|_| bad())?, b.parse().map_err(|_| bad())?);
        if b < a {
            return Err(bad());
        }
        cpus.extend(a..=b);
    }
    Ok(cpus)
}

/// Why the zones or guest nodes cannot be built.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ZoneError {
    #[error("--memory-zone id={0} is given twice; give each zone its own id")]
    DuplicateZone(String),
    #[error("--memory-zone id={id},size={} ({size} bytes): not a multiple of the {} page size; give a size that is", human(*size), human(*page))]
    ZoneSize { id: String, size: u64, page: u64 },
    #[error("--memory-zone id={id},hugepages=on would start {} into guest RAM, not on a {} huge page; put it first, or after zones whose sizes add up to a multiple of {}", human(*start), human(*page), human(*page))]
    ZoneStart { id: String, start: u64, page: u64 },
    #[error("--memory {} but the --memory-zone sizes add up to {}; leave --memory out or make it their sum", human(*memory), human(*zones))]
    MemoryMismatch { memory: u64, zones: u64 },
    #[error("the --memory-zone sizes add up to {}, below the guest minimum of {}; give larger zones", human(*.0), human(MIN_MEM_SIZE))]
    TooSmall(u64),
    #[error("--numa needs --memory-zone: give each guest node its RAM as zones (--memory-zone id=mem0,size=1G and memory_zones=[mem0])")]
    NumaWithoutZones,
    #[error("--numa guest_numa_id={0} is given twice; give each guest node its own id")]
    DuplicateNode(u32),
    #[error("--numa guest_numa_id={node}: memory_zones names {zone}, which no --memory-zone defines; define it or name one that is")]
    UnknownZone { node: u32, zone: String },
    #[error("--memory-zone id={zone} is in guest nodes {first} and {second}; put it in one --numa memory_zones only")]
    ZoneInTwoNodes {
        zone: String,
        first: u32,
        second: u32,
    },
    #[error("--numa guest_numa_id values must run 0, 1, 2, ... with no gap, and {0} is missing; number the guest nodes from 0")]
    NodeIdGap(u32),
    #[error("--numa guest_numa_id={0} has neither cpus nor memory_zones; give it one of them or leave the node out")]
    EmptyNode(u32),
    #[error("--numa guest_numa_id={a} gives distance {ab} to node {b}, but guest_numa_id={b} gives {ba} back; give both directions the same distance")]
    AsymmetricDistance { a: u32, b: u32, ab: u8, ba: u8 },
    #[error("--numa guest_numa_id={node}: {what} is listed twice; list it once")]
    ListedTwice { node: u32, what: String },
    #[error("--memory-zone id={0} is in no --numa node; add it to one node's memory_zones")]
    ZoneInNoNode(String),
    #[error("--numa guest_numa_id={node}: cpus names vCPU {cpu}, but --cpus {cpus} gives vCPUs 0-{}; name only those or raise --cpus", cpus - 1)]
    CpuOutOfRange { node: u32, cpu: u8, cpus: u8 },
    #[error(
        "vCPU {cpu} is in guest nodes {first} and {second}; put it in one --numa cpus list only"
    )]
    CpuInTwoNodes { cpu: u8, first: u32, second: u32 },
    #[error("vCPU {0} is in no --numa node; add it to one node's cpus")]
    CpuInNoNode(u8),
    #[error("--numa guest_numa_id={node}: distances names node {to}, which no --numa defines; give distances to defined guest nodes only")]
    UnknownDistanceNode { node: u32, to: u32 },
    #[error("--numa guest_numa_id={node}: distance {distance} to node {to} is not allowed; give {LOCAL_DISTANCE} to itself and 11 to 255 to another node")]
    BadDistance { node: u32, to: u32, distance: u8 },
    #[error("--memory-zone id={zone},host_numa_node={node}: {source}")]
    Host {
        zone: String,
        node: u32,
        #[source]
        source: NodeError,
    },
    #[error("--memory-zone id={zone},hugepages=on: the hugepages=on zones on host node {node} need {needed} free {} huge pages, and it has {free}; raise /sys/devices/system/node/node{node}/hugepages/hugepages-{}kB/nr_hugepages by {} (as root) or leave hugepages off", human(*page), page / 1024, needed - free)]
    NoHugePages {
        zone: String,
        node: u32,
        needed: u64,
        free: u64,
        page: u64,
    },
}

impl Classify for ZoneError {
    fn class(&self) -> ErrorClass {
        ErrorClass::User
    }
}

/// Checks the zones and guest nodes against each other, `--memory` (`None`: not given) and
/// `--cpus`; returns the guest RAM they make (0 without zones).
pub fn check(
    zones: &[ZoneConfig],
    numa: &[GuestNumaNode],
    memory: Option<u64>,
    cpus: u8,
) -> Result<u64, ZoneError> {
    let mut ids = BTreeSet::new();
    for z in zones {
        if !ids.insert(z.id.as_str()) {
            return Err(ZoneError::DuplicateZone(z.id.clone()));
        }
        let page = if z.hugepages {
            Backing::Hugetlb.page_size()
        } else {
            PAGE_SIZE
        };
        if z.size % page != 0 {
            return Err(ZoneError::ZoneSize {
                id: z.id.clone(),
                size: z.size,
                page,
            });
        }
    }
    // Zones lie one after the other from address 0, and the 32-bit hole starts and ends on a
    // huge-page boundary: a zone starting on one stays aligned to its huge pages throughout.
    let mut start = 0u64;
    for z in zones {
        let page = Backing::Hugetlb.page_size();
        if z.hugepages && start % page != 0 {
            return Err(ZoneError::ZoneStart {
                id: z.id.clone(),
                start,
                page,
            });
        }
        start = start.saturating_add(z.size);
    }
    let total = start;
    if !zones.is_empty() && total < MIN_MEM_SIZE {
        return Err(ZoneError::TooSmall(total));
    }
    if let Some(memory) = memory.filter(|&m| !zones.is_empty() && m != total) {
        return Err(ZoneError::MemoryMismatch {
            memory,
            zones: total,
        });
    }
    if numa.is_empty() {
        return Ok(total);
    }
    if zones.is_empty() {
        return Err(ZoneError::NumaWithoutZones);
    }
    check_nodes(zones, numa, cpus)?;
    Ok(total)
}

/// Every zone in exactly one guest node, every vCPU in exactly one, distances between
/// defined nodes.
fn check_nodes(zones: &[ZoneConfig], numa: &[GuestNumaNode], cpus: u8) -> Result<(), ZoneError> {
    let mut node_ids = BTreeSet::new();
    for n in numa {
        if !node_ids.insert(n.guest_numa_id) {
            return Err(ZoneError::DuplicateNode(n.guest_numa_id));
        }
    }
    // The SRAT's proximity domains and the SLIT's rows are the ids, in order.
    if let Some(missing) = (0..)
        .zip(&node_ids)
        .find(|&(i, &id)| i != id)
        .map(|(i, _)| i)
    {
        return Err(ZoneError::NodeIdGap(missing));
    }
    if let Some(n) = numa
        .iter()
        .find(|n| n.cpus.is_empty() && n.memory_zones.is_empty())
    {
        return Err(ZoneError::EmptyNode(n.guest_numa_id));
    }
    let mut zone_node: Vec<Option<u32>> = vec![None; zones.len()];
    let mut cpu_node: Vec<Option<u32>> = vec![None; usize::from(cpus)];
    for n in numa {
        let node = n.guest_numa_id;
        for name in &n.memory_zones {
            let Some(i) = zones.iter().position(|z| &z.id == name) else {
                return Err(ZoneError::UnknownZone {
                    node,
                    zone: name.clone(),
                });
            };
            if let Some(first) = zone_node[i].replace(node) {
                if first == node {
                    return Err(ZoneError::ListedTwice {
                        node,
                        what: format!("memory zone {name}"),
                    });
                }
                return Err(ZoneError::ZoneInTwoNodes {
                    zone: name.clone(),
                    first,
                    second: node,
                });
            }
        }
        for &cpu in &n.cpus {
            let Some(slot) = cpu_node.get_mut(usize::from(cpu)) else {
                return Err(ZoneError::CpuOutOfRange { node, cpu, cpus });
            };
            if let Some(first) = slot.replace(node) {
                if first == node {
                    return Err(ZoneError::ListedTwice {
                        node,
                        what: format!("vCPU {cpu}"),
                    });
                }
                return Err(ZoneError::CpuInTwoNodes {
                    cpu,
                    first,
                    second: node,
                });
            }
        }
        for &(to, distance) in &n.distances {
            if !node_ids.contains(&to) {
                return Err(ZoneError::UnknownDistanceNode { node, to });
            }
            if (to == node) != (distance == LOCAL_DISTANCE) || distance < LOCAL_DISTANCE {
                return Err(ZoneError::BadDistance { node, to, distance });
            }
            // The SLIT written here holds one distance per pair of nodes.
            let back = numa
                .iter()
                .filter(|m| m.guest_numa_id == to)
                .flat_map(|m| &m.distances)
                .find(|&&(t, _)| t == node);
            if let Some(&(_, ba)) = back.filter(|&&(_, ba)| ba != distance) {
                return Err(ZoneError::AsymmetricDistance {
                    a: node,
                    b: to,
                    ab: distance,
                    ba,
                });
            }
        }
    }
    if let Some(i) = zone_node.iter().position(Option::is_none) {
        return Err(ZoneError::ZoneInNoNode(zones[i].id.clone()));
    }
    if let Some(cpu) = cpu_node.iter().position(Option::is_none) {
        // Below `cpus`, which is a u8.
        return Err(ZoneError::CpuInNoNode(cpu as u8));
    }
    Ok(())
}

/// Checks each zone's host node against `topo`: it exists, is online, has memory, lies in
/// the process's cpuset and Mems_allowed, and has the huge pages `hugepages=on` needs.
pub fn check_host(zones: &[ZoneConfig], topo: &HostTopology) -> Result<(), ZoneError> {
    // Huge pages each node must give, summed over its zones as they are checked.
    let mut needed_on: std::collections::BTreeMap<u32, u64> = Default::default();
    for z in zones {
        let Some(node) = z.host_numa_node else {
            continue;
        };
        let host = topo.check_node(node).map_err(|source| ZoneError::Host {
            zone: z.id.clone(),
            node,
            source,
        })?;
        if z.hugepages {
            let page = Backing::Hugetlb.page_size();
            let needed = needed_on.entry(node).or_default();
            *needed += z.size / page;
            let (needed, free) = (*needed, host.free_huge_pages(page));
            if free < needed {
                return Err(ZoneError::NoHugePages {
                    zone: z.id.clone(),
                    node,
                    needed,
                    free,
                    page,
                });
            }
        }
    }
    Ok(())
}

/// Each zone's span of the pinning engine's linear offsets (`GuestRam` orders its regions by
/// guest address, and zones lie in address order), in the order of `layout.zones()`: what a
/// pin job is told each zone covers.
#[cfg(test)]
pub fn linear_spans(layout: &super::MemoryLayout) -> Vec<std::ops::Range<u64>> {
    let mut start = 0;
    layout
        .zones()
        .iter()
        .map(|z| {
            let end = start + z.ranges.iter().map(|r| r.size).sum::<u64>();
            let span = start..end;
            start = end;
            span
        })
        .collect()
}

impl ZoneConfig {
    /// The zone's backing: hugetlb for `hugepages=on`, shareable memory (with huge pages
    /// where the host's shmem policy allows) for `shared=on`, else `default` (what
    /// `--backing` resolved to), with `--memory-shard` where the backing has shards.
    pub fn spec(&self, default: MemorySpec, thp: &ThpPolicy) -> MemorySpec {
        let backing = if self.hugepages {
            Backing::Hugetlb
        } else if self.shared && !default.backing.shareable() {
            if thp.shmem_allowed() {
                Backing::MemfdThp
            } else {
                Backing::Memfd
            }
        } else {
            default.backing
        };
        MemorySpec {
            backing,
            shard_bytes: default.shard_bytes.filter(|_| backing.shareable()),
            host_numa_node: self.host_numa_node,
        }
    }
}

#[cfg(test)]
mod tests;
