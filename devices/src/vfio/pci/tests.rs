//! The passthrough model over an in-process backend that serves the pci-epf-test model, with
//! the device's DMA going through the IOMMU model that the pinning engine mapped guest RAM
//! into: the same path as kernel VFIO with a type1 container, minus the kernel.

use std::sync::{Arc, Mutex};

use guest_abi::epf as epf_abi;
use pinning::backend::Type1Backend;
use pinning::model::IommuModel;
use pinning::sys::AnonMapping;
use pinning::{CancelToken, GuestRam, Limits, PinOptions, Pinner, Region, ThreadRequest, MIB};
use vmm_sys_util::eventfd::EventFd;

use super::*;
use crate::epf::{self, EpfConfig, EpfIrq, EpfTest};
use crate::pci::dma::IommuDma;
use crate::vfio::kernel::KernelVfioError;
use crate::vfio::types::{IrqInfo, MmapArea, RegionInfo};

type Fds = Arc<Mutex<Vec<(u32, Vec<EventFd>)>>>;

/// A `VfioBackend` that serves a `PciDevice` in this process, recording what it is asked.
struct LocalBackend {
    dev: Mutex<EpfTest>,
    fds: Fds,
    config_writes: Mutex<Vec<(u64, Vec<u8>)>>,
}

impl LocalBackend {
    fn new(dma: Arc<dyn crate::pci::DmaSpace>) -> Arc<Self> {
        let fds: Fds = Arc::default();
        let sink_fds = fds.clone();
        let sink = move |irq: EpfIrq| {
            let (index, vector) = match irq {
                EpfIrq::Intx => (irq::INTX, 0),
                EpfIrq::Msi { vector } => (irq::MSI, vector),
                EpfIrq::Msix { vector } => (irq::MSIX, vector),
            };
            for (i, fds) in sink_fds.lock().unwrap().iter() {
                if *i == index {
                    if let Some(fd) = fds.get(usize::from(vector)) {
                        fd.write(1).unwrap();
                    }
                }
            }
        };
        let dev = EpfTest::new(EpfConfig::default(), dma, Box::new(sink)).unwrap();
        Arc::new(LocalBackend {
            dev: Mutex::new(dev),
            fds,
            config_writes: Mutex::default(),
        })
    }
}

impl VfioBackend for LocalBackend {
    fn name(&self) -> &str {
        "local-epf"
    }
    fn counts(&self) -> Result<(u32, u32), VfioBackendError> {
        Ok((9, 5))
    }
    fn region_info(&self, index: u32) -> Result<RegionInfo, VfioBackendError> {
        let size = match index {
            region::CONFIG => 4096,
            0 => epf::REG_BAR_SIZE,
            _ => 0,
        };
        Ok(RegionInfo::trapped(index, size))
    }
    fn region_read(
        &self,
        index: u32,
        offset: u64,
        data: &mut [u8],
    ) -> Result<(), VfioBackendError> {
        let mut dev = self.dev.lock().unwrap();
        if index == region::CONFIG {
            for (i, b) in data.iter_mut().enumerate() {
                let at = offset + i as u64;
                *b = (dev.config_read((at / 4) as usize) >> (at % 4 * 8)) as u8;
            }
        } else {
            dev.bar_read(index as usize, offset, data);
        }
        Ok(())
    }
    fn region_write(&self, index: u32, offset: u64, data: &[u8]) -> Result<(), VfioBackendError> {
        let mut dev = self.dev.lock().unwrap();
        if index == region::CONFIG {
            self.config_writes
                .lock()
                .unwrap()
                .push((offset, data.to_vec()));
            dev.config_write((offset / 4) as usize, offset % 4, data);
        } else {
            dev.bar_write(index as usize, offset, data);
        }
        Ok(())
    }
    fn irq_info(&self, index: u32) -> Result<IrqInfo, VfioBackendError> {
        Ok(IrqInfo {
            index,
            flags: 0,
            count: if index <= irq::MSIX { 32 } else { 0 },
        })
    }
    fn enable_irq(&self, index: u32, fds: &[&EventFd]) -> Result<(), VfioBackendError> {
        let fds = fds.iter().map(|f| f.try_clone().unwrap()).collect();
        let mut all = self.fds.lock().unwrap();
        all.retain(|(i, _)| *i != index);
        all.push((index, fds));
        Ok(())
    }
    fn enable_intx(&self, _t: &EventFd, _u: &EventFd) -> Result<(), VfioBackendError> {
        Ok(())
    }
    fn disable_irq(&self, index: u32) -> Result<(), VfioBackendError> {
        self.fds.lock().unwrap().retain(|(i, _)| *i != index);
        Ok(())
    }
    fn reset(&self) -> Result<(), VfioBackendError> {
        Ok(())
    }
}

