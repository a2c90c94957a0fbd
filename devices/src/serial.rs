//! COM1: a 16550 UART (vm-superio) on ports 0x3f8..0x400.
//!
//! Output goes to any `Write` (stdout, a log file, a test buffer) and the first transmitted
//! byte is timestamped in [`GuestMarks`]. Interrupts leave through an `EventFd` that the VMM
//! registers as the irqfd of GSI 4. Input comes from [`SerialInput`], an event-manager
//! subscriber that moves bytes from a readable fd (stdin) into the receive FIFO. The VMM gives
//! the UART an [`output::BoundedOutput`], so that a console nobody reads cannot block a vCPU.

pub mod output;

use std::fmt;
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::sync::{Arc, Mutex, PoisonError};

use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};
use vm_superio::serial::{Error as SerialError, SerialEvents};
use vm_superio::{Serial, Trigger};
use vmm_sys_util::eventfd::EventFd;

use crate::bus::BusDevice;
use crate::marks::GuestMarks;

/// Raises the serial interrupt by writing to an `EventFd` (an irqfd on the VMM side).
#[derive(Debug)]
pub struct EventFdTrigger(EventFd);

impl EventFdTrigger {
    /// Wraps `evt`.
    pub fn new(evt: EventFd) -> Self {
        EventFdTrigger(evt)
    }
}

impl Trigger for EventFdTrigger {
    type E = io::Error;

    fn trigger(&self) -> io::Result<()> {
        self.0.write(1)
    }
}

/// Serial events we care about: any transmitted byte marks "first output". A byte the writer
/// failed to take still shows the guest reached its console, so it counts too.
struct OutputMarks(Arc<GuestMarks>);

impl SerialEvents for OutputMarks {
    fn buffer_read(&self) {}
    fn out_byte(&self) {
        self.0.record_first_output();
    }
    fn tx_lost_byte(&self) {
        self.0.record_first_output();
    }
    fn in_buffer_empty(&self) {}
}

type Uart = Serial<EventFdTrigger, OutputMarks, Box<dyn Write + Send>>;

/// The COM1 device as seen on the PIO bus.
pub struct SerialDevice {
    uart: Uart,
    tx_errors: u64,
}

impl fmt::Debug for SerialDevice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SerialDevice")
            .field("tx_errors", &self.tx_errors)
            .finish_non_exhaustive()
    }
}

impl SerialDevice {
    /// A UART raising `interrupt` and writing to `out`, recording the first byte in `marks`.
    pub fn new(interrupt: EventFd, out: Box<dyn Write + Send>, marks: Arc<GuestMarks>) -> Self {
        SerialDevice {
            uart: Serial::with_events(EventFdTrigger::new(interrupt), OutputMarks(marks), out),
            tx_errors: 0,
        }
    }

    /// Queues host input for the guest. Returns how many bytes fitted in the receive FIFO.
    pub fn enqueue(&mut self, input: &[u8]) -> usize {
        match self.uart.enqueue_raw_bytes(input) {
            Ok(n) => n,
            Err(SerialError::FullFifo) => 0,
            Err(e) => {
                tracing::debug!("serial: raising the receive interrupt failed: {e:?}");
                // The bytes are queued even when the interrupt could not be raised.
                0
            }
        }
    }

    /// Free space in the receive FIFO.
    pub fn fifo_capacity(&self) -> usize {
        self.uart.fifo_capacity()
    }
}

impl BusDevice for SerialDevice {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        // A wider access spans consecutive registers, as on an 8-bit ISA bus. Offsets come
        // from the bus but the trait allows any: one near 2^64 must not overflow.
        for (i, b) in data.iter_mut().enumerate() {
            let reg = offset.saturating_add(i as u64);
            *b = if reg < 8 {
                self.uart.read(reg as u8)
            } else {
                0xff
            };
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        for (i, &b) in data.iter().enumerate() {
            let reg = offset.saturating_add(i as u64);
            if reg >= 8 {
                break;
            }
            if let Err(e) = self.uart.write(reg as u8, b) {
                // Only the first failure is logged: a closed stdout fails every byte.
                if self.tx_errors == 0 {
                    tracing::debug!("serial: register {reg} write failed: {e:?}");
                }
                self.tx_errors += 1;
            }
        }
    }
}

