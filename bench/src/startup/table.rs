//! The human table on stdout, and the chart's series.

use std::fmt::Write;

use vmm::size::human;

use super::args::short_size;
use super::svg::{self, Series};
use super::{StartupReport, Stats};

fn s3(s: Option<Stats>) -> String {
    match s {
        Some(s) => format!("{:>9.1} {:>9.1} {:>9.1}", s.median, s.min, s.max),
        None => format!("{:>9} {:>9} {:>9}", "-", "-", "-"),
    }
}

/// Median and min: teardown is shown beside time to ready, and its max says little more.
fn s2(s: Option<Stats>) -> String {
    match s {
        Some(s) => format!("{:>9.1} {:>9.1}", s.median, s.min),
        None => format!("{:>9} {:>9}", "-", "-"),
    }
}

/// `4x1G` for four memfds of 1 GiB; `-` for private memory.
fn shards(shards: Option<u64>, bytes: Option<u64>) -> String {
    match (shards, bytes) {
        (Some(n), Some(b)) => format!("{n}x{}", short_size(b)),
        _ => "-".into(),
    }
}

fn opt<T: std::fmt::Display>(v: Option<T>) -> String {
    v.map_or("-".into(), |v| v.to_string())
}

pub fn table(r: &StartupReport) -> String {
    let mut o = String::new();
    let _ = writeln!(o, "vmm bench startup: {}", r.machine.describe());
    let _ = writeln!(
        o,
        "{} measured runs per configuration, interleaved, after {} discarded warm-up round(s); times in ms",
        r.runs, r.warmup
    );
    if let Some(m) = r.memset_gibps {
        let _ = writeln!(
            o,
            "memset ceiling: {m:.1} GiB/s (resident memory, one thread)"
        );
    }
    for n in &r.notes {
        let _ = writeln!(o, "note: {n}");
    }
    let _ = writeln!(
        o,
        "\n{:<22} {:<15} {:<10} {:>7} {:>7}  {:^29}  {:^19}  {:^29}  {:>9}  {:>11}",
        "config",
        "mode",
        "backend",
        "threads",
        "shards",
        "ready: median   min   max",
        "teardown: med  min",
        "pin: median    min    max",
        "pin GiB/s",
        "overhead ms"
    );
    for c in &r.configs {
        let _ = writeln!(
            o,
            "{:<22} {:<15} {:<10} {:>7} {:>7}  {}  {}  {}  {:>9}  {:>11}{}",
            c.id,
            c.mode,
            c.pin_backend.as_deref().unwrap_or("-"),
            opt(c.threads_used),
            shards(c.memory_shards, c.shard_bytes),
            s3(c.ready_ms),
            s2(c.teardown_ms),
            s3(c.pin_ms),
            c.pin_gibps
                .map_or("-".into(), |g| format!("{:.2}", g.median)),
            c.overhead_ms
                .map_or("-".into(), |g| format!("{:.1}", g.median)),
            if c.failed { "  FAILED" } else { "" }
        );
    }
    if !r.parallel_vs_serial.is_empty() {
        let _ = writeln!(
            o,
            "\nparallel / serial (median time to ready; pin phase):\n{:<8} {:<8} {:<9} {:>10} {:>12} {:>7} {:>9}",
            "memory", "backing", "parallel", "serial ms", "parallel ms", "ratio", "pin ratio"
        );
        for p in &r.parallel_vs_serial {
            let _ = writeln!(
                o,
                "{:<8} {:<8} {:<9} {:>10.1} {:>12.1} {:>7.3} {:>9}",
                human(p.memory_bytes),
                p.backing.name(),
                format!("{} ({})", p.parallel, opt(p.parallel_threads)),
                p.serial_ready_ms,
                p.parallel_ready_ms,
                p.ready_ratio,
                p.pin_ratio.map_or("-".into(), |x| format!("{x:.3}"))
            );
        }
    }
    match &r.qemu.skipped {
        Some(why) => {
            let _ = writeln!(o, "\nQEMU: skipped ({why})");
        }
        None => {
            let _ = writeln!(
                o,
                "\nQEMU (memfd, prealloc, mem-lock; from spawn):\n{:<22} {:^29}  {:^29}",
                "config", "first output: med  min  max", "ready: median   min   max"
            );
            for q in &r.qemu.results {
                let _ = writeln!(
                    o,
                    "{:<22} {}  {}{}",
                    q.id,
                    s3(q.first_output_ms),
                    s3(q.ready_ms),
                    if q.failed { "  FAILED" } else { "" }
                );
            }
            for q in &r.qemu.slopes {
                let _ = writeln!(
                    o,
                    "QEMU's RAM-dependent part, {} prealloc thread(s), {} to {}: {:.1} ms per GiB; fixed part (at 0 GiB) {:.1} ms",
                    q.prealloc_threads,
                    human(q.from_memory_bytes),
                    human(q.to_memory_bytes),
                    q.ms_per_gib,
                    q.fixed_ms
                );
            }
            let _ = writeln!(
                o,
                "\nvmm / QEMU, equal prealloc threads (median, from spawn to the probe's result line):\n{:<8} {:<8} {:>7} {:>9} {:>9} {:>7}",
                "memory", "backing", "threads", "vmm ms", "QEMU ms", "ratio"
            );
            for q in &r.vmm_vs_qemu {
                let _ = writeln!(
                    o,
                    "{:<8} {:<8} {:>7} {:>9.1} {:>9.1} {:>7.3}",
                    human(q.memory_bytes),
                    q.backing.name(),
                    q.threads,
                    q.vmm_ready_ms,
                    q.qemu_ready_ms,
                    q.ratio
                );
            }
        }
    }
    slopes(&mut o, r);
    o
}