/// Guest accesses, as a driver would make them.
fn cfg16(d: &mut VfioPciDevice, at: usize, v: u16) -> Effects {
    d.config_write(at / 4, (at % 4) as u64, &v.to_le_bytes())
}

fn reg_write(d: &mut VfioPciDevice, r: u64, v: u32) {
    d.bar_write(0, r, &v.to_le_bytes());
}

fn reg_read(d: &mut VfioPciDevice, r: u64) -> u32 {
    let mut b = [0u8; 4];
    d.bar_read(0, r, &mut b);
    u32::from_le_bytes(b)
}

fn find_cap(d: &mut VfioPciDevice, id: u8) -> usize {
    let mut at = (d.config_read(offset::CAPABILITIES_POINTER / 4) & 0xfc) as usize;
    while at != 0 {
        let dw = d.config_read(at / 4);
        if dw as u8 == id {
            return at;
        }
        at = (dw >> 8 & 0xfc) as usize;
    }
    panic!("capability {id:#x} not found");
}

fn scratch_device() -> (Arc<LocalBackend>, VfioPciDevice) {
    let mem = Arc::new(crate::pci::MappedRegions::new());
    let backend = LocalBackend::new(mem);
    let dev = VfioPciDevice::new(backend.clone()).unwrap();
    (backend, dev)
}

#[test]
fn identity_passes_through_and_bars_are_virtualised() {
    let (backend, mut d) = scratch_device();
    assert_eq!(d.config_read(0), 0xb500_104c);
    assert_eq!(d.config_read(2) >> 8, 0xff0000);
    // BAR sizing happens in the shadow; the device never sees BAR writes.
    d.config_write(4, 0, &u32::MAX.to_le_bytes());
    assert_eq!(
        d.config_read(4) & !0xf,
        !(epf::REG_BAR_SIZE as u32 - 1),
        "BAR0 sizes to the region size"
    );
    let bars = d.place_bar(0, 0xc000_0000).unwrap();
    assert_eq!(bars[0].addr, 0xc000_0000);
    assert!(bars[0].decoding, "placing a BAR turns decoding on");
    assert_eq!(d.config_read(4) & !0xf, 0xc000_0000);
    let writes = backend.config_writes.lock().unwrap().clone();
    assert!(
        writes.iter().all(|(off, _)| !(0x10..0x28).contains(off)),
        "a BAR write reached the device: {writes:?}"
    );
    // Moving the BAR is an effect for the VMM.
    let e = d.config_write(4, 0, &0xd000_0000u32.to_le_bytes());
    assert_eq!(e.bars.len(), 1);
    assert_eq!(
        (e.bars[0].old, e.bars[0].new),
        (Some(0xc000_0000), Some(0xd000_0000))
    );
    assert_eq!(d.config_read(offset::ROM_BAR / 4), 0, "no expansion ROM");
}

