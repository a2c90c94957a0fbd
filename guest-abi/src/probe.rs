//! The probe guest's command-line options and the parts of its output that the VMM and the
//! tests match.
//!
//! Options are space-separated words; those with a value are `name=value`, the name being the
//! constant here. Every output line starts with [`LINE_PREFIX`]; for each line below there
//! is the text the probe prints after the prefix and the whole line's start, prefix included,
//! for matching its serial output.

/// A macro, not only a constant, so that `concat!` can build the whole-line constants.
macro_rules! prefix {
    () => {
        "probe: "
    };
}

/// Starts every line the probe prints: tells its lines apart from anything else on the serial
/// port (firmware, the VMM's own messages) and marks the guest's first output.
pub const LINE_PREFIX: &str = prefix!();

/// Defines the text after [`LINE_PREFIX`] and the whole line's start from the one literal.
macro_rules! probe_line {
    ($(#[doc = $doc:literal])* $text:literal => $after_prefix:ident, $whole:ident) => {
        $(#[doc = $doc])*
        ///
        /// The text after [`LINE_PREFIX`], as the probe prints it.
        pub const $after_prefix: &str = $text;
        $(#[doc = $doc])*
        ///
        /// The whole line's start, [`LINE_PREFIX`] included, as the serial output shows it.
        pub const $whole: &str = concat!(prefix!(), $text);
    };
}

/// Starts both result lines ([`RESULT_OK_LINE`], [`RESULT_FAIL_PREFIX`]). The result line is
/// the probe's last, printed right after the ready mark: outside the VMM, the sign the guest
/// is up.
pub const RESULT_PREFIX: &str = concat!(prefix!(), "result");
probe_line! {
    /// The result line when every check passed.
    "result ok" => RESULT_OK, RESULT_OK_LINE
}
probe_line! {
    /// Starts the result line when a check failed (the reason follows), after an exception or
    /// after a panic.
    "result FAIL: " => RESULT_FAIL, RESULT_FAIL_PREFIX
}
probe_line! {
    /// Starts the DMA result line when every DMA check passed (regions and bytes follow).
    "dma ok: " => DMA_OK, DMA_OK_PREFIX
}
probe_line! {
    /// Starts the DMA result line when a DMA check failed (the run fails too).
    "dma FAIL: " => DMA_FAIL, DMA_FAIL_PREFIX
}
probe_line! {
    /// The DMA result line without a pci-epf-test device on bus 0 (and no
    /// [`OPT_EXPECT_DMA`]`=1`).
    "dma skipped: no pci-epf-test device" => DMA_SKIPPED, DMA_SKIPPED_LINE
}

probe_line! {
    /// Starts the line listing one function on bus 0: `00:dd.f VVVV:DDDD class CCCCCC`, then
    /// each BAR as `barN KIND ADDRESS size SIZE`, KIND being `io`, `mem32` or `mem64`.
    "pci " => PCI_FUNCTION, PCI_FUNCTION_PREFIX
}
probe_line! {
    /// Starts the line with the first dword of one BAR of a function other than a
    /// pci-epf-test one: `00:dd.f barN KIND ADDRESS: VALUE`, or instead of the value why it
    /// was not read (`not placed`, `decoding off`, `not mapped`).
    "bar read " => BAR_READ, BAR_READ_PREFIX
}
probe_line! {
    /// The MSI-X pending-bit check passed: with the pci-epf-test device on MSI-X, a vector
    /// raised while masked (by its entry, then by the function mask) set its PBA bit and
    /// arrived once, when unmasked.
    "msix pba ok" => MSIX_PBA_OK, MSIX_PBA_OK_LINE
}
probe_line! {
    /// Starts the MSI-X pending-bit result line when that check failed (the run fails too).
    "msix pba FAIL: " => MSIX_PBA_FAIL, MSIX_PBA_FAIL_PREFIX
}
probe_line! {
    /// Starts the line describing one guest NUMA node as the ACPI SRAT and SLIT give it, one
    /// line per node, in node order: `N cpus LIST mem RANGES distances D,D,..`. LIST is the
    /// node's Local APIC IDs (`0-3,6`; `none` for a memory-only node), RANGES its memory as
    /// `BASE-END` (hex, END exclusive) joined by `,` (`none` if it has none), the distances
    /// its SLIT row (`none` without a SLIT). Not printed when there is no SRAT.
    "numa node " => NUMA_NODE, NUMA_NODE_PREFIX
}

const fn starts_with(s: &str, prefix: &str) -> bool {
    let (s, prefix) = (s.as_bytes(), prefix.as_bytes());
    if s.len() < prefix.len() {
        return false;
    }
    let mut i = 0;
    while i < prefix.len() {
        if s[i] != prefix[i] {
            return false;
        }
        i += 1;
    }
    true
}

// Whoever waits for the result line must see both outcomes.
const _: () = assert!(
    starts_with(RESULT_OK_LINE, RESULT_PREFIX) && starts_with(RESULT_FAIL_PREFIX, RESULT_PREFIX)
);

/// `probe.expect_mem=<MiB>`: the RAM the memory map describes, in whole MiB rounded down,
/// must equal it. The VMM passes what its own E820 map adds up to.
pub const OPT_EXPECT_MEM: &str = "probe.expect_mem";
/// `probe.expect_cpus=<N>`: the MP table's enabled processors must equal it.
pub const OPT_EXPECT_CPUS: &str = "probe.expect_cpus";
/// `probe.expect_dma=1` makes a missing pci-epf-test device a failure (`=0`, the default:
/// `dma skipped`). The VMM passes `=1` when it attaches its own (`--user-device epf`). A
/// pci-epf-test function found on bus 0 gets the DMA checks either way.
pub const OPT_EXPECT_DMA: &str = "probe.expect_dma";
/// `probe.expect_pci=VVVV:DDDD` (vendor and device ID, four hex digits each): a function with
/// these IDs must be on bus 0. May be given more than once.
pub const OPT_EXPECT_PCI: &str = "probe.expect_pci";
/// `probe.dma_irq=msi` or `=msix` (the default): the interrupt the pci-epf-test device is set
/// up with (MSI is also used when the device has no MSI-X).
pub const OPT_DMA_IRQ: &str = "probe.dma_irq";
/// `probe.fault`: read an unmapped address after the memory test, to exercise the exception
/// report and [`crate::exit::EXCEPTION`].
pub const OPT_FAULT: &str = "probe.fault";
/// `probe.hang`: stay alive after the result line instead of exiting, for tests that stop a
/// running guest from the VMM side (signals, timeouts).
pub const OPT_HANG: &str = "probe.hang";
/// `probe.flood`: after the result line, print numbered lines on the console forever instead
/// of exiting, for tests of a console nobody reads and of the serial log's size cap.
pub const OPT_FLOOD: &str = "probe.flood";
/// `probe.expect_numa=N/CPUS/RANGES`, once per guest NUMA node: the SRAT must describe
/// exactly the nodes given, node `N` with the Local APIC IDs CPUS (decimal, ascending,
/// `,`-separated, `a-b` for a run; empty for none) and the memory RANGES (`BASE-END`, hex with `0x`, END
/// exclusive, `,`-separated, in the SRAT's order). The VMM passes one per `--numa`.
pub const OPT_EXPECT_NUMA: &str = "probe.expect_numa";
/// The most guest NUMA nodes the probe keeps apart: `vmm run` refuses more when the probe is
/// the guest.
pub const MAX_NUMA_NODES: usize = 8;
/// The most memory ranges of one guest NUMA node the probe keeps.
pub const MAX_NUMA_RANGES: usize = 8;
