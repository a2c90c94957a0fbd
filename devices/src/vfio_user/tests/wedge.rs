//! A peer cannot wedge the other side, nor reach memory it gave back: the client's connect
//! has a deadline, the server's replies and the client's requests a send deadline, and a
//! DMA_UNMAP's window is gone once its reply is read.

use std::sync::mpsc;

use super::*;
use crate::vfio_user::wire::DmaAccess;

/// Rounds of the unmap race: without the window dropped by the reader, the DMA_READ that
/// follows the reply in the same write is served in most of them.
const UNMAP_ROUNDS: usize = 200;

#[test]
fn dma_read_right_after_the_unmap_reply_is_refused() {
    const IOVA: u64 = 0x10000;
    let (tx, rx) = mpsc::channel();
    let (client, fake) = fake_server(LONG, move |p| {
        for round in 0..UNMAP_ROUNDS {
            let m = p.recv();
            assert_eq!(m.header.command, cmd::DMA_MAP);
            p.send(Header::reply(&m.header, 0), &[]);
            let m = p.recv();
            assert_eq!(m.header.command, cmd::DMA_UNMAP);
            // The reply and a DMA_READ of the window in one write: the client reads both
            // back to back.
            let read = DmaAccess {
                address: IOVA,
                count: 8,
            }
            .encode(&[]);
            let id = round as u16;
            let mut bytes = Header::reply(&m.header, m.payload.len()).encode().to_vec();
            bytes.extend_from_slice(&m.payload);
            bytes.extend_from_slice(&Header::command(id, cmd::DMA_READ, read.len()).encode());
            bytes.extend_from_slice(&read);
            p.send_raw(&bytes);
            let r = p.recv();
            assert_eq!((r.header.msg_id, r.header.command), (id, cmd::DMA_READ));
            tx.send(r.header.is_error().then_some(r.header.error as i32))
                .unwrap();
        }
        p.wait_for_close();
    });
    let f = Arc::new(memfd(0x1000));
    let mut served = Vec::new();
    for _ in 0..UNMAP_ROUNDS {
        client.dma_map(IOVA, 0x1000, &f, 0, true, true).unwrap();
        client.dma_unmap(IOVA, 0x1000).unwrap();
        // The next DMA_MAP only once the DMA_READ was answered (the fake expects them in turn).
        served.push(rx.recv_timeout(LONG).unwrap());
    }
    let from_gone_window = served.iter().filter(|e| **e != Some(libc::EFAULT)).count();
    assert_eq!(
        from_gone_window, 0,
        "{from_gone_window} of {UNMAP_ROUNDS} DMA_READs after the UNMAP reply were served"
    );
    drop(client);
    fake.join().unwrap();
}

/// Writes DEVICE_GET_INFO requests on `s` and never reads a reply, until the server stops
/// reading too (it is stuck sending: our write times out) or hangs up; the write's error.
fn flood_without_reading(s: &UnixStream) -> ErrorKind {
    s.set_write_timeout(Some(Duration::from_millis(100)))
        .unwrap();
    let one = Header::command(2, cmd::DEVICE_GET_INFO, 0).encode();
    let many: Vec<u8> = one.iter().copied().cycle().take(one.len() * 256).collect();
    loop {
        if let Err(e) = (&*s).write_all(&many) {
            return e.kind();
        }
    }
}

/// The server stopped reading while it was still connected.
fn stuck(kind: ErrorKind) -> bool {
    matches!(kind, ErrorKind::WouldBlock | ErrorKind::TimedOut)
}

