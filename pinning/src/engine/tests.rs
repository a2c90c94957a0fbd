//! Engine properties: coverage, undo, first error, cancellation, thread-count independence.

use std::ops::Range;
use std::sync::atomic::{AtomicI64, AtomicUsize, Ordering};
use std::sync::Mutex;

use proptest::prelude::*;

use super::plan::SpecError;
use super::run::Completed;
use super::*;
use crate::cancel::{CancelReason, CancelToken};

/// Records, per `unit` bytes, how often it was run and undone. A unit's count is positive
/// after `run`, back to zero after `undo`, and negative if something undid work never done.
struct Ledger {
    start: u64,
    unit: u64,
    counts: Vec<AtomicI64>,
    runs: AtomicUsize,
    fail_at: Option<u64>,
    /// Panic (instead of failing) in the chunk that holds this position, after doing the
    /// first half of it.
    panic_at: Option<u64>,
    /// Panic in every chunk, after doing all of it.
    panic_everywhere: bool,
    /// The units each panicked chunk had done, by its start, for `undo_panicked`.
    half_done: Mutex<std::collections::HashMap<u64, Range<usize>>>,
    /// The undo of the chunk that holds this position fails, undoing nothing.
    undo_fails_at: Option<u64>,
    cancel_after: Option<(usize, CancelToken)>,
    undone_order: Mutex<Vec<u64>>,
}

impl Ledger {
    fn new(spec: &JobSpec, unit: u64) -> Self {
        let units = spec.size.div_ceil(unit) as usize;
        Self {
            start: spec.start,
            unit,
            counts: (0..units).map(|_| AtomicI64::new(0)).collect(),
            runs: AtomicUsize::new(0),
            fail_at: None,
            panic_at: None,
            panic_everywhere: false,
            half_done: Mutex::default(),
            undo_fails_at: None,
            cancel_after: None,
            undone_order: Mutex::new(Vec::new()),
        }
    }

    fn units(&self, chunk: &Range<u64>) -> Range<usize> {
        let first = ((chunk.start - self.start) / self.unit) as usize;
        let last = (chunk.end - self.start).div_ceil(self.unit) as usize;
        first..last
    }

    fn snapshot(&self) -> Vec<i64> {
        self.counts
            .iter()
            .map(|c| c.load(Ordering::SeqCst))
            .collect()
    }
}

impl ChunkWork for Ledger {
    type Error = String;

    fn run(&self, chunk: Range<u64>) -> Result<(), String> {
        let n = self.runs.fetch_add(1, Ordering::SeqCst);
        if let Some((after, token)) = &self.cancel_after {
            if n + 1 >= *after {
                token.cancel();
            }
        }
        if self.fail_at.is_some_and(|at| chunk.contains(&at)) {
            // Partial work, then self-undo, as the contract asks.
            return Err(format!("injected at {:#x}", chunk.start));
        }
        let units = self.units(&chunk);
        let (panics, done) = if self.panic_everywhere {
            (true, units.clone())
        } else if self.panic_at.is_some_and(|at| chunk.contains(&at)) {
            (true, units.start..units.start + units.len() / 2)
        } else {
            (false, units)
        };
        for u in done.clone() {
            self.counts[u].fetch_add(1, Ordering::SeqCst);
        }
        if panics {
            self.half_done.lock().unwrap().insert(chunk.start, done);
            panic!("injected panic at {:#x}", chunk.start);
        }
        Ok(())
    }

    fn undo_panicked(&self, chunk: Range<u64>) -> Result<(), String> {
        self.undone_order.lock().unwrap().push(chunk.start);
        let done = self.half_done.lock().unwrap().remove(&chunk.start);
        for u in done.expect("only a chunk that panicked is undone so") {
            self.counts[u].fetch_sub(1, Ordering::SeqCst);
        }
        Ok(())
    }

    fn undo(&self, chunk: Range<u64>) -> Result<(), String> {
        self.undone_order.lock().unwrap().push(chunk.start);
        if self.undo_fails_at.is_some_and(|at| chunk.contains(&at)) {
            return Err(format!("undo refused at {:#x}", chunk.start));
        }
        for u in self.units(&chunk) {
            self.counts[u].fetch_sub(1, Ordering::SeqCst);
        }
        Ok(())
    }
}

