//! `vmm pin-bench`: how fast guest RAM can be prepared here, thread count by thread count.
//!
//! Every run maps fresh memory (first-touch cost is what a VM start pays), prepares it with
//! the chosen backend, undoes it and unmaps it. Configurations are interleaved run by run
//! so that machine noise hits each alike, and a warm-up round is discarded: on this kind of
//! machine memory touched for the first time since boot costs several times more.
//! `memset` over already-resident memory is measured in the same process as the bandwidth
//! ceiling any preparation could reach.
//!
//! `--host-numa-node N` binds each run's memory to host node N before it is touched, as
//! `vmm run` binds a zone's; the report says where the last run's pages landed.
//! `--numa-nodes A,B` splits it into one zone per node, each filled on its own node
//! ([`zones`]).

pub mod zones;

use std::sync::Arc;
use std::time::Instant;

use pinning::backend::{MlockBackend, NoneBackend, PopulateBackend};
use pinning::{
    CancelToken, Classify, ErrorClass, Limits, PinBackend, PinError, PinOptions, Pinner,
    ThreadRequest,
};
use serde::Serialize;
use vmm::memory::numa::{self, Policy};
use vmm::memory::{Backing, GuestMemory, MemoryError, MemorySpec, Placement, RamRange};
use vmm::placement;
use vmm::size::{human, parse_size};

use zones::{ZoneError, ZoneResult, ZoneRuns};

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum BenchPin {
    /// MADV_POPULATE_WRITE: fault in, no lock.
    Populate,
    /// One mlock2(MLOCK_ONFAULT), then parallel populate.
    Mlock,
    /// Nothing: measures the harness.
    None,
}

impl BenchPin {
    pub fn name(self) -> &'static str {
        match self {
            BenchPin::Populate => "populate",
            BenchPin::Mlock => "mlock",
            BenchPin::None => "none",
        }
    }

    fn backend(self) -> Arc<dyn PinBackend> {
        match self {
            BenchPin::Populate => Arc::new(PopulateBackend),
            BenchPin::Mlock => Arc::new(MlockBackend),
            BenchPin::None => Arc::new(NoneBackend),
        }
    }
}

#[derive(Clone, Debug, clap::Args)]
pub struct PinBenchArgs {
    /// Guest RAM to prepare per run: 512M, 4G, 1T (a bare number is MiB).
    #[arg(long, value_parser = parse_size)]
    pub memory: u64,
    /// What backs guest RAM: anon, thp, memfd, memfd-thp, hugetlb, hugetlb-1g.
    #[arg(long, value_enum, default_value = "anon")]
    pub backing: Backing,
    /// Shard size for shareable backings (memfd, memfd-thp, hugetlb): one memfd each
    /// (default 1G, at most --memory).
    #[arg(long, value_parser = parse_size)]
    pub memory_shard: Option<u64>,
    /// How to prepare it.
    #[arg(long, value_enum, default_value = "populate")]
    pub pin: BenchPin,
    /// Comma-separated thread counts to compare, each a number from 1 to 4096 or `auto` (all
    /// the limits allow).
    #[arg(long, default_value = "1,auto", value_delimiter = ',', value_parser = parse_threads)]
    pub threads: Vec<ThreadRequest>,
    /// Measured runs per thread count.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..=1000))]
    pub runs: u32,
    /// Discarded warm-up rounds before measuring (at most 100).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(0..=100))]
    pub warmup: u32,
    /// Smallest chunk a thread takes.
    #[arg(long, value_parser = parse_size, default_value = "128M")]
    pub min_chunk: u64,
    /// Bind the memory to this host NUMA node (MPOL_BIND) before it is touched; without it
    /// the process's own policy places it (`numactl --membind=N vmm pin-bench ...`).
    #[arg(long)]
    pub host_numa_node: Option<u32>,
    /// Split the memory into one zone per listed host NUMA node (`0,1`; a node may repeat,
    /// `0,0`), each bound to its node and filled by helpers on that node's CPUs, as `vmm run
    /// --memory-zone ...,host_numa_node=N` does; each zone's rate and placement are reported.
    #[arg(long, value_delimiter = ',', conflicts_with = "host_numa_node")]
    pub numa_nodes: Vec<u32>,
    /// Print one JSON object instead of a table.
    #[arg(long)]
    pub json: bool,
    /// Testing only: a fault injected into the pin backend, as `vmm run --test-fault`.
    #[arg(long, hide = true)]
    pub test_fault: Vec<vmm::pin::TestFault>,
}

fn parse_threads(s: &str) -> Result<ThreadRequest, String> {
    s.trim().parse()
}

#[derive(Debug, Serialize)]
pub struct BenchResult {
    pub requested: String,
    pub threads: usize,
    pub decided_by: String,
    pub runs_gibps: Vec<f64>,
    pub median_gibps: f64,
    /// The fastest run: on a host that backs its own memory lazily, the least disturbed one.
    pub best_gibps: f64,
    pub chunks: u64,
    /// Per zone, with `--numa-nodes`.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub zones: Vec<ZoneResult>,
}