#[test]
fn msix_is_routed_through_the_shadow_table_and_eventfds() {
    let (backend, mut d) = scratch_device();
    d.place_bar(0, 0xc000_0000).unwrap();
    let cap = find_cap(&mut d, cap_id::MSIX);
    assert!(d.irq_vectors().iter().all(|v| v.message.is_none()));
    // Table entry 0: address, data, unmask.
    d.bar_write(0, epf::MSIX_TABLE_OFFSET, &0xfee0_0000u32.to_le_bytes());
    d.bar_write(0, epf::MSIX_TABLE_OFFSET + 8, &0x45u32.to_le_bytes());
    let e = d.bar_write(0, epf::MSIX_TABLE_OFFSET + 12, &0u32.to_le_bytes());
    assert_eq!(e.msix, RoutingChange::Vector(0));
    let e = cfg16(&mut d, cap + 2, 0x8000);
    assert_eq!(e.msix, RoutingChange::All);
    assert_eq!(
        backend.fds.lock().unwrap()[0].0,
        irq::MSIX,
        "enabling MSI-X handed the backend its eventfds"
    );
    let v = d.irq_vectors();
    let msg = v[0].message.unwrap();
    assert_eq!((msg.addr, msg.data), (0xfee0_0000, 0x45));
    assert!(v[1].message.is_none(), "vector 1 is still masked");
    // The device raises MSI-X vector 0 (IRQ_NUMBER 1): its eventfd fires.
    cfg16(
        &mut d,
        offset::COMMAND,
        command::MEMORY_SPACE | command::BUS_MASTER,
    );
    reg_write(&mut d, epf_abi::reg::IRQ_TYPE, epf_abi::irq_type::MSIX);
    reg_write(&mut d, epf_abi::reg::IRQ_NUMBER, 1);
    reg_write(
        &mut d,
        epf_abi::reg::COMMAND,
        epf_abi::command::RAISE_MSIX_IRQ,
    );
    assert_eq!(v[0].fd.read().unwrap(), 1);
    // Disabling MSI-X takes the eventfds back from the backend.
    cfg16(&mut d, cap + 2, 0);
    assert!(backend.fds.lock().unwrap().is_empty());
}

/// The device set up as a driver does: BAR0 placed, bus mastering on, MSI-X entry 0 aimed
/// at 0xfee0_0000 with data 0x45 (left masked), MSI-X enabled, the model told to raise
/// MSI-X number 1 (vector 0). Returns the MSI-X capability offset.
fn msix_device() -> (Arc<LocalBackend>, VfioPciDevice, usize) {
    let (backend, mut d) = scratch_device();
    d.place_bar(0, 0xc000_0000).unwrap();
    let cap = find_cap(&mut d, cap_id::MSIX);
    d.bar_write(0, epf::MSIX_TABLE_OFFSET, &0xfee0_0000u32.to_le_bytes());
    d.bar_write(0, epf::MSIX_TABLE_OFFSET + 8, &0x45u32.to_le_bytes());
    cfg16(&mut d, cap + 2, 0x8000);
    cfg16(
        &mut d,
        offset::COMMAND,
        command::MEMORY_SPACE | command::BUS_MASTER,
    );
    reg_write(&mut d, epf_abi::reg::IRQ_TYPE, epf_abi::irq_type::MSIX);
    reg_write(&mut d, epf_abi::reg::IRQ_NUMBER, 1);
    (backend, d, cap)
}

fn raise(d: &mut VfioPciDevice) {
    reg_write(d, epf_abi::reg::COMMAND, epf_abi::command::RAISE_MSIX_IRQ);
}

fn pba(d: &mut VfioPciDevice) -> u64 {
    let mut b = [0u8; 8];
    d.bar_read(0, epf::MSIX_PBA_OFFSET, &mut b);
    u64::from_le_bytes(b)
}

/// What KVM's irqfd would take from vector 0's eventfd: the signals waiting there.
fn signals(d: &VfioPciDevice) -> u64 {
    d.irq_vectors()[0].fd.read().unwrap_or(0)
}

fn set_entry0_mask(d: &mut VfioPciDevice, masked: bool) -> Effects {
    d.bar_write(
        0,
        epf::MSIX_TABLE_OFFSET + 12,
        &u32::from(masked).to_le_bytes(),
    )
}

#[test]
fn a_vector_fired_while_masked_is_pending_and_sent_once_when_unmasked() {
    let (_backend, mut d, _) = msix_device();
    raise(&mut d);
    assert_eq!(pba(&mut d), 1, "entry 0 is masked: the signal is pending");
    assert_eq!(pba(&mut d), 1, "reading the PBA does not clear it");
    raise(&mut d);
    d.release_pending();
    assert_eq!(pba(&mut d), 1, "still masked: nothing is released");
    let e = set_entry0_mask(&mut d, false);
    assert_eq!(e.msix, RoutingChange::Vector(0));
    assert_eq!(
        signals(&d),
        0,
        "nothing is sent before the VMM has routed the vector"
    );
    d.release_pending();
    assert_eq!(
        signals(&d),
        1,
        "two signals while masked are one message, sent once"
    );
    assert_eq!(pba(&mut d), 0);
    d.release_pending();
    assert_eq!(signals(&d), 0, "sent only once");
}

