//! A running VM seen and steered from another thread (the machine API's): the stage being
//! built, pinning progress, pause and resume, stop, the counters, and how the run ended.
//!
//! [`crate::builder::run`] publishes into a [`VmControl`] as it goes; the API thread only
//! reads snapshots and asks for pause, resume or stop, each under one short lock, so it stays
//! responsive while the VM pins its RAM or runs.

use std::collections::BTreeMap;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use devices::counters::DeviceCounters;
use devices::exit::StopHandle;
use devices::ExitReason;
use pinning::pinner::PinStats;
use pinning::{CancelToken, ProgressSink};
use serde::Serialize;

use crate::vstate::pause::{PauseError, PauseGate};

/// A VM's state, in Cloud Hypervisor's names.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub enum VmState {
    /// Configured, not started (only `vmm serve` has it).
    Created,
    /// Being built or running.
    Running,
    Paused,
    /// Ended and torn down.
    Shutdown,
}

impl VmState {
    /// The name vm.info gives (Cloud Hypervisor's).
    pub fn name(self) -> &'static str {
        match self {
            VmState::Created => "Created",
            VmState::Running => "Running",
            VmState::Paused => "Paused",
            VmState::Shutdown => "Shutdown",
        }
    }
}

/// Pinning progress, for `vm.info`'s `vmm.progress`.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct PinProgress {
    pub bytes_done: u64,
    pub bytes_total: u64,
    pub bytes_per_s: f64,
    /// None until a rate is known.
    pub eta_s: Option<f64>,
}

/// `vm.info`'s `vmm` object.
#[derive(Clone, Debug, Default, Serialize)]
pub struct VmmInfo {
    /// The stage being run (the timeline's names), `exit` for teardown; none once ended.
    pub phase: Option<&'static str>,
    pub progress: Option<PinProgress>,
    pub exit_status: Option<i32>,
    pub outcome: Option<String>,
    pub error: Option<String>,
    /// The report `--report` writes, once the run ended.
    pub report: Option<serde_json::Value>,
}

/// `vm.info`'s body: Cloud Hypervisor's VmInfo (`device_tree` aside), with vmm's own `vmm`
/// object; `vmm run --api-socket` and `vmm serve` both answer with it.
#[derive(Serialize)]
pub struct VmInfo<'a, C: Serialize> {
    pub config: &'a C,
    pub state: VmState,
    pub memory_actual_size: u64,
    pub vmm: VmmInfo,
}

impl From<Finished> for VmmInfo {
    /// A VM that ended: no stage, no progress, how it ended.
    fn from(f: Finished) -> Self {
        VmmInfo {
            phase: None,
            progress: None,
            exit_status: Some(f.exit_status),
            outcome: f.outcome,
            error: f.error,
            report: f.report,
        }
    }
}

/// How a run ended, as [`VmControl::finish`] is told.
#[derive(Clone, Debug, Default)]
pub struct Finished {
    /// The process exit status the run calls for.
    pub exit_status: i32,
    /// Why the guest stopped (`guest exited with status 0`), when it ran.
    pub outcome: Option<String>,
    /// Why the VM could not be built or run, when it could not.
    pub error: Option<String>,
    pub report: Option<serde_json::Value>,
}

