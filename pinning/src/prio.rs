//! Helper threads yield to other work: they run at nice 19. While the calling thread waits
//! for them it lends its own nice value to one unfinished helper at a time, so the job's
//! tail is not starved by busy neighbours (measured here: nice-19 helpers next to two busy
//! nice-0 processes drop from 1.9 to 0.04 GiB/s). Lending needs CAP_SYS_NICE or an
//! RLIMIT_NICE that allows the caller's value; without it the job says so once and goes on.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Condvar, Mutex};

use serde::Serialize;

use crate::sys;

/// Nice value of helper threads: the lowest priority, so pinning never crowds out the guest
/// or other tenants.
pub(crate) const HELPER_NICE: i32 = 19;

/// What happened to priority lending during a job.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Lending {
    /// No helpers, or the caller itself runs at nice 19.
    NotNeeded,
    /// The caller's nice value was lent to this many helpers in turn.
    Lent { helpers: usize },
    /// The system refused; helpers stayed at nice 19.
    NotPermitted { reason: String },
}

/// Lowers the calling (helper) thread to nice 19. Raising one's own nice value is always
/// allowed; failure is logged and ignored, the job is still correct.
pub(crate) fn become_background() {
    if let Err(e) = sys::set_thread_nice(0, HELPER_NICE) {
        tracing::debug!("helper could not lower its priority: {e}");
    }
}

#[derive(Clone, Copy, Default)]
struct Helper {
    tid: Option<i32>,
    done: bool,
}

#[derive(Default)]
struct Board {
    helpers: Vec<Helper>,
    started: bool,
}

/// Where helpers announce themselves and their end, and wait for the start signal.
pub(crate) struct HelperBoard {
    state: Mutex<Board>,
    changed: Condvar,
}

/// Logged once per process, not once per job: a VMM with many devices runs many jobs.
static REFUSAL_LOGGED: AtomicBool = AtomicBool::new(false);

impl HelperBoard {
    pub(crate) fn new(helpers: usize) -> Self {
        Self {
            state: Mutex::new(Board {
                helpers: vec![Helper::default(); helpers],
                started: false,
            }),
            changed: Condvar::new(),
        }
    }

    pub(crate) fn register(&self, index: usize) {
        self.state.lock().unwrap().helpers[index].tid = Some(sys::gettid());
    }

    /// Parks a helper until every helper exists.
    pub(crate) fn wait_for_start(&self) {
        let mut state = self.state.lock().unwrap();
        while !state.started {
            state = self.changed.wait(state).unwrap();
        }
    }

    pub(crate) fn start(&self) {
        self.state.lock().unwrap().started = true;
        self.changed.notify_all();
    }

    pub(crate) fn finish(&self, index: usize) {
        self.state.lock().unwrap().helpers[index].done = true;
        self.changed.notify_all();
    }

    /// Called by the caller once it has no more chunks to take: lends its nice value to one
    /// unfinished helper at a time until all are done.
    pub(crate) fn lend_until_done(&self) -> Lending {
        let caller_nice = match sys::thread_nice(0) {
            Ok(n) => n,
            Err(_) => HELPER_NICE,
        };
        let mut lent = 0;
        let mut refused: Option<String> = None;
        let mut state = self.state.lock().unwrap();
        if state.helpers.is_empty() {
            return Lending::NotNeeded;
        }
        while let Some(index) = state.helpers.iter().position(|h| !h.done) {
            if caller_nice < HELPER_NICE && refused.is_none() {
                if let Some(tid) = state.helpers[index].tid {
                    match sys::set_thread_nice(tid, caller_nice) {
                        Ok(()) => lent += 1,
                        // The helper exited between our look and the call: nothing to lend to.
                        Err(e) if e.raw_os_error() == Some(libc::ESRCH) => {}
                        Err(e) => {
                            if !REFUSAL_LOGGED.swap(true, Ordering::Relaxed) {
                                tracing::info!(
                                    "cannot lend nice {caller_nice} to pinning helpers ({e}); they stay at nice {HELPER_NICE}. Grant CAP_SYS_NICE or raise RLIMIT_NICE to let them catch up when the caller waits"
                                );
                            }
                            refused = Some(e.to_string());
                        }
                    }
                }
            }
            while !state.helpers[index].done {
                state = self.changed.wait(state).unwrap();
            }
        }
        match (refused, lent) {
            (Some(reason), _) => Lending::NotPermitted { reason },
            (None, 0) => Lending::NotNeeded,
            (None, helpers) => Lending::Lent { helpers },
        }
    }
}
