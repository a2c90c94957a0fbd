//! `vmm-bench startup` (`vmm bench startup`): end-to-end start-up time of the probe guest,
//! configuration by configuration (guest RAM x backing x pin threads), with QEMU side by side.
//!
//! Every boot is a child `vmm run` (the `vmm` binary beside this one, or `--vmm`), so what is
//! measured is what a user gets: exec, KVM set-up, memory, pinning, loading, the guest up to
//! its ready mark. Runs are interleaved (run r of every configuration before run r+1, in
//! reverse order every other round) so that machine noise and what one boot leaves behind hit
//! every configuration alike, after discarded warm-up rounds (memory touched for the first
//! time costs several times more on a lazily backed host).

pub mod args;
pub mod compare;
pub mod machine;
pub mod qemu;
pub mod run;
pub mod svg;
pub mod table;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use pinning::cancel::CancelReason;
use pinning::{CancelToken, Classify, ErrorClass, JobSpec, Limits, PinOptions, ThreadRequest};
use serde::Serialize;
use vmm::memory::{Backing, GuestMemory, MemoryError, MemorySpec, RamRange, ThpPolicy};

pub use args::StartupArgs;
use args::{configs, Config};
use compare::{ParallelRatio, QemuRatio, QemuSlope, RamSlope};
use machine::Machine;
use qemu::{ProbeElf, QemuChoice, QemuConfig, QemuSample};
use run::{RunFailure, VmmSample};

/// Median, min and max of some samples.
#[derive(Clone, Copy, Debug, Serialize)]
pub struct Stats {
    pub median: f64,
    pub min: f64,
    pub max: f64,
}

impl Stats {
    pub fn of(values: impl IntoIterator<Item = f64>) -> Option<Stats> {
        let v: Vec<f64> = values.into_iter().collect();
        if v.is_empty() {
            return None;
        }
        Some(Stats {
            median: crate::pin::median(&v),
            min: v.iter().copied().fold(f64::INFINITY, f64::min),
            max: v.iter().copied().fold(f64::NEG_INFINITY, f64::max),
        })
    }
}

#[derive(Debug, Serialize)]
pub struct ConfigResult {
    pub id: String,
    pub memory_bytes: u64,
    pub backing: Backing,
    /// As asked: a number or `auto`.
    pub pin_threads: String,
    /// How it was booted (`pin populate`, `user-device epf`).
    pub mode: String,
    /// The pin backend the reports name.
    pub pin_backend: Option<String>,
    /// Threads the pin job used, and the limit that decided.
    pub threads_used: Option<u64>,
    pub decided_by: Option<String>,
    /// memfds backing guest RAM and the size of each, as the reports give them (none for
    /// private memory).
    pub memory_shards: Option<u64>,
    pub shard_bytes: Option<u64>,
    /// From vmm's start to the guest's ready mark (the report's `guest.ready_ms`).
    pub ready_ms: Option<Stats>,
    /// The report's `exit` phase: teardown, after the guest has stopped.
    pub teardown_ms: Option<Stats>,
    /// From spawn to the probe's result line on the serial pipe.
    pub spawn_ready_ms: Option<Stats>,
    pub wall_ms: Option<Stats>,
    pub pin_ms: Option<Stats>,
    pub pin_gibps: Option<Stats>,
    /// kvm + memory + devices + load + vcpus.
    pub overhead_ms: Option<Stats>,
    pub failed: bool,
    pub samples: Vec<VmmSample>,
}

#[derive(Debug, Serialize)]
pub struct QemuResult {
    pub id: String,
    pub memory_bytes: u64,
    pub prealloc_threads: usize,
    pub first_output_ms: Option<Stats>,
    pub ready_ms: Option<Stats>,
    pub wall_ms: Option<Stats>,
    pub failed: bool,
    pub samples: Vec<QemuSample>,
}

