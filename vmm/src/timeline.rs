//! The start-up timeline: every phase of `vmm run` timed from the moment `vmm` started,
//! the guest's own marks, and the pinning job, as a short human summary and as JSON.

use std::time::{Duration, Instant};

use pinning::pinner::PinStats;
use serde::Serialize;

use crate::memory::layout::E820Entry;
use crate::placement::ZoneReport;
use crate::size::human;

/// A duration in milliseconds, rounded to the microsecond, as every report writes it.
pub fn ms(d: Duration) -> f64 {
    (d.as_secs_f64() * 1e6).round() / 1e3
}

#[derive(Clone, Debug, Serialize)]
pub struct Phase {
    pub name: &'static str,
    pub start_ms: f64,
    pub end_ms: f64,
}

impl Phase {
    pub fn duration_ms(&self) -> f64 {
        self.end_ms - self.start_ms
    }
}

/// Phases recorded against one start instant.
#[derive(Debug)]
pub struct Timeline {
    start: Instant,
    phases: Vec<Phase>,
}

impl Timeline {
    pub fn new(start: Instant) -> Self {
        Self {
            start,
            phases: Vec::new(),
        }
    }

    pub fn start(&self) -> Instant {
        self.start
    }

    /// Runs `f` as phase `name`. The phase is recorded even when `f` fails, so a report of a
    /// failed start shows how far it got.
    pub fn phase<T>(&mut self, name: &'static str, f: impl FnOnce() -> T) -> T {
        let begin = self.start.elapsed();
        let out = f();
        self.record(name, begin, self.start.elapsed());
        out
    }

    /// Records a phase measured elsewhere (offsets from the start).
    pub fn record(&mut self, name: &'static str, begin: Duration, end: Duration) {
        self.phases.push(Phase {
            name,
            start_ms: ms(begin),
            end_ms: ms(end),
        });
    }

    pub fn now_ms(&self) -> f64 {
        ms(self.start.elapsed())
    }

    pub fn phases(&self) -> &[Phase] {
        &self.phases
    }
}

/// When the guest did what, in ms since `vmm` started.
#[derive(Clone, Debug, Default, Serialize)]
pub struct GuestTimes {
    pub entry_ms: Option<f64>,
    pub first_output_ms: Option<f64>,
    pub ready_ms: Option<f64>,
}

impl GuestTimes {
    pub fn from_durations(
        entry: Option<Duration>,
        first_output: Option<Duration>,
        ready: Option<Duration>,
    ) -> Self {
        Self {
            entry_ms: entry.map(ms),
            first_output_ms: first_output.map(ms),
            ready_ms: ready.map(ms),
        }
    }
}

/// The JSON written by `--report`.
#[derive(Clone, Debug, Serialize)]
pub struct Report {
    pub total_ms: f64,
    pub phases: Vec<Phase>,
    pub guest: GuestTimes,
    /// The guest's exit status (debug-exit port), if it gave one.
    pub exit_status: Option<i32>,
    /// How the VM ended, in words.
    pub outcome: String,
    pub pin: Option<PinStats>,
    pub teardown: Teardown,
    pub vm: VmSummary,
    /// What became of the guest's console output: written, dropped because nobody read it,
    /// left out of the serial log past its cap.
    pub serial: devices::serial::output::OutputStats,
}

/// The `exit` phase in parts: undoing the DMA mappings, freeing guest RAM, and the rest
/// (device models, KVM, device servers), with the threads each parallel part used.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Teardown {
    pub unpin_ms: f64,
    pub unpin_threads: usize,
    /// What undoing the DMA mappings and locks did, and the undo calls that failed.
    pub unpin: pinning::Undone,
    pub free_ms: f64,
    pub free_threads: usize,
    pub other_ms: f64,
}

#[derive(Clone, Debug, Serialize)]
pub struct VmSummary {
    /// Guest RAM mapped.
    pub memory_bytes: u64,
    /// memfds backing it (0 for private memory), and the size of each but perhaps the last.
    pub memory_shards: usize,
    pub shard_bytes: u64,
    /// Huge pages the kernel gave while the guest existed (/proc/meminfo deltas), whatever
    /// the backing asked for.
    pub huge_bytes: u64,
    pub cpus: u8,
    /// The memory map given to the guest (boot_params or the PVH memory map).
    pub e820: Vec<E820Entry>,
    pub backing: String,
    /// Why this backing (what `--backing auto` weighed, or "--backing NAME").
    pub backing_reason: String,
    pub kernel: String,
    /// Passthrough devices (sysfs paths or vfio-user sockets).
    pub devices: Vec<String>,
    /// Guest RAM zone by zone and where its pages were on the host after pinning (one zone,
    /// `ram`, without `--memory-zone`).
    pub zones: Vec<ZoneReport>,
}

impl Report {
    /// A few lines for stderr.
    pub fn summary(&self) -> String {
        let mut out = String::from("vmm: start-up timeline (ms since vmm started)\n");
        for p in &self.phases {
            out.push_str(&format!(
                "  {:<13} {:>9.1} -> {:>9.1}  ({:.1} ms)\n",
                p.name,
                p.start_ms,
                p.end_ms,
                p.duration_ms()
            ));
        }
        let opt = |v: Option<f64>| v.map(|v| format!("{v:.1}")).unwrap_or_else(|| "-".into());
        out.push_str(&format!(
            "  guest         entry {}  first output {}  ready {}\n",
            opt(self.guest.entry_ms),
            opt(self.guest.first_output_ms),
            opt(self.guest.ready_ms)
        ));
        let v = &self.vm;
        let shards = if v.memory_shards > 0 {
            let s = if v.memory_shards == 1 { "" } else { "s" };
            format!(
                " in {} shard{s} of {}",
                v.memory_shards,
                human(v.shard_bytes)
            )
        } else {
            String::new()
        };
        out.push_str(&format!(
            "  memory        {} {}{shards}, {} in huge pages ({})\n",
            human(v.memory_bytes),
            v.backing,
            human(v.huge_bytes),
            v.backing_reason
        ));
        for z in &v.zones {
            out.push_str(&format!("  placement     {}\n", z.describe()));
        }
        if let Some(p) = &self.pin {
            out.push_str(&format!(
                "  pin           {} {} bytes, {} threads (decided by {}), {} chunks, {:.1} ms, {:.2} GiB/s\n",
                p.backend, p.bytes, p.threads, p.decided_by, p.chunks, p.elapsed_ms, p.gibps
            ));
        }
        let t = &self.teardown;
        out.push_str(&format!(
            "  exit          unpin {:.1} ms ({} thr), free {:.1} ms ({} thr), other {:.1} ms\n",
            t.unpin_ms, t.unpin_threads, t.free_ms, t.free_threads, t.other_ms
        ));
        out.push_str(&format!(
            "  total         {:.1} ms, {}\n",
            self.total_ms, self.outcome
        ));
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn phases_are_ordered_and_recorded_even_on_failure() {
        let mut t = Timeline::new(Instant::now());
        let r: Result<(), &str> = t.phase("kvm", || Err("no /dev/kvm"));
        assert!(r.is_err());
        t.phase("memory", || std::thread::sleep(Duration::from_millis(2)));
        let p = t.phases();
        assert_eq!(p.len(), 2);
        assert_eq!(p[0].name, "kvm");
        assert!(p[1].start_ms >= p[0].end_ms);
        assert!(p[1].duration_ms() >= 2.0);
    }
}
