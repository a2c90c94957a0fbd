//! What one passthrough device has done, counted as it happens and read by the machine API's
//! `vm.counters`: relaxed atomics, one add per event, no lock.
//!
//! Interrupts a device raises go from its eventfd to KVM by irqfd without passing through the
//! VMM, so `interrupts` counts only those the passthrough model delivers itself (a masked
//! vector's pending signal released at unmask).

use std::sync::atomic::{AtomicU64, Ordering};

/// One device's counters.
#[derive(Debug, Default)]
pub struct DeviceCounters {
    /// Bytes of guest RAM DMA-mapped for the device.
    pub dma_map_bytes: AtomicU64,
    /// Bytes the device read from guest RAM through vfio-user DMA_READ.
    pub dma_read_bytes: AtomicU64,
    /// Bytes the device wrote to guest RAM through vfio-user DMA_WRITE.
    pub dma_write_bytes: AtomicU64,
    /// Interrupts the passthrough model delivered itself (see the module doc).
    pub interrupts: AtomicU64,
    /// vfio-user messages sent to the device's server (0 for kernel VFIO).
    pub messages_sent: AtomicU64,
    /// vfio-user messages received from it.
    pub messages_received: AtomicU64,
}

impl DeviceCounters {
    /// Adds `n` to `counter`.
    pub fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }

    /// Every counter by the name `vm.counters` gives it.
    pub fn snapshot(&self) -> [(&'static str, u64); 6] {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        [
            ("dma_map_bytes", get(&self.dma_map_bytes)),
            ("dma_read_bytes", get(&self.dma_read_bytes)),
            ("dma_write_bytes", get(&self.dma_write_bytes)),
            ("interrupts", get(&self.interrupts)),
            ("messages_sent", get(&self.messages_sent)),
            ("messages_received", get(&self.messages_received)),
        ]
    }
}
