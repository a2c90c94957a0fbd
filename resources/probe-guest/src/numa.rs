//! The guest NUMA topology as ACPI gives it: the SRAT's enabled Local APIC and memory
//! affinities grouped by proximity domain, the SLIT's distances. Prints one `numa node` line
//! per domain and, given `probe.expect_numa` options, checks the SRAT against them.
//!
//! Layouts: ACPI 6.5 sections 5.2.16 (SRAT) and 5.2.17 (SLIT).
//!
//! The emulator that runs the probe here lacks the SSE instructions LLVM zeroes and compares
//! larger values with, and `core::fmt` (which a bounds-check panic drags in) is kept out: so
//! the topology lives in a static rather than on the stack, no CPU set is built from the
//! command line (its words are checked one by one), and every index is a `get`.

use guest_abi::probe::{NUMA_NODE, OPT_EXPECT_NUMA};

use crate::acpi::{self, HEADER};
use crate::console::Line;
use crate::global::Global;
use crate::io::phys;
use crate::text::{parse_dec, parse_hex};

const SRAT: u32 = u32::from_le_bytes(*b"SRAT");
const SLIT: u32 = u32::from_le_bytes(*b"SLIT");
/// SRAT: header, 12 reserved bytes, then the affinity structures.
const SRAT_FIRST: u64 = HEADER + 12;
const LAPIC_AFFINITY: u8 = 0;
const MEMORY_AFFINITY: u8 = 1;
const ENABLED: u32 = 1;
/// Proximity domains the probe keeps apart, and memory ranges per domain.
pub const MAX_NODES: usize = guest_abi::probe::MAX_NUMA_NODES;
const MAX_RANGES: usize = guest_abi::probe::MAX_NUMA_RANGES;
/// Local APIC IDs are a byte: a set of them is 256 bits.
type CpuSet = [u64; 4];

/// A memory range, `[base, end)`.
pub type Range = (u64, u64);

#[derive(Clone, Copy)]
struct Node {
    cpus: CpuSet,
    ranges: [Range; MAX_RANGES],
    nranges: usize,
}

const EMPTY: Node = Node {
    cpus: [0; 4],
    ranges: [(0, 0); MAX_RANGES],
    nranges: 0,
};

impl Node {
    fn ranges(&self) -> &[Range] {
        self.ranges.get(..self.nranges).unwrap_or(&[])
    }

    fn add_range(&mut self, r: Range) -> bool {
        match self.ranges.get_mut(self.nranges) {
            Some(slot) => {
                *slot = r;
                self.nranges += 1;
                true
            }
            None => false,
        }
    }
}

/// What the SRAT and SLIT say: domains `0..count`.
struct Topology {
    nodes: [Node; MAX_NODES],
    count: usize,
    distances: [[u8; MAX_NODES]; MAX_NODES],
    /// The SLIT's localities; 0 without a SLIT.
    localities: usize,
}

impl Topology {
    fn nodes(&self) -> &[Node] {
        self.nodes.get(..self.count).unwrap_or(&[])
    }

    fn distance(&self, from: usize, to: usize) -> u8 {
        let row = self.distances.get(from);
        row.and_then(|r| r.get(to)).copied().unwrap_or(0)
    }
}

static TOPOLOGY: Global<Topology> = Global::new(Topology {
    nodes: [EMPTY; MAX_NODES],
    count: 0,
    distances: [[0; MAX_NODES]; MAX_NODES],
    localities: 0,
});

fn has(set: &CpuSet, id: usize) -> bool {
    set.get(id / 64).is_some_and(|w| w >> (id % 64) & 1 == 1)
}

fn count(set: &CpuSet) -> u32 {
    set.iter().map(|w| w.count_ones()).sum()
}

/// What went wrong, for `check failed:`.
#[derive(Clone, Copy)]
pub enum Error {
    /// A domain the probe does not keep (at or above [`MAX_NODES`]).
    TooManyNodes(u32),
    /// More memory ranges in one domain than the probe keeps.
    TooManyRanges(u32),
    /// `probe.expect_numa` asked for `want` nodes, the SRAT has `got` (0: no SRAT).
    Count { want: u64, got: u64 },
    /// The node's CPUs differ: the expected list as given, the SRAT's set.
    Cpus {
        node: u32,
        want: &'static [u8],
        got: CpuSet,
    },
    /// The node's memory ranges differ at the first one shown ((0, 0): none there).
    Mem { node: u32, want: Range, got: Range },
    /// A malformed `probe.expect_numa` value, or a node given twice.
    BadOption,
}