#[derive(Debug, Serialize)]
pub struct BenchReport {
    pub memory_bytes: u64,
    pub backend: BenchPin,
    pub backing: Backing,
    /// memfds per run (0 for private memory), and the size of each.
    pub shards: u64,
    pub shard_bytes: u64,
    pub memset_gibps: f64,
    /// `--host-numa-node`, and the process's policy, which places the memory without it.
    pub host_numa_node: Option<u32>,
    /// `--numa-nodes`: one zone per entry (empty without).
    pub numa_nodes: Vec<u32>,
    pub process_policy: Policy,
    /// Where the last measured run's pages were, sampled once per 2 MiB before the undo.
    pub placement: Placement,
    pub limits: Limits,
    pub results: Vec<BenchResult>,
}

#[derive(Debug, thiserror::Error)]
pub enum PinBenchError {
    #[error(transparent)]
    Memory(#[from] MemoryError),
    #[error(transparent)]
    Pin(#[from] PinError),
    #[error(transparent)]
    Limits(#[from] pinning::limits::LimitsError),
    #[error(transparent)]
    Zones(#[from] ZoneError),
}

impl Classify for PinBenchError {
    fn class(&self) -> ErrorClass {
        match self {
            PinBenchError::Memory(m) => m.class(),
            PinBenchError::Pin(p) => p.class(),
            PinBenchError::Limits(l) => l.class(),
            PinBenchError::Zones(z) => z.class(),
        }
    }
}

pub fn median(values: &[f64]) -> f64 {
    let mut v = values.to_vec();
    v.sort_by(|a, b| a.total_cmp(b));
    match v.len() {
        0 => 0.0,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

/// memset over resident memory: the memory bandwidth ceiling (best of three).
fn memset_gibps(size: u64) -> Result<f64, MemoryError> {
    let size = size.min(1 << 30);
    let m = GuestMemory::new(MemorySpec::new(Backing::Anon), &[RamRange::at_zero(size)])?;
    let region = &m.ram.regions()[0];
    let ptr = region.host_addr as *mut u8;
    let mut best = 0f64;
    for round in 0..4 {
        let t = Instant::now();
        // SAFETY: the mapping is ours, `size` bytes long, and not otherwise accessed.
        unsafe { std::ptr::write_bytes(ptr, round as u8, size as usize) };
        let rate = size as f64 / (1u64 << 30) as f64 / t.elapsed().as_secs_f64();
        // The first round faults the pages in; it is not a bandwidth figure.
        if round > 0 {
            best = best.max(rate);
        }
    }
    Ok(best)
}

/// Runs the benchmark. `cancel` stops it between and inside runs (with everything undone).
pub fn run(args: &PinBenchArgs, cancel: &CancelToken) -> Result<BenchReport, PinBenchError> {
    let limits = Limits::detect()?;
    let spec = MemorySpec {
        backing: args.backing,
        shard_bytes: args.memory_shard,
        host_numa_node: args.host_numa_node,
    };
    let zones = if args.numa_nodes.is_empty() {
        Vec::new()
    } else {
        let topology = pinning::topology::HostTopology::detect();
        zones::split(
            &args.numa_nodes,
            args.memory,
            args.backing.page_size(),
            &topology,
        )?
    };
    let layout = zones::memory_layout(spec, args.memory, &zones);
    let ranges: Vec<RamRange> = layout.iter().flat_map(|(_, r)| r.clone()).collect();
    // Fail on bad input (sizes, shards, hugetlb reservations, host RAM) before measuring.
    drop(GuestMemory::zoned(&layout)?);
    let memset = memset_gibps(args.memory)?;
    let backend = vmm::pin::TestFault::wrap(&args.test_fault, args.pin.backend());
    // Decided once, as `vmm run` decides it once per VM.
    let pin_zones = if zones.is_empty() {
        Vec::new()
    } else {
        placement::pin_zones(&zones)
    };
    let policy = Policy::current();
    let allowed = Policy::mems_allowed().unwrap_or_default();
    let mut samples: Vec<Vec<f64>> = vec![Vec::new(); args.threads.len()];
    let mut seen = vec![(0usize, String::new(), 0u64); args.threads.len()];
    let mut zone_runs: Vec<ZoneRuns> = args.threads.iter().map(|_| ZoneRuns::default()).collect();
    let mut placement = Placement::default();
    for round in 0..(args.warmup + args.runs) {
        for (i, &threads) in args.threads.iter().enumerate() {
            let mem = GuestMemory::zoned(&layout)?;
            let options = PinOptions {
                threads,
                min_chunk: args.min_chunk,
                progress: !args.json,
                zones: pin_zones.clone(),
            };
            let pinner = Pinner::new(backend.clone(), limits.clone(), options);
            let pinned = pinner.pin(mem.ram.clone(), cancel)?;
            let s = &pinned.stats;
            tracing::debug!(round, %threads, threads_used = s.threads, gibps = s.gibps, "pin-bench run");
            seen[i] = (s.threads, s.decided_by.to_string(), s.chunks);
            let measured = round >= args.warmup;
            if measured {
                samples[i].push(s.gibps);
                placement = mem
                    .placement(
                        &ranges,
                        vmm::placement::SAMPLE_STEP,
                        vmm::placement::MAX_SAMPLES,
                    )
                    .unwrap_or_else(|e| {
                        tracing::warn!("sampling page placement: {e}");
                        Placement::default()
                    });
            }
            let zone_placement = (measured && !zones.is_empty())
                .then(|| placement::check(&mem, &zones, &policy, &allowed));
            zone_runs[i].record(&s.zones, zone_placement);
            pinned.unpin();
            drop(mem);
        }
    }
    let results = args
        .threads
        .iter()
        .zip(samples)
        .zip(seen)
        .zip(zone_runs)
        .map(
            |(((req, runs), (threads, decided_by, chunks)), zones)| BenchResult {
                requested: req.to_string(),
                threads,
                decided_by,
                median_gibps: median(&runs),
                best_gibps: runs.iter().copied().fold(0.0, f64::max),
                runs_gibps: runs,
                chunks,
                zones: zones.finish(),
            },
        )
        .collect();
    Ok(BenchReport {
        memory_bytes: args.memory,
        backend: args.pin,
        backing: args.backing,
        shards: layout.iter().map(|(s, r)| s.shards(r)).sum(),
        shard_bytes: layout
            .iter()
            .filter(|(s, _)| s.backing.shareable())
            .map(|(s, r)| s.shard_bytes(r))
            .max()
            .unwrap_or(0),
        memset_gibps: memset,
        host_numa_node: args.host_numa_node,
        numa_nodes: args.numa_nodes.clone(),
        process_policy: policy,
        placement,
        limits,
        results,
    })
}

/// Where the pages landed: on the bound node, or on the nodes the process's policy names.
fn placement_line(r: &BenchReport) -> String {
    let p = &r.placement;
    let (nodes, why) = match (r.host_numa_node, &r.process_policy.nodes) {
        _ if !r.numa_nodes.is_empty() => (
            {
                let mut nodes = r.numa_nodes.clone();
                nodes.sort_unstable();
                nodes.dedup();
                nodes
            },
            match r.numa_nodes.len() {
                1 => "1 zone, bound to its node".to_string(),
                n => format!("{n} zones, each bound to its node"),
            },
        ),
        (None, None) => {
            let shares = p.shares();
            return format!(
                "placement: {shares} of {} sampled pages (process policy default)\n",
                p.sampled
            );
        }
        // As `vmm run` says it: bound to a node, or the process's policy.
        (node, _) => vmm::placement::expected(node, &r.process_policy, &[]),
    };
    let pct = if p.sampled > 0 {
        100.0 * p.on(&nodes) as f64 / p.sampled as f64
    } else {
        0.0
    };
    format!(
        "placement: {pct:.1}% of {} sampled pages on node {} ({why})\n",
        p.sampled,
        numa::node_list(&nodes)
    )
}

/// The human table.
pub fn table(r: &BenchReport) -> String {
    let shards = if r.shards > 0 {
        format!(" in {} shards of {}", r.shards, human(r.shard_bytes))
    } else {
        String::new()
    };
    let mut out = format!(
        "pin-bench: {} {} memory{shards}, backend {}, memset ceiling {:.1} GiB/s\n",
        human(r.memory_bytes),
        r.backing.name(),
        r.backend.name(),
        r.memset_gibps
    );
    out.push_str(&placement_line(r));
    out.push_str("requested  threads  decided_by   chunks  median GiB/s  best GiB/s  runs GiB/s\n");
    let base = r
        .results
        .first()
        .map(|b| (b.median_gibps, b.best_gibps))
        .filter(|(m, b)| *m > 0.0 && *b > 0.0);
    for x in &r.results {
        let runs: Vec<String> = x.runs_gibps.iter().map(|g| format!("{g:.2}")).collect();
        let ratio = base
            .map(|(m, b)| {
                format!(
                    "  (median {:.2}x, best {:.2}x)",
                    x.median_gibps / m,
                    x.best_gibps / b
                )
            })
            .unwrap_or_default();
        out.push_str(&format!(
            "{:<10} {:>7}  {:<11} {:>7}  {:>12.2}  {:>10.2}  {}{}\n",
            x.requested,
            x.threads,
            x.decided_by,
            x.chunks,
            x.median_gibps,
            x.best_gibps,
            runs.join(" "),
            ratio
        ));
        out.push_str(&zones::table(&x.zones));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_of_odd_and_even() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&[4.0, 1.0, 2.0, 3.0]), 2.5);
    }
}
