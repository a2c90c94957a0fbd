//! Guest start-up marks: when the guest first spoke on the serial port, when it said it was
//! ready, and any other mark byte it wrote to the boot-marks port. The VMM's timeline report
//! reads them after the run.

use std::sync::{Mutex, OnceLock, PoisonError};
use std::time::{Duration, Instant};

use guest_abi::marks::READY;

/// How many "other" marks are kept; a guest looping on the port must not grow VMM memory.
pub const MAX_OTHER_MARKS: usize = 64;

/// A mark byte and when it was written, relative to the VMM start.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Mark {
    /// The byte the guest wrote.
    pub byte: u8,
    /// Time since the VMM started.
    pub at: Duration,
}

/// Shared (in an `Arc`) between the devices that observe the guest and the VMM.
#[derive(Debug)]
pub struct GuestMarks {
    start: Instant,
    first_output: OnceLock<Duration>,
    ready: OnceLock<Duration>,
    /// Marks other than ready; later ones are dropped once [`MAX_OTHER_MARKS`] are kept.
    others: Mutex<Vec<Mark>>,
}

impl GuestMarks {
    /// `start` is the VMM's own start instant, so marks line up with the rest of the timeline.
    pub fn new(start: Instant) -> Self {
        GuestMarks {
            start,
            first_output: OnceLock::new(),
            ready: OnceLock::new(),
            others: Mutex::new(Vec::new()),
        }
    }

    /// The instant all durations are measured from.
    pub fn start(&self) -> Instant {
        self.start
    }

    fn now(&self) -> Duration {
        self.start.elapsed()
    }

    /// Records the first serial output byte; later calls change nothing. Returns whether this
    /// call recorded it.
    pub fn record_first_output(&self) -> bool {
        // Cheap check first: this runs for every byte the guest prints.
        if self.first_output.get().is_some() {
            return false;
        }
        self.first_output.set(self.now()).is_ok()
    }

    /// Records a byte written to the boot-marks port: [`READY`] sets the ready time (once),
    /// anything else is appended to the bounded list of other marks.
    pub fn record_mark(&self, byte: u8) {
        let at = self.now();
        if byte == READY {
            let _ = self.ready.set(at);
            return;
        }
        let mut others = self.others.lock().unwrap_or_else(PoisonError::into_inner);
        if others.len() < MAX_OTHER_MARKS {
            others.push(Mark { byte, at });
        }
    }

    /// When the guest first wrote to the serial transmit register.
    pub fn first_output(&self) -> Option<Duration> {
        self.first_output.get().copied()
    }

    /// When the guest wrote the ready mark.
    pub fn ready(&self) -> Option<Duration> {
        self.ready.get().copied()
    }

    /// Marks other than ready, in the order written (at most [`MAX_OTHER_MARKS`]).
    pub fn other_marks(&self) -> Vec<Mark> {
        self.others
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use guest_abi::marks::ENTRY;

    #[test]
    fn first_output_and_ready_are_recorded_once() {
        let marks = GuestMarks::new(Instant::now());
        assert_eq!(marks.first_output(), None);
        assert!(marks.record_first_output());
        let first = marks.first_output().unwrap();
        std::thread::sleep(Duration::from_millis(2));
        assert!(!marks.record_first_output());
        assert_eq!(marks.first_output(), Some(first));

        marks.record_mark(READY);
        let ready = marks.ready().unwrap();
        std::thread::sleep(Duration::from_millis(2));
        marks.record_mark(READY);
        assert_eq!(marks.ready(), Some(ready));
        assert!(marks.other_marks().is_empty());
    }

    #[test]
    fn other_marks_are_bounded() {
        let marks = GuestMarks::new(Instant::now());
        marks.record_mark(ENTRY);
        for i in 0..(MAX_OTHER_MARKS as u32 + 9) {
            marks.record_mark((i % 200) as u8 + 3);
        }
        let others = marks.other_marks();
        assert_eq!(others.len(), MAX_OTHER_MARKS);
        assert_eq!(others[0].byte, ENTRY);
        assert!(others.windows(2).all(|w| w[0].at <= w[1].at));
    }
}