/// Why a request to the VM was refused (the API answers 409).
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ControlError {
    #[error("the VM has shut down; there is nothing to {0}")]
    Ended(&'static str),
    #[error("the VM is still being built (stage {stage}); {what} it once it runs")]
    NotYetRunning {
        stage: &'static str,
        what: &'static str,
    },
    #[error(transparent)]
    Pause(#[from] PauseError),
}

#[derive(Default)]
struct Inner {
    phase: Option<&'static str>,
    stop: Option<StopHandle>,
    cancel: Option<CancelToken>,
    /// A stop asked for before there was a VM to stop.
    stop_asked: bool,
    pause: Option<Arc<PauseGate>>,
    pin: Option<PinStats>,
    devices: Vec<(String, Arc<DeviceCounters>)>,
    finished: Option<Finished>,
}

/// The one place a running VM is seen from outside its own threads.
#[derive(Default)]
pub struct VmControl {
    inner: Mutex<Inner>,
    ended: Condvar,
    progress: Arc<ProgressSink>,
}

impl VmControl {
    pub fn new() -> Arc<Self> {
        Arc::default()
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    // --- published by the builder ---

    /// The stage `name` begins.
    pub fn set_phase(&self, name: &'static str) {
        self.lock().phase = Some(name);
    }

    /// Where the pinner counts its progress.
    pub fn progress_sink(&self) -> Arc<ProgressSink> {
        self.progress.clone()
    }

    /// The VM exists: how to stop it, and the token that cancels its pinning.
    pub fn set_stop(&self, stop: StopHandle, cancel: CancelToken) {
        let mut s = self.lock();
        if s.stop_asked {
            cancel.cancel();
            stop.request(ExitReason::ShutdownRequested);
        }
        s.stop = Some(stop);
        s.cancel = Some(cancel);
    }

    /// The vCPUs are about to run under `gate`.
    pub fn set_pause(&self, gate: Arc<PauseGate>) {
        self.lock().pause = Some(gate);
    }

    pub fn set_pin_stats(&self, stats: PinStats) {
        self.lock().pin = Some(stats);
    }

    /// The passthrough devices, by the names the report gives them, count into these.
    pub fn set_devices(&self, devices: Vec<(String, Arc<DeviceCounters>)>) {
        self.lock().devices = devices;
    }

    /// The run ended and the VM is torn down: state Shutdown from now on.
    pub fn finish(&self, finished: Finished) {
        let mut s = self.lock();
        s.phase = None;
        s.pause = None;
        s.finished = Some(finished);
        self.ended.notify_all();
    }

    // --- asked by the API ---

    pub fn state(&self) -> VmState {
        let s = self.lock();
        if s.finished.is_some() {
            VmState::Shutdown
        } else if s.pause.as_ref().is_some_and(|p| p.is_paused()) {
            VmState::Paused
        } else {
            VmState::Running
        }
    }

    /// `vm.info`'s `vmm` object now.
    pub fn info(&self) -> VmmInfo {
        let s = self.lock();
        if let Some(f) = &s.finished {
            return f.clone().into();
        }
        let progress = (s.phase == Some("pin"))
            .then(|| self.progress.read())
            .flatten()
            .map(|r| {
                let secs = r.elapsed.as_secs_f64();
                let rate = if secs > 0.0 {
                    r.bytes_done as f64 / secs
                } else {
                    0.0
                };
                PinProgress {
                    bytes_done: r.bytes_done,
                    bytes_total: r.bytes_total,
                    bytes_per_s: rate,
                    eta_s: (rate > 0.0)
                        .then(|| r.bytes_total.saturating_sub(r.bytes_done) as f64 / rate),
                }
            });
        VmmInfo {
            phase: s.phase,
            progress,
            ..VmmInfo::default()
        }
    }

    /// `vm.counters`: the pinning figures and each device's counters, by name.
    pub fn counters(&self) -> BTreeMap<String, BTreeMap<&'static str, u64>> {
        let s = self.lock();
        let mut all = BTreeMap::new();
        if let Some(p) = &s.pin {
            all.insert(
                "pinning".to_string(),
                BTreeMap::from([
                    ("bytes", p.bytes),
                    ("threads", p.threads as u64),
                    ("chunks", p.chunks),
                    ("ms", p.elapsed_ms.round() as u64),
                ]),
            );
        }
        for (name, c) in &s.devices {
            all.insert(name.clone(), BTreeMap::from(c.snapshot()));
        }
        all
    }

    /// Parks every vCPU; refused unless the guest runs and is not paused.
    pub fn pause(&self) -> Result<(), ControlError> {
        self.gate("pause")?.pause().map_err(Into::into)
    }

    /// Lets the vCPUs run again; refused unless paused.
    pub fn resume(&self) -> Result<(), ControlError> {
        self.gate("resume")?.resume().map_err(Into::into)
    }

    fn gate(&self, what: &'static str) -> Result<Arc<PauseGate>, ControlError> {
        let s = self.lock();
        match (&s.finished, &s.pause) {
            (Some(_), _) => Err(ControlError::Ended(what)),
            (None, Some(g)) => Ok(g.clone()),
            (None, None) => Err(ControlError::NotYetRunning {
                stage: s.phase.unwrap_or("start"),
                what,
            }),
        }
    }

    /// Asks the VM to stop, whatever stage it is in: its pinning is cancelled, and a guest
    /// stops as `ExitReason::ShutdownRequested` (exit status 0). Refused once it ended.
    pub fn stop(&self) -> Result<(), ControlError> {
        let mut s = self.lock();
        if s.finished.is_some() {
            return Err(ControlError::Ended("shut down"));
        }
        s.stop_asked = true;
        if let Some(c) = &s.cancel {
            c.cancel();
        }
        if let Some(h) = &s.stop {
            h.request(ExitReason::ShutdownRequested);
        }
        Ok(())
    }

    /// Waits until the run ended and the VM is torn down, at most `timeout`; true if it has.
    pub fn wait_ended(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        let mut s = self.lock();
        while s.finished.is_none() {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            s = self
                .ended
                .wait_timeout(s, left)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        true
    }
}

#[cfg(test)]
#[path = "control_tests.rs"]
mod tests;
