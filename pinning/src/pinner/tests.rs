//! The pinner over real memory with the populate/mlock backends, over the IOMMU model with
//! the VFIO backends, and over unbacked addresses with a backend that only records.

use std::sync::{Arc, Mutex};

use super::work::POPULATE_STEP;
use super::*;
use crate::admission::AdmissionError;
use crate::backend::{BackendInfo, BackendKind};
use crate::backend::{IommufdBackend, MlockBackend, NoneBackend, PopulateBackend, Type1Backend};
use crate::class::{Classify, ErrorClass};
use crate::engine::{DecidedBy, DEFAULT_MIN_CHUNK};
use crate::limits::Memlock;
use crate::model::IommuModel;
use crate::procfs::ProcStatus;
use crate::region::{Piece, RamFile, Region};
use crate::sys::AnonMapping;
use crate::MIB;

/// Two regions with a gap in guest-physical space, like RAM below and above the MMIO hole.
fn ram(low: &AnonMapping, high: &AnonMapping) -> Arc<GuestRam> {
    let regions = vec![
        Region {
            host_addr: low.addr(),
            guest_addr: 0,
            size: low.len(),
            page_size: 4096,
            file: None,
        },
        Region {
            host_addr: high.addr(),
            guest_addr: 1 << 32,
            size: high.len(),
            page_size: 4096,
            file: None,
        },
    ];
    // SAFETY: both mappings outlive the GuestRam in every test and are only touched by the
    // backends and the IOMMU model.
    Arc::new(unsafe { GuestRam::new(regions) }.unwrap())
}

fn limits() -> Limits {
    let mut l = Limits::detect().unwrap();
    l.cgroup_memory = None;
    l
}

fn options(threads: usize) -> PinOptions {
    PinOptions {
        threads: ThreadRequest::AtMost(threads),
        min_chunk: 4 * MIB,
        progress: false,
        zones: Vec::new(),
    }
}

fn locked_now() -> u64 {
    ProcStatus::read(std::path::Path::new("/")).unwrap().locked
}

#[test]
fn type1_populates_in_parallel_then_maps_serially_covering_all_ram_exactly() {
    let (low, high) = (
        AnonMapping::new(48 * MIB).unwrap(),
        AnonMapping::new(24 * MIB).unwrap(),
    );
    let ram = ram(&low, &high);
    let model = Arc::new(IommuModel::new(65535, None));
    let backend = Arc::new(Type1Backend::new(model.clone(), 65535));
    let pinner = Pinner::new(
        backend,
        limits(),
        PinOptions {
            min_chunk: 2 * MIB,
            ..options(2)
        },
    );
    let pinned = pinner.pin(ram.clone(), &CancelToken::new()).unwrap();
    assert_eq!(model.pinned(), 72 * MIB);
    assert_eq!(
        model.max_concurrent_maps(),
        1,
        "type1 MAP_DMA must be issued serially"
    );
    // Few, large mappings: one per region here (chunks of at least 1 GiB).
    let maps = model.mappings();
    assert_eq!(maps.len(), 2);
    assert_eq!(maps[0].0, 0);
    assert_eq!(maps[1].0, 1 << 32);
    assert_eq!(
        model.translate((1 << 32) + 4096, 8),
        Some(high.addr() + 4096)
    );
    assert_eq!(pinned.stats.bytes, 72 * MIB);
    // The populate phase is the parallel one: it gets every thread the limits allow.
    let caps = limits().thread_caps(Some(2));
    let allowed = [Some(2), caps.cgroup, Some(caps.affinity), Some(caps.online)]
        .into_iter()
        .flatten()
        .min()
        .unwrap();
    let populate = pinned
        .stats
        .populate
        .as_ref()
        .expect("type1 populates first");
    assert_eq!(populate.threads, allowed);
    assert_eq!(pinned.stats.threads, allowed);
    assert_eq!(pinned.stats.map.threads, 1);
    drop(pinned);
    assert!(model.mappings().is_empty(), "drop must unmap everything");
}

