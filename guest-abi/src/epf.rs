//! The pci-epf-test function: Linux's PCI endpoint test function
//! (drivers/pci/endpoint/functions/pci-epf-test.c), as its host driver `pci_endpoint_test`
//! (drivers/misc/pci_endpoint_test.c) drives it. The VMM models it (devices/src/epf.rs), and
//! the probe guest finds it on bus 0 and has it DMA to and from guest RAM.
//!
//! IDs, register offsets and bit values are Linux's, so a real endpoint or Linux's own driver
//! work with the same numbers. [`pattern`] and the checksum parameters are what the VMM's
//! model does where the real function writes random data: a guest can predict them.

/// Texas Instruments.
pub const VENDOR_ID_TI: u16 = 0x104c;
/// TI DRA74x: an ID in `pci_endpoint_test`'s table with the registers in BAR0 and MSI as the
/// default interrupt, so that driver binds to the model as it is.
pub const DEVICE_ID_TI_DRA74X: u16 = 0xb500;
/// Class "other" (base class 0xff), as pci-epf-test's header says.
pub const CLASS_OTHERS: u32 = 0xff_00_00;
/// The BAR with the register block ([`reg`]), as `pci_endpoint_test` expects for the DRA74x.
pub const REG_BAR: usize = 0;

/// Register offsets in [`REG_BAR`] (Linux `PCI_ENDPOINT_TEST_*`), each 32 bits wide.
pub mod reg {
    /// Scratch register the host's BAR test writes and reads back.
    pub const MAGIC: u64 = 0x00;
    /// Command to run ([`super::command`]); reads 0 once taken.
    pub const COMMAND: u64 = 0x04;
    /// Result of the last command ([`super::status`]).
    pub const STATUS: u64 = 0x08;
    /// Source address, low 32 bits.
    pub const SRC_ADDR_LO: u64 = 0x0c;
    /// Source address, high 32 bits.
    pub const SRC_ADDR_HI: u64 = 0x10;
    /// Destination address, low 32 bits.
    pub const DST_ADDR_LO: u64 = 0x14;
    /// Destination address, high 32 bits.
    pub const DST_ADDR_HI: u64 = 0x18;
    /// Transfer size in bytes.
    pub const SIZE: u64 = 0x1c;
    /// The data's checksum ([`super::CRC32_POLY`], [`super::CHECKSUM_SEED`]): input to READ,
    /// output of WRITE.
    pub const CHECKSUM: u64 = 0x20;
    /// Interrupt type to raise when a transfer is done ([`super::irq_type`]).
    pub const IRQ_TYPE: u64 = 0x24;
    /// Interrupt number, 1-based for MSI/MSI-X.
    pub const IRQ_NUMBER: u64 = 0x28;
    /// Transfer flags ([`super::flags`]).
    pub const FLAGS: u64 = 0x2c;
    /// What the endpoint supports ([`super::caps`]); read-only.
    pub const CAPS: u64 = 0x30;
}

/// COMMAND values (one bit per command).
pub mod command {
    /// Raise the INTx interrupt.
    pub const RAISE_INTX_IRQ: u32 = 1 << 0;
    /// Raise MSI number IRQ_NUMBER.
    pub const RAISE_MSI_IRQ: u32 = 1 << 1;
    /// Raise MSI-X number IRQ_NUMBER.
    pub const RAISE_MSIX_IRQ: u32 = 1 << 2;
    /// Read SIZE bytes at SRC_ADDR and compare their checksum with CHECKSUM.
    pub const READ: u32 = 1 << 3;
    /// Write SIZE bytes at DST_ADDR and put their checksum in CHECKSUM.
    pub const WRITE: u32 = 1 << 4;
    /// Copy SIZE bytes from SRC_ADDR to DST_ADDR.
    pub const COPY: u32 = 1 << 5;
    /// Set up a doorbell.
    pub const ENABLE_DOORBELL: u32 = 1 << 6;
    /// Tear a doorbell down.
    pub const DISABLE_DOORBELL: u32 = 1 << 7;
}

