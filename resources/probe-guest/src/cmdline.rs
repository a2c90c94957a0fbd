//! The command line: read from guest memory, and the `probe.*` options (guest-abi's `OPT_*`)
//! that ask for checks or behaviour.

use guest_abi::probe::{
    OPT_DMA_IRQ, OPT_EXPECT_CPUS, OPT_EXPECT_DMA, OPT_EXPECT_MEM, OPT_EXPECT_PCI, OPT_FAULT,
    OPT_FLOOD, OPT_HANG,
};

use crate::checks::{Checks, Failure};
use crate::console::Line;
use crate::io::phys;
use crate::{pci, text};

const CMDLINE_MAX: u64 = 4096;
/// Never mapped (PML4 entry 1): [`OPT_FAULT`] reads it.
const UNMAPPED: u64 = 1 << 40;

pub fn read_cmdline(ptr: u64, mapped: u64, checks: &mut Checks) -> &'static [u8] {
    if ptr == 0 {
        return &[];
    }
    if ptr.saturating_add(CMDLINE_MAX) > mapped {
        checks.fail(Failure::Unmapped("cmdline", ptr));
        return &[];
    }
    let mut len = 0;
    while len < CMDLINE_MAX && phys::u8(ptr + len) != 0 {
        len += 1;
    }
    // SAFETY: identity mapped, non-null, read-only from here on.
    unsafe { core::slice::from_raw_parts(ptr as *const u8, len as usize) }
}

pub struct DmaOptions {
    /// [`OPT_EXPECT_DMA`]`=1`: no pci-epf-test device is a failure.
    pub expect: bool,
    /// [`OPT_DMA_IRQ`]`=msi`: use MSI even if the device has MSI-X.
    pub msi: bool,
}

pub fn dma_options(cmdline: &[u8], checks: &mut Checks) -> DmaOptions {
    const EXPECT: &[u8] = text!(OPT_EXPECT_DMA, "=").as_bytes();
    const IRQ: &[u8] = text!(OPT_DMA_IRQ, "=").as_bytes();
    let mut opts = DmaOptions {
        expect: false,
        msi: false,
    };
    for word in cmdline.split(|&b| b == b' ') {
        if let Some(value) = word.strip_prefix(EXPECT) {
            match value {
                b"0" => opts.expect = false,
                b"1" => opts.expect = true,
                _ => checks.fail(Failure::BadOption(OPT_EXPECT_DMA)),
            }
        } else if let Some(value) = word.strip_prefix(IRQ) {
            match value {
                b"msi" => opts.msi = true,
                b"msix" => opts.msi = false,
                _ => checks.fail(Failure::BadOption(OPT_DMA_IRQ)),
            }
        }
    }
    opts
}

/// [`OPT_EXPECT_MEM`], [`OPT_EXPECT_CPUS`], [`OPT_EXPECT_PCI`], [`OPT_FAULT`] (a deliberate
/// page fault, to test how the VMM reports an exception), [`OPT_HANG`] and [`OPT_FLOOD`].
pub fn expectations(
    cmdline: &[u8],
    ram_mib: u64,
    cpus: Option<u64>,
    bus: &pci::Bus,
    checks: &mut Checks,
) {
    const MEM: &[u8] = text!(OPT_EXPECT_MEM, "=").as_bytes();
    const CPUS: &[u8] = text!(OPT_EXPECT_CPUS, "=").as_bytes();
    const PCI: &[u8] = text!(OPT_EXPECT_PCI, "=").as_bytes();
    const FAULT: &[u8] = OPT_FAULT.as_bytes();
    const HANG: &[u8; OPT_HANG.len()] = &text::join(&[OPT_HANG]);
    const FLOOD: &[u8] = OPT_FLOOD.as_bytes();
    for word in cmdline.split(|&b| b == b' ') {
        if word == HANG {
            checks.hang = true;
        } else if word == FLOOD {
            checks.flood = true;
        } else if word == FAULT {
            Line::new().s("fault: reading ").hex(UNMAPPED).end();
            phys::read64(UNMAPPED);
        } else if let Some(value) = word.strip_prefix(MEM) {
            match text::parse_dec(value) {
                Some(want) if want != ram_mib => {
                    checks.fail(Failure::ExpectMem { want, got: ram_mib })
                }
                Some(_) => {}
                None => checks.fail(Failure::BadOption(OPT_EXPECT_MEM)),
            }
        } else if let Some(value) = word.strip_prefix(CPUS) {
            match text::parse_dec(value) {
                Some(want) if Some(want) != cpus => {
                    checks.fail(Failure::ExpectCpus { want, got: cpus })
                }
                Some(_) => {}
                None => checks.fail(Failure::BadOption(OPT_EXPECT_CPUS)),
            }
        } else if let Some(value) = word.strip_prefix(PCI) {
            match parse_pci_id(value) {
                Some(id) if !bus.listed().iter().any(|&(_, got)| got == id) => {
                    checks.fail(Failure::ExpectPci(id))
                }
                Some(_) => {}
                None => checks.fail(Failure::BadOption(OPT_EXPECT_PCI)),
            }
        }
    }
}

/// `VVVV:DDDD` as the vendor/device dword of configuration space (vendor in the low half).
fn parse_pci_id(s: &[u8]) -> Option<u32> {
    let (vendor, device) = (s.get(..4)?, s.get(5..)?);
    if s.get(4) != Some(&b':') || device.len() != 4 {
        return None;
    }
    // Four hex digits each: both fit in 16 bits.
    Some(text::parse_hex(vendor)? as u32 | (text::parse_hex(device)? as u32) << 16)
}