#[derive(Debug, Serialize)]
pub struct QemuSection {
    pub path: Option<PathBuf>,
    pub skipped: Option<String>,
    pub command: Option<String>,
    pub results: Vec<QemuResult>,
    /// QEMU's RAM-dependent part on its own, per prealloc thread count.
    pub slopes: Vec<QemuSlope>,
}

#[derive(Debug, Serialize)]
pub struct StartupReport {
    pub machine: Machine,
    pub command: Vec<String>,
    pub runs: u32,
    pub warmup: u32,
    /// Whether `vmm run` has `--user-device` (memfd then boots with the epf device).
    pub user_device: bool,
    /// The backings measured: those asked for, or the default for this host.
    pub backings: Vec<Backing>,
    /// `--memory-shard`, passed to `vmm run` for shareable backings.
    pub memory_shard: Option<u64>,
    /// memset over resident memory in the bench process, GiB/s: the bandwidth ceiling.
    pub memset_gibps: Option<f64>,
    pub notes: Vec<String>,
    pub configs: Vec<ConfigResult>,
    pub qemu: QemuSection,
    pub parallel_vs_serial: Vec<ParallelRatio>,
    pub vmm_vs_qemu: Vec<QemuRatio>,
    /// The RAM-dependent part of time to ready, vmm's and QEMU's, per backing and threads.
    pub ram_slopes: Vec<RamSlope>,
    pub failures: Vec<RunFailure>,
    pub elapsed_s: f64,
}