/// STATUS bits.
pub mod status {
    /// READ found the expected checksum.
    pub const READ_SUCCESS: u32 = 1 << 0;
    /// READ failed (DMA fault or checksum mismatch).
    pub const READ_FAIL: u32 = 1 << 1;
    /// WRITE done.
    pub const WRITE_SUCCESS: u32 = 1 << 2;
    /// WRITE failed.
    pub const WRITE_FAIL: u32 = 1 << 3;
    /// COPY done.
    pub const COPY_SUCCESS: u32 = 1 << 4;
    /// COPY failed.
    pub const COPY_FAIL: u32 = 1 << 5;
    /// The interrupt for the command was raised.
    pub const IRQ_RAISED: u32 = 1 << 6;
    /// The source address could not be reached.
    pub const SRC_ADDR_INVALID: u32 = 1 << 7;
    /// The destination address could not be reached.
    pub const DST_ADDR_INVALID: u32 = 1 << 8;
    /// Doorbell set-up failed.
    pub const DOORBELL_ENABLE_FAIL: u32 = 1 << 11;
    /// Doorbell tear-down failed.
    pub const DOORBELL_DISABLE_FAIL: u32 = 1 << 13;
}

/// IRQ_TYPE values.
pub mod irq_type {
    /// Legacy INTx.
    pub const INTX: u32 = 0;
    /// MSI.
    pub const MSI: u32 = 1;
    /// MSI-X.
    pub const MSIX: u32 = 2;
}

/// FLAGS bits.
pub mod flags {
    /// Use the endpoint's DMA engine rather than memcpy through a window.
    pub const USE_DMA: u32 = 1 << 0;
}

/// CAPS bits.
pub mod caps {
    /// Transfers need no particular alignment, so the host need not pad its buffers.
    pub const UNALIGNED_ACCESS: u32 = 1 << 0;
    /// MSI is available.
    pub const MSI: u32 = 1 << 1;
    /// MSI-X is available.
    pub const MSIX: u32 = 1 << 2;
    /// INTx is available.
    pub const INTX: u32 = 1 << 3;
}

/// CHECKSUM is Linux's `crc32_le(CHECKSUM_SEED, data)`, as pci-epf-test and its host driver
/// compute it: the reflected CRC-32 with this polynomial and no final inversion (so it is the
/// bitwise NOT of the usual CRC-32).
pub const CRC32_POLY: u32 = 0xedb8_8320;
/// The CRC's initial value: pci-epf-test and `pci_endpoint_test` both start from `~0`.
pub const CHECKSUM_SEED: u32 = !0;

/// The byte-at-a-time table of the [`CRC32_POLY`] CRC: entry `i` is the CRC of byte `i`.
/// Both sides build from it (the probe derives its slice-by-8 tables), so they cannot differ.
pub const CRC32_TABLE: [u32; 256] = {
    let mut table = [0u32; 256];
    let mut i = 0;
    while i < 256 {
        let mut c = i as u32;
        let mut k = 0;
        while k < 8 {
            c = if c & 1 != 0 {
                CRC32_POLY ^ (c >> 1)
            } else {
                c >> 1
            };
            k += 1;
        }
        table[i] = c;
        i += 1;
    }
    table
};

pub mod pattern {
    //! What a WRITE stores in the VMM's model: the real function writes random bytes, the model
    //! a pattern seeded from the destination address, so runs are reproducible and the guest
    //! can check every byte it received.
    //!
    //! 64-bit word `i` (bytes `8 * i ..`, little-endian) of a WRITE to `base` is
    //! [`word`]`(base, i)`: splitmix64 of `base ^ i * PHI`. The mixer constants are public for
    //! code that computes the same in assembly (the probe's page check).

    /// 2^64 / φ, splitmix64's increment (and the stride between word seeds here).
    pub const PHI: u64 = 0x9e37_79b9_7f4a_7c15;
    /// splitmix64's first multiplier.
    pub const MIX1: u64 = 0xbf58_476d_1ce4_e5b9;
    /// splitmix64's second multiplier.
    pub const MIX2: u64 = 0x94d0_49bb_1331_11eb;

    /// One splitmix64 step from state `z`: `z + PHI`, mixed.
    #[inline]
    pub const fn splitmix64(mut z: u64) -> u64 {
        z = z.wrapping_add(PHI);
        z = (z ^ (z >> 30)).wrapping_mul(MIX1);
        z = (z ^ (z >> 27)).wrapping_mul(MIX2);
        z ^ (z >> 31)
    }

    /// Word `index` of what a WRITE to `base` stores.
    #[inline]
    pub const fn word(base: u64, index: u64) -> u64 {
        splitmix64(base ^ index.wrapping_mul(PHI))
    }
}