#[test]
fn the_function_mask_holds_every_vector_and_lifting_it_sends_them() {
    let (_backend, mut d, cap) = msix_device();
    set_entry0_mask(&mut d, false);
    let e = cfg16(&mut d, cap + 2, 0xc000);
    assert_eq!(e.msix, RoutingChange::All);
    raise(&mut d);
    assert_eq!(pba(&mut d), 1);
    assert_eq!(d.config_read(cap / 4) >> 16 & 0xc000, 0xc000);
    cfg16(&mut d, cap + 2, 0x8000);
    d.release_pending();
    assert_eq!(signals(&d), 1);
    assert_eq!(pba(&mut d), 0);
}

#[test]
fn a_live_vector_s_signal_is_kvm_s_and_sets_no_pending_bit() {
    let (_backend, mut d, cap) = msix_device();
    set_entry0_mask(&mut d, false);
    raise(&mut d);
    assert_eq!(
        pba(&mut d),
        0,
        "unmasked: the signal is delivered, not pending"
    );
    assert_eq!(
        signals(&d),
        1,
        "a live vector's counter is left to KVM's irqfd"
    );
    // A signal while MSI-X is off is dropped, not pending once it is enabled.
    cfg16(&mut d, cap + 2, 0);
    set_entry0_mask(&mut d, true);
    d.irq_vectors()[0].fd.write(1).unwrap();
    cfg16(&mut d, cap + 2, 0x8000);
    assert_eq!(pba(&mut d), 0, "a signal while MSI-X was off is dropped");
}

#[test]
fn dma_reaches_exactly_what_the_pinning_engine_mapped_into_the_iommu() {
    let low = AnonMapping::new(32 * MIB).unwrap();
    let ram = Arc::new(
        // SAFETY: `low` outlives the GuestRam and is only touched by the backends and the
        // IOMMU model.
        unsafe {
            GuestRam::new(vec![Region {
                host_addr: low.addr(),
                guest_addr: 0,
                size: low.len(),
                page_size: 4096,
                file: None,
            }])
        }
        .unwrap(),
    );
    let model = Arc::new(IommuModel::new(65535, None));
    let mut limits = Limits::detect().unwrap();
    limits.cgroup_memory = None;
    let pinner = Pinner::new(
        Arc::new(Type1Backend::new(model.clone(), 65535)),
        limits,
        PinOptions {
            threads: ThreadRequest::AtMost(2),
            min_chunk: 4 * MIB,
            progress: false,
            zones: Vec::new(),
        },
    );
    let pinned = pinner.pin(ram.clone(), &CancelToken::new()).unwrap();
    // SAFETY: every host address the model maps is inside `low`, which outlives the device.
    let dma = Arc::new(unsafe { IommuDma::new(model.clone()) });
    let backend = LocalBackend::new(dma);
    let mut d = VfioPciDevice::new(backend).unwrap();
    d.place_bar(0, 0xc000_0000).unwrap();
    cfg16(
        &mut d,
        offset::COMMAND,
        command::MEMORY_SPACE | command::BUS_MASTER,
    );

    let write = |d: &mut VfioPciDevice, dst: u64| {
        reg_write(d, epf_abi::reg::DST_ADDR_LO, dst as u32);
        reg_write(d, epf_abi::reg::DST_ADDR_HI, (dst >> 32) as u32);
        reg_write(d, epf_abi::reg::SIZE, 4096);
        reg_write(d, epf_abi::reg::COMMAND, epf_abi::command::WRITE);
        reg_read(d, epf_abi::reg::STATUS)
    };
    let last = 32 * MIB - 4096;
    for dst in [0, 16 * MIB, last] {
        let st = write(&mut d, dst);
        assert_ne!(
            st & epf_abi::status::WRITE_SUCCESS,
            0,
            "WRITE to {dst:#x}: {st:#x}"
        );
        let mut expect = vec![0u8; 4096];
        epf::fill_pattern(dst, 0, &mut expect);
        // SAFETY: the page lies inside `low`, and the device is done writing it.
        let got = unsafe { std::slice::from_raw_parts((low.addr() + dst) as *const u8, 4096) };
        assert_eq!(got, &expect[..], "guest page {dst:#x}");
        assert_eq!(
            reg_read(&mut d, epf_abi::reg::CHECKSUM),
            epf::checksum(&expect)
        );
    }
    // Past the end of RAM nothing is mapped: the command fails instead of writing anywhere.
    let st = write(&mut d, 32 * MIB);
    assert_ne!(st & epf_abi::status::WRITE_FAIL, 0, "{st:#x}");
    // Unpinning unmaps everything: the same WRITE now fails.
    drop(pinned);
    assert!(model.mappings().is_empty());
    let st = write(&mut d, 0);
    assert_ne!(st & epf_abi::status::WRITE_FAIL, 0, "{st:#x}");
}

