//! The boot-marks port (`guest_abi::ports::BOOT_MARKS`, one byte): the guest writes a mark byte
//! at interesting points of its start-up (`guest_abi::marks`) and the VMM timestamps them.

use std::sync::Arc;

use crate::bus::BusDevice;
use crate::marks::GuestMarks;

/// The boot-marks device.
#[derive(Debug)]
pub struct BootMarks {
    marks: Arc<GuestMarks>,
}

impl BootMarks {
    /// Records into `marks`.
    pub fn new(marks: Arc<GuestMarks>) -> Self {
        BootMarks { marks }
    }
}

impl BusDevice for BootMarks {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        // The port is one byte wide; a wider write carries the mark in its low byte.
        if offset == 0 {
            if let Some(&byte) = data.first() {
                self.marks.record_mark(byte);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use guest_abi::marks::{ENTRY, READY};
    use std::time::Instant;

    #[test]
    fn writes_record_marks() {
        let marks = Arc::new(GuestMarks::new(Instant::now()));
        let mut dev = BootMarks::new(marks.clone());
        dev.write(0, &[ENTRY]);
        dev.write(0, &[READY]);
        dev.write(0, &[READY]);
        assert!(marks.ready().is_some());
        let others = marks.other_marks();
        assert_eq!(others.len(), 1);
        assert_eq!(others[0].byte, ENTRY);
        let mut data = [0xffu8];
        dev.read(0, &mut data);
        assert_eq!(data, [0]);
    }
}