#[test]
fn type1_stays_under_the_entry_limit() {
    let (low, high) = (
        AnonMapping::new(64 * MIB).unwrap(),
        AnonMapping::new(4 * MIB).unwrap(),
    );
    let ram = ram(&low, &high);
    let model = Arc::new(IommuModel::new(8, None));
    let backend = Arc::new(Type1Backend::new(model.clone(), 8));
    let pinner = Pinner::new(backend, limits(), options(2));
    let pinned = pinner.pin(ram, &CancelToken::new()).unwrap();
    assert!(model.mappings().len() <= 8);
    assert_eq!(model.pinned(), 68 * MIB);
    pinned.unpin();
    assert_eq!(model.pinned(), 0);
}

#[test]
fn iommufd_maps_chunks_in_parallel_and_a_failure_leaves_nothing_mapped() {
    let (low, high) = (
        AnonMapping::new(64 * MIB).unwrap(),
        AnonMapping::new(16 * MIB).unwrap(),
    );
    let ram = ram(&low, &high);
    let model = Arc::new(IommuModel::new(65535, None));
    let pinner = Pinner::new(
        Arc::new(IommufdBackend::new(model.clone())),
        limits(),
        options(4),
    );
    let pinned = pinner.pin(ram.clone(), &CancelToken::new()).unwrap();
    assert!(pinned.stats.map.chunks > 2);
    assert_eq!(model.pinned(), 80 * MIB);
    drop(pinned);
    assert_eq!(model.pinned(), 0);

    for fail in [0, 3, 7] {
        let model = Arc::new(IommuModel::new(65535, None).failing_call(fail));
        let pinner = Pinner::new(
            Arc::new(IommufdBackend::new(model.clone())),
            limits(),
            options(4),
        );
        let err = pinner
            .pin(ram.clone(), &CancelToken::new())
            .err()
            .expect("injected failure");
        assert_eq!(err.class(), ErrorClass::Internal);
        match err {
            PinError::Failed { source, .. } => assert_eq!(source.errno(), Some(libc::EFAULT)),
            other => panic!("unexpected {other}"),
        }
        assert!(
            model.mappings().is_empty(),
            "failure at call {fail} left mappings behind"
        );
    }
}

#[test]
fn iommu_memlock_limit_fails_cleanly() {
    let (low, high) = (
        AnonMapping::new(32 * MIB).unwrap(),
        AnonMapping::new(8 * MIB).unwrap(),
    );
    let ram = ram(&low, &high);
    let model = Arc::new(IommuModel::new(65535, Some(20 * MIB)));
    let pinner = Pinner::new(
        Arc::new(IommufdBackend::new(model.clone())),
        limits(),
        options(2),
    );
    let err = pinner.pin(ram, &CancelToken::new()).err().unwrap();
    assert!(
        matches!(&err, PinError::Failed { source, .. } if source.errno() == Some(libc::ENOMEM)),
        "{err}"
    );
    assert!(model.mappings().is_empty());
}

#[test]
fn admission_refuses_before_any_work() {
    let (low, high) = (
        AnonMapping::new(32 * MIB).unwrap(),
        AnonMapping::new(8 * MIB).unwrap(),
    );
    let ram = ram(&low, &high);
    let model = Arc::new(IommuModel::new(65535, None));
    let mut l = limits();
    l.memlock = Memlock {
        limit: Some(16 * MIB),
        locked: 0,
        cap_ipc_lock: false,
    };
    let pinner = Pinner::new(Arc::new(IommufdBackend::new(model.clone())), l, options(2));
    let err = pinner.pin(ram, &CancelToken::new()).err().unwrap();
    assert!(
        matches!(err, PinError::Admission(AdmissionError::Memlock { .. })),
        "{err}"
    );
    assert_eq!(err.class(), ErrorClass::User);
    assert!(model.mappings().is_empty());
}

#[test]
fn mlock_locks_all_ram_and_unpin_returns_vmlck() {
    let before = locked_now();
    let (low, high) = (
        AnonMapping::new(32 * MIB).unwrap(),
        AnonMapping::new(16 * MIB).unwrap(),
    );
    let ram = ram(&low, &high);
    let pinner = Pinner::new(Arc::new(MlockBackend), limits(), options(2));
    let pinned = pinner.pin(ram, &CancelToken::new()).unwrap();
    assert!(
        locked_now() >= before + 48 * MIB,
        "VmLck did not grow by the pinned size"
    );
    pinned.unpin();
    assert_eq!(locked_now(), before);
}