/// A device with one BAR (described by `bar0`), no MSI/MSI-X and INTA: what a legacy
/// function looks like.
struct IntxOnlyBackend {
    config: Mutex<ConfigSpace>,
    bar0: RegionInfo,
    intx: Mutex<Option<(EventFd, EventFd)>>,
}

impl VfioBackend for IntxOnlyBackend {
    fn name(&self) -> &str {
        "intx-only"
    }
    fn counts(&self) -> Result<(u32, u32), VfioBackendError> {
        Ok((9, 1))
    }
    fn region_info(&self, index: u32) -> Result<RegionInfo, VfioBackendError> {
        Ok(match index {
            region::CONFIG => RegionInfo::trapped(index, 256),
            0 => self.bar0.clone(),
            _ => RegionInfo::trapped(index, 0),
        })
    }
    fn region_read(&self, index: u32, off: u64, data: &mut [u8]) -> Result<(), VfioBackendError> {
        if index == region::CONFIG {
            // As kernel VFIO does past a region's end.
            if off + data.len() as u64 > 256 {
                return Err(KernelVfioError::Request {
                    device: "intx-only".into(),
                    op: "config read".into(),
                    source: std::io::Error::from_raw_os_error(libc::EINVAL),
                }
                .into());
            }
            self.config.lock().unwrap().read(off as usize, data);
        }
        Ok(())
    }
    fn region_write(&self, index: u32, off: u64, data: &[u8]) -> Result<(), VfioBackendError> {
        if index == region::CONFIG {
            self.config
                .lock()
                .unwrap()
                .write_reg((off / 4) as usize, off % 4, data);
        }
        Ok(())
    }
    fn irq_info(&self, index: u32) -> Result<IrqInfo, VfioBackendError> {
        Ok(IrqInfo {
            index,
            flags: 0,
            count: u32::from(index == irq::INTX),
        })
    }
    fn enable_irq(&self, _: u32, _: &[&EventFd]) -> Result<(), VfioBackendError> {
        panic!("no MSI or MSI-X to enable")
    }
    fn enable_intx(&self, t: &EventFd, u: &EventFd) -> Result<(), VfioBackendError> {
        *self.intx.lock().unwrap() = Some((t.try_clone().unwrap(), u.try_clone().unwrap()));
        Ok(())
    }
    fn disable_irq(&self, _: u32) -> Result<(), VfioBackendError> {
        Ok(())
    }
    fn reset(&self) -> Result<(), VfioBackendError> {
        Ok(())
    }
}