fn spec(size_units: u64, align: u64, min_chunk_units: u64, max_threads: usize) -> JobSpec {
    JobSpec {
        start: 16 * align,
        size: size_units * 4096,
        align,
        min_chunk: min_chunk_units * 4096,
        max_threads,
        cuts: Vec::new(),
    }
}

/// Caps that leave the thread count to the user's request and the job alone.
fn requested(threads: usize) -> ThreadCaps {
    ThreadCaps {
        requested: Some(threads),
        cgroup: None,
        affinity: usize::MAX,
        online: usize::MAX,
    }
}

fn run(
    spec: &JobSpec,
    threads: usize,
    work: &Ledger,
    cancel: &CancelToken,
) -> Result<Completed, JobError<String>> {
    let plan = spec.plan(&requested(threads));
    run_job(spec, &plan, work, cancel)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn every_byte_is_covered_exactly_once(
        size in 1u64..600, align_shift in 0u32..4, min_chunk in 1u64..64, threads in 1usize..9,
    ) {
        let align = 4096u64 << align_shift;
        let spec = spec(size, align, min_chunk, 64);
        let work = Ledger::new(&spec, 4096);
        let done = run(&spec, threads, &work, &CancelToken::new()).unwrap();
        prop_assert!(work.snapshot().iter().all(|&c| c == 1));
        // Completed chunks tile the range in order, and every cut falls on a page boundary.
        let mut at = spec.start;
        for c in &done.chunks {
            prop_assert_eq!(c.start, at);
            prop_assert_eq!(c.start % align, 0);
            at = c.end;
        }
        prop_assert_eq!(at, spec.start + spec.size);
        prop_assert_eq!(done.stats.bytes, spec.size);
    }

    #[test]
    fn a_failure_anywhere_undoes_exactly_the_completed_work(
        size in 1u64..600, min_chunk in 1u64..32, threads in 1usize..9, fail_frac in 0.0f64..1.0,
    ) {
        let spec = spec(size, 4096, min_chunk, 64);
        let mut work = Ledger::new(&spec, 4096);
        let fail_at = spec.start + ((spec.size as f64 * fail_frac) as u64).min(spec.size - 1);
        work.fail_at = Some(fail_at);
        let err = run(&spec, threads, &work, &CancelToken::new()).unwrap_err();
        match err {
            JobError::Failed { chunk, undone, .. } => {
                prop_assert!(chunk.contains(&fail_at));
                let order = work.undone_order.lock().unwrap().clone();
                prop_assert_eq!(undone.chunks as usize, order.len());
                prop_assert!(order.windows(2).all(|w| w[0] < w[1]), "undo not in address order");
            }
            other => prop_assert!(false, "unexpected {other:?}"),
        }
        // Zero everywhere: everything done was undone, nothing undone twice or never done.
        prop_assert!(work.snapshot().iter().all(|&c| c == 0));
    }

    #[test]
    fn the_result_does_not_depend_on_the_thread_count(
        size in 1u64..400, min_chunk in 1u64..16,
    ) {
        let spec = spec(size, 4096, min_chunk, 64);
        let mut reference = None;
        for threads in [1, 2, 3, 8] {
            let work = Ledger::new(&spec, 4096);
            let done = run(&spec, threads, &work, &CancelToken::new()).unwrap();
            let covered: u64 = done.chunks.iter().map(|c| c.end - c.start).sum();
            let state = (work.snapshot(), covered);
            match &reference {
                None => reference = Some(state),
                Some(r) => prop_assert_eq!(r, &state),
            }
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(32))]

    /// Without the catch, the panic would leave the scope (re-raised by `thread::scope`)
    /// before any undo, and this test would die of it.
    #[test]
    fn a_panic_on_any_thread_is_the_error_and_the_completed_work_is_undone(
        size in 2u64..600, min_chunk in 1u64..32, threads in 1usize..9, at_frac in 0.0f64..1.0,
    ) {
        let spec = spec(size, 4096, min_chunk, 64);
        let mut work = Ledger::new(&spec, 4096);
        let panic_at = spec.start + ((spec.size as f64 * at_frac) as u64).min(spec.size - 1);
        work.panic_at = Some(panic_at);
        let err = run(&spec, threads, &work, &CancelToken::new()).unwrap_err();
        match &err {
            JobError::Panicked { chunk, message, undone } => {
                prop_assert!(chunk.contains(&panic_at));
                prop_assert_eq!(message, &format!("injected panic at {:#x}", chunk.start));
                prop_assert!(undone.is_clean());
                let order = work.undone_order.lock().unwrap().clone();
                prop_assert_eq!(undone.chunks as usize, order.len());
                prop_assert_eq!(undone.panicked, 1);
                prop_assert_eq!(order.last(), Some(&chunk.start), "the panicked chunk last");
            }
            other => prop_assert!(false, "unexpected {other:?}"),
        }
        prop_assert!(err.to_string().contains("nothing is left pinned"), "{}", err);
        prop_assert!(work.snapshot().iter().all(|&c| c == 0));
    }
}

