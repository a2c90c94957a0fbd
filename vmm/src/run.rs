//! The run loop (stage `run`): start one thread per vCPU, wait in the event loop (exit
//! eventfd, serial input) until something asks the VM to stop or the deadline passes, then
//! kick every vCPU out of KVM_RUN and join it.
//!
//! It sits above [`crate::platform`] (whose buses and event loop it runs) and [`crate::vstate`]
//! (the VM and vCPUs the platform is built on), so neither of those imports it.

use std::io;
use std::sync::Arc;
use std::time::{Duration, Instant};

use devices::{ExitNotifier, ExitReason, RawTerminal};
use event_manager::EventManager;
use pinning::{Classify, ErrorClass};

use crate::platform::{Platform, Subscriber};
use crate::seccomp::{Filters, SeccompError, VcpuGate};
use crate::vstate::pause::PauseGate;
use crate::vstate::vcpu::{self, Rip, Vcpu, VcpuContext, VcpuFault, VcpuHandle};

/// How often the boot vCPU is asked whether it sits in HLT with interrupts off. With the
/// in-kernel LAPIC such a HLT never leaves KVM, so this is the only way to notice a guest that
/// finished without writing an exit status (a panicked Linux, a `cli; hlt`).
pub const HALT_PROBE_INTERVAL: Duration = Duration::from_millis(250);
/// How long stopping waits for vCPU threads before saying so (it keeps waiting: a thread
/// cannot be abandoned while it owns the vCPU fd).
const STOP_WARN_AFTER: Duration = Duration::from_secs(5);

/// Why the run ended.
#[derive(Debug, thiserror::Error)]
pub enum VmExit {
    #[error("guest exited with status {0}")]
    GuestExit(u8),
    #[error("guest reset")]
    Reset,
    #[error("guest shut down")]
    Shutdown,
    #[error("vCPU {cpu} halted with interrupts disabled")]
    Halted { cpu: u32 },
    #[error("timed out")]
    Timeout,
    #[error("stopped by signal {0}")]
    Signal(i32),
    #[error("stopped")]
    Stopped,
    #[error("shut down on request")]
    ShutdownRequested,
    #[error(transparent)]
    Fault(VcpuFault),
    #[error("passthrough device failed")]
    DeviceFailed,
}

/// Run-loop failures of the VMM itself (not the guest).
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("starting the thread of vCPU {index} failed: {source}")]
    Spawn { index: u32, source: io::Error },
    #[error("the event loop failed: {0:?}")]
    EventLoop(event_manager::Error),
    #[error(transparent)]
    Seccomp(#[from] SeccompError),
}

impl Classify for RunError {
    fn class(&self) -> ErrorClass {
        ErrorClass::Internal
    }
}

/// Runs the guest on `vcpus` until it exits, faults, is stopped through `exit`, or `deadline`
/// passes; every vCPU thread has been joined when it returns. `pause` can pause and resume
/// the vCPUs from another thread while they run.
///
/// With `seccomp` filters, each vCPU thread installs its own before its first KVM_RUN and
/// waits until this thread has filtered every other thread and itself: from the guest's
/// first instruction on, every thread of the process is filtered.
pub fn run_until_exit(
    vcpus: Vec<Vcpu>,
    platform: &mut Platform,
    exit: &Arc<ExitNotifier>,
    deadline: Option<Instant>,
    seccomp: Option<&Arc<Filters>>,
    pause: &Arc<PauseGate>,
) -> Result<VmExit, RunError> {
    let gate = seccomp.map(|f| Arc::new(VcpuGate::new(f.clone())));
    let ctx = VcpuContext {
        pio: platform.pio.clone(),
        mmio: platform.mmio.clone(),
        exit: exit.clone(),
        seccomp: gate.clone(),
        pause: pause.clone(),
    };
    pause.open(vcpus.iter().map(Vcpu::index));
    let mut running = Vec::with_capacity(vcpus.len());
    for v in vcpus {
        let index = v.index();
        match vcpu::spawn(v, ctx.clone()) {
            Ok(h) => running.push(h),
            Err(source) => {
                if let Some(g) = &gate {
                    g.abandon();
                }
                stop_vcpus(running, pause);
                return Err(RunError::Spawn { index, source });
            }
        }
    }
    if let Some(g) = &gate {
        if let Err(e) = g.open(running.len()) {
            stop_vcpus(running, pause);
            return Err(e.into());
        }
    }
    let raw_terminal = if platform.stdin_attached {
        RawTerminal::enter().unwrap_or_else(|e| {
            tracing::warn!("cannot switch the terminal to raw input: {e}");
            None
        })
    } else {
        None
    };

    let waited = wait_for_exit(&mut platform.event_manager, exit, &running, deadline, pause);
    drop(raw_terminal);
    let results = stop_vcpus(running, pause);
    let timed_out = waited?;

    let mut faults: Vec<(u32, VcpuFault)> = results
        .into_iter()
        .filter_map(|(i, r)| r.err().map(|f| (i, f)))
        .collect();
    let exit = match exit.reason() {
        Some(ExitReason::GuestExit(s)) => VmExit::GuestExit(s),
        Some(ExitReason::Reset) => VmExit::Reset,
        Some(ExitReason::Shutdown) => VmExit::Shutdown,
        Some(ExitReason::Halted { cpu }) => VmExit::Halted { cpu },
        Some(ExitReason::Signal(n)) => VmExit::Signal(n),
        Some(ExitReason::Stop) => VmExit::Stopped,
        Some(ExitReason::ShutdownRequested) => VmExit::ShutdownRequested,
        Some(ExitReason::DeviceFailed) => VmExit::DeviceFailed,
        Some(ExitReason::VcpuFault { cpu }) => {
            let at = faults.iter().position(|(i, _)| *i == cpu);
            VmExit::Fault(match at {
                Some(at) => faults.remove(at).1,
                None => VcpuFault::Unexpected {
                    cpu,
                    exit: "fault reported but not returned".into(),
                    rip: Rip(None),
                },
            })
        }
        None if timed_out => VmExit::Timeout,
        None => VmExit::Stopped,
    };
    for (_, f) in faults {
        tracing::warn!("after the VM stopped ({exit}): {f}");
    }
    Ok(exit)
}