#[test]
fn a_device_without_msi_gets_a_level_triggered_intx_line() {
    let config = crate::pci::config::with_mem_bar0(
        &PciHeader {
            vendor_id: 0x1234,
            device_id: 0x11,
            interrupt_pin: 1,
            ..PciHeader::default()
        },
        0x100,
    );
    let backend = Arc::new(IntxOnlyBackend {
        config: Mutex::new(config),
        bar0: RegionInfo::trapped(0, 0x100),
        intx: Mutex::default(),
    });
    let mut d = VfioPciDevice::new(backend.clone()).unwrap();
    assert!(d.irq_vectors().is_empty());
    assert_eq!(d.intx_only(), Some(1));
    let (t, r) = (EventFd::new(0).unwrap(), EventFd::new(0).unwrap());
    d.enable_intx(10, &t, &r).unwrap();
    assert!(
        backend.intx.lock().unwrap().is_some(),
        "backend got both fds"
    );
    assert_eq!(d.config_read(offset::INTERRUPT_LINE / 4) & 0xff, 10);
    // A conventional function has no extended space: all ones through ECAM, and neither a
    // read nor a write there reaches (and fails) the backend.
    let failed = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let flag = failed.clone();
    d.set_failure_handler(Box::new(move |_| flag.store(true, Ordering::SeqCst)));
    assert_eq!(d.config_read(0x100 / 4), u32::MAX);
    d.config_write(0x100 / 4, 0, &[1, 2, 3, 4]);
    assert!(
        !failed.load(Ordering::SeqCst),
        "an extended access failed the device"
    );
    // A device with MSI-X has no INTx-only line.
    let (_, epf) = scratch_device();
    assert_eq!(epf.intx_only(), None);
}

#[test]
fn bar_parts_around_the_msix_table_and_pba_pages_stay_mappable() {
    let (_, d) = scratch_device();
    // The epf model has its MSI-X table (0x400) and PBA (0x800) in BAR0's first page.
    assert_eq!(d.mappable(0, 0, 0x4000), [(0x1000, 0x3000)]);
    assert_eq!(d.mappable(0, 0, 0x1000), []);
    assert_eq!(
        d.mappable(1, 0, 0x2000),
        [(0, 0x2000)],
        "other BARs are untouched"
    );
    assert_eq!(
        d.mappable(0, 0x800, 0x2000),
        [(0x1000, 0x1000)],
        "unaligned edges shrink to whole pages"
    );
}

#[test]
fn setup_errors_keep_the_backend_s_class() {
    use pinning::class::{Classify, ErrorClass};
    let not_bound = KernelVfioError::NotBound {
        device: "0000:01:00.0".into(),
        address: "0000:01:00.0".into(),
        driver: Some("nvme".into()),
    };
    let e = VfioPciError::Backend(not_bound.into());
    assert_eq!(e.class(), ErrorClass::User);
    let small = VfioPciError::ConfigRegion {
        device: "0000:01:00.0".into(),
        size: 64,
    };
    assert_eq!(small.class(), ErrorClass::Device);
}

/// A peer (a vfio-user server not written here) may describe a sparse-mmap area that reaches
/// past its region: the area is trapped, never made a mapping past the BAR, and the device
/// stays usable.
#[test]
fn an_mmap_area_past_its_region_is_trapped_and_the_rest_mapped() {
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
    // SAFETY: a plain memfd_create with a NUL-terminated name; the fd is owned below.
    let fd = unsafe { libc::memfd_create(c"bar0".as_ptr(), libc::MFD_CLOEXEC) };
    assert!(fd >= 0);
    // SAFETY: `fd` is fresh and owned by nobody else.
    let file = std::fs::File::from(unsafe { OwnedFd::from_raw_fd(fd) });
    // Room in the file for the bad area too, so only the region check can refuse it.
    file.set_len(0x4000).unwrap();
    let config = crate::pci::config::with_mem_bar0(
        &PciHeader {
            vendor_id: 0x1234,
            device_id: 0x12,
            interrupt_pin: 1,
            ..PciHeader::default()
        },
        0x2000,
    );
    let bar0 = RegionInfo {
        index: 0,
        flags: region::FLAG_READ | region::FLAG_WRITE | region::FLAG_MMAP,
        size: 0x2000,
        mmap_areas: vec![
            MmapArea {
                offset: 0,
                size: 0x1000,
            },
            MmapArea {
                offset: 0x1000,
                size: 0x1001,
            },
        ],
        mmap_fd: Some((file.as_raw_fd(), 0)),
    };
    let backend = Arc::new(IntxOnlyBackend {
        config: Mutex::new(config),
        bar0,
        intx: Mutex::default(),
    });
    let d = VfioPciDevice::new(backend).unwrap();
    let parts: Vec<_> = d
        .mmaps()
        .iter()
        .map(|m| (m.bar, m.offset, m.size))
        .collect();
    assert_eq!(parts, [(0, 0, 0x1000)]);
}

