//! [`Global`]: the probe's statics that are written after start-up (boot information, the
//! CPU tables, the memtest's scratch), one CPU and interrupts off.

use core::cell::UnsafeCell;

/// A global used on one CPU with interrupts off.
#[repr(transparent)]
pub struct Global<T>(UnsafeCell<T>);
// SAFETY: the probe is single-threaded; exceptions end the run, and the only interrupt
// handler (apic.rs) touches no `Global`.
unsafe impl<T> Sync for Global<T> {}

impl<T> Global<T> {
    pub const fn new(value: T) -> Self {
        Self(UnsafeCell::new(value))
    }

    /// The value's address, for code that writes it through raw pointers (the CPU tables).
    pub const fn as_ptr(&self) -> *mut T {
        self.0.get()
    }

    /// # Safety
    /// No other reference to the value may be alive.
    #[allow(clippy::mut_from_ref)]
    pub unsafe fn get(&self) -> &mut T {
        &mut *self.0.get()
    }
}