impl Error {
    pub fn describe(self, line: Line) -> Line {
        match self {
            Error::TooManyNodes(d) => line
                .s("srat proximity domain ")
                .dec(d.into())
                .s(" is beyond the 8 the probe reads"),
            Error::TooManyRanges(d) => line
                .s("srat domain ")
                .dec(d.into())
                .s(" has more than 8 memory ranges"),
            Error::Count { want, got } => line
                .s("expected ")
                .dec(want)
                .s(" numa nodes, srat has ")
                .dec(got),
            Error::Cpus { node, want, got } => {
                let line = line.s("numa node ").dec(node.into()).s(" expected cpus ");
                let line = if want.is_empty() {
                    line.s("none")
                } else {
                    line.bytes(want)
                };
                cpu_list(line.s(", srat has "), &got)
            }
            Error::Mem { node, want, got } => {
                let line = line.s("numa node ").dec(node.into()).s(" expected mem ");
                range(range(line, want).s(", srat has "), got)
            }
            Error::BadOption => line.s(text!("bad value for ", OPT_EXPECT_NUMA)),
        }
    }
}

/// `0-3,6`, or `none`.
fn cpu_list(mut line: Line, set: &CpuSet) -> Line {
    let (mut id, mut first) = (0, true);
    while id < 256 {
        if !has(set, id) {
            id += 1;
            continue;
        }
        let start = id;
        while id + 1 < 256 && has(set, id + 1) {
            id += 1;
        }
        line = line.s(if first { "" } else { "," }).dec(start as u64);
        if id > start {
            line = line.s("-").dec(id as u64);
        }
        first = false;
        id += 1;
    }
    if first {
        line.s("none")
    } else {
        line
    }
}

fn range(line: Line, r: Range) -> Line {
    if r == (0, 0) {
        return line.s("none");
    }
    line.hex(r.0).s("-").hex(r.1)
}

/// Reads the SRAT (and SLIT) into [`TOPOLOGY`]; `Ok(None)` without an SRAT. Called once.
fn read(rsdp: u64, mapped: u64) -> Result<Option<&'static Topology>, Error> {
    let Ok(Some((srat, len))) = acpi::find_table(rsdp, mapped, SRAT, |a, l| Some((a, l))) else {
        return Ok(None);
    };
    // SAFETY: `check`, which runs once, is the only caller, and no other code uses TOPOLOGY.
    let t = unsafe { TOPOLOGY.get() };
    // From revision 2 on, a proximity domain is 32 bits (the LAPIC affinity splits it).
    let wide = phys::u8(srat + 8) >= 2;
    let mut e = srat + SRAT_FIRST;
    while e + 2 <= srat + len {
        let (kind, elen) = (phys::u8(e), u64::from(phys::u8(e + 1)));
        if elen < 2 || e + elen > srat + len {
            break;
        }
        let domain = match (kind, elen) {
            (LAPIC_AFFINITY, 16) if phys::u32(e + 4) & ENABLED != 0 => {
                let high = if wide { phys::u32(e + 8) >> 8 } else { 0 };
                Some(u32::from(phys::u8(e + 2)) | high << 8)
            }
            (MEMORY_AFFINITY, 40) if phys::u32(e + 28) & ENABLED != 0 => Some(phys::u32(e + 2)),
            _ => None,
        };
        if let Some(d) = domain {
            let node = t.nodes.get_mut(d as usize).ok_or(Error::TooManyNodes(d))?;
            t.count = t.count.max(d as usize + 1);
            if kind == LAPIC_AFFINITY {
                let id = phys::u8(e + 3);
                if let Some(w) = node.cpus.get_mut(usize::from(id / 64)) {
                    *w |= 1 << (id % 64);
                }
            } else {
                let (base, size) = (phys::u64(e + 8), phys::u64(e + 16));
                if !node.add_range((base, base.saturating_add(size))) {
                    return Err(Error::TooManyRanges(d));
                }
            }
        }
        e += elen;
    }
    let slit = acpi::find_table(rsdp, mapped, SLIT, |a, l| Some((a, l)));
    if let Ok(Some((slit, len))) = slit {
        let n = phys::u64(slit + HEADER);
        if n as usize <= MAX_NODES && HEADER + 8 + n * n <= len {
            t.localities = n as usize;
            for (i, row) in t.distances.iter_mut().take(n as usize).enumerate() {
                for (j, d) in row.iter_mut().take(n as usize).enumerate() {
                    *d = phys::u8(slit + HEADER + 8 + i as u64 * n + j as u64);
                }
            }
        }
    }
    Ok(Some(t))
}

/// Prints a `numa node` line per domain when there is an SRAT, and checks each
/// `probe.expect_numa` word of `cmdline` against it; the first difference is the error.
pub fn check(rsdp: u64, mapped: u64, cmdline: &'static [u8]) -> Result<(), Error> {
    let topology = read(rsdp, mapped)?;
    if let Some(t) = topology {
        for (i, node) in t.nodes().iter().enumerate() {
            let line = Line::new().s(NUMA_NODE).dec(i as u64).s(" cpus ");
            let mut line = cpu_list(line, &node.cpus).s(" mem ");
            for (k, &r) in node.ranges().iter().enumerate() {
                line = range(line.s(if k == 0 { "" } else { "," }), r);
            }
            if node.nranges == 0 {
                line = line.s("none");
            }
            line = line.s(" distances ");
            for j in 0..t.localities {
                line = line.s(if j == 0 { "" } else { "," });
                line = line.dec(t.distance(i, j).into());
            }
            if t.localities == 0 {
                line = line.s("none");
            }
            line.end();
        }
    }
    expectations(topology, cmdline)
}