#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    #[error("{0}")]
    Qemu(String),
    #[error(transparent)]
    Limits(#[from] pinning::limits::LimitsError),
    #[error(transparent)]
    Memory(#[from] MemoryError),
    #[error("{what}: {source}")]
    Io {
        what: String,
        source: std::io::Error,
    },
    #[error("stopped by {0}; every child was stopped and reaped")]
    Cancelled(CancelReason),
    #[error("no vmm binary at {}, beside this one: {}, or give its path with --vmm", .0.display(), vmm::cli::forward::build_hint("vmm"))]
    NoVmmBeside(PathBuf),
    #[error("--vmm {}: not an executable file; give the path of the vmm binary", .0.display())]
    NoVmmAt(PathBuf),
}

impl Classify for BenchError {
    fn class(&self) -> ErrorClass {
        match self {
            BenchError::Qemu(_) => ErrorClass::User,
            BenchError::Limits(e) => e.class(),
            BenchError::Memory(e) => e.class(),
            BenchError::Io { .. } => ErrorClass::Internal,
            BenchError::Cancelled(r) => r.class(),
            BenchError::NoVmmBeside(_) | BenchError::NoVmmAt(_) => ErrorClass::User,
        }
    }
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> BenchError {
    let what = what.into();
    move |source| BenchError::Io { what, source }
}

/// The `vmm` binary to boot: `--vmm`, else the one beside this executable.
pub fn vmm_binary(arg: Option<&Path>) -> Result<PathBuf, BenchError> {
    let (path, given) = match arg {
        Some(p) => (p.to_path_buf(), true),
        None => {
            let path = vmm::cli::forward::beside_this_executable("vmm")
                .map_err(io("finding this executable"))?;
            (path, false)
        }
    };
    match (qemu::is_executable(&path), given) {
        (true, _) => Ok(path),
        (false, true) => Err(BenchError::NoVmmAt(path)),
        (false, false) => Err(BenchError::NoVmmBeside(path)),
    }
}

/// Whether `vmm run` at `exe` accepts `--user-device`.
fn has_user_device(exe: &Path) -> bool {
    Command::new(exe)
        .args(["run", "--help"])
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains("--user-device"))
}

/// The thread count `vmm run` will use for `threads` on `memory` of `backing`.
fn predicted_threads(
    limits: &Limits,
    memory: u64,
    backing: Backing,
    threads: ThreadRequest,
) -> usize {
    let requested = match threads {
        ThreadRequest::Auto => None,
        ThreadRequest::AtMost(n) => Some(n),
    };
    JobSpec {
        start: 0,
        size: memory,
        align: backing.page_size(),
        min_chunk: PinOptions::default().min_chunk,
        max_threads: usize::MAX,
        cuts: Vec::new(),
    }
    .plan(&limits.thread_caps(requested))
    .threads
}

/// memset over 1 GiB of resident memory, best of three: the bandwidth ceiling.
fn memset_gibps() -> Option<f64> {
    let size: u64 = 1 << 30;
    let m = GuestMemory::new(MemorySpec::new(Backing::Anon), &[RamRange::at_zero(size)]).ok()?;
    let ptr = m.ram.regions()[0].host_addr as *mut u8;
    let mut best = 0f64;
    for round in 0..4u8 {
        let t = Instant::now();
        // SAFETY: the mapping is ours, `size` bytes long, and nothing else accesses it.
        unsafe { std::ptr::write_bytes(ptr, round, size as usize) };
        if round > 0 {
            best = best.max(1.0 / t.elapsed().as_secs_f64());
        }
    }
    Some(best)
}

fn log(msg: impl AsRef<str>) {
    eprintln!("bench: {}", msg.as_ref());
}

/// Runs the benchmark and writes its files. Failed boots are in `failures`; they do not stop
/// the other configurations.
pub fn startup(args: &StartupArgs, cancel: &CancelToken) -> Result<StartupReport, BenchError> {
    let started = Instant::now();
    let exe = vmm_binary(args.vmm.as_deref())?;
    let qemu_choice = qemu::choose(args.qemu.as_deref()).map_err(BenchError::Qemu)?;
    // What every boot of a configuration would refuse is refused here, before any boots.
    let thp = ThpPolicy::host();
    let (backings, left_out) = args::backings(&args.backing, &thp)?;
    let user_device = has_user_device(&exe);
    let configs = configs(args, &backings, user_device);
    args::check_shards(&configs, &thp)?;
    let runs_dir = args.out.join("runs");
    std::fs::create_dir_all(&runs_dir).map_err(io(format!("creating {}", runs_dir.display())))?;
    let limits = Limits::detect()?;
    let machine = Machine::detect();
    log(format!("machine: {}", machine.describe()));
    let mut notes: Vec<String> = left_out.into_iter().collect();
    if !user_device && backings.iter().any(|b| b.shareable()) {
        notes.push(
            "`vmm run` has no --user-device yet: shareable RAM (memfd) is booted with \
--pin populate and no device, like anon"
                .into(),
        );
    }
    if args.memory_shard.is_some() && !backings.iter().any(|b| b.shareable()) {
        notes.push("--memory-shard: no shareable backing measured, so it was not used".into());
    }
    for n in &notes {
        log(n);
    }

    // QEMU's prealloc threads: what vmm uses for each requested count, per memory size.
    let (qemu_path, skipped) = match &qemu_choice {
        QemuChoice::Use(p) => (Some(p.clone()), None),
        QemuChoice::Skip(why) => {
            log(format!("QEMU comparison skipped: {why}"));
            (None, Some(why.clone()))
        }
    };
    let mut qemu_configs: Vec<QemuConfig> = Vec::new();
    if qemu_path.is_some() {
        for &memory in &args.memory {
            for &t in &args.pin_threads {
                let c = QemuConfig {
                    memory,
                    prealloc_threads: predicted_threads(&limits, memory, Backing::Memfd, t),
                };
                if !qemu_configs.contains(&c) {
                    qemu_configs.push(c);
                }
            }
        }
    }
    let elf = match &qemu_path {
        Some(_) => Some(ProbeElf::write().map_err(io("writing the probe ELF for QEMU"))?),
        None => None,
    };

    let memset = memset_gibps();
    if let Some(m) = memset {
        log(format!(
            "memset ceiling {m:.1} GiB/s (1 GiB, resident, one thread)"
        ));
    }

    let timeout = Duration::from_secs(args.timeout);
    let mut vmm_samples: Vec<Vec<VmmSample>> = vec![Vec::new(); configs.len()];
    let mut vmm_failed = vec![false; configs.len()];
    let mut qemu_samples: Vec<Vec<QemuSample>> = vec![Vec::new(); qemu_configs.len()];
    let mut qemu_failed = vec![false; qemu_configs.len()];
    let mut failures: Vec<RunFailure> = Vec::new();
    let rounds = args.warmup + args.runs;
    for round in 0..rounds {
        let measured = round >= args.warmup;
        let label = if measured {
            format!("run{}", round - args.warmup + 1)
        } else {
            format!("warmup{}", round + 1)
        };
        for i in round_order(configs.len(), round) {
            let c = &configs[i];
            if vmm_failed[i] {
                continue;
            }
            let report = runs_dir.join(format!("{}-{label}.json", c.id()));
            let r = run::boot(&exe, c, round, &label, &report, timeout, cancel)
                .map_err(BenchError::Cancelled)?;
            match r {
                Ok(mut s) => {
                    log(format!(
                        "{label:<8} {:<18} ready {:>9.1} ms  pin {:>9.1} ms ({}, {} threads)  overhead {:.1} ms",
                        c.id(),
                        s.ready_ms,
                        s.pin_ms,
                        s.pin.backend,
                        s.pin.threads.map_or("-".into(), |t| t.to_string()),
                        s.overhead_ms
                    ));
                    if measured {
                        s.run = round - args.warmup + 1;
                        vmm_samples[i].push(s);
                    }
                }
                Err(f) => {
                    log(format!(
                        "{} {label} FAILED: {}\n{}",
                        f.config, f.reason, f.stderr_tail
                    ));
                    vmm_failed[i] = true;
                    failures.push(f);
                }
            }
        }
        if let (Some(q), Some(elf)) = (&qemu_path, &elf) {
            for i in round_order(qemu_configs.len(), round) {
                let c = &qemu_configs[i];
                if qemu_failed[i] {
                    continue;
                }
                let r = qemu::boot(q, elf.path(), c, round, &label, timeout, cancel)
                    .map_err(BenchError::Cancelled)?;
                match r {
                    Ok(mut s) => {
                        log(format!(
                            "{label:<8} {:<18} ready {:>9.1} ms from spawn (first output {:.1} ms)",
                            c.id(),
                            s.ready_ms,
                            s.first_output_ms
                        ));
                        if measured {
                            s.run = round - args.warmup + 1;
                            qemu_samples[i].push(s);
                        }
                    }
                    Err(f) => {
                        log(format!(
                            "{} {label} FAILED: {}\n{}",
                            f.config, f.reason, f.stderr_tail
                        ));
                        qemu_failed[i] = true;
                        failures.push(f);
                    }
                }
            }
        }
    }
    drop(elf);

    let configs: Vec<ConfigResult> = configs
        .iter()
        .zip(vmm_samples)
        .zip(vmm_failed)
        .map(|((c, samples), failed)| config_result(c, samples, failed))
        .collect();
    for c in &configs {
        let t = c.threads_used;
        let predicted = c.threads_used.map(|_| {
            let req = c.pin_threads.parse().unwrap_or(ThreadRequest::Auto);
            predicted_threads(&limits, c.memory_bytes, c.backing, req) as u64
        });
        if t.is_some() && predicted != t {
            let n = format!(
                "{}: vmm used {t:?} pin threads, the bench predicted {predicted:?} (QEMU's prealloc threads follow the prediction)",
                c.id
            );
            log(&n);
            notes.push(n);
        }
    }
    let qemu_results: Vec<QemuResult> = qemu_configs
        .iter()
        .zip(qemu_samples)
        .zip(qemu_failed)
        .map(|((c, samples), failed)| QemuResult {
            id: c.id(),
            memory_bytes: c.memory,
            prealloc_threads: c.prealloc_threads,
            first_output_ms: Stats::of(samples.iter().map(|s| s.first_output_ms)),
            ready_ms: Stats::of(samples.iter().map(|s| s.ready_ms)),
            wall_ms: Stats::of(samples.iter().map(|s| s.wall_ms)),
            failed,
            samples,
        })
        .collect();
    let parallel_vs_serial = compare::parallel_ratios(&configs);
    let vmm_vs_qemu = compare::qemu_ratios(&configs, &qemu_results);
    let ram_slopes = compare::ram_slopes(&configs, &qemu_results);
    let report = StartupReport {
        machine,
        command: std::env::args().collect(),
        runs: args.runs,
        warmup: args.warmup,
        user_device,
        backings,
        memory_shard: args.memory_shard,
        memset_gibps: memset,
        notes,
        configs,
        qemu: QemuSection {
            command: qemu_path.as_ref().map(|p| {
                let c = QemuConfig {
                    memory: 1 << 30,
                    prealloc_threads: 1,
                };
                format!(
                    "{} {}",
                    p.display(),
                    c.args(Path::new("PROBE.elf")).join(" ")
                )
            }),
            path: qemu_path,
            skipped,
            slopes: compare::qemu_slopes(&qemu_results),
            results: qemu_results,
        },
        parallel_vs_serial,
        vmm_vs_qemu,
        ram_slopes,
        failures,
        elapsed_s: (started.elapsed().as_secs_f64() * 10.0).round() / 10.0,
    };
    let json = serde_json::to_string_pretty(&report).expect("report serialises") + "\n";
    let json_path = args.out.join("startup.json");
    std::fs::write(&json_path, json).map_err(io(format!("writing {}", json_path.display())))?;
    let svg_path = args.out.join("startup.svg");
    std::fs::write(&svg_path, table::svg(&report))
        .map_err(io(format!("writing {}", svg_path.display())))?;
    Ok(report)
}

fn config_result(c: &Config, samples: Vec<VmmSample>, failed: bool) -> ConfigResult {
    let last = samples.last();
    ConfigResult {
        id: c.id(),
        memory_bytes: c.memory,
        backing: c.backing,
        pin_threads: c.threads.to_string(),
        mode: c.plan.mode.clone(),
        pin_backend: last.map(|s| s.pin.backend.clone()),
        threads_used: last.and_then(|s| s.pin.threads),
        decided_by: last.and_then(|s| s.pin.decided_by.clone()),
        memory_shards: last.map(|s| s.memory_shards).filter(|&n| n > 0),
        shard_bytes: last.map(|s| s.shard_bytes).filter(|&n| n > 0),
        ready_ms: Stats::of(samples.iter().map(|s| s.ready_ms)),
        teardown_ms: Stats::of(samples.iter().map(|s| s.teardown_ms)),
        spawn_ready_ms: Stats::of(samples.iter().filter_map(|s| s.spawn_ready_ms)),
        wall_ms: Stats::of(samples.iter().map(|s| s.wall_ms)),
        pin_ms: Stats::of(samples.iter().map(|s| s.pin_ms)),
        pin_gibps: Stats::of(samples.iter().filter_map(|s| s.pin.gibps)),
        overhead_ms: Stats::of(samples.iter().map(|s| s.overhead_ms)),
        failed,
        samples,
    }
}

/// The order configurations run in during `round`: forward, then backward, alternately.
/// Run after run the same order would give each configuration the same predecessor, and what
/// one leaves behind (freed huge pages, fragmented memory, a cold page cache) would bias the
/// next one systematically instead of randomly: with THP, the configuration after a 4 KiB one
/// had to compact memory in every round, the one after a THP teardown never did.
fn round_order(n: usize, round: u32) -> Vec<usize> {
    if round % 2 == 0 {
        (0..n).collect()
    } else {
        (0..n).rev().collect()
    }
}

#[cfg(test)]
mod order_tests {
    #[test]
    fn rounds_alternate_direction_so_predecessors_change() {
        assert_eq!(super::round_order(3, 0), [0, 1, 2]);
        assert_eq!(super::round_order(3, 1), [2, 1, 0]);
        assert_eq!(super::round_order(3, 2), [0, 1, 2]);
        assert!(super::round_order(0, 1).is_empty());
    }
}