#[test]
fn a_client_that_never_reads_is_dropped_within_the_reply_timeout() {
    const TIMEOUT: Duration = Duration::from_millis(300);
    let (a, b) = UnixStream::pair().unwrap();
    let (tx, served) = mpsc::channel();
    std::thread::spawn(move || {
        let regions = Arc::new(MappedRegions::new());
        let mut dev = EpfUserDevice::new(EpfConfig::default(), regions.clone()).unwrap();
        let limits = super::super::server::ServerLimits {
            reply_timeout: TIMEOUT,
            ..Default::default()
        };
        let _ = tx.send(super::super::server::serve_with(
            b, &mut dev, regions, None, limits,
        ));
    });
    let raw = RawPeer { s: a };
    raw.negotiate();
    let why = flood_without_reading(&raw.s);
    assert!(
        stuck(why) || why == ErrorKind::BrokenPipe || why == ErrorKind::ConnectionReset,
        "{why:?}"
    );
    let t = Instant::now();
    let result = served
        .recv_timeout(LONG)
        .expect("the server still waits for a client that does not read");
    assert!(t.elapsed() < PROMPT, "dropped after {:?}", t.elapsed());
    let err = result.unwrap_err();
    assert!(matches!(err, ServerError::NotReading { .. }), "{err:?}");
    assert!(err.to_string().contains("the peer does not read"), "{err}");
}

#[test]
fn sigterm_ends_an_epf_server_whose_client_never_reads_within_a_second() {
    let _one = PROCESS_SERVER.lock().unwrap_or_else(|e| e.into_inner());
    let path = socket_path("term-unread");
    let server = spawn_server(&path);
    wait_for_path(&path);
    let raw = RawPeer {
        s: UnixStream::connect(&path).unwrap(),
    };
    raw.negotiate();
    let why = flood_without_reading(&raw.s);
    assert!(stuck(why), "the server never stopped reading: {why:?}");
    let (tx, done) = mpsc::channel();
    std::thread::spawn(move || tx.send(server.join().unwrap()).unwrap());
    let t = Instant::now();
    // SAFETY: sends SIGTERM to this process, whose handler run_epf_server installed before
    // the socket appeared.
    assert_eq!(unsafe { libc::kill(libc::getpid(), libc::SIGTERM) }, 0);
    let served = done
        .recv_timeout(LONG)
        .expect("SIGTERM did not end a server stuck replying to a client that does not read");
    assert!(
        t.elapsed() < Duration::from_secs(1),
        "took {:?}",
        t.elapsed()
    );
    assert!(served.is_ok(), "{served:?}");
    assert!(!path.exists(), "socket file left behind");
}

/// A server socket at a fresh path that listens and never accepts, with its queue of
/// connections already full: the listener and the one connection that fills it.
fn full_listener(tag: &str) -> (PathBuf, UnixListener, UnixStream) {
    let path = socket_path(tag);
    let listener = UnixListener::bind(&path).unwrap();
    // SAFETY: listen(2) on a socket we own, to shrink its backlog: one connection waits, a
    // second finds the queue full.
    assert_eq!(unsafe { libc::listen(listener.as_raw_fd(), 0) }, 0);
    let queued = UnixStream::connect(&path).unwrap();
    (path, listener, queued)
}

/// `Client::connect` on another thread, so that a connect that never returns fails the test.
fn connect_in_thread(
    path: &Path,
    timeout: Duration,
) -> mpsc::Receiver<Result<Client, ClientError>> {
    let (tx, rx) = mpsc::channel();
    let path = path.to_path_buf();
    std::thread::spawn(move || {
        let _ = tx.send(Client::connect(&path, timeout));
    });
    rx
}

#[test]
fn a_server_that_never_accepts_fails_connect_within_its_timeout() {
    let (path, _listener, _queued) = full_listener("full");
    let t = Instant::now();
    let result = connect_in_thread(&path, SHORT)
        .recv_timeout(LONG)
        .expect("connect still waits for a server whose queue is full");
    let waited = t.elapsed();
    let err = result.unwrap_err();
    assert!(matches!(err, ClientError::NotAccepting { .. }), "{err:?}");
    assert!(waited >= SHORT && waited < PROMPT, "waited {waited:?}");
    assert_eq!(err.class().exit_status(), 2);
    let text = err.to_string();
    assert!(text.contains(&path.display().to_string()), "{text}");
    assert!(text.contains("alive and accepting"), "{text}");
    assert!(!text.contains('\n'), "{text}");
    std::fs::remove_file(&path).unwrap();
}