#[test]
fn cancelled_mlock_job_leaves_nothing_locked() {
    let before = locked_now();
    let (low, high) = (
        AnonMapping::new(32 * MIB).unwrap(),
        AnonMapping::new(16 * MIB).unwrap(),
    );
    let ram = ram(&low, &high);
    // Cancelled mid-job: two chunks locked, the rest not reached.
    let token = CancelToken::new();
    let backend = Arc::new(Faulty {
        cancel_after_map: Some((1, token.clone())),
        ..Faulty::new(Arc::new(MlockBackend))
    });
    let pinner = Pinner::new(backend, limits(), options(2));
    let err = pinner.pin(ram, &token).err().unwrap();
    assert_eq!(err.cancel_reason(), Some(CancelReason::Requested));
    assert_eq!(err.class(), ErrorClass::Internal);
    let undone = err.undone().unwrap();
    assert!(undone.chunks >= 2 && undone.bytes < 48 * MIB, "{err}");
    assert_eq!(locked_now(), before);
    // Measured by the pinner itself right after the undo, with the RAM still mapped.
    assert_eq!(undone.locked_after, Some(before));
    assert!(
        err.to_string()
            .ends_with("right after the undo, with guest RAM still mapped"),
        "{err}"
    );
}

#[test]
fn populate_and_none_report_their_plan() {
    let (low, high) = (
        AnonMapping::new(64 * MIB).unwrap(),
        AnonMapping::new(64 * MIB).unwrap(),
    );
    let ram = ram(&low, &high);
    let pinner = Pinner::new(Arc::new(PopulateBackend), limits(), options(1));
    let pinned = pinner.pin(ram.clone(), &CancelToken::new()).unwrap();
    assert_eq!(
        (pinned.stats.threads, pinned.stats.decided_by),
        (1, DecidedBy::Requested)
    );
    let pinner = Pinner::new(Arc::new(NoneBackend), limits(), options(1));
    let pinned = pinner.pin(ram, &CancelToken::new()).unwrap();
    assert_eq!(pinned.stats.backend, BackendKind::None);
}

#[test]
fn a_signal_classifies_a_cancelled_pin_as_interrupted() {
    let err = PinError::Cancelled {
        reason: CancelReason::Signal(libc::SIGTERM),
        undone: Box::default(),
    };
    assert_eq!(err.class(), ErrorClass::Interrupted(libc::SIGTERM));
    assert_eq!(err.class().exit_status(), 143);
}

/// A backend that touches no memory and records how the pinner drives it.
#[derive(Default)]
struct Recorder {
    /// Report a serial map, as type1 does.
    serial: bool,
    maps: Mutex<Vec<Piece>>,
    /// Each unmap, with the thread and nice value it ran on.
    unmaps: Mutex<Vec<(Piece, i32, i32)>>,
    /// Runs in the first unmap.
    on_first_unmap: Option<fn()>,
}

impl PinBackend for Recorder {
    fn describe(&self) -> BackendInfo {
        BackendInfo {
            populates: false,
            map_threads: self.serial.then_some(1),
            ..BackendInfo::new(BackendKind::None)
        }
    }
    fn map(&self, piece: &Piece) -> Result<(), crate::backend::BackendError> {
        self.maps.lock().unwrap().push(piece.clone());
        Ok(())
    }
    fn unmap(&self, piece: &Piece) -> Result<(), crate::backend::BackendError> {
        let first = {
            let mut unmaps = self.unmaps.lock().unwrap();
            let me = (crate::sys::gettid(), crate::sys::thread_nice(0).unwrap());
            unmaps.push((piece.clone(), me.0, me.1));
            unmaps.len() == 1
        };
        if let (true, Some(f)) = (first, self.on_first_unmap) {
            f();
        }
        // Long enough that every thread of the undo gets some chunks.
        std::thread::sleep(std::time::Duration::from_millis(2));
        Ok(())
    }
}