/// Waits until an exit reason is recorded (Ok(false)) or the deadline passes (Ok(true)).
fn wait_for_exit(
    em: &mut EventManager<Subscriber>,
    exit: &ExitNotifier,
    running: &[VcpuHandle],
    deadline: Option<Instant>,
    pause: &PauseGate,
) -> Result<bool, RunError> {
    let mut next_probe = Instant::now() + HALT_PROBE_INTERVAL;
    loop {
        if exit.reason().is_some() {
            return Ok(false);
        }
        let now = Instant::now();
        // Time paused is not the guest's: its deadline moves by it.
        let deadline = deadline.map(|d| d + pause.paused_for());
        if deadline.is_some_and(|d| now >= d) {
            return Ok(true);
        }
        if now >= next_probe {
            // A parked vCPU is not the guest halting: ask again after the resume.
            if let Some(bsp) = running.first().filter(|_| !pause.is_paused()) {
                bsp.probe_halt();
            }
            next_probe = now + HALT_PROBE_INTERVAL;
        }
        let until = deadline.map_or(next_probe, |d| d.min(next_probe));
        let wait = until.saturating_duration_since(now);
        // Round up so a sub-millisecond remainder does not spin.
        let ms = wait.as_millis().saturating_add(1).min(i32::MAX as u128) as i32;
        em.run_with_timeout(ms).map_err(RunError::EventLoop)?;
    }
}

/// Stops and joins every running vCPU; returns each thread's result.
fn stop_vcpus(
    mut running: Vec<VcpuHandle>,
    pause: &PauseGate,
) -> Vec<(u32, Result<(), VcpuFault>)> {
    // Stop flags first: a parked vCPU woken by `close` must find its flag set, or it would
    // run guest code again until its kick.
    for h in &running {
        h.request_stop();
    }
    // Before any join: from here a pause neither kicks nor waits.
    pause.close();
    let started = Instant::now();
    let mut warned = false;
    // A kick can land while a thread is outside KVM_RUN; immediate_exit covers that, but
    // kicking again every 10 ms costs little and covers any path that clears it.
    let mut rounds = 0u32;
    while running.iter().any(|h| !h.is_finished()) {
        std::thread::sleep(Duration::from_millis(1));
        rounds += 1;
        if rounds % 10 == 0 {
            for h in running.iter().filter(|h| !h.is_finished()) {
                h.request_stop();
            }
        }
        if !warned && started.elapsed() > STOP_WARN_AFTER {
            warned = true;
            tracing::warn!("vCPU threads are slow to stop; still waiting");
        }
    }
    running
        .drain(..)
        .filter_map(|mut h| {
            let i = h.index();
            h.join().map(|r| (i, r))
        })
        .collect()
}

#[cfg(test)]
#[path = "run_tests.rs"]
pub(crate) mod tests;