/// vmm's and QEMU's RAM-dependent part side by side: what each adds per GiB of guest RAM,
/// whatever QEMU's emulated firmware costs at any size.
fn slopes(o: &mut String, r: &StartupReport) {
    if r.ram_slopes.is_empty() {
        return;
    }
    let _ = writeln!(
        o,
        "\nRAM-dependent part: median time from spawn to ready, slope between the smallest and largest size (ms per GiB), and the fixed part left at 0 GiB (ms):\n{:<10} {:<10} {:>7} {:>11} {:>10} {:>8} {:>11} {:>10} {:>7}",
        "sizes",
        "backing",
        "threads",
        "vmm ms/GiB",
        "vmm fixed",
        "QEMU p",
        "QEMU ms/GiB",
        "QEMU fixed",
        "ratio"
    );
    let f1 = |v: Option<f64>| v.map_or("-".into(), |v| format!("{v:.1}"));
    for s in &r.ram_slopes {
        let _ = writeln!(
            o,
            "{:<10} {:<10} {:>7} {:>11.1} {:>10.1} {:>8} {:>11} {:>10} {:>7}",
            format!(
                "{}-{}",
                short_size(s.from_memory_bytes),
                short_size(s.to_memory_bytes)
            ),
            s.backing.name(),
            s.pin_threads,
            s.vmm_ms_per_gib,
            s.vmm_fixed_ms,
            s.qemu_prealloc_threads
                .map_or("-".into(), |[a, b]| if a == b {
                    a.to_string()
                } else {
                    format!("{a}-{b}")
                }),
            f1(s.qemu_ms_per_gib),
            f1(s.qemu_fixed_ms),
            s.ratio.map_or("-".into(), |x| format!("{x:.3}"))
        );
    }
}

/// The chart: median time from spawn to the probe's result line against guest RAM, one line
/// per vmm configuration (backing, threads asked) and per QEMU prealloc thread count.
pub fn svg(r: &StartupReport) -> String {
    let gib = |b: u64| b as f64 / (1u64 << 30) as f64;
    let mut series: Vec<Series> = Vec::new();
    for c in &r.configs {
        let label = format!("vmm {} threads={}", c.backing.name(), c.pin_threads);
        let Some(s) = c.spawn_ready_ms else { continue };
        let point = (gib(c.memory_bytes), s.median, s.min, s.max);
        match series.iter_mut().find(|x| x.label == label) {
            Some(x) => x.points.push(point),
            None => series.push(Series {
                label,
                dashed: false,
                points: vec![point],
            }),
        }
    }
    for q in &r.qemu.results {
        let label = format!("QEMU memfd prealloc-threads={}", q.prealloc_threads);
        let Some(s) = q.ready_ms else { continue };
        let point = (gib(q.memory_bytes), s.median, s.min, s.max);
        match series.iter_mut().find(|x| x.label == label) {
            Some(x) => x.points.push(point),
            None => series.push(Series {
                label,
                dashed: true,
                points: vec![point],
            }),
        }
    }
    for s in &mut series {
        s.points.sort_by(|a, b| a.0.total_cmp(&b.0));
    }
    svg::chart(
        &format!(
            "Probe guest start-up: median of {} runs (whiskers: min-max)",
            r.runs
        ),
        &r.machine.describe(),
        "guest RAM (GiB)",
        "time from spawn to guest ready (ms)",
        &series,
    )
}