/// Every chunk that panicked is undone, not only the first: two threads can each be in a
/// chunk when the first panic stops the job.
#[test]
fn every_chunk_that_panicked_is_undone_as_far_as_it_got() {
    let spec = spec(256, 4096, 4, 64);
    for threads in [1, 4, 8] {
        let mut work = Ledger::new(&spec, 4096);
        work.panic_everywhere = true;
        let err = run(&spec, threads, &work, &CancelToken::new()).unwrap_err();
        let JobError::Panicked { undone, .. } = &err else {
            panic!("unexpected {err:?}");
        };
        let panics = work.runs.load(Ordering::SeqCst) as u64;
        assert_eq!((undone.chunks, undone.panicked), (panics, panics), "{err}");
        assert!(work.snapshot().iter().all(|&c| c == 0), "{err}");
        assert!(
            err.to_string().contains(&format!(
                "{panics} of them as far as the panicking work had got), so nothing is left pinned"
            )),
            "{err}"
        );
    }
}

#[test]
fn an_undo_that_fails_is_counted_and_every_other_chunk_is_still_undone() {
    let spec = spec(64, 4096, 4, 64);
    let mut work = Ledger::new(&spec, 4096);
    // One thread: four chunks of 16 units, in order. The job fails in the last, and the
    // undo of the second fails.
    work.fail_at = Some(spec.start + 63 * 4096);
    work.undo_fails_at = Some(spec.start + 20 * 4096);
    let err = run(&spec, 1, &work, &CancelToken::new()).unwrap_err();
    let JobError::Failed { undone, .. } = &err else {
        panic!("unexpected {err:?}");
    };
    assert_eq!((undone.chunks, undone.bytes), (3, 3 * 16 * 4096));
    assert_eq!((undone.failed, undone.failed_bytes), (1, 16 * 4096));
    let text = err.to_string();
    assert!(!text.contains("nothing is left pinned"), "{text}");
    assert!(
        text.contains("1 undo calls failed (the first: undo refused at")
            && text.contains("up to 65536 bytes may remain mapped or locked"),
        "{text}"
    );
    // The chunk whose undo failed is still done; every other one is undone.
    let counts = work.snapshot();
    assert!(counts[16..32].iter().all(|&c| c == 1));
    assert!(counts[..16].iter().chain(&counts[32..]).all(|&c| c == 0));
}

#[test]
fn a_panicking_undo_is_a_failure_and_the_rest_goes_on() {
    struct PanickyUndo(AtomicUsize);
    impl ChunkWork for PanickyUndo {
        type Error = String;
        fn run(&self, chunk: Range<u64>) -> Result<(), String> {
            if chunk.start == 0 {
                return Ok(());
            }
            Err("stop".into())
        }
        fn undo(&self, _chunk: Range<u64>) -> Result<(), String> {
            self.0.fetch_add(1, Ordering::SeqCst);
            panic!("undo blew up");
        }
        fn undo_panicked(&self, _chunk: Range<u64>) -> Result<(), String> {
            unreachable!("nothing panics in run")
        }
    }
    let job = JobSpec {
        start: 0,
        ..spec(8, 4096, 1, 64)
    };
    let work = PanickyUndo(AtomicUsize::new(0));
    let err = run_job(&job, &job.plan(&requested(1)), &work, &CancelToken::new()).unwrap_err();
    let JobError::Failed { undone, .. } = err else {
        panic!("unexpected {err:?}");
    };
    assert_eq!((undone.chunks, undone.failed), (1, 1));
    assert_eq!(
        undone.first_failure.as_deref(),
        Some("the undo panicked: undo blew up")
    );
}

#[test]
fn parallel_for_goes_on_past_a_panicking_item() {
    let done: Vec<AtomicUsize> = (0..20).map(|_| AtomicUsize::new(0)).collect();
    parallel_for(&done, 3, "test", |c| {
        c.fetch_add(1, Ordering::SeqCst);
        if std::ptr::eq(c, &done[7]) {
            panic!("item 7");
        }
    });
    assert!(done.iter().all(|c| c.load(Ordering::SeqCst) == 1));
}

