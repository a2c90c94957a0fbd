//! What the bench derives from the per-configuration medians: parallel against serial, vmm
//! against QEMU at equal prealloc threads, and the RAM-dependent part of each one's time to
//! ready (the slope between the smallest and the largest memory size).
//!
//! The slopes exist because QEMU's time from spawn is mostly not RAM on a host without
//! hardware virtualisation: its firmware (SeaBIOS and the option ROM that loads `-kernel`)
//! runs emulated and costs seconds at any size, so "vmm is 10x faster from spawn" says little
//! about how each prepares guest RAM. The slope in ms per GiB does, and what is left at
//! 0 GiB (the fixed part) shows the firmware on its own.

use serde::Serialize;
use vmm::memory::Backing;

use super::{ConfigResult, QemuResult, Stats};

/// parallel/serial for one memory size and backing: median time to ready, and pin phase.
#[derive(Debug, Serialize)]
pub struct ParallelRatio {
    pub memory_bytes: u64,
    pub backing: Backing,
    pub parallel: String,
    pub parallel_threads: Option<u64>,
    pub serial_ready_ms: f64,
    pub parallel_ready_ms: f64,
    pub ready_ratio: f64,
    pub pin_ratio: Option<f64>,
}

/// vmm/QEMU with equal prealloc threads, both from spawn to the probe's result line.
#[derive(Debug, Serialize)]
pub struct QemuRatio {
    pub memory_bytes: u64,
    pub backing: Backing,
    pub threads: usize,
    pub vmm_ready_ms: f64,
    pub qemu_ready_ms: f64,
    pub ratio: f64,
}

/// A straight line through two (GiB, ms) points: its slope and where it meets 0 GiB.
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub struct Line {
    pub ms_per_gib: f64,
    pub fixed_ms: f64,
}

/// The line through (`a_bytes`, `a_ms`) and (`b_bytes`, `b_ms`); `None` for one size twice.
pub fn line((a_bytes, a_ms): (u64, f64), (b_bytes, b_ms): (u64, f64)) -> Option<Line> {
    let gib = |b: u64| b as f64 / (1u64 << 30) as f64;
    let (a, b) = (gib(a_bytes), gib(b_bytes));
    if a == b {
        return None;
    }
    let ms_per_gib = (b_ms - a_ms) / (b - a);
    Some(Line {
        ms_per_gib: round3(ms_per_gib),
        fixed_ms: round3(a_ms - ms_per_gib * a),
    })
}

/// The RAM-dependent part of the median time from spawn to the probe's result line, for one
/// backing and `--pin-threads` value, vmm's beside QEMU's with the same prealloc threads.
#[derive(Debug, Serialize)]
pub struct RamSlope {
    pub backing: Backing,
    pub pin_threads: String,
    pub from_memory_bytes: u64,
    pub to_memory_bytes: u64,
    pub vmm_ms_per_gib: f64,
    pub vmm_fixed_ms: f64,
    /// QEMU's prealloc threads at the two sizes: the pin threads vmm used there.
    pub qemu_prealloc_threads: Option<[usize; 2]>,
    pub qemu_ms_per_gib: Option<f64>,
    pub qemu_fixed_ms: Option<f64>,
    /// vmm/QEMU of the slopes; none unless QEMU's slope is positive (noise can make it not).
    pub ratio: Option<f64>,
}

/// QEMU's RAM-dependent part on its own, for one prealloc thread count.
#[derive(Debug, Serialize)]
pub struct QemuSlope {
    pub prealloc_threads: usize,
    pub from_memory_bytes: u64,
    pub to_memory_bytes: u64,
    pub ms_per_gib: f64,
    pub fixed_ms: f64,
}

fn round3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

pub fn ratio(a: f64, b: f64) -> f64 {
    round3(a / b)
}

