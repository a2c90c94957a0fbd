//! Guest console output that cannot block the guest: the UART writes into a ring of fixed
//! size ([`BoundedOutput`]) and a thread of its own moves the ring to the real sink (stdout,
//! the serial log). A sink that does not drain (a pipe nobody reads, a stalled disk) stalls
//! only that thread; once the ring is full, further bytes are dropped and counted, with one
//! rate-limited warning. Without this the vCPU thread itself blocked in write(2), and with
//! it every stop request, SIGTERM included.
//!
//! [`CappedLog`] bounds the serial log file: past its cap it writes one marker line saying
//! where it cut, and counts what it left out.

use std::collections::VecDeque;
use std::fs::File;
use std::io::{self, Write};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::ratelimit::{RateLimit, DEFAULT_INTERVAL};

/// The ring between the UART and the writer thread: enough for any burst a console reader
/// that is merely slow falls behind by.
pub const DEFAULT_BUFFER_BYTES: usize = 1 << 20;
/// How long the end of a run waits on a sink that takes nothing ([`OutputHandle::finish`]).
pub const FINISH_STALL: Duration = Duration::from_secs(1);
/// [`OutputHandle::finish`] waits at most this many stalls in all.
pub const FINISH_STALLS: u32 = 10;
/// How much the writer thread takes from the ring per write(2).
const CHUNK: usize = 64 << 10;

/// The one warning that output is being dropped (rate-limited: a guest printing into a full
/// ring fails every byte).
static DROP_WARNING: RateLimit = RateLimit::new(1, DEFAULT_INTERVAL);

/// What became of the guest's console output, for the run report.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct OutputStats {
    /// The ring's size.
    pub buffer_bytes: u64,
    /// Bytes the sink took.
    pub written_bytes: u64,
    /// Bytes that never reached the sink: the ring was full, the sink failed, or they were
    /// still buffered when the run ended and the sink took nothing more.
    pub dropped_bytes: u64,
    /// Bytes the serial log left out past its cap ([`CappedLog`]).
    pub log_cut_bytes: u64,
}

#[derive(Debug)]
struct State {
    ring: VecDeque<u8>,
    /// Bytes the writer has taken out of the ring and not yet handed to the sink.
    in_flight: usize,
    written: u64,
    dropped: u64,
    /// No more input: the writer ends once the ring is empty.
    closed: bool,
    /// The sink failed: everything from now on is dropped.
    broken: bool,
}

#[derive(Debug)]
struct Shared {
    capacity: usize,
    state: Mutex<State>,
    /// Signalled when bytes arrive or input closes (the writer waits on it) and when the
    /// writer made progress (`finish` waits on it).
    changed: Condvar,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// The writing end the UART gets: never blocks on the sink.
#[derive(Debug)]
pub struct BoundedOutput(Arc<Shared>);

impl Write for BoundedOutput {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let mut s = self.0.lock();
        // The writer only waits on an empty ring: a wake-up (a system call) per byte is needed
        // only when this write makes the ring non-empty.
        let wake = s.ring.is_empty();
        let room = if s.broken || s.closed {
            0
        } else {
            self.0.capacity - s.ring.len()
        };
        let taken = room.min(buf.len());
        s.ring.extend(&buf[..taken]);
        let lost = (buf.len() - taken) as u64;
        if lost > 0 {
            s.dropped += lost;
            let total = s.dropped;
            drop(s);
            crate::log_limited!(
                &DROP_WARNING,
                warn,
                "serial: the guest console output is not being read; dropping what does not fit \
                 in its {} KiB buffer ({total} bytes so far)",
                self.0.capacity >> 10
            );
        } else {
            drop(s);
        }
        if taken > 0 && wake {
            self.0.changed.notify_all();
        }
        // What was dropped is accounted for: the UART must not see an error per byte.
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// The writer thread and the counters; [`OutputHandle::finish`] (or dropping it) ends it.
#[derive(Debug)]
pub struct OutputHandle {
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
    log_cut: Arc<AtomicU64>,
    finished: Option<OutputStats>,
}

impl OutputHandle {
    /// Starts a thread writing to `sink` what the returned [`BoundedOutput`] takes, through a
    /// ring of `capacity` bytes. `log_cut` is the counter of a [`CappedLog`] sink, if any.
    pub fn start(
        sink: Box<dyn Write + Send>,
        capacity: usize,
        log_cut: Option<Arc<AtomicU64>>,
    ) -> io::Result<(BoundedOutput, OutputHandle)> {
        let shared = Arc::new(Shared {
            capacity,
            state: Mutex::new(State {
                ring: VecDeque::new(),
                in_flight: 0,
                written: 0,
                dropped: 0,
                closed: false,
                broken: false,
            }),
            changed: Condvar::new(),
        });
        let writer = Arc::clone(&shared);
        // Named, so that a seccomp report can say which thread it was.
        let thread = std::thread::Builder::new()
            .name("vmm-serial-out".into())
            .spawn(move || drain(&writer, sink))?;
        Ok((
            BoundedOutput(Arc::clone(&shared)),
            OutputHandle {
                shared,
                thread: Some(thread),
                log_cut: log_cut.unwrap_or_default(),
                finished: None,
            },
        ))
    }

