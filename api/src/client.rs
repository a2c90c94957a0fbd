//! A small HTTP/1.1 client over a Unix socket, for `vmm serve` (which forwards to a VM's own
//! socket), the tests and the latency benchmark: one persistent connection (made again when
//! the server closed it), requests with `Content-Length` bodies, answers read by their
//! `Content-Length`.

use std::io::{ErrorKind, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::http::MAX_HEADERS;
use crate::Method;

/// An answer's head longer than this is refused.
const MAX_HEAD_BYTES: usize = 16 << 10;

/// An answer's body longer than this is refused: the biggest `vmm` sends (vm.info with a
/// report) is tens of KiB, and a peer must not make the client buffer without bound.
const MAX_BODY_BYTES: usize = 16 << 20;

/// One persistent connection.
pub struct Client {
    path: PathBuf,
    timeout: Duration,
    stream: Option<UnixStream>,
    /// Received and not yet read as an answer.
    buf: Vec<u8>,
}

/// A response as the client read it.
#[derive(Debug, Clone)]
pub struct Reply {
    pub status: u16,
    pub body: Vec<u8>,
}

impl Reply {
    /// The body as JSON.
    pub fn json(&self) -> serde_json::Result<serde_json::Value> {
        serde_json::from_slice(&self.body)
    }
}

/// Why an exchange failed: `Unanswered` when the server cannot have seen the request (the
/// connection was closed before a byte of the answer came).
enum Failure {
    Unanswered(std::io::Error),
    Other(std::io::Error),
}

fn bad(message: String) -> std::io::Error {
    std::io::Error::new(ErrorKind::InvalidData, message)
}

impl Client {
    /// Connects to the API socket at `path`; every request after waits at most `timeout`.
    pub fn connect(path: &Path, timeout: Duration) -> std::io::Result<Client> {
        let mut client = Client {
            path: path.to_path_buf(),
            timeout,
            stream: None,
            buf: Vec::new(),
        };
        client.open()?;
        Ok(client)
    }

    /// How long each request after this may take.
    pub fn set_timeout(&mut self, timeout: Duration) {
        self.timeout = timeout;
        if let Some(stream) = &self.stream {
            let _ = stream.set_write_timeout(Some(timeout));
        }
    }

    fn open(&mut self) -> std::io::Result<&mut UnixStream> {
        let stream = UnixStream::connect(&self.path)?;
        stream.set_write_timeout(Some(self.timeout))?;
        self.buf.clear();
        Ok(self.stream.insert(stream))
    }

    /// Sends one request (`path` as sent, e.g. `/api/v1/vm.info`) and reads its response.
    pub fn request(
        &mut self,
        method: Method,
        path: &str,
        body: Option<&[u8]>,
    ) -> std::io::Result<Reply> {
        let deadline = Instant::now() + self.timeout;
        let mut request = format!("{} {path} HTTP/1.1\r\nHost: localhost\r\n", method.as_str());
        if let Some(body) = body {
            request.push_str("Content-Type: application/json\r\n");
            request.push_str(&format!("Content-Length: {}\r\n", body.len()));
        }
        request.push_str("\r\n");
        let mut bytes = request.into_bytes();
        bytes.extend_from_slice(body.unwrap_or_default());
        let reused = self.stream.is_some();
        let result = match self.exchange(&bytes, deadline) {
            // A kept connection the server closed while idle (before it saw this request,
            // which is therefore safe to send again): once more on a new one.
            Err(Failure::Unanswered(_)) if reused => {
                self.stream = None;
                self.exchange(&bytes, deadline)
            }
            other => other,
        };
        match result {
            Ok((reply, close)) => {
                if close {
                    self.stream = None;
                }
                Ok(reply)
            }
            // Its answer may still come: the connection cannot be trusted for the next one.
            Err(Failure::Unanswered(e) | Failure::Other(e)) => {
                self.stream = None;
                Err(e)
            }
        }
    }

    /// Sends `bytes` on the kept connection (or a new one) and reads the answer.
    fn exchange(&mut self, bytes: &[u8], deadline: Instant) -> Result<(Reply, bool), Failure> {
        let stream = match self.stream.take() {
            Some(s) => self.stream.insert(s),
            None => self.open().map_err(Failure::Other)?,
        };
        stream.write_all(bytes).map_err(Failure::Unanswered)?;
        self.read_reply(deadline).map_err(|e| {
            let nothing_read = self.buf.is_empty();
            match e.kind() {
                ErrorKind::UnexpectedEof | ErrorKind::ConnectionReset if nothing_read => {
                    Failure::Unanswered(e)
                }
                _ => Failure::Other(e),
            }
        })
    }

    /// Reads until the buffer holds `want` bytes; false if the connection ended first.
    fn fill(&mut self, deadline: Instant, want: usize) -> std::io::Result<bool> {
        let Some(stream) = self.stream.as_mut() else {
            return Err(ErrorKind::NotConnected.into());
        };
        while self.buf.len() < want {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(ErrorKind::TimedOut.into());
            }
            stream.set_read_timeout(Some(left))?;
            let mut chunk = [0u8; 16 << 10];
            match stream.read(&mut chunk) {
                Ok(0) => return Ok(false),
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) if e.kind() == ErrorKind::WouldBlock => {
                    return Err(ErrorKind::TimedOut.into())
                }
                Err(e) => return Err(e),
            }
        }
        Ok(true)
    }

    /// The answer at the start of the buffer, and whether the server closes after it.
    fn read_reply(&mut self, deadline: Instant) -> std::io::Result<(Reply, bool)> {
        loop {
            let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
            let mut response = httparse::Response::new(&mut headers);
            let head_len = match response.parse(&self.buf) {
                Ok(httparse::Status::Complete(n)) => n,
                Ok(httparse::Status::Partial) if self.buf.len() < MAX_HEAD_BYTES => {
                    let want = self.buf.len() + 1;
                    if !self.fill(deadline, want)? {
                        return Err(ErrorKind::UnexpectedEof.into());
                    }
                    continue;
                }
                Ok(httparse::Status::Partial) => {
                    return Err(bad(format!(
                        "an answer's head exceeds {MAX_HEAD_BYTES} bytes"
                    )))
                }
                Err(e) => return Err(bad(format!("malformed answer: {e}"))),
            };
            let status = response.code.unwrap_or(0);
            let mut length = None;
            let mut close = response.version == Some(0);
            for h in response.headers.iter() {
                if h.name.eq_ignore_ascii_case("content-length") {
                    let n = std::str::from_utf8(h.value)
                        .ok()
                        .and_then(|v| v.trim().parse::<usize>().ok())
                        .ok_or_else(|| bad("an answer's Content-Length is not a number".into()))?;
                    length = Some(n);
                } else if h.name.eq_ignore_ascii_case("connection") {
                    close |= h.value.eq_ignore_ascii_case(b"close");
                }
            }
            if (100..200).contains(&status) {
                self.buf.drain(..head_len);
                continue;
            }
            let body_len = match (status, length) {
                (204 | 304, _) => 0,
                (_, Some(n)) if n > MAX_BODY_BYTES => {
                    return Err(bad(format!(
                        "an answer's body of {n} bytes is over the client's {MAX_BODY_BYTES}"
                    )))
                }
                (_, Some(n)) => n,
                // No length: the body runs to the connection's end.
                (_, None) => {
                    while self.buf.len() - head_len <= MAX_BODY_BYTES
                        && self.fill(deadline, self.buf.len() + 1)?
                    {}
                    if self.buf.len() - head_len > MAX_BODY_BYTES {
                        return Err(bad(format!(
                            "an answer's body is over the client's {MAX_BODY_BYTES} bytes"
                        )));
                    }
                    close = true;
                    self.buf.len() - head_len
                }
            };
            let total = head_len
                .checked_add(body_len)
                .ok_or_else(|| bad("an answer's Content-Length is absurd".into()))?;
            if !self.fill(deadline, total)? {
                return Err(ErrorKind::UnexpectedEof.into());
            }
            let body = self.buf[head_len..total].to_vec();
            self.buf.drain(..total);
            return Ok((Reply { status, body }, close));
        }
    }
}