/// Reads the process's stdin straight from fd 0. `std::io::Stdin` buffers internally, which
/// would hide bytes from epoll; this reader does not.
#[derive(Debug, Default, Clone, Copy)]
pub struct StdinFd;

impl Read for StdinFd {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        // SAFETY: fd 0 stays open for the life of the process and `buf` is a valid, writable
        // buffer of `buf.len()` bytes.
        let n = unsafe { libc::read(0, buf.as_mut_ptr().cast(), buf.len()) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(n as usize)
    }
}

impl AsRawFd for StdinFd {
    fn as_raw_fd(&self) -> RawFd {
        0
    }
}

/// Whether stdin can feed the serial console: not `/dev/null` and not a regular file (epoll
/// refuses regular files). A TTY, pipe or socket qualifies.
pub fn stdin_is_pollable() -> bool {
    // SAFETY: `st` is plain data filled by fstat; fd 0 is only inspected.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: valid fd number and a valid pointer to a stat buffer.
    if unsafe { libc::fstat(0, &mut st) } != 0 {
        return false;
    }
    match st.st_mode & libc::S_IFMT {
        libc::S_IFIFO | libc::S_IFSOCK => true,
        // /dev/null is char device 1:3; any other char device (a TTY) is fine.
        libc::S_IFCHR => !(libc::major(st.st_rdev) == 1 && libc::minor(st.st_rdev) == 3),
        _ => false,
    }
}

/// Size of one read from the input fd: the UART FIFO holds 64 bytes.
const INPUT_CHUNK: usize = 64;

/// Event-manager subscriber moving bytes from `input` into the serial receive FIFO.
pub struct SerialInput<R: Read + AsRawFd> {
    input: R,
    serial: Arc<Mutex<SerialDevice>>,
    dropped: u64,
    eof: bool,
}

impl<R: Read + AsRawFd> SerialInput<R> {
    /// Feeds `serial` from `input`.
    pub fn new(input: R, serial: Arc<Mutex<SerialDevice>>) -> Self {
        SerialInput {
            input,
            serial,
            dropped: 0,
            eof: false,
        }
    }

    /// Bytes dropped because the guest had not drained the FIFO.
    pub fn dropped(&self) -> u64 {
        self.dropped
    }

    /// Whether the input reached end of file (and was unregistered).
    pub fn eof(&self) -> bool {
        self.eof
    }

    fn stop(&mut self, ops: &mut EventOps) {
        self.eof = true;
        if let Err(e) = ops.remove(Events::empty(&self.input)) {
            tracing::debug!("serial input: unregistering fd failed: {e:?}");
        }
    }
}

impl<R: Read + AsRawFd> MutEventSubscriber for SerialInput<R> {
    // A hang-up needs no case of its own: epoll reports the fd readable and the read returns
    // 0 (end of file) once the remaining bytes are drained.
    fn process(&mut self, _events: Events, ops: &mut EventOps) {
        let mut buf = [0u8; INPUT_CHUNK];
        match self.input.read(&mut buf) {
            Ok(0) => self.stop(ops),
            Ok(n) => {
                let taken = self
                    .serial
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .enqueue(&buf[..n]);
                if taken < n {
                    self.dropped += (n - taken) as u64;
                    tracing::debug!("serial input: FIFO full, dropped {} byte(s)", n - taken);
                }
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => {
                tracing::debug!("serial input: read failed ({e}); no more input");
                self.stop(ops);
            }
        }
    }

    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new(&self.input, EventSet::IN)) {
            tracing::debug!(
                "serial input: cannot watch fd {}: {e:?}",
                self.input.as_raw_fd()
            );
            self.eof = true;
        }
    }
}

/// A cloneable in-memory writer, for capturing serial output (tests, reports).
#[derive(Clone, Debug, Default)]
pub struct SharedBuffer(Arc<Mutex<Vec<u8>>>);

impl SharedBuffer {
    /// An empty buffer.
    pub fn new() -> Self {
        Self::default()
    }

    /// Everything written so far.
    pub fn contents(&self) -> Vec<u8> {
        self.0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }
}

impl Write for SharedBuffer {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use event_manager::{EventManager, SubscriberOps};
    use std::os::unix::net::UnixStream;
    use std::time::Instant;
    use vmm_sys_util::eventfd::EFD_NONBLOCK;