#[test]
fn cancellation_stops_new_chunks_and_undoes_everything() {
    let spec = spec(1024, 4096, 1, 64);
    let token = CancelToken::new();
    let mut work = Ledger::new(&spec, 4096);
    work.cancel_after = Some((5, token.clone()));
    let err = run(&spec, 4, &work, &token).unwrap_err();
    let chunks = spec.plan(&requested(4)).ranges.len();
    match err {
        JobError::Cancelled { reason, undone } => {
            assert_eq!(reason, CancelReason::Requested);
            // Cancelled mid-job: the five chunks run before the cancel, and any in flight
            // with them, are undone; the rest were never started.
            let ran = work.runs.load(Ordering::SeqCst) as u64;
            assert!(
                undone.chunks >= 5 && undone.chunks < chunks as u64,
                "{undone}"
            );
            assert_eq!(undone.chunks, ran, "{undone}");
        }
        other => panic!("unexpected {other:?}"),
    }
    assert!(work.snapshot().iter().all(|&c| c == 0));
    // Chunks stop being handed out soon after the cancel (at most one in flight per thread).
    assert!(work.runs.load(Ordering::SeqCst) < 5 + 4);
}

#[test]
fn plan_takes_the_tightest_cap_and_names_it() {
    let job = JobSpec {
        start: 0,
        size: 4 * crate::GIB,
        align: 4096,
        min_chunk: DEFAULT_MIN_CHUNK,
        max_threads: 64,
        cuts: Vec::new(),
    };
    let caps = |requested, cgroup, affinity, online| ThreadCaps {
        requested,
        cgroup,
        affinity,
        online,
    };
    let p = job.plan(&caps(None, None, 2, 2));
    assert_eq!((p.threads, p.decided_by), (2, DecidedBy::Affinity));
    let p = job.plan(&caps(None, None, 1, 2));
    assert_eq!((p.threads, p.decided_by), (1, DecidedBy::Affinity));
    let p = job.plan(&caps(None, Some(1), 2, 2));
    assert_eq!((p.threads, p.decided_by), (1, DecidedBy::Cgroup));
    let p = job.plan(&caps(Some(1), Some(1), 2, 2));
    assert_eq!((p.threads, p.decided_by), (1, DecidedBy::Requested));
    let p = job.plan(&caps(None, None, 16, 4));
    assert_eq!((p.threads, p.decided_by), (4, DecidedBy::Online));
    // 4 GiB / 128 MiB = 32 chunks at most.
    let p = job.plan(&caps(None, None, 64, 64));
    assert_eq!((p.threads, p.decided_by), (32, DecidedBy::MinChunk));
    // Chunk = max(size / (threads * 4), min_chunk): 4 GiB / 8 = 512 MiB.
    let p = job.plan(&caps(None, None, 2, 2));
    assert_eq!(p.chunk_size, 512 * crate::MIB);
    assert_eq!(p.chunks, 8);
    let serial = JobSpec {
        max_threads: 1,
        ..job
    };
    let p = serial.plan(&caps(None, None, 2, 2));
    assert_eq!((p.threads, p.decided_by), (1, DecidedBy::MaxThreads));
}

#[test]
fn huge_pages_are_never_split() {
    let job = JobSpec {
        start: 0,
        size: 10 * crate::GIB,
        align: crate::GIB,
        min_chunk: DEFAULT_MIN_CHUNK,
        max_threads: 64,
        cuts: Vec::new(),
    };
    let p = job.plan(&requested(16));
    assert_eq!(p.chunk_size % crate::GIB, 0);
}

#[test]
fn bad_specs_are_refused_before_any_work() {
    let work_spec = spec(10, 4096, 1, 4);
    let work = Ledger::new(&work_spec, 4096);
    let mut bad = work_spec.clone();
    bad.align = 3000;
    assert!(matches!(
        run(&bad, 1, &work, &CancelToken::new()),
        Err(JobError::Spec(SpecError::Align(3000)))
    ));
    let mut bad = work_spec.clone();
    bad.start += 1;
    assert!(matches!(
        run(&bad, 1, &work, &CancelToken::new()),
        Err(JobError::Spec(SpecError::Start { .. }))
    ));
    assert_eq!(work.runs.load(Ordering::SeqCst), 0);
}