/// For each memory size and backing with a `1` configuration: every other thread count
/// against it.
pub fn parallel_ratios(configs: &[ConfigResult]) -> Vec<ParallelRatio> {
    let mut out = Vec::new();
    for serial in configs.iter().filter(|c| c.pin_threads == "1") {
        let Some(s) = serial.ready_ms else { continue };
        for p in configs.iter().filter(|c| {
            c.memory_bytes == serial.memory_bytes
                && c.backing == serial.backing
                && c.pin_threads != "1"
        }) {
            let Some(pr) = p.ready_ms else { continue };
            out.push(ParallelRatio {
                memory_bytes: p.memory_bytes,
                backing: p.backing,
                parallel: p.pin_threads.clone(),
                parallel_threads: p.threads_used,
                serial_ready_ms: s.median,
                parallel_ready_ms: pr.median,
                ready_ratio: ratio(pr.median, s.median),
                pin_ratio: match (p.pin_ms, serial.pin_ms) {
                    (Some(a), Some(b)) if b.median > 0.0 => Some(ratio(a.median, b.median)),
                    _ => None,
                },
            });
        }
    }
    out
}

/// Each vmm configuration against the QEMU run of the same size whose prealloc threads equal
/// the pin threads vmm used; both timed from spawn to the probe's result line.
pub fn qemu_ratios(configs: &[ConfigResult], qemu: &[QemuResult]) -> Vec<QemuRatio> {
    let mut out = Vec::new();
    for q in qemu {
        let Some(qr) = q.ready_ms else { continue };
        for c in configs.iter().filter(|c| {
            c.memory_bytes == q.memory_bytes && c.threads_used == Some(q.prealloc_threads as u64)
        }) {
            // Two requests (`2` and `auto`) can use the same count: compare each backing once.
            if out.iter().any(|r: &QemuRatio| {
                r.memory_bytes == c.memory_bytes
                    && r.backing == c.backing
                    && r.threads == q.prealloc_threads
            }) {
                continue;
            }
            let Some(v) = c.spawn_ready_ms else { continue };
            out.push(QemuRatio {
                memory_bytes: q.memory_bytes,
                backing: c.backing,
                threads: q.prealloc_threads,
                vmm_ready_ms: v.median,
                qemu_ready_ms: qr.median,
                ratio: ratio(v.median, qr.median),
            });
        }
    }
    out
}

/// The smallest and the largest memory size among `items` that have a median, if they differ.
fn ends<T>(items: &[&T], key: impl Fn(&T) -> (u64, Option<Stats>)) -> Option<[(u64, f64); 2]> {
    let points: Vec<(u64, f64)> = items
        .iter()
        .filter_map(|t| {
            let (bytes, s) = key(t);
            Some((bytes, s?.median))
        })
        .collect();
    let lo = *points.iter().min_by_key(|p| p.0)?;
    let hi = *points.iter().max_by_key(|p| p.0)?;
    (lo.0 != hi.0).then_some([lo, hi])
}