fn expectations(t: Option<&Topology>, cmdline: &'static [u8]) -> Result<(), Error> {
    const EXPECT: &[u8] = text!(OPT_EXPECT_NUMA, "=").as_bytes();
    let got = t.map_or(0, |t| t.count as u64);
    let (mut want, mut seen) = (0u64, 0u64);
    for word in cmdline.split(|&b| b == b' ') {
        let Some(value) = word.strip_prefix(EXPECT) else {
            continue;
        };
        want += 1;
        // A node given twice is as malformed as a bad value: the count would hide one.
        let parsed =
            parse(value).filter(|&(node, ..)| (node as usize) < MAX_NODES && seen & 1 << node == 0);
        let (node, cpus, ranges) = parsed.ok_or(Error::BadOption)?;
        seen |= 1 << node;
        let Some(have) = t.and_then(|t| t.nodes().get(node as usize)) else {
            // Counted below.
            continue;
        };
        if !same_cpus(cpus, &have.cpus) {
            let got = have.cpus;
            return Err(Error::Cpus {
                node,
                want: cpus,
                got,
            });
        }
        if let Some(e) = compare_ranges(node, ranges, have.ranges()) {
            return Err(e);
        }
    }
    if want != 0 && want != got {
        return Err(Error::Count { want, got });
    }
    Ok(())
}

/// The first difference between the expected `want` (`BASE-END` words joined by `,`, well
/// formed) and the SRAT's ranges; `None` when they are the same.
fn compare_ranges(node: u32, want: &[u8], got: &[Range]) -> Option<Error> {
    let mut words = want.split(|&b| b == b',').filter(|w| !w.is_empty());
    let mut i = 0;
    loop {
        let w = words.next().map(|w| parse_range(w).unwrap_or((0, 0)));
        let g = got.get(i).copied();
        match (w, g) {
            (None, None) => return None,
            (w, g) if w != g => {
                let (want, got) = (w.unwrap_or((0, 0)), g.unwrap_or((0, 0)));
                return Some(Error::Mem { node, want, got });
            }
            _ => i += 1,
        }
    }
}

/// `N/CPUS/RANGES`: the node, its CPUs' and its ranges' text, both well formed.
fn parse(value: &'static [u8]) -> Option<(u32, &'static [u8], &'static [u8])> {
    let mut parts = value.splitn(3, |&b| b == b'/');
    let node = parse_dec(parts.next()?)?;
    let cpus = parts.next()?;
    // Ascending, so that no CPU is named twice.
    let mut next = 0;
    for (first, last) in cpu_runs(cpus) {
        if first < next || first > last {
            return None;
        }
        next = last + 1;
    }
    let ranges = parts.next()?;
    if !ranges.is_empty()
        && ranges
            .split(|&b| b == b',')
            .any(|w| parse_range(w).is_none())
    {
        return None;
    }
    Some((u32::try_from(node).ok()?, cpus, ranges))
}

/// The runs of `0,2-3` (empty: none) as `(first, last)`; a malformed run as `(1, 0)`,
/// which `parse` refuses.
fn cpu_runs(s: &[u8]) -> impl Iterator<Item = (u64, u64)> + '_ {
    s.split(|&b| b == b',')
        .filter(|w| !w.is_empty())
        .map(|word| run(word).unwrap_or((1, 0)))
}

/// `a` or `a-b`, at most 255.
fn run(word: &[u8]) -> Option<(u64, u64)> {
    let mut ends = word.splitn(2, |&b| b == b'-');
    let first = parse_dec(ends.next()?)?;
    let last = match ends.next() {
        Some(l) => parse_dec(l)?,
        None => first,
    };
    (first <= last && last <= 255).then_some((first, last))
}

/// Whether the CPU list `want` (well formed: ascending) names exactly the CPUs of `got`:
/// each one in it, as many as it has.
fn same_cpus(want: &[u8], got: &CpuSet) -> bool {
    let mut named = 0u32;
    for (first, last) in cpu_runs(want) {
        for id in first..=last {
            if !has(got, id as usize) {
                return false;
            }
            named += 1;
        }
    }
    named == count(got)
}

/// `0xBASE-0xEND`.
fn parse_range(s: &[u8]) -> Option<Range> {
    let mut ends = s.splitn(2, |&b| b == b'-');
    let base = parse_hex(ends.next()?.strip_prefix(b"0x")?)?;
    let end = parse_hex(ends.next()?.strip_prefix(b"0x")?)?;
    (base < end).then_some((base, end))
}