/// Guest RAM made of `GIB`-sized shards, like memfd-per-GiB RAM: `low` below 4 GiB, `high`
/// from 4 GiB up, at addresses nothing maps, each with a file of its own.
fn sharded_ram(low: u64, high: u64, shard: u64) -> Arc<GuestRam> {
    let guest = (0..low)
        .map(|i| i * shard)
        .chain((0..high).map(|i| (1 << 32) + i * shard));
    let regions = guest
        .enumerate()
        .map(|(i, guest_addr)| Region {
            host_addr: 0x100_0000_0000 + i as u64 * 2 * shard,
            guest_addr,
            size: shard,
            page_size: 4096,
            file: Some((RamFile::new(std::fs::File::open("/dev/null").unwrap()), 0)),
        })
        .collect();
    // SAFETY: only the Recorder backend sees these regions, and it never dereferences them.
    Arc::new(unsafe { GuestRam::new(regions) }.unwrap())
}

#[test]
fn every_chunk_lies_in_one_shard() {
    let ram = sharded_ram(3, 3, GIB);
    for threads in [1, 2, 3, 8] {
        for min_chunk in [4 * MIB, DEFAULT_MIN_CHUNK, 5 * GIB] {
            let backend = Arc::new(Recorder::default());
            let options = PinOptions {
                min_chunk,
                ..options(threads)
            };
            let pinner = Pinner::new(backend.clone(), limits(), options);
            let pinned = pinner.pin(ram.clone(), &CancelToken::new()).unwrap();
            for chunk in &pinned.chunks {
                assert_eq!(
                    ram.pieces(chunk.clone()).count(),
                    1,
                    "chunk {chunk:x?} spans shards ({threads} threads, min_chunk {min_chunk:#x})"
                );
            }
            // One map call per chunk, and together they cover every shard exactly.
            let maps = backend.maps.lock().unwrap();
            assert_eq!(maps.len(), pinned.chunks.len());
            assert_eq!(maps.iter().map(|p| p.len).sum::<u64>(), 6 * GIB);
        }
    }
}

#[test]
fn unpin_undoes_on_as_many_threads_as_the_pin_used() {
    let ram = sharded_ram(2, 2, 64 * MIB);
    let backend = Arc::new(Recorder::default());
    let pinner = Pinner::new(backend.clone(), limits(), options(4));
    let pinned = pinner.pin(ram, &CancelToken::new()).unwrap();
    let (pin_threads, chunks) = (pinned.stats.threads, pinned.chunks.len() as u64);
    let caller_tid = crate::sys::gettid();
    let caller_nice = crate::sys::thread_nice(0).unwrap();
    let unpinned = pinned.unpin();
    assert_eq!(unpinned.threads, pin_threads);
    assert_eq!(unpinned.undone.chunks, chunks);
    assert_eq!(unpinned.undone.bytes, 256 * MIB);
    assert!(unpinned.elapsed > std::time::Duration::ZERO);
    let unmaps = backend.unmaps.lock().unwrap();
    assert_eq!(unmaps.len() as u64, chunks);
    let tids: std::collections::HashSet<i32> = unmaps.iter().map(|u| u.1).collect();
    assert!(
        tids.len() <= pin_threads,
        "undo used more threads than the pin"
    );
    // Which threads got items is up to the scheduler (on a loaded host the caller can take
    // them all before a helper runs), so the crew's size is what is checked, above.
    for (_, tid, nice) in unmaps.iter() {
        if *tid != caller_tid {
            assert!(*nice == crate::prio::HELPER_NICE || *nice == caller_nice);
        }
    }
}

#[test]
fn a_serial_map_is_undone_serially() {
    let backend = Arc::new(Recorder {
        serial: true,
        ..Recorder::default()
    });
    let pinner = Pinner::new(backend.clone(), limits(), options(4));
    let sharded = sharded_ram(2, 2, 64 * MIB);
    let unpinned = pinner.pin(sharded, &CancelToken::new()).unwrap().unpin();
    assert_eq!(unpinned.threads, 1);
    let unmaps = backend.unmaps.lock().unwrap();
    assert_eq!(unmaps.len() as u64, unpinned.undone.chunks);

    // type1 itself: the populate phase ran on every thread, the undo on one.
    let (low, high) = (
        AnonMapping::new(16 * MIB).unwrap(),
        AnonMapping::new(8 * MIB).unwrap(),
    );
    let model = Arc::new(IommuModel::new(65535, None));
    let pinner = Pinner::new(
        Arc::new(Type1Backend::new(model.clone(), 65535)),
        limits(),
        options(2),
    );
    let unpinned = pinner
        .pin(ram(&low, &high), &CancelToken::new())
        .unwrap()
        .unpin();
    assert_eq!(unpinned.threads, 1);
    assert!(model.mappings().is_empty());
}

