//! A panic after a backend's map succeeded, in every backend: the chunk that panicked is
//! undone as far as its work had got, so nothing stays mapped and the error says so.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};

use super::*;
use crate::backend::{FdDmaMapper, SeveralBackend, VfioUserBackend};

/// A vfio-user server as the pinner sees it, keeping the rules of `vmm device epf`: an
/// unmap must name a region exactly as it was mapped, and anything else is ENOENT.
#[derive(Default)]
struct CountingServer {
    regions: Mutex<BTreeMap<u64, u64>>,
    maps: AtomicU64,
}

impl CountingServer {
    fn regions(&self) -> usize {
        self.regions.lock().unwrap().len()
    }
}

impl FdDmaMapper for CountingServer {
    fn map_fd(&self, iova: u64, size: u64, _file: &RamFile, _offset: u64) -> std::io::Result<()> {
        let mut regions = self.regions.lock().unwrap();
        if regions
            .range(..iova + size)
            .next_back()
            .is_some_and(|(&s, &l)| s + l > iova)
        {
            return Err(std::io::Error::from_raw_os_error(libc::EEXIST));
        }
        regions.insert(iova, size);
        self.maps.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }
    fn unmap(&self, iova: u64, size: u64) -> std::io::Result<()> {
        let mut regions = self.regions.lock().unwrap();
        if regions.get(&iova) != Some(&size) {
            return Err(std::io::Error::from_raw_os_error(libc::ENOENT));
        }
        regions.remove(&iova);
        Ok(())
    }
}

/// `ram` with a file behind each region, as vfio-user needs (the server double never
/// touches it).
fn shared_ram(low: &AnonMapping, high: &AnonMapping) -> Arc<GuestRam> {
    let regions = ram(low, high)
        .regions()
        .iter()
        .map(|r| Region {
            file: Some((RamFile::new(std::fs::File::open("/dev/null").unwrap()), 0)),
            ..r.clone()
        })
        .collect();
    // SAFETY: both mappings outlive the GuestRam in every test and are only touched by the
    // populate step and the backends' models.
    Arc::new(unsafe { GuestRam::new(regions) }.unwrap())
}

/// Pins and expects the panic `message` as the error, with everything undone cleanly and
/// the chunk that panicked among what was undone.
fn pin_expecting_panic(
    backend: Arc<dyn PinBackend>,
    ram: &Arc<GuestRam>,
    threads: usize,
    message: &str,
) -> PinError {
    let pinner = Pinner::new(backend, limits(), options(threads));
    let err = pinner
        .pin(ram.clone(), &CancelToken::new())
        .err()
        .expect("the panic is the job's error");
    let PinError::Panicked {
        message: said,
        undone,
        ..
    } = &err
    else {
        panic!("unexpected {err}");
    };
    assert_eq!(said, message);
    assert!(undone.is_clean(), "{err}");
    assert!(undone.panicked >= 1, "{err}");
    let text = err.to_string();
    assert!(
        text.contains("as far as the panicking work had got), so nothing is left pinned"),
        "{text}"
    );
    assert_eq!(err.class(), ErrorClass::Internal);
    err
}

fn mappings() -> (AnonMapping, AnonMapping) {
    (
        AnonMapping::new(64 * MIB).unwrap(),
        AnonMapping::new(16 * MIB).unwrap(),
    )
}

#[test]
fn type1_a_panic_after_a_map_leaves_nothing_mapped() {
    let (low, high) = mappings();
    let ram = ram(&low, &high);
    // The serial phase maps one chunk per region: the second map call is the last.
    for after in [0, 1] {
        let model = Arc::new(IommuModel::new(65535, None));
        let faulty = Arc::new(Faulty {
            panic_after_map: Some(after),
            ..Faulty::new(Arc::new(Type1Backend::new(model.clone(), 65535)))
        });
        let message = format!("injected panic after map call {after}");
        pin_expecting_panic(faulty.clone(), &ram, 2, &message);
        assert_eq!(model.mappings(), [], "after map call {after}");
        assert_eq!(model.pinned(), 0);
        assert_eq!(faulty.ends(), 1);
    }
}

#[test]
fn iommufd_a_panic_after_a_map_leaves_nothing_mapped() {
    let (low, high) = mappings();
    let ram = ram(&low, &high);
    for threads in [1, 4] {
        let model = Arc::new(IommuModel::new(65535, None));
        let faulty = Arc::new(Faulty {
            panic_after_map: Some(3),
            ..Faulty::new(Arc::new(IommufdBackend::new(model.clone())))
        });
        pin_expecting_panic(faulty, &ram, threads, "injected panic after map call 3");
        assert_eq!(model.mappings(), [], "{threads} threads");
    }
}

