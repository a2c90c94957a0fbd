//! The human table on stdout, and the chart's series.

use std::fmt::Write;

use super::svg::{self, Series};
use super::{StartupReport, Stats};
use crate::size::human;

fn s3(s: Option<Stats>) -> String {
    match s {
        Some(s) => format!("{:>9.1} {:>9.1} {:>9.1}", s.median, s.min, s.max),
        None => format!("{:>9} {:>9} {:>9}", "-", "-", "-"),
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
        "\n{:<18} {:<15} {:<10} {:>7}  {:^29}  {:^29}  {:>9}  {:>11}",
        "config",
        "mode",
        "backend",
        "threads",
        "ready: median   min   max",
        "pin: median    min    max",
        "pin GiB/s",
        "overhead ms"
    );
    for c in &r.configs {
        let _ = writeln!(
            o,
            "{:<18} {:<15} {:<10} {:>7}  {}  {}  {:>9}  {:>11}{}",
            c.id,
            c.mode,
            c.pin_backend.as_deref().unwrap_or("-"),
            opt(c.threads_used),
            s3(c.ready_ms),
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
                "\nQEMU (memfd, prealloc, mem-lock; from spawn):\n{:<18} {:^29}  {:^29}",
                "config", "first output: med  min  max", "ready: median   min   max"
            );
            for q in &r.qemu.results {
                let _ = writeln!(
                    o,
                    "{:<18} {}  {}{}",
                    q.id,
                    s3(q.first_output_ms),
                    s3(q.ready_ms),
                    if q.failed { "  FAILED" } else { "" }
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
    o
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