#[test]
fn a_sigint_during_teardown_does_not_stop_it() {
    let guard = crate::cancel::SignalGuard::install(None).unwrap();
    let ram = sharded_ram(2, 2, 64 * MIB);
    let backend = Arc::new(Recorder {
        on_first_unmap: Some(|| {
            // SAFETY: raise(3) with a valid signal number; the guard's handler only stores it.
            unsafe { libc::raise(libc::SIGINT) };
        }),
        ..Recorder::default()
    });
    let pinner = Pinner::new(backend.clone(), limits(), options(4));
    let pinned = pinner.pin(ram, &CancelToken::with_signals()).unwrap();
    let chunks = pinned.chunks.len() as u64;
    let unpinned = pinned.unpin();
    assert_eq!(
        crate::cancel::pending_signal(),
        Some(libc::SIGINT),
        "the signal was not raised during teardown"
    );
    drop(guard);
    assert_eq!(unpinned.undone.chunks, chunks);
    assert_eq!(backend.unmaps.lock().unwrap().len() as u64, chunks);
}

/// Collects every report, to check what the bar would be told.
#[derive(Default)]
struct Reports(Mutex<Vec<u64>>);

impl Reports {
    fn add(&self, bytes: u64) {
        self.0.lock().unwrap().push(bytes);
    }

    /// Checks that the counter ends at exactly `total` without passing it, and returns how
    /// many reports there were.
    fn check(&self, total: u64) -> usize {
        let reports = self.0.lock().unwrap();
        let mut sum = 0;
        for &r in reports.iter() {
            sum += r;
            assert!(sum <= total, "progress passed the job's size");
        }
        assert_eq!(sum, total);
        reports.len()
    }
}

#[test]
fn progress_follows_populate_steps_and_ends_at_the_job_size() {
    let (low, high) = (
        AnonMapping::new(96 * MIB).unwrap(),
        AnonMapping::new(64 * MIB).unwrap(),
    );
    let ram = ram(&low, &high);
    let size = ram.size();
    let cancel = CancelToken::new();
    for threads in [1, 3] {
        let spec = JobSpec {
            start: 0,
            size,
            align: 4096,
            min_chunk: 128 * MIB,
            max_threads: usize::MAX,
            cuts: ram.region_cuts(),
        };
        let plan = spec.plan(&limits().thread_caps(Some(threads)));
        // Chunks of 96 and 64 MiB: reports of at most a populate step each.
        assert_eq!(plan.chunks, 2);

        let reports = Reports::default();
        let work = PopulateWork {
            ram: &ram,
            cancel: &cancel,
            progress: &|bytes| reports.add(bytes),
        };
        engine::run_job(&spec, &plan, &work, &cancel).unwrap();
        assert_eq!(reports.check(size), 3);
        assert!(reports
            .0
            .lock()
            .unwrap()
            .iter()
            .all(|&r| r <= POPULATE_STEP));

        let reports = Reports::default();
        let rollbacks = Mutex::new(Undone::default());
        let work = MapWork {
            backend: &NoneBackend,
            ram: &ram,
            cancel: &cancel,
            populate: true,
            progress: &|bytes| reports.add(bytes),
            rollbacks: &rollbacks,
            panicked: Mutex::default(),
        };
        engine::run_job(&spec, &plan, &work, &cancel).unwrap();
        assert_eq!(reports.check(size), 3);

        // Without populating, each mapped piece counts once.
        let reports = Reports::default();
        let work = MapWork {
            populate: false,
            progress: &|bytes| reports.add(bytes),
            ..work
        };
        engine::run_job(&spec, &plan, &work, &cancel).unwrap();
        assert_eq!(reports.check(size), 2);
    }
}