/// One [`RamSlope`] per backing and `--pin-threads` value measured at two sizes or more.
/// QEMU's line goes through its runs at the same two sizes with prealloc threads equal to the
/// pin threads vmm used at each (`auto` can use more threads at the larger size).
pub fn ram_slopes(configs: &[ConfigResult], qemu: &[QemuResult]) -> Vec<RamSlope> {
    let mut out: Vec<RamSlope> = Vec::new();
    for c in configs {
        if out
            .iter()
            .any(|s| s.backing == c.backing && s.pin_threads == c.pin_threads)
        {
            continue;
        }
        let group: Vec<&ConfigResult> = configs
            .iter()
            .filter(|o| o.backing == c.backing && o.pin_threads == c.pin_threads)
            .collect();
        let Some([lo, hi]) = ends(&group, |o| (o.memory_bytes, o.spawn_ready_ms)) else {
            continue;
        };
        let Some(vmm) = line(lo, hi) else { continue };
        let threads_at = |bytes: u64| {
            group
                .iter()
                .find(|o| o.memory_bytes == bytes)
                .and_then(|o| o.threads_used)
                .map(|t| t as usize)
        };
        let qemu_at = |bytes: u64, threads: usize| {
            qemu.iter()
                .find(|q| q.memory_bytes == bytes && q.prealloc_threads == threads)
                .and_then(|q| Some((bytes, q.ready_ms?.median)))
        };
        let threads = threads_at(lo.0).zip(threads_at(hi.0)).map(|(a, b)| [a, b]);
        let q = threads
            .and_then(|[a, b]| qemu_at(lo.0, a).zip(qemu_at(hi.0, b)))
            .and_then(|(a, b)| line(a, b));
        out.push(RamSlope {
            backing: c.backing,
            pin_threads: c.pin_threads.clone(),
            from_memory_bytes: lo.0,
            to_memory_bytes: hi.0,
            vmm_ms_per_gib: vmm.ms_per_gib,
            vmm_fixed_ms: vmm.fixed_ms,
            qemu_prealloc_threads: threads.filter(|_| q.is_some()),
            qemu_ms_per_gib: q.map(|l| l.ms_per_gib),
            qemu_fixed_ms: q.map(|l| l.fixed_ms),
            ratio: q
                .filter(|l| l.ms_per_gib > 0.0)
                .map(|l| ratio(vmm.ms_per_gib, l.ms_per_gib)),
        });
    }
    out
}

