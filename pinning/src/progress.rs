//! A progress bar for jobs long enough to wonder about: shown on stderr only when it is a
//! terminal and the job has run for over a second.
//!
//! The work adds bytes as it finishes them (populate steps, not whole chunks), so the bar
//! moves while a thread is still on its first chunk.

use std::io::IsTerminal;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

/// Jobs shorter than this show nothing.
const SHOW_AFTER: Duration = Duration::from_secs(1);
/// How often the bar reads the counter.
const TICK: Duration = Duration::from_millis(50);

pub struct Progress {
    done: Arc<AtomicU64>,
    finished: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
    sink: Option<Arc<ProgressSink>>,
}

/// The running job's progress for a reader in another thread (the machine API's `vm.info`):
/// the same bytes the bar counts, readable at any time without a terminal.
#[derive(Debug, Default)]
pub struct ProgressSink {
    done: AtomicU64,
    total: AtomicU64,
    /// When the current job began; none before the first.
    started: Mutex<Option<Instant>>,
}

/// What a [`ProgressSink`] read at one moment.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct ProgressReading {
    pub bytes_done: u64,
    pub bytes_total: u64,
    /// Since the job began.
    pub elapsed: Duration,
}

impl ProgressSink {
    /// Starts counting a new job of `total` bytes from zero.
    fn begin(&self, total: u64) {
        let mut started = self.started.lock().unwrap_or_else(|e| e.into_inner());
        self.done.store(0, Ordering::Relaxed);
        self.total.store(total, Ordering::Relaxed);
        *started = Some(Instant::now());
    }

    /// The current job's progress; none before a job began.
    pub fn read(&self) -> Option<ProgressReading> {
        let started = *self.started.lock().unwrap_or_else(|e| e.into_inner());
        let total = self.total.load(Ordering::Relaxed);
        Some(ProgressReading {
            bytes_done: self.done.load(Ordering::Relaxed).min(total),
            bytes_total: total,
            elapsed: started?.elapsed(),
        })
    }
}

impl Progress {
    /// Starts watching; `enabled` false (or stderr not a terminal) shows nothing.
    pub fn start(label: &'static str, total: u64, enabled: bool) -> Self {
        Self::start_with_sink(label, total, enabled, None)
    }

    /// As [`Progress::start`], also counting into `sink` (restarted at zero for this job).
    pub fn start_with_sink(
        label: &'static str,
        total: u64,
        enabled: bool,
        sink: Option<Arc<ProgressSink>>,
    ) -> Self {
        if let Some(s) = &sink {
            s.begin(total);
        }
        let done = Arc::new(AtomicU64::new(0));
        let finished = Arc::new(AtomicBool::new(false));
        let thread = (enabled && std::io::stderr().is_terminal()).then(|| {
            let (done, finished) = (done.clone(), finished.clone());
            let bar = hidden_bar(label, total);
            std::thread::spawn(move || {
                watch(
                    &bar,
                    &done,
                    &finished,
                    SHOW_AFTER,
                    ProgressDrawTarget::stderr,
                );
            })
        });
        Self {
            done,
            finished,
            thread,
            sink,
        }
    }

    /// Counts `bytes` just finished.
    pub fn add(&self, bytes: u64) {
        self.done.fetch_add(bytes, Ordering::Relaxed);
        if let Some(s) = &self.sink {
            s.done.fetch_add(bytes, Ordering::Relaxed);
        }
    }

    #[cfg(test)]
    pub fn done(&self) -> u64 {
        self.done.load(Ordering::Relaxed)
    }
}

fn style() -> ProgressStyle {
    ProgressStyle::with_template(
        "{msg} [{bar:40}] {binary_bytes}/{binary_total_bytes} {binary_bytes_per_sec}, {eta} left",
    )
    .unwrap_or_else(|_| ProgressStyle::default_bar())
    .progress_chars("=> ")
}