/// Wraps a backend to inject what no real backend does on demand: a panic in the map call
/// with this index, unmaps that fail (undoing nothing), an `end` that fails.
struct Faulty {
    inner: Arc<dyn PinBackend>,
    panic_on_map: Option<usize>,
    /// The map call with this index maps, then panics.
    panic_after_map: Option<usize>,
    /// The map call with this index maps, then cancels the token: a cancel mid-job.
    cancel_after_map: Option<(usize, CancelToken)>,
    fail_unmap: bool,
    fail_end: bool,
    maps: std::sync::atomic::AtomicUsize,
    ends: std::sync::atomic::AtomicUsize,
}

impl Faulty {
    fn new(inner: Arc<dyn PinBackend>) -> Self {
        Self {
            inner,
            panic_on_map: None,
            panic_after_map: None,
            cancel_after_map: None,
            fail_unmap: false,
            fail_end: false,
            maps: Default::default(),
            ends: Default::default(),
        }
    }

    fn ends(&self) -> usize {
        self.ends.load(std::sync::atomic::Ordering::SeqCst)
    }
}

impl PinBackend for Faulty {
    fn describe(&self) -> BackendInfo {
        self.inner.describe()
    }
    fn begin(&self, ram: &GuestRam) -> Result<(), crate::backend::BackendError> {
        self.inner.begin(ram)
    }
    fn end(&self, ram: &GuestRam) -> Vec<crate::backend::BackendError> {
        self.ends.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let mut failed = self.inner.end(ram);
        if self.fail_end {
            let r = &ram.regions()[0];
            let piece = Piece {
                host_addr: r.host_addr,
                guest_addr: r.guest_addr,
                len: r.size,
                file: None,
            };
            let e = std::io::Error::from_raw_os_error(libc::ENOMEM);
            failed.push(crate::backend::BackendError::new("munlock", &piece, e));
        }
        failed
    }
    fn map(&self, piece: &Piece) -> Result<(), crate::backend::BackendError> {
        let n = self.maps.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        if self.panic_on_map == Some(n) {
            panic!("injected panic in map call {n}");
        }
        let mapped = self.inner.map(piece);
        if mapped.is_ok() && self.panic_after_map == Some(n) {
            panic!("injected panic after map call {n}");
        }
        if let Some((_, token)) = self.cancel_after_map.as_ref().filter(|(at, _)| *at == n) {
            token.cancel();
        }
        mapped
    }
    fn unmap(&self, piece: &Piece) -> Result<(), crate::backend::BackendError> {
        if self.fail_unmap {
            let e = std::io::Error::from_raw_os_error(libc::EIO);
            return Err(crate::backend::BackendError::new(
                "IOMMU_IOAS_UNMAP",
                piece,
                e,
            ));
        }
        self.inner.unmap(piece)
    }
}

/// Before the engine caught panics, `thread::scope` re-raised this one out of `pin` with the
/// completed chunks still mapped and the backend's `end` never run.
#[test]
fn a_panicking_map_stops_the_job_undoes_the_chunks_and_runs_end() {
    let (low, high) = (
        AnonMapping::new(64 * MIB).unwrap(),
        AnonMapping::new(16 * MIB).unwrap(),
    );
    let ram = ram(&low, &high);
    for threads in [1, 4] {
        let model = Arc::new(IommuModel::new(65535, None));
        let faulty = Arc::new(Faulty {
            panic_on_map: Some(3),
            ..Faulty::new(Arc::new(IommufdBackend::new(model.clone())))
        });
        let pinner = Pinner::new(faulty.clone(), limits(), options(threads));
        let err = pinner
            .pin(ram.clone(), &CancelToken::new())
            .err()
            .expect("the panic is the job's error");
        let PinError::Panicked {
            message, undone, ..
        } = &err
        else {
            panic!("unexpected {err}");
        };
        assert_eq!(message, "injected panic in map call 3");
        assert!(undone.chunks >= 3 || threads > 1, "{err}");
        assert!(undone.is_clean());
        assert_eq!(err.class(), ErrorClass::Internal);
        assert!(
            err.to_string().contains("injected panic in map call 3")
                && err.to_string().contains("nothing is left pinned"),
            "{err}"
        );
        assert!(model.mappings().is_empty(), "completed chunks left mapped");
        assert_eq!(faulty.ends(), 1, "the backend's end did not run");
    }
}

