//! MSI-X pending bits, as the PCI spec defines them and Linux relies on when it masks a
//! vector: the pci-epf-test device raises vector 0 while entry 0 is masked, then while the
//! function mask is set. Each time no interrupt may arrive and PBA bit 0 must be set; once
//! unmasked, exactly one interrupt arrives and the bit is clear. Runs after the DMA checks,
//! with entry 0 unmasked and interrupts on, and leaves it so.

use guest_abi::epf::status;
use guest_abi::probe::{MSIX_PBA_FAIL, MSIX_PBA_OK};

use crate::apic;
use crate::console::Line;
use crate::cpu;
use crate::epf::{Epf, Msix, IRQ_SPINS, MSIX_FUNCTION_MASK, MSIX_VECTOR_CONTROL};
use crate::io::phys;

/// How long an interrupt that must not come (while masked, or a second time) gets to show up,
/// in `pause` spins (a few emulated instructions each here; 10-140 cycles on hardware).
///
/// Both ways such an interrupt could be sent are synchronous with a guest access that has
/// already returned when the wait starts: the device server signals the vector's eventfd
/// before it answers the COMMAND write that raised it, and the VMM re-sends a pending vector
/// on the vCPU's own exit path for the write that unmasked it. Through an irqfd, KVM puts the
/// interrupt in the LAPIC's IRR at once (the MSI fast path) and delivers it at the next VM
/// entry, before the guest's next instruction; each wait also ends with a PBA read, one more
/// exit and entry. So the spin only gives KVM's deferred path its time: the irqfd work item a
/// host kworker runs when an irqfd is attached to an eventfd that was already signalled (or
/// the fast path declines), within microseconds on the host. A thousand spins are at most
/// tens of microseconds on hardware and 1-2 ms under the emulator, where every spin is paid
/// for in emulated instructions: four waits of 20,000 were a quarter second of each run.
const SETTLE_SPINS: u32 = 1_000;

#[derive(Clone, Copy)]
pub enum Mask {
    Entry,
    Function,
}

impl Mask {
    fn name(self) -> &'static str {
        match self {
            Mask::Entry => "entry 0 masked",
            Mask::Function => "function masked",
        }
    }

    fn set(self, m: &Msix, on: bool) {
        match self {
            Mask::Entry => phys::write32(m.entry + MSIX_VECTOR_CONTROL, on as u32),
            Mask::Function => {
                let ctl = m.bdf.read16(m.cap + 2) & !MSIX_FUNCTION_MASK;
                m.bdf
                    .write16(m.cap + 2, ctl | if on { MSIX_FUNCTION_MASK } else { 0 });
            }
        }
    }
}

/// What went wrong; the mask in force when it did.
#[derive(Clone, Copy)]
pub enum Error {
    /// PBA bit 0 is set while vector 0 is unmasked (after the DMA commands' interrupts).
    PendingWhileLive,
    /// The device did not report IRQ_RAISED (STATUS).
    NotRaised(Mask, u32),
    /// The interrupt arrived although masked.
    Delivered(Mask),
    /// PBA bit 0 stayed clear after the masked vector was raised.
    NotPending(Mask),
    /// No interrupt after unmasking.
    NotDelivered(Mask),
    /// More than one interrupt after unmasking.
    DeliveredTwice(Mask),
    /// PBA bit 0 still set after the interrupt was delivered.
    StillPending(Mask),
}

impl Error {
    pub fn describe(self, line: Line) -> Line {
        match self {
            Error::PendingWhileLive => line.s("PBA bit 0 is set while vector 0 is unmasked"),
            Error::NotRaised(m, st) => line
                .s(m.name())
                .s(": the device did not raise vector 0, status ")
                .hex(st as u64),
            Error::Delivered(m) => line.s(m.name()).s(": vector 0 arrived while masked"),
            Error::NotPending(m) => line
                .s(m.name())
                .s(": vector 0 was raised but its PBA bit is clear"),
            Error::NotDelivered(m) => line
                .s(m.name())
                .s(": no interrupt after unmasking a pending vector 0"),
            Error::DeliveredTwice(m) => line
                .s(m.name())
                .s(": more than one interrupt after unmasking"),
            Error::StillPending(m) => line
                .s(m.name())
                .s(": PBA bit 0 is still set after the interrupt came"),
        }
    }
}

fn pending(m: &Msix) -> bool {
    phys::read32(m.pba) & 1 != 0
}

/// Quiet spin, then the PBA (an exit, after which KVM has delivered whatever it injected):
/// whether the interrupt count moved past `seen`, and PBA bit 0.
fn settle(m: &Msix, seen: u64) -> (bool, bool) {
    for _ in 0..SETTLE_SPINS {
        cpu::pause();
    }
    let pending = pending(m);
    (apic::irq_count() > seen, pending)
}

fn masked_raise(epf: &Epf, m: &Msix, mask: Mask) -> Result<(), Error> {
    mask.set(m, true);
    let seen = apic::irq_count();
    let st = epf.raise();
    if st & status::IRQ_RAISED == 0 {
        mask.set(m, false);
        return Err(Error::NotRaised(mask, st));
    }
    let (early, was_pending) = settle(m, seen);
    mask.set(m, false);
    if early {
        return Err(Error::Delivered(mask));
    }
    if !was_pending {
        return Err(Error::NotPending(mask));
    }
    // Normally there already: the unmasking write's exit re-sent it (see SETTLE_SPINS).
    if !apic::wait_irq(seen, IRQ_SPINS) {
        return Err(Error::NotDelivered(mask));
    }
    let (twice, still_pending) = settle(m, seen + 1);
    if twice {
        return Err(Error::DeliveredTwice(mask));
    }
    if still_pending {
        return Err(Error::StillPending(mask));
    }
    Ok(())
}

/// Runs the check on a device set up with MSI-X and prints its line ([`MSIX_PBA_OK`] or
/// [`MSIX_PBA_FAIL`] and why); nothing for a device on MSI. Returns the failure.
pub fn check(epf: &Epf) -> Option<Error> {
    let m = epf.msix()?;
    let result = if pending(&m) {
        Err(Error::PendingWhileLive)
    } else {
        masked_raise(epf, &m, Mask::Entry).and_then(|()| masked_raise(epf, &m, Mask::Function))
    };
    match result {
        Ok(()) => {
            Line::new().s(MSIX_PBA_OK).end();
            None
        }
        Err(e) => {
            e.describe(Line::new().s(MSIX_PBA_FAIL)).end();
            Some(e)
        }
    }
}