    const THR: u64 = 0;
    const IER: u64 = 1;
    const LSR: u64 = 5;
    const LSR_DATA_READY: u8 = 0x01;

    fn serial() -> (SerialDevice, SharedBuffer, EventFd, Arc<GuestMarks>) {
        let irq = EventFd::new(EFD_NONBLOCK).unwrap();
        let out = SharedBuffer::new();
        let marks = Arc::new(GuestMarks::new(Instant::now()));
        let dev = SerialDevice::new(
            irq.try_clone().unwrap(),
            Box::new(out.clone()),
            marks.clone(),
        );
        (dev, out, irq, marks)
    }

    fn read_reg(dev: &mut SerialDevice, reg: u64) -> u8 {
        let mut b = [0u8];
        dev.read(reg, &mut b);
        b[0]
    }

    #[test]
    fn output_reaches_writer_and_marks_first_output() {
        let (mut dev, out, _irq, marks) = serial();
        assert_eq!(marks.first_output(), None);
        dev.write(THR, b"K");
        let first = marks.first_output().expect("first output recorded");
        dev.write(THR, b"!");
        assert_eq!(out.contents(), b"K!");
        assert_eq!(marks.first_output(), Some(first));
    }

    /// Found by the `serial` fuzz target: a wide access at an offset near 2^64 overflowed
    /// the register index (a panic with overflow checks on).
    #[test]
    fn accesses_at_any_offset_are_harmless() {
        let (mut dev, out, _irq, _marks) = serial();
        dev.write(7, &[0x5a]);
        for off in [u64::MAX, u64::MAX - 1, u64::MAX - 3, 8, 1 << 40] {
            let mut buf = [0u8; 4];
            dev.read(off, &mut buf);
            assert_eq!(buf, [0xff; 4], "read at {off:#x}");
            dev.write(off, b"abcd");
        }
        assert_eq!(out.contents(), b"");
        assert_eq!(read_reg(&mut dev, 7), 0x5a);
    }

    #[test]
    fn input_is_enqueued_and_raises_the_interrupt() {
        let (mut dev, _out, irq, _marks) = serial();
        // Enable the received-data interrupt, as a driver would.
        dev.write(IER, &[0x01]);
        assert_eq!(dev.enqueue(b"ab"), 2);
        assert_eq!(irq.read().unwrap(), 1);
        assert_ne!(read_reg(&mut dev, LSR) & LSR_DATA_READY, 0);
        assert_eq!(read_reg(&mut dev, THR), b'a');
        assert_eq!(read_reg(&mut dev, THR), b'b');
        assert_eq!(read_reg(&mut dev, LSR) & LSR_DATA_READY, 0);
    }

    #[test]
    fn input_subscriber_feeds_fifo_drops_overflow_and_stops_at_eof() {
        let (dev, _out, _irq, _marks) = serial();
        let dev = Arc::new(Mutex::new(dev));
        let (mut host, guest_side) = UnixStream::pair().unwrap();
        let mut em = EventManager::<SerialInput<UnixStream>>::new().unwrap();
        let id = em.add_subscriber(SerialInput::new(guest_side, dev.clone()));

        host.write_all(b"hello").unwrap();
        assert_eq!(em.run_with_timeout(1000).unwrap(), 1);
        {
            let mut d = dev.lock().unwrap();
            let got: Vec<u8> = (0..5).map(|_| read_reg(&mut d, THR)).collect();
            assert_eq!(got, b"hello");
        }

        // 100 bytes into a 64-byte FIFO: 64 kept, 36 dropped.
        host.write_all(&[b'x'; 100]).unwrap();
        while dev.lock().unwrap().fifo_capacity() > 0
            || em.subscriber_mut(id).unwrap().dropped() < 36
        {
            assert!(em.run_with_timeout(1000).unwrap() > 0, "no input event");
        }
        assert_eq!(em.subscriber_mut(id).unwrap().dropped(), 36);

        drop(host);
        em.run_with_timeout(1000).unwrap();
        assert!(em.subscriber_mut(id).unwrap().eof());
        // Unregistered: nothing more is reported.
        assert_eq!(em.run_with_timeout(50).unwrap(), 0);
    }
}