#[test]
fn a_signal_ends_the_wait_for_a_server_that_never_accepts() {
    // The process's SIGINT handler is shared with the epf server tests.
    let _one = PROCESS_SERVER.lock().unwrap_or_else(|e| e.into_inner());
    let (path, _listener, _queued) = full_listener("full-int");
    let guard = pinning::cancel::SignalGuard::install(None).unwrap();
    let waiting = connect_in_thread(&path, LONG);
    std::thread::sleep(SHORT);
    let t = Instant::now();
    // SAFETY: sends SIGINT to this process, whose handler the guard installed.
    assert_eq!(unsafe { libc::kill(libc::getpid(), libc::SIGINT) }, 0);
    let result = waiting.recv_timeout(LONG);
    let waited = t.elapsed();
    drop(guard);
    // The caught signal stays pending until the next guard: clear it for the other tests.
    drop(pinning::cancel::SignalGuard::install(None).unwrap());
    let err = result.expect("SIGINT did not end the wait").unwrap_err();
    assert!(
        matches!(
            err,
            ClientError::ConnectInterrupted {
                signal: libc::SIGINT,
                ..
            }
        ),
        "{err:?}"
    );
    assert!(waited < PROMPT, "waited {waited:?}");
    assert_eq!(err.class(), ErrorClass::Interrupted(libc::SIGINT));
    std::fs::remove_file(&path).unwrap();
}

#[test]
fn an_error_reply_fails_its_request_keeps_the_connection_and_fails_the_passthrough_device() {
    use crate::pci::device::PciDevice;
    use crate::vfio::VfioPciDevice;
    use crate::vfio_user::UserBackend;

    let rig = epf_rig();
    let client = Arc::new(rig.client);
    let backend = Arc::new(UserBackend::new(client.clone()));
    let mut dev = VfioPciDevice::new(backend).unwrap();
    let failures = Arc::new(Mutex::new(Vec::new()));
    let seen = failures.clone();
    dev.set_failure_handler(Box::new(move |e| seen.lock().unwrap().push(e.to_string())));
    // The epf function has no BAR 1: the server answers the read with an error reply.
    let mut data = [0u8; 4];
    dev.bar_read(1, 0, &mut data);
    assert_eq!(data, [0xff; 4], "a failed read is all ones");
    let failures = failures.lock().unwrap().clone();
    assert_eq!(failures.len(), 1, "{failures:?}");
    assert!(
        failures[0].contains("the server refused") && failures[0].contains("(os error 22)"),
        "{failures:?}"
    );
    // The connection is still up: the reply was an answer, not a broken stream.
    assert_eq!(client.device_info().unwrap().1, 9);
    drop(dev);
    drop(client);
    assert!(rig.server.join().unwrap().is_ok());
}

/// A server that stops reading cannot hold a request forever either: the send waits at most
/// the request timeout for room, then the connection is broken and every later request fails
/// at once.
#[test]
fn a_server_that_never_reads_fails_the_send_within_the_request_timeout() {
    let (release, hold) = mpsc::channel::<()>();
    // Connected, answering nothing and reading nothing until the test is done.
    let (client, fake) = fake_server(SHORT, move |p| {
        let _ = hold.recv();
        drop(p);
    });
    // More than a socketpair's buffer holds: the send must wait for room. On another thread,
    // so that a send that never returns fails the test instead of hanging it.
    let client = Arc::new(client);
    let (tx, sent) = mpsc::channel();
    let writer = client.clone();
    let t = Instant::now();
    std::thread::spawn(move || {
        let data = vec![0u8; wire::MAX_DATA_XFER];
        let _ = tx.send(writer.region_write(region::BAR0, 0, &data));
    });
    let result = sent
        .recv_timeout(LONG)
        .expect("the send still waits for a server that does not read");
    let waited = t.elapsed();
    let err = result.unwrap_err();
    assert!(matches!(err, ClientError::Send { .. }), "{err:?}");
    assert!(err.to_string().contains("sending the request"), "{err}");
    assert!(waited >= SHORT && waited < PROMPT, "waited {waited:?}");
    let t = Instant::now();
    let later = client.device_info().unwrap_err();
    assert!(t.elapsed() < SHORT / 2, "took {:?}", t.elapsed());
    assert!(matches!(later, ClientError::Broken { .. }), "{later}");
    release.send(()).unwrap();
    drop(client);
    fake.join().unwrap();
}