    /// The counters as they are now.
    pub fn stats(&self) -> OutputStats {
        if let Some(done) = self.finished {
            return done;
        }
        let s = self.shared.lock();
        OutputStats {
            buffer_bytes: self.shared.capacity as u64,
            written_bytes: s.written,
            dropped_bytes: s.dropped,
            log_cut_bytes: self.log_cut.load(Ordering::Relaxed),
        }
    }

    /// Closes the input and waits until the sink has taken everything buffered, or until it
    /// took nothing for `stall`, or for [`FINISH_STALLS`] times `stall` in all (a reader
    /// taking a byte now and then): a console nobody reads cannot hold the VMM's exit. What
    /// is left then counts as dropped, and the writer thread is left to the process's exit.
    pub fn finish(&mut self, stall: Duration) -> OutputStats {
        if let Some(done) = self.finished {
            return done;
        }
        let deadline = Instant::now() + stall * FINISH_STALLS;
        let mut s = self.shared.lock();
        s.closed = true;
        self.shared.changed.notify_all();
        let mut stuck = false;
        while !s.ring.is_empty() || s.in_flight > 0 {
            if Instant::now() >= deadline {
                stuck = true;
                break;
            }
            let before = s.written + s.dropped;
            let (next, timeout) = self
                .shared
                .changed
                .wait_timeout(s, stall)
                .unwrap_or_else(PoisonError::into_inner);
            s = next;
            if timeout.timed_out() && s.written + s.dropped == before {
                stuck = true;
                break;
            }
        }
        if stuck {
            let left = (s.ring.len() + s.in_flight) as u64;
            s.ring.clear();
            // The writer's chunk in flight is counted here; it must not count it again.
            s.in_flight = 0;
            s.broken = true;
            s.dropped += left;
            tracing::warn!(
                "serial: the guest console output is not being read; {left} buffered bytes \
                 were not written"
            );
        }
        drop(s);
        if !stuck {
            if let Some(t) = self.thread.take() {
                let _ = t.join();
            }
        }
        let stats = self.stats();
        self.finished = Some(stats);
        stats
    }
}

impl Drop for OutputHandle {
    fn drop(&mut self) {
        self.finish(FINISH_STALL);
    }
}

/// The writer thread: ring to sink until input closes and the ring is empty.
fn drain(shared: &Shared, mut sink: Box<dyn Write + Send>) {
    let mut chunk = Vec::with_capacity(CHUNK);
    loop {
        {
            let mut s = shared.lock();
            while s.ring.is_empty() && !s.closed {
                s = shared
                    .changed
                    .wait(s)
                    .unwrap_or_else(PoisonError::into_inner);
            }
            if s.ring.is_empty() {
                return;
            }
            let n = s.ring.len().min(CHUNK);
            chunk.clear();
            chunk.extend(s.ring.drain(..n));
            s.in_flight = n;
        }
        let result = sink.write_all(&chunk).and_then(|()| sink.flush());
        let mut s = shared.lock();
        // Zero when `finish` gave up on this chunk and counted it already.
        let n = std::mem::take(&mut s.in_flight) as u64;
        match result {
            Ok(()) => s.written += n,
            Err(e) => {
                if !s.broken {
                    tracing::debug!("serial: writing guest output failed ({e}); dropping the rest");
                }
                s.broken = true;
                s.dropped += n + s.ring.len() as u64;
                s.ring.clear();
            }
        }
        drop(s);
        shared.changed.notify_all();
    }
}

/// The serial log file, cut at `max` bytes of guest output with a marker line.
#[derive(Debug)]
pub struct CappedLog {
    file: File,
    max: u64,
    logged: u64,
    /// Whether the last byte logged ended a line (the marker starts on a line of its own).
    at_line_start: bool,
    cut: Arc<AtomicU64>,
}

/// How the marker line starts.
pub const CUT_MARKER: &str = "[vmm: serial log cut here";

impl CappedLog {
    /// Logs to `file` at most `max` bytes of output.
    pub fn new(file: File, max: u64) -> Self {
        CappedLog {
            file,
            max,
            logged: 0,
            at_line_start: true,
            cut: Arc::default(),
        }
    }

    /// Bytes left out past the cap, as the log goes on.
    pub fn cut_counter(&self) -> Arc<AtomicU64> {
        Arc::clone(&self.cut)
    }
}

impl Write for CappedLog {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let room = self.max.saturating_sub(self.logged);
        let keep = buf.len().min(usize::try_from(room).unwrap_or(usize::MAX));
        if keep > 0 {
            self.file.write_all(&buf[..keep])?;
            self.logged += keep as u64;
            self.at_line_start = buf[keep - 1] == b'\n';
        }
        let cut = (buf.len() - keep) as u64;
        if cut > 0 && self.cut.fetch_add(cut, Ordering::Relaxed) == 0 {
            let newline = if self.at_line_start { "" } else { "\n" };
            let marker = format!(
                "{newline}{CUT_MARKER}: it reached its cap of {} bytes; later guest output \
                     is not logged (the run report counts it; raise the cap with \
                     --serial-log-max)]\n",
                self.max
            );
            self.file.write_all(marker.as_bytes())?;
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        self.file.flush()
    }
}

#[cfg(test)]
mod tests;