/// One [`QemuSlope`] per prealloc thread count measured at two sizes or more.
pub fn qemu_slopes(qemu: &[QemuResult]) -> Vec<QemuSlope> {
    let mut out: Vec<QemuSlope> = Vec::new();
    for q in qemu {
        if out.iter().any(|s| s.prealloc_threads == q.prealloc_threads) {
            continue;
        }
        let group: Vec<&QemuResult> = qemu
            .iter()
            .filter(|o| o.prealloc_threads == q.prealloc_threads)
            .collect();
        let Some([lo, hi]) = ends(&group, |o| (o.memory_bytes, o.ready_ms)) else {
            continue;
        };
        let Some(l) = line(lo, hi) else { continue };
        out.push(QemuSlope {
            prealloc_threads: q.prealloc_threads,
            from_memory_bytes: lo.0,
            to_memory_bytes: hi.0,
            ms_per_gib: l.ms_per_gib,
            fixed_ms: l.fixed_ms,
        });
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const GIB: u64 = 1 << 30;

    fn stats(median: f64) -> Option<Stats> {
        Some(Stats {
            median,
            min: median,
            max: median,
        })
    }

    fn vmm(memory: u64, backing: Backing, req: &str, used: u64, spawn_ready: f64) -> ConfigResult {
        ConfigResult {
            id: format!("{memory}-{req}"),
            memory_bytes: memory,
            backing,
            pin_threads: req.into(),
            mode: "pin populate".into(),
            pin_backend: Some("populate".into()),
            threads_used: Some(used),
            decided_by: None,
            memory_shards: None,
            shard_bytes: None,
            ready_ms: stats(spawn_ready - 2.0),
            teardown_ms: None,
            spawn_ready_ms: stats(spawn_ready),
            wall_ms: None,
            pin_ms: None,
            pin_gibps: None,
            overhead_ms: None,
            failed: false,
            samples: Vec::new(),
        }
    }

    fn qemu(memory: u64, threads: usize, ready: f64) -> QemuResult {
        QemuResult {
            id: format!("{memory}-q{threads}"),
            memory_bytes: memory,
            prealloc_threads: threads,
            first_output_ms: None,
            ready_ms: stats(ready),
            wall_ms: None,
            failed: false,
            samples: Vec::new(),
        }
    }

    #[test]
    fn a_line_through_two_sizes_gives_ms_per_gib_and_the_fixed_part() {
        // QEMU on the build machine, 1 thread: 3538.4 ms at 1 GiB, 11499.8 ms at 8 GiB.
        let l = line((GIB, 3538.4), (8 * GIB, 11499.8)).unwrap();
        assert_eq!(l.ms_per_gib, 1137.343);
        assert_eq!(l.fixed_ms, 2401.057);
        // Either order, and sizes that are not whole GiB.
        let l = line((2 * GIB, 300.0), (GIB / 2, 150.0)).unwrap();
        assert_eq!(l.ms_per_gib, 100.0);
        assert_eq!(l.fixed_ms, 100.0);
        assert_eq!(line((GIB, 1.0), (GIB, 2.0)), None);
    }

    #[test]
    fn slopes_pair_the_smallest_and_largest_size_per_backing_and_threads() {
        let configs = [
            vmm(GIB, Backing::Anon, "1", 1, 400.0),
            vmm(4 * GIB, Backing::Anon, "1", 1, 1300.0),
            vmm(8 * GIB, Backing::Anon, "1", 1, 2500.0),
            // `auto` used 2 threads at 1 GiB and 4 at 8 GiB.
            vmm(GIB, Backing::Anon, "auto", 2, 300.0),
            vmm(8 * GIB, Backing::Anon, "auto", 4, 1000.0),
            // One size only: no slope.
            vmm(GIB, Backing::Thp, "1", 1, 150.0),
        ];
        let qemu = [
            qemu(GIB, 1, 3500.0),
            qemu(8 * GIB, 1, 10500.0),
            qemu(GIB, 2, 3200.0),
            qemu(8 * GIB, 4, 6700.0),
        ];
        let s = ram_slopes(&configs, &qemu);
        assert_eq!(s.len(), 2, "{s:?}");
        let t1 = &s[0];
        assert_eq!((t1.backing, t1.pin_threads.as_str()), (Backing::Anon, "1"));
        assert_eq!((t1.from_memory_bytes, t1.to_memory_bytes), (GIB, 8 * GIB));
        assert_eq!(t1.vmm_ms_per_gib, 300.0);
        assert_eq!(t1.vmm_fixed_ms, 100.0);
        assert_eq!(t1.qemu_prealloc_threads, Some([1, 1]));
        assert_eq!(t1.qemu_ms_per_gib, Some(1000.0));
        assert_eq!(t1.qemu_fixed_ms, Some(2500.0));
        assert_eq!(t1.ratio, Some(0.3));
        let auto = &s[1];
        assert_eq!(auto.vmm_ms_per_gib, 100.0);
        assert_eq!(auto.qemu_prealloc_threads, Some([2, 4]));
        assert_eq!(auto.qemu_ms_per_gib, Some(500.0));
        assert_eq!(auto.ratio, Some(0.2));

        // Without QEMU, vmm's slope stands alone.
        let s = ram_slopes(&configs, &[]);
        assert_eq!(s[0].vmm_ms_per_gib, 300.0);
        assert_eq!((s[0].qemu_ms_per_gib, s[0].ratio), (None, None));

        let q = qemu_slopes(&qemu);
        assert_eq!(q.len(), 1, "{q:?}");
        assert_eq!(q[0].prealloc_threads, 1);
        assert_eq!((q[0].ms_per_gib, q[0].fixed_ms), (1000.0, 2500.0));
    }

    #[test]
    fn a_flat_or_falling_qemu_slope_gives_no_ratio() {
        let configs = [
            vmm(GIB, Backing::Memfd, "1", 1, 700.0),
            vmm(2 * GIB, Backing::Memfd, "1", 1, 1400.0),
        ];
        let qemu = [qemu(GIB, 1, 3500.0), qemu(2 * GIB, 1, 3400.0)];
        let s = ram_slopes(&configs, &qemu);
        assert_eq!(s[0].qemu_ms_per_gib, Some(-100.0));
        assert_eq!(s[0].ratio, None);
    }
}
