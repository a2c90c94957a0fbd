//! The crew: the calling thread plus helpers at nice 19, all pulling from one shared cursor,
//! with the caller's priority lent to the stragglers while it waits. Jobs run on it, and so
//! does teardown ([`parallel_for`]).

use std::panic::{self, AssertUnwindSafe};
use std::sync::atomic::{AtomicUsize, Ordering};

use super::work::panic_message;
use crate::prio::{self, HelperBoard, Lending};

/// Runs `f` on every item once, on up to `threads` threads: the caller and helpers at nice
/// 19 (named `{label}-N`), each pulling the next item from a shared cursor. For teardown
/// (unpinning, closing memory files, unmapping), so it cannot be cancelled, a helper that
/// cannot be started only means fewer hands, and an item whose `f` panics is logged and
/// skipped while the rest go on (an `f` that must know catches its own panics). Returns how
/// many threads took part: at most `threads`, at most one per item, 0 for no items.
pub fn parallel_for<T: Sync>(
    items: &[T],
    threads: usize,
    label: &'static str,
    f: impl Fn(&T) + Sync,
) -> usize {
    if items.is_empty() {
        return 0;
    }
    let next = AtomicUsize::new(0);
    let work = || {
        while let Some(item) = items.get(next.fetch_add(1, Ordering::Relaxed)) {
            if let Err(payload) = panic::catch_unwind(AssertUnwindSafe(|| f(item))) {
                tracing::error!(
                    "a {label} item panicked and was skipped: {}",
                    panic_message(payload.as_ref())
                );
            }
        }
    };
    let crew = crew(threads.clamp(1, items.len()), true, label, &work, || {});
    if let Some(e) = crew.spawn_error {
        tracing::warn!(
            "could not start every {label} thread ({e}); {} threads do the work",
            crew.threads
        );
    }
    crew.threads
}

/// The threads that ran a piece of work, and how the caller's priority was lent to them.
pub(super) struct Crew {
    pub(super) threads: usize,
    pub(super) lending: Lending,
    /// Set when a helper could not be started; the crew ran without it and the rest.
    pub(super) spawn_error: Option<std::io::Error>,
}

/// Runs `work` on the caller and on `threads - 1` helpers at nice 19, and returns once all
/// have returned; or, unless `caller_works`, on `threads` helpers while the caller only
/// waits (helpers that pin themselves to CPUs: the caller's own affinity must not change, as
/// threads it starts later inherit it). `work` pulls its own items, so it is the same
/// closure everywhere. If a helper cannot be started, `short_handed` runs before anyone
/// starts and the crew goes on without it.
pub(super) fn crew(
    threads: usize,
    caller_works: bool,
    name: &str,
    work: &(dyn Fn() + Sync),
    short_handed: impl FnOnce(),
) -> Crew {
    let helpers = threads.saturating_sub(usize::from(caller_works));
    let board = HelperBoard::new(helpers);
    std::thread::scope(|scope| {
        let mut spawned = 0;
        let mut spawn_error = None;
        for index in 0..helpers {
            let board = &board;
            let started = std::thread::Builder::new()
                .name(format!("{name}-{index}"))
                .spawn_scoped(scope, move || {
                    // Counted as finished even if `work` panics, or the caller waits forever.
                    let _finished = Finished { board, index };
                    crate::thread_hook::helper_started();
                    board.register(index);
                    prio::become_background();
                    board.wait_for_start();
                    work();
                });
            match started {
                Ok(_) => spawned += 1,
                Err(e) => {
                    spawn_error = Some(e);
                    break;
                }
            }
        }
        if spawn_error.is_some() {
            for index in spawned..helpers {
                board.finish(index);
            }
            short_handed();
        }
        // Every thread is created before any starts: thread stacks are mmaps, and mmap
        // contends with page faults on the mm lock, so spawning while others fault is slow.
        board.start();
        if caller_works {
            work();
        }
        Crew {
            threads: spawned + usize::from(caller_works),
            lending: board.lend_until_done(),
            spawn_error,
        }
    })
}

struct Finished<'a> {
    board: &'a HelperBoard,
    index: usize,
}

impl Drop for Finished<'_> {
    fn drop(&mut self) {
        self.board.finish(self.index);
    }
}