#[test]
fn vfio_user_a_panic_after_a_map_leaves_the_server_no_region() {
    let (low, high) = mappings();
    let ram = shared_ram(&low, &high);
    for threads in [1, 4] {
        let server = Arc::new(CountingServer::default());
        let faulty = Arc::new(Faulty {
            panic_after_map: Some(3),
            ..Faulty::new(Arc::new(VfioUserBackend::new(server.clone())))
        });
        pin_expecting_panic(faulty, &ram, threads, "injected panic after map call 3");
        assert!(server.maps.load(Ordering::SeqCst) >= 4);
        assert_eq!(server.regions(), 0, "{threads} threads");
    }
}

/// The piece a panic struck before its map reached the server was never mapped: the
/// server's ENOENT for its unmap is not a failure, and no piece after it is unmapped.
#[test]
fn vfio_user_a_panic_before_the_map_is_not_reported_as_a_failed_undo() {
    let (low, high) = mappings();
    let ram = shared_ram(&low, &high);
    let server = Arc::new(CountingServer::default());
    let faulty = Arc::new(Faulty {
        panic_on_map: Some(3),
        ..Faulty::new(Arc::new(VfioUserBackend::new(server.clone())))
    });
    pin_expecting_panic(faulty, &ram, 1, "injected panic in map call 3");
    assert_eq!(server.maps.load(Ordering::SeqCst), 3);
    assert_eq!(server.regions(), 0);
}

/// Device 0 has mapped the piece when device 1's map panics: device 0 gives it back, and
/// device 1's "nothing there" does not count as a failure.
#[test]
fn several_device_0_mapped_and_device_1_panics_leaves_neither_mapped() {
    let (low, high) = mappings();
    let ram = shared_ram(&low, &high);
    for threads in [1, 4] {
        let (a, b) = (
            Arc::new(IommuModel::new(65535, None)),
            Arc::new(CountingServer::default()),
        );
        let second = Arc::new(Faulty {
            panic_on_map: Some(3),
            ..Faulty::new(Arc::new(VfioUserBackend::new(b.clone())))
        });
        let several = Arc::new(SeveralBackend::new(vec![
            Arc::new(IommufdBackend::new(a.clone())),
            second,
        ]));
        pin_expecting_panic(several, &ram, threads, "injected panic in map call 3");
        assert_eq!(a.mappings(), [], "device 0, {threads} threads");
        assert_eq!(b.regions(), 0, "device 1, {threads} threads");

        // And a panic after device 1 mapped too.
        let (a, b) = (
            Arc::new(IommuModel::new(65535, None)),
            Arc::new(CountingServer::default()),
        );
        let second = Arc::new(Faulty {
            panic_after_map: Some(3),
            ..Faulty::new(Arc::new(VfioUserBackend::new(b.clone())))
        });
        let several = Arc::new(SeveralBackend::new(vec![
            Arc::new(IommufdBackend::new(a.clone())),
            second,
        ]));
        pin_expecting_panic(several, &ram, threads, "injected panic after map call 3");
        assert_eq!(a.mappings(), [], "device 0, {threads} threads");
        assert_eq!(b.regions(), 0, "device 1, {threads} threads");
    }
}

/// A panic in a later step of the chunk (here the progress report after its first piece is
/// mapped): that piece is unmapped, and the piece never reached is not asked for at all (the
/// server would answer ENOENT, which counts as a failure outside the piece a panic struck).
#[test]
fn a_panic_in_a_later_step_unmaps_what_the_chunk_had_mapped_and_nothing_else() {
    let (low, high) = mappings();
    let ram = shared_ram(&low, &high);
    // No cuts: one chunk over both regions, so two pieces.
    let spec = engine::JobSpec {
        start: 0,
        size: ram.size(),
        align: 4096,
        min_chunk: ram.size(),
        max_threads: 1,
        cuts: Vec::new(),
    };
    let plan = spec.plan(&limits().thread_caps(Some(1)));
    assert_eq!(plan.chunks, 1);
    let server = Arc::new(CountingServer::default());
    let backend = VfioUserBackend::new(server.clone());
    let cancel = CancelToken::new();
    let rollbacks = Mutex::new(Undone::default());
    let work = MapWork {
        backend: &backend,
        ram: &ram,
        cancel: &cancel,
        populate: false,
        progress: &|_| panic!("injected panic in the progress report"),
        rollbacks: &rollbacks,
        panicked: Mutex::default(),
    };
    let err = engine::run_job(&spec, &plan, &work, &cancel).unwrap_err();
    let JobError::Panicked { undone, .. } = &err else {
        panic!("unexpected {err}");
    };
    assert_eq!(server.maps.load(Ordering::SeqCst), 1);
    assert_eq!(server.regions(), 0, "{err}");
    assert!(undone.is_clean(), "{err}");
    assert_eq!((undone.chunks, undone.panicked), (1, 1));
}
