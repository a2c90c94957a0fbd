//! Pausing a running guest: every vCPU brought out of KVM_RUN (the same SIGRTMIN kick and
//! `immediate_exit` as a stop) and parked on a condition variable until it is resumed or the
//! VM stops. The guest's state stays in KVM while its vCPUs are parked, so resuming goes on
//! where it left off.
//!
//! One gate per run stage: [`crate::run::run_until_exit`] opens it before it starts the vCPU
//! threads (each registers itself before its first KVM_RUN) and closes it before any is
//! joined, so a pause kicks only threads that still exist.

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use vmm_sys_util::signal::SIGRTMIN;

/// How long [`PauseGate::pause`] waits for every vCPU to park.
pub const PAUSE_TIMEOUT: Duration = Duration::from_secs(5);

/// Why a pause or resume was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PauseError {
    #[error("the guest is not running (its vCPUs have not started or have stopped); pause it while it runs")]
    NotRunning,
    #[error("the guest is already paused; resume it first")]
    AlreadyPaused,
    #[error("the guest is not paused; pause it first")]
    NotPaused,
    #[error(
        "vCPU {0} did not stop within {PAUSE_TIMEOUT:?}, so the guest was left running; try again"
    )]
    Timeout(u32),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    NotStarted,
    Running,
    Ended,
}

struct GateState {
    phase: Phase,
    paused: bool,
    /// The vCPUs of the run.
    expected: Vec<u32>,
    /// Each started vCPU's index and thread, for the kick.
    threads: Vec<(u32, libc::pthread_t)>,
    parked: BTreeSet<u32>,
    exited: BTreeSet<u32>,
    /// When the pause now in force was asked for.
    paused_since: Option<Instant>,
    /// How long the guest was paused before that.
    paused_before: Duration,
}

impl GateState {
    /// The pause in force, if any, ends now: its time goes to `paused_before`.
    fn end_pause(&mut self) {
        if let Some(since) = self.paused_since.take() {
            self.paused_before += since.elapsed();
        }
    }
}

/// Where the vCPUs of one run park while the guest is paused.
pub struct PauseGate {
    /// Read by each vCPU on every exit from KVM_RUN: one relaxed load when no pause is asked.
    requested: AtomicBool,
    state: Mutex<GateState>,
    changed: Condvar,
}

impl std::fmt::Debug for PauseGate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PauseGate")
            .field("paused", &self.is_paused())
            .finish()
    }
}

impl Default for PauseGate {
    fn default() -> Self {
        PauseGate {
            requested: AtomicBool::new(false),
            state: Mutex::new(GateState {
                phase: Phase::NotStarted,
                paused: false,
                expected: Vec::new(),
                threads: Vec::new(),
                parked: BTreeSet::new(),
                exited: BTreeSet::new(),
                paused_since: None,
                paused_before: Duration::ZERO,
            }),
            changed: Condvar::new(),
        }
    }
}

impl PauseGate {
    fn lock(&self) -> MutexGuard<'_, GateState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The run stage starts the vCPUs `indices`: pausing is possible from now on, and waits
    /// for each of them.
    pub(crate) fn open(&self, indices: impl IntoIterator<Item = u32>) {
        let mut s = self.lock();
        s.expected = indices.into_iter().collect();
        s.phase = Phase::Running;
    }

    /// On the vCPU thread, before its first KVM_RUN: from now on a pause kicks it.
    pub(crate) fn register(&self, index: u32) {
        // SAFETY: pthread_self has no preconditions.
        let thread = unsafe { libc::pthread_self() };
        let mut s = self.lock();
        if s.phase != Phase::Ended {
            s.threads.push((index, thread));
        }
    }

    /// The run stage is ending: no pause from now on, and parked vCPUs go on to stop. Called
    /// before any vCPU thread is joined, so that no kick reaches a joined thread.
    pub(crate) fn close(&self) {
        let mut s = self.lock();
        s.phase = Phase::Ended;
        s.paused = false;
        s.end_pause();
        s.threads.clear();
        self.requested.store(false, Ordering::Release);
        self.changed.notify_all();
    }

    /// How long the guest has been paused in all, the pause in force included: time that
    /// does not count against its `--timeout`.
    pub fn paused_for(&self) -> Duration {
        let s = self.lock();
        s.paused_before + s.paused_since.map_or(Duration::ZERO, |t| t.elapsed())
    }

    /// Whether the guest is paused (every vCPU parked or on its way to).
    pub fn is_paused(&self) -> bool {
        self.lock().paused
    }

    /// Stops every vCPU and returns once each is parked (or has ended).
    pub fn pause(&self) -> Result<(), PauseError> {
        let mut s = self.lock();
        match (s.phase, s.paused) {
            (Phase::NotStarted | Phase::Ended, _) => return Err(PauseError::NotRunning),
            (Phase::Running, true) => return Err(PauseError::AlreadyPaused),
            (Phase::Running, false) => {}
        }
        s.paused = true;
        s.paused_since = Some(Instant::now());
        self.requested.store(true, Ordering::Release);
        let deadline = Instant::now() + PAUSE_TIMEOUT;
        loop {
            if s.phase != Phase::Running {
                return Err(PauseError::NotRunning);
            }
            let waiting = s
                .expected
                .iter()
                .find(|i| !s.parked.contains(i) && !s.exited.contains(i))
                .copied();
            let Some(index) = waiting else {
                return Ok(());
            };
            let now = Instant::now();
            if now >= deadline {
                s.paused = false;
                s.end_pause();
                self.requested.store(false, Ordering::Release);
                self.changed.notify_all();
                return Err(PauseError::Timeout(index));
            }
            // Kicked again on every round: a kick that lands while the thread is between
            // its check and KVM_RUN is covered by immediate_exit, but costs little to repeat.
            for (i, t) in &s.threads {
                if !s.parked.contains(i) && !s.exited.contains(i) {
                    // SAFETY: the thread is not joined (the gate closes before any join, under
                    // this lock), so its pthread_t is valid; SIGRTMIN's handler only sets
                    // immediate_exit.
                    unsafe { libc::pthread_kill(*t, SIGRTMIN()) };
                }
            }
            let wait = (deadline - now).min(Duration::from_millis(10));
            s = self
                .changed
                .wait_timeout(s, wait)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }

    /// Lets every parked vCPU run again.
    pub fn resume(&self) -> Result<(), PauseError> {
        let mut s = self.lock();
        if !s.paused {
            return Err(PauseError::NotPaused);
        }
        s.paused = false;
        s.end_pause();
        self.requested.store(false, Ordering::Release);
        self.changed.notify_all();
        Ok(())
    }

    /// On the vCPU thread, out of KVM_RUN: parks while a pause holds, unless `stop` is set.
    pub(crate) fn park_if_paused(&self, index: u32, stop: &AtomicBool) {
        if !self.requested.load(Ordering::Acquire) {
            return;
        }
        let mut s = self.lock();
        s.parked.insert(index);
        self.changed.notify_all();
        while s.paused && !stop.load(Ordering::Acquire) {
            s = self.changed.wait(s).unwrap_or_else(|e| e.into_inner());
        }
        s.parked.remove(&index);
    }

    /// Wakes parked vCPUs to look at their stop flag.
    pub(crate) fn wake(&self) {
        let _s = self.lock();
        self.changed.notify_all();
    }

    /// On the vCPU thread, as it returns: a pause no longer waits for it.
    pub(crate) fn exited(&self, index: u32) {
        let mut s = self.lock();
        s.exited.insert(index);
        self.changed.notify_all();
    }
}