/// The bar is made, hidden, before the job starts, so that its rate and ETA estimate covers
/// the whole job. A bar made when it appears (or by a thread that starts late) counts
/// everything done so far as done in the instant before its first update: a first reading
/// of "27.51 TiB/s".
fn hidden_bar(label: &'static str, total: u64) -> ProgressBar {
    ProgressBar::with_draw_target(Some(total), ProgressDrawTarget::hidden())
        .with_style(style())
        .with_message(label)
}

/// Feeds `bar` from `done` until `finished`, drawing it on `target` once it has existed for
/// `show_after`. Returns the rate it showed first, if it was shown, for the tests.
fn watch(
    bar: &ProgressBar,
    done: &AtomicU64,
    finished: &AtomicBool,
    show_after: Duration,
    target: fn() -> ProgressDrawTarget,
) -> Option<f64> {
    let total = bar.length().unwrap_or(u64::MAX);
    let mut first_rate = None;
    while !finished.load(Ordering::Acquire) {
        // Real progress only, and never past the end, so the bar only moves forward. Setting
        // it every tick also redraws the rate and ETA while a slow step holds it still.
        bar.set_position(done.load(Ordering::Relaxed).min(total));
        if first_rate.is_none() && bar.elapsed() >= show_after {
            bar.set_draw_target(target());
            first_rate = Some(bar.per_sec());
        }
        std::thread::park_timeout(TICK);
    }
    bar.finish_and_clear();
    first_rate
}

impl Drop for Progress {
    fn drop(&mut self) {
        self.finished.store(true, Ordering::Release);
        if let Some(t) = self.thread.take() {
            // Wakes the bar from its tick so a finished job does not wait for it.
            t.thread().unpark();
            let _ = t.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;

    use crate::GIB;

    /// One 2 GiB chunk finishes just before the bar appears (one thread on 8 GiB): the first
    /// rate shown must be about the job's rate so far, not those bytes over an instant.
    #[test]
    fn the_first_rate_shown_is_the_jobs_rate_not_a_spike() {
        let done = AtomicU64::new(0);
        let finished = AtomicBool::new(false);
        let show_after = Duration::from_millis(400);
        let started = Instant::now();
        let bar = hidden_bar("test", 8 * GIB);
        let first_rate = std::thread::scope(|s| {
            let bar = s.spawn(|| {
                watch(
                    &bar,
                    &done,
                    &finished,
                    show_after,
                    ProgressDrawTarget::hidden,
                )
            });
            std::thread::sleep(Duration::from_millis(300));
            done.fetch_add(2 * GIB, Ordering::Relaxed);
            std::thread::sleep(Duration::from_millis(200));
            finished.store(true, Ordering::Release);
            bar.join().unwrap()
        });
        let rate = first_rate.expect("the bar was shown");
        // 2 GiB over at least 300 ms is under 7 GiB/s; a spike reads thousands of times that.
        let job_rate = (2 * GIB) as f64 / 0.3;
        assert!(
            rate > 0.0 && rate < 10.0 * job_rate,
            "first rate {:.1} GiB/s, the job's {:.1} GiB/s (after {:?})",
            rate / GIB as f64,
            job_rate / GIB as f64,
            started.elapsed()
        );
    }

    #[test]
    fn a_sink_counts_each_job_from_zero() {
        let sink = Arc::new(ProgressSink::default());
        assert_eq!(sink.read(), None);
        let first = Progress::start_with_sink("test", 10, false, Some(sink.clone()));
        first.add(4);
        assert_eq!(
            sink.read().map(|r| (r.bytes_done, r.bytes_total)),
            Some((4, 10))
        );
        drop(first);
        let second = Progress::start_with_sink("test", 20, false, Some(sink.clone()));
        second.add(5);
        assert_eq!(
            sink.read().map(|r| (r.bytes_done, r.bytes_total)),
            Some((5, 20))
        );
    }

    #[test]
    fn a_disabled_bar_still_counts() {
        let progress = Progress::start("test", 10, false);
        progress.add(4);
        progress.add(6);
        assert_eq!(progress.done(), 10);
    }
}