/// MSI with per-vector masking (the model's capability: 64-bit address, then data at +12,
/// mask bits at +16, pending bits at +20) keeps its pending bits the same way as MSI-X.
#[test]
fn an_msi_vector_raised_while_masked_is_pending_and_sent_once_when_unmasked() {
    let (_backend, mut d) = scratch_device();
    d.place_bar(0, 0xc000_0000).unwrap();
    let cap = find_cap(&mut d, cap_id::MSI);
    let write32 = |d: &mut VfioPciDevice, at: usize, v: u32| {
        d.config_write(at / 4, 0, &v.to_le_bytes());
    };
    write32(&mut d, cap + 4, 0xfee0_0000);
    cfg16(&mut d, cap + 12, 0x46);
    write32(&mut d, cap + 16, 1);
    cfg16(&mut d, cap + 2, 1);
    cfg16(
        &mut d,
        offset::COMMAND,
        command::MEMORY_SPACE | command::BUS_MASTER,
    );
    reg_write(&mut d, epf_abi::reg::IRQ_TYPE, epf_abi::irq_type::MSI);
    reg_write(&mut d, epf_abi::reg::IRQ_NUMBER, 1);
    reg_write(
        &mut d,
        epf_abi::reg::COMMAND,
        epf_abi::command::RAISE_MSI_IRQ,
    );
    assert_eq!(d.config_read((cap + 20) / 4) & 1, 1, "masked: pending");
    write32(&mut d, cap + 16, 0);
    d.release_pending();
    assert_eq!(signals(&d), 1, "sent once on unmask");
    assert_eq!(
        d.config_read((cap + 20) / 4) & 1,
        0,
        "and no longer pending"
    );
}

/// Found by the `vfio_pci` fuzz target: a register index near `usize::MAX` overflowed the
/// past-the-end check (a panic), and a write longer than its dword (or crossing it) was
/// forwarded whole, reaching the device's own BAR registers after the one addressed.
#[test]
fn config_accesses_of_any_register_and_shape_stay_in_their_dword() {
    let (backend, mut d) = scratch_device();
    for reg in [
        usize::MAX,
        usize::MAX - 1,
        usize::MAX / 4,
        1 << 62,
        1024,
        4096,
    ] {
        assert_eq!(d.config_read(reg), u32::MAX, "register {reg:#x}");
        d.config_write(reg, 0, &[0xff; 4]);
        d.config_write(reg, u64::MAX, &[0xff]);
    }
    // Register 3 ends where BAR0 starts: neither a 16-byte write nor one crossing into BAR0
    // may reach the device, nor any other malformed shape.
    for (offset, len) in [(0, 16), (3, 4), (2, 4), (1, 8), (0, 3), (0, 0), (4, 1)] {
        d.config_write(3, offset, &vec![0xff; len]);
    }
    let writes = backend.config_writes.lock().unwrap().clone();
    assert!(
        writes.is_empty(),
        "malformed writes reached the device: {writes:?}"
    );
    // Well-formed writes still do.
    d.config_write(3, 1, &[0x40]);
    let writes = backend.config_writes.lock().unwrap().clone();
    assert_eq!(writes, vec![(0x0d, vec![0x40])]);
}

/// Found by the `vfio_pci` fuzz target: a BAR access with an index past BAR5 went to region
/// `BAR0 + index`, which is the expansion ROM (6) or config space (7): a write there changed
/// the device's config space behind the virtualised BARs.
#[test]
fn bar_indices_past_bar5_reach_neither_rom_nor_config_space() {
    let (backend, mut d) = scratch_device();
    for bar in [6, 7, 8, usize::MAX] {
        let mut b = [0u8; 4];
        d.bar_read(bar, 0, &mut b);
        assert_eq!(b, [0xff; 4], "BAR{bar} does not exist");
        assert!(d.bar_write(bar, 0x10, &[0xff; 4]).is_empty());
    }
    let writes = backend.config_writes.lock().unwrap().clone();
    assert!(
        writes.is_empty(),
        "BAR writes reached config space: {writes:?}"
    );
    assert_eq!(d.config_read(0), 0xb500_104c, "the device is untouched");
}