#[test]
fn helpers_run_at_nice_19_and_keep_the_callers_affinity() {
    struct Probe {
        seen: Mutex<Vec<(i32, i32, Vec<usize>)>>,
    }
    impl ChunkWork for Probe {
        type Error = String;
        fn run(&self, _chunk: Range<u64>) -> Result<(), String> {
            let tid = crate::sys::gettid();
            let nice = crate::sys::thread_nice(0).unwrap();
            let cpus = crate::sys::affinity_cpus().unwrap();
            self.seen.lock().unwrap().push((tid, nice, cpus));
            std::thread::sleep(std::time::Duration::from_millis(5));
            Ok(())
        }
        fn undo(&self, _chunk: Range<u64>) -> Result<(), String> {
            Ok(())
        }
        fn undo_panicked(&self, _chunk: Range<u64>) -> Result<(), String> {
            Ok(())
        }
    }
    let caller_tid = crate::sys::gettid();
    let caller_cpus = crate::sys::affinity_cpus().unwrap();
    let job = spec(64, 4096, 1, 64);
    let probe = Probe {
        seen: Mutex::new(Vec::new()),
    };
    let plan = job.plan(&requested(3));
    run_job(&job, &plan, &probe, &CancelToken::new()).unwrap();
    let seen = probe.seen.into_inner().unwrap();
    let helpers: Vec<_> = seen.iter().filter(|(tid, ..)| *tid != caller_tid).collect();
    assert!(!helpers.is_empty(), "no helper ran a chunk");
    for (_, nice, cpus) in helpers {
        // A helper lent the caller's priority may briefly show the caller's nice.
        let caller_nice = crate::sys::thread_nice(0).unwrap();
        assert!(*nice == crate::prio::HELPER_NICE || *nice == caller_nice);
        assert_eq!(
            cpus, &caller_cpus,
            "a helper's affinity differs from the caller's"
        );
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn chunks_never_cross_a_cut_and_cover_every_byte_once(
        size in 1u64..600,
        align_shift in 0u32..4,
        min_chunk in 1u64..64,
        threads in 1usize..9,
        cut_units in proptest::collection::vec(1u64..600, 0..8),
    ) {
        let align = 4096u64 << align_shift;
        let mut spec = spec(size, align, min_chunk, 64);
        let mut units: Vec<u64> = cut_units.into_iter().filter(|&u| u < size).collect();
        units.sort_unstable();
        units.dedup();
        spec.cuts = units.iter().map(|u| spec.start + u * 4096).collect();
        let plan = spec.plan(&requested(threads));
        let work = Ledger::new(&spec, 4096);
        let done = run_job(&spec, &plan, &work, &CancelToken::new()).unwrap();
        prop_assert!(work.snapshot().iter().all(|&c| c == 1));
        prop_assert_eq!(done.chunks.len() as u64, plan.chunks);
        let mut at = spec.start;
        for c in &done.chunks {
            prop_assert_eq!(c.start, at);
            prop_assert!(c.end - c.start <= plan.chunk_size);
            prop_assert!(
                !spec.cuts.iter().any(|&cut| c.start < cut && cut < c.end),
                "chunk {:x?} crosses a cut of {:x?}", c, spec.cuts
            );
            // Each segment is cut from its own start, so its pages stay whole.
            let segment = spec.cuts.iter().copied().filter(|&cut| cut <= c.start).max();
            let segment = segment.unwrap_or(spec.start);
            prop_assert_eq!((c.start - segment) % plan.chunk_size, 0);
            at = c.end;
        }
        prop_assert_eq!(at, spec.start + spec.size);
        for cut in &spec.cuts {
            prop_assert!(done.chunks.iter().any(|c| c.end == *cut), "no chunk ends at {cut:#x}");
        }
    }

    #[test]
    fn parallel_for_runs_every_item_exactly_once(len in 0usize..40, threads in 1usize..9) {
        let counts: Vec<AtomicUsize> = (0..len).map(|_| AtomicUsize::new(0)).collect();
        let used = parallel_for(&counts, threads, "test", |c| {
            c.fetch_add(1, Ordering::SeqCst);
        });
        prop_assert!(counts.iter().all(|c| c.load(Ordering::SeqCst) == 1));
        prop_assert_eq!(used, threads.min(len));
    }
}

#[test]
fn each_segment_is_cut_from_its_own_start() {
    let gib = crate::GIB;
    let mut job = JobSpec {
        start: 0,
        size: 8 * gib,
        align: 4096,
        min_chunk: DEFAULT_MIN_CHUNK,
        max_threads: 64,
        cuts: (1..8).map(|i| i * gib).collect(),
    };
    // One thread on 8 GiB: 2 GiB chunks, but 1 GiB files, so eight chunks of 1 GiB.
    let p = job.plan(&requested(1));
    assert_eq!((p.chunk_size, p.chunks), (2 * gib, 8));
    assert!(p.ranges.iter().all(|c| c.end - c.start == gib));
    job.size = 4 * gib;
    job.cuts = vec![gib + 4096];
    let p = job.plan(&requested(1));
    let starts: Vec<u64> = p.ranges.iter().map(|c| c.start).collect();
    assert_eq!(p.chunk_size, gib);
    assert_eq!(starts, [0, gib, gib + 4096, 2 * gib + 4096, 3 * gib + 4096]);
    assert_eq!(p.chunks, 5);
}

#[test]
fn cuts_out_of_order_or_outside_the_job_are_refused() {
    let job = spec(64, 4096, 1, 4);
    let work = Ledger::new(&job, 4096);
    let (start, end) = (job.start, job.start + job.size);
    for cuts in [
        vec![start],
        vec![end],
        vec![end + 4096],
        vec![start + 8192, start + 4096],
        vec![start + 4096, start + 4096],
    ] {
        let bad = JobSpec {
            cuts: cuts.clone(),
            ..job.clone()
        };
        assert!(
            matches!(
                run(&bad, 2, &work, &CancelToken::new()),
                Err(JobError::Spec(SpecError::Cut { .. }))
            ),
            "{cuts:x?} was accepted"
        );
    }
    assert_eq!(work.runs.load(Ordering::SeqCst), 0);
}

#[test]
fn parallel_for_helpers_run_at_nice_19_beside_the_caller() {
    let caller_tid = crate::sys::gettid();
    let caller_nice = crate::sys::thread_nice(0).unwrap();
    let seen = Mutex::new(Vec::new());
    let items: Vec<u32> = (0..24).collect();
    let used = parallel_for(&items, 3, "test", |_| {
        let tid = crate::sys::gettid();
        seen.lock()
            .unwrap()
            .push((tid, crate::sys::thread_nice(0).unwrap()));
        std::thread::sleep(std::time::Duration::from_millis(5));
    });
    assert_eq!(used, 3);
    let seen = seen.into_inner().unwrap();
    let tids: std::collections::HashSet<i32> = seen.iter().map(|(tid, _)| *tid).collect();
    assert!(tids.len() > 1, "no helper took an item");
    assert!(tids.len() <= 3, "more threads than asked for");
    assert!(tids.contains(&caller_tid), "the caller did not work");
    for (tid, nice) in seen {
        if tid != caller_tid {
            // A helper lent the caller's priority may briefly show the caller's nice.
            assert!(nice == crate::prio::HELPER_NICE || nice == caller_nice);
        }
    }
}

#[test]
fn every_helper_runs_the_start_hook_with_its_name_before_working() {
    // The hook is process-wide: other tests' helpers may call it too, so keep only ours.
    static STARTED: Mutex<Vec<(String, i32)>> = Mutex::new(Vec::new());
    fn hook(name: &str) {
        if name.starts_with("hooktest-") {
            STARTED
                .lock()
                .unwrap()
                .push((name.to_string(), crate::sys::gettid()));
        }
    }
    crate::thread_hook::set_helper_start_hook(Some(hook));
    let items: Vec<usize> = (0..6).collect();
    let worked = Mutex::new(Vec::new());
    let used = parallel_for(&items, 3, "hooktest", |_| {
        worked.lock().unwrap().push(crate::sys::gettid());
        std::thread::sleep(std::time::Duration::from_millis(5));
    });
    crate::thread_hook::set_helper_start_hook(None);
    assert_eq!(used, 3);
    let mut started = STARTED.lock().unwrap().clone();
    started.sort();
    let names: Vec<&str> = started.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(names, ["hooktest-0", "hooktest-1"]);
    // Every thread that worked, except the caller (which starts no hook), ran the hook.
    let caller = crate::sys::gettid();
    for tid in worked.into_inner().unwrap() {
        assert!(tid == caller || started.iter().any(|(_, t)| *t == tid));
    }
}
