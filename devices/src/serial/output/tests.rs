use super::*;
use std::sync::mpsc;
use std::time::Instant;

use crate::serial::SharedBuffer;

/// A sink that takes nothing until its sender is dropped: a pipe nobody reads.
struct Stalled(Mutex<mpsc::Receiver<()>>);

impl Write for Stalled {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let _ = self.0.lock().unwrap().recv();
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

#[test]
fn a_drained_sink_gets_every_byte_in_order() {
    let sink = SharedBuffer::new();
    let (mut out, mut handle) = OutputHandle::start(Box::new(sink.clone()), 4096, None).unwrap();
    let mut want = Vec::new();
    for i in 0..2000u32 {
        let line = format!("line {i}\n");
        // Small writes, as the UART makes them, a little at a time so the ring never fills.
        out.write_all(line.as_bytes()).unwrap();
        want.extend_from_slice(line.as_bytes());
        if i % 100 == 0 {
            while handle.stats().written_bytes + 1024 < want.len() as u64 {
                std::thread::yield_now();
            }
        }
    }
    let stats = handle.finish(Duration::from_secs(5));
    assert_eq!(sink.contents(), want);
    assert_eq!(stats.written_bytes, want.len() as u64);
    assert_eq!(stats.dropped_bytes, 0);
    assert_eq!(stats.buffer_bytes, 4096);
}

#[test]
fn a_stalled_sink_never_blocks_the_writer_and_drops_are_counted() {
    let (release, gate) = mpsc::channel();
    let cap = 4096;
    let (mut out, mut handle) =
        OutputHandle::start(Box::new(Stalled(Mutex::new(gate))), cap, None).unwrap();
    let total = 3 * cap;
    let started = Instant::now();
    for _ in 0..total {
        // One byte per call, as the UART writes.
        assert_eq!(out.write(b"x").unwrap(), 1);
    }
    assert!(started.elapsed() < Duration::from_secs(2));
    // The ring holds at most `cap` and the writer at most `cap` in flight.
    let during = handle.stats();
    assert!(
        during.dropped_bytes >= (total - 2 * cap) as u64,
        "{during:?}"
    );
    assert_eq!(during.written_bytes, 0);

    let ending = Instant::now();
    let stats = handle.finish(Duration::from_millis(100));
    assert!(ending.elapsed() < Duration::from_secs(2));
    assert_eq!(stats.written_bytes, 0);
    assert_eq!(stats.dropped_bytes, total as u64, "{stats:?}");
    // Once ended, nothing more is taken.
    assert_eq!(out.write(b"late").unwrap(), 4);
    drop(release);
    drop(handle);
}

#[test]
fn the_log_is_cut_at_its_cap_with_one_marker_line() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("serial.log");
    let mut log = CappedLog::new(File::create(&path).unwrap(), 10);
    let cut = log.cut_counter();
    log.write_all(b"abcdef").unwrap();
    log.write_all(b"ghijkl").unwrap();
    log.write_all(b"mnop\n").unwrap();
    log.flush().unwrap();
    let text = std::fs::read_to_string(&path).unwrap();
    let (kept, marker) = text.split_once('\n').unwrap();
    assert_eq!(kept, "abcdefghij");
    assert!(marker.starts_with(CUT_MARKER), "{text}");
    assert!(marker.contains("10 bytes"), "{text}");
    assert_eq!(text.matches(CUT_MARKER).count(), 1);
    assert!(text.ends_with("]\n"));
    assert_eq!(cut.load(Ordering::Relaxed), 7);
}

#[test]
fn a_log_under_its_cap_is_whole_and_unmarked() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("serial.log");
    let mut log = CappedLog::new(File::create(&path).unwrap(), 10);
    log.write_all(b"0123456789").unwrap();
    assert_eq!(std::fs::read(&path).unwrap(), b"0123456789");
    assert_eq!(log.cut_counter().load(Ordering::Relaxed), 0);
}

/// Takes everything it is given, slowly: each write(2) as long as a fair part of a stall.
struct Slow(Duration);

impl Write for Slow {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        std::thread::sleep(self.0);
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

#[test]
fn a_reader_that_keeps_taking_a_little_cannot_hold_the_end_past_its_limit() {
    let cap = 1 << 20;
    let stall = Duration::from_millis(200);
    // 16 chunks of 64 KiB at 150 ms each (2.4 s) take longer than 10 stalls (2 s) in all.
    let (mut out, mut handle) =
        OutputHandle::start(Box::new(Slow(Duration::from_millis(150))), cap, None).unwrap();
    assert_eq!(out.write(&vec![b'x'; cap]).unwrap(), cap);
    let started = Instant::now();
    let stats = handle.finish(stall);
    assert!(started.elapsed() < stall * FINISH_STALLS + Duration::from_secs(1));
    assert!(stats.dropped_bytes > 0, "{stats:?}");
    assert_eq!(
        stats.written_bytes + stats.dropped_bytes,
        cap as u64,
        "{stats:?}"
    );
}