#[cfg(test)]
mod tests {
    use vmm::memory::Backing;

    use super::*;
    use crate::startup::compare::{QemuSlope, RamSlope};
    use crate::startup::machine::Machine;
    use crate::startup::{ConfigResult, QemuSection};

    fn stats(median: f64, min: f64) -> Option<Stats> {
        Some(Stats {
            median,
            min,
            max: median * 2.0,
        })
    }

    fn report() -> StartupReport {
        let config = ConfigResult {
            id: "8G-memfd-t1".into(),
            memory_bytes: 8 << 30,
            backing: Backing::Memfd,
            pin_threads: "1".into(),
            mode: "user-device epf".into(),
            pin_backend: Some("vfio-user".into()),
            threads_used: Some(1),
            decided_by: None,
            memory_shards: Some(9),
            shard_bytes: Some(1 << 30),
            ready_ms: stats(6186.5, 5704.2),
            teardown_ms: stats(1234.5, 987.6),
            spawn_ready_ms: None,
            wall_ms: None,
            pin_ms: None,
            pin_gibps: None,
            overhead_ms: None,
            failed: false,
            samples: Vec::new(),
        };
        StartupReport {
            machine: Machine::detect(),
            command: Vec::new(),
            runs: 3,
            warmup: 1,
            user_device: true,
            backings: vec![Backing::Memfd],
            memory_shard: None,
            memset_gibps: None,
            notes: Vec::new(),
            configs: vec![config],
            qemu: QemuSection {
                path: None,
                skipped: None,
                command: None,
                results: Vec::new(),
                slopes: vec![QemuSlope {
                    prealloc_threads: 1,
                    from_memory_bytes: 1 << 30,
                    to_memory_bytes: 8 << 30,
                    ms_per_gib: 1137.343,
                    fixed_ms: 2401.057,
                }],
            },
            parallel_vs_serial: Vec::new(),
            vmm_vs_qemu: Vec::new(),
            ram_slopes: vec![RamSlope {
                backing: Backing::Memfd,
                pin_threads: "auto".into(),
                from_memory_bytes: 1 << 30,
                to_memory_bytes: 8 << 30,
                vmm_ms_per_gib: 496.0,
                vmm_fixed_ms: 218.1,
                qemu_prealloc_threads: Some([2, 4]),
                qemu_ms_per_gib: Some(607.5),
                qemu_fixed_ms: Some(2632.3),
                ratio: Some(0.816),
            }],
            failures: Vec::new(),
            elapsed_s: 1.0,
        }
    }

    #[test]
    fn rows_show_shards_and_teardown_beside_time_to_ready() {
        let t = table(&report());
        let row = t.lines().find(|l| l.starts_with("8G-memfd-t1")).unwrap();
        let cols: Vec<&str> = row.split_whitespace().collect();
        // config, mode (2 words), backend, threads, shards, ready x3, teardown median and min.
        assert_eq!(cols[5], "9x1G", "{row}");
        assert_eq!(
            &cols[6..11],
            ["6186.5", "5704.2", "12373.0", "1234.5", "987.6"]
        );
    }

    #[test]
    fn the_ram_dependent_part_is_shown_for_qemu_alone_and_beside_vmm() {
        let t = table(&report());
        assert!(
            t.contains("QEMU's RAM-dependent part, 1 prealloc thread(s), 1 GiB to 8 GiB: 1137.3 ms per GiB; fixed part (at 0 GiB) 2401.1 ms"),
            "{t}"
        );
        let row = t.lines().find(|l| l.starts_with("1G-8G")).unwrap();
        let cols: Vec<&str> = row.split_whitespace().collect();
        assert_eq!(
            cols,
            ["1G-8G", "memfd", "auto", "496.0", "218.1", "2-4", "607.5", "2632.3", "0.816"]
        );
    }
}