#[test]
fn undo_failures_are_counted_and_reported_never_as_nothing_left_pinned() {
    let (low, high) = (
        AnonMapping::new(64 * MIB).unwrap(),
        AnonMapping::new(16 * MIB).unwrap(),
    );
    let ram = ram(&low, &high);
    // A job that fails, whose undo fails too: an internal error whatever stopped it.
    let model = Arc::new(IommuModel::new(65535, None).failing_call(4));
    let faulty = Arc::new(Faulty {
        fail_unmap: true,
        ..Faulty::new(Arc::new(IommufdBackend::new(model.clone())))
    });
    let pinner = Pinner::new(faulty, limits(), options(1));
    let err = pinner.pin(ram.clone(), &CancelToken::new()).err().unwrap();
    let undone = err.undone().unwrap();
    assert_eq!((undone.chunks, undone.failed), (4, 4), "{err}");
    assert_eq!(undone.failed_bytes, undone.bytes);
    assert_eq!(model.mappings().len(), 4, "the model still holds them");
    assert!(err.left_something_behind());
    let text = err.to_string();
    assert!(!text.contains("nothing is left pinned"), "{text}");
    assert!(
        text.contains("4 undo calls failed (the first: IOMMU_IOAS_UNMAP of"),
        "{text}"
    );
    assert!(
        text.contains(&format!(
            "up to {} bytes may remain mapped or locked",
            undone.bytes
        )),
        "{text}"
    );

    // Cancelled by a signal with a failed `end`: exit 1 (internal), not 130.
    let token = CancelToken::new();
    let faulty = Arc::new(Faulty {
        fail_end: true,
        cancel_after_map: Some((1, token.clone())),
        ..Faulty::new(Arc::new(MlockBackend))
    });
    let pinner = Pinner::new(faulty, limits(), options(2));
    let err = pinner.pin(ram.clone(), &token).err().unwrap();
    assert_eq!(err.cancel_reason(), Some(CancelReason::Requested));
    let undone = err.undone().unwrap();
    assert!(undone.chunks >= 2 && undone.bytes < 80 * MIB, "{err}");
    assert_eq!(undone.failed, 1);
    assert!(err.to_string().contains("munlock of"), "{err}");
    let cancelled = PinError::Cancelled {
        reason: CancelReason::Signal(libc::SIGINT),
        undone: Box::new(err.undone().unwrap().clone()),
    };
    assert_eq!(cancelled.class(), ErrorClass::Internal);
}

#[test]
fn teardown_counts_the_undo_calls_that_failed() {
    let ram = sharded_ram(2, 2, 64 * MIB);
    let faulty = Arc::new(Faulty::new(Arc::new(Recorder::default())));
    let pinner = Pinner::new(faulty.clone(), limits(), options(2));
    let pinned = pinner.pin(ram.clone(), &CancelToken::new()).unwrap();
    let chunks = pinned.chunks.len() as u64;
    let clean = pinned.unpin();
    assert!(clean.undone.is_clean());
    assert_eq!(
        clean.undone.to_string(),
        format!("undid {chunks} chunks (268435456 bytes), so nothing is left pinned")
    );

    let faulty = Arc::new(Faulty {
        fail_unmap: true,
        fail_end: true,
        ..Faulty::new(Arc::new(Recorder::default()))
    });
    let pinner = Pinner::new(faulty.clone(), limits(), options(2));
    let unpinned = pinner.pin(ram, &CancelToken::new()).unwrap().unpin();
    let u = &unpinned.undone;
    assert_eq!((u.chunks, u.failed), (chunks, chunks + 1), "{u}");
    assert_eq!(u.failed_bytes, 256 * MIB + 64 * MIB);
    assert!(!u.to_string().contains("nothing is left pinned"), "{u}");
    assert_eq!(faulty.ends(), 1);
}

#[test]
fn thread_requests_are_bounded() {
    assert_eq!("auto".parse(), Ok(ThreadRequest::Auto));
    assert_eq!("4096".parse(), Ok(ThreadRequest::AtMost(4096)));
    for bad in ["0", "4097", "18446744073709551616", "-1", "x"] {
        let e = bad.parse::<ThreadRequest>().unwrap_err();
        assert!(e.contains("from 1 to 4096"), "{bad}: {e}");
    }
}

#[path = "panic_tests.rs"]
mod panic_tests;

#[path = "zone_tests.rs"]
mod zone_tests;
