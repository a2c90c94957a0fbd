//! Reading a request out of the bytes a connection has received, and writing a response:
//! plain functions over buffers (no socket, no clock), so the server loop, the tests and the
//! fuzz target run the same code.
//!
//! Choices a client can see:
//! - a request line and headers longer than `max_header_bytes`, or more than [`MAX_HEADERS`]
//!   headers, get 413 (the code the spec uses for every size bound), and the connection closes;
//! - a query string is refused (400): no endpoint takes one, and one silently ignored could
//!   hide a client's mistake;
//! - `Transfer-Encoding` gets 411: bodies are small JSON documents, sent with `Content-Length`;
//! - HTTP/1.0 requests are answered and the connection closed (no 1.0 keep-alive);
//! - a `Content-Type` other than `application/json` on a body gets 415; none is fine.

use std::ops::Range;

use crate::{Endpoint, Method, Response, PREFIX};

/// At most this many headers in one request.
pub const MAX_HEADERS: usize = 32;

/// How much of a client's path an error message repeats.
const PATH_IN_MESSAGE: usize = 64;

/// The size bounds a request is parsed under.
#[derive(Clone, Copy, Debug)]
pub struct Bounds {
    pub max_header_bytes: usize,
    pub max_body_bytes: usize,
}

/// What the bytes received so far amount to.
#[derive(Debug, PartialEq, Eq)]
pub enum Parsed {
    /// Not a whole request yet; `head` once the request line and headers are all there.
    More { head: Option<Head> },
    /// A whole request for `endpoint`, which the handler answers. It took the first `len`
    /// bytes; its body is `body` of them.
    Request {
        endpoint: Endpoint,
        body: Range<usize>,
        len: usize,
        close: bool,
    },
    /// A request the server answers itself with an error. Without `len` its end is unknown
    /// (or it cannot be trusted), so the connection closes after the answer.
    Refused {
        response: Response,
        allow: Option<Method>,
        len: Option<usize>,
        close: bool,
    },
}

/// A complete request head whose body is still coming.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Head {
    /// Whether the client waits for `100 Continue` before it sends the body (curl does for
    /// bodies over 1 KiB).
    pub expect_continue: bool,
}

fn refuse(status: u16, message: String) -> Parsed {
    Parsed::Refused {
        response: Response::error(status, message),
        allow: None,
        len: None,
        close: true,
    }
}

/// What the head says, once httparse has read it.
struct Framing {
    close: bool,
    content_length: usize,
    expect_continue: bool,
    json: bool,
}

/// Reads the first request out of `buf`.
pub fn parse(buf: &[u8], bounds: Bounds) -> Parsed {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut headers);
    let head_len = match req.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) if buf.len() <= bounds.max_header_bytes => {
            return Parsed::More { head: None }
        }
        Ok(httparse::Status::Partial) => return too_long_head(bounds),
        Err(httparse::Error::TooManyHeaders) => {
            return refuse(
                413,
                format!("the request has more than {MAX_HEADERS} headers; send fewer"),
            )
        }
        Err(e) => {
            return refuse(
                400,
                format!("malformed request ({e}); send an HTTP/1.1 request line and headers"),
            )
        }
    };
    if head_len > bounds.max_header_bytes {
        return too_long_head(bounds);
    }
    let framing = match framing(&req, bounds) {
        Ok(f) => f,
        Err(refused) => return refused,
    };
    let len = head_len.saturating_add(framing.content_length);
    if buf.len() < len {
        return Parsed::More {
            head: Some(Head {
                expect_continue: framing.expect_continue,
            }),
        };
    }
    let (Some(path), Some(method)) = (req.path, req.method) else {
        return refuse(
            400,
            "malformed request line; send METHOD PATH HTTP/1.1".into(),
        );
    };
    let close = framing.close;
    let refused = |status, message: String, allow| Parsed::Refused {
        response: Response::error(status, message),
        allow,
        len: Some(len),
        close,
    };
    let endpoint = match route(path) {
        Ok(e) => e,
        Err((status, message)) => return refused(status, message, None),
    };
    if Method::from_name(method) != Some(endpoint.method()) {
        let message = format!(
            "{} takes {}, not {}; send it with {}",
            endpoint.name(),
            endpoint.method().as_str(),
            shorten(method),
            endpoint.method().as_str()
        );
        return refused(405, message, Some(endpoint.method()));
    }
    if framing.content_length > 0 && !endpoint.takes_body() {
        let message = format!(
            "{} takes no body, and this request has {} bytes; send it without one",
            endpoint.name(),
            framing.content_length
        );
        return refused(400, message, None);
    }
    if framing.content_length > 0 && !framing.json {
        let message = format!(
            "the body of {} must be application/json; send that Content-Type or none",
            endpoint.name()
        );
        return refused(415, message, None);
    }
    Parsed::Request {
        endpoint,
        body: head_len..len,
        len,
        close,
    }
}

fn too_long_head(bounds: Bounds) -> Parsed {
    refuse(
        413,
        format!(
            "the request line and headers exceed {} bytes; send a shorter request",
            bounds.max_header_bytes
        ),
    )
}

/// The headers that decide how long the request is and what happens after it.
fn framing(req: &httparse::Request<'_, '_>, bounds: Bounds) -> Result<Framing, Parsed> {
    // HTTP/1.0 (version 0) closes after the answer.
    let mut f = Framing {
        close: req.version != Some(1),
        content_length: 0,
        expect_continue: false,
        json: true,
    };
    let mut length: Option<u64> = None;
    for h in req.headers.iter() {
        let name = h.name;
        if name.eq_ignore_ascii_case("transfer-encoding") {
            return Err(refuse(
                411,
                "Transfer-Encoding is not supported; send the body with Content-Length".into(),
            ));
        }
        if name.eq_ignore_ascii_case("content-length") {
            let value = std::str::from_utf8(h.value).unwrap_or("").trim();
            let parsed = match value.bytes().all(|b| b.is_ascii_digit()) && !value.is_empty() {
                true => value.parse::<u64>().ok(),
                false => None,
            };
            let Some(n) = parsed else {
                return Err(refuse(
                    400,
                    format!(
                        "Content-Length {:?} is not a byte count; send a decimal number",
                        shorten(value)
                    ),
                ));
            };
            if length.is_some_and(|l| l != n) {
                return Err(refuse(
                    400,
                    "the request has Content-Length headers that differ; send one".into(),
                ));
            }
            length = Some(n);
        } else if name.eq_ignore_ascii_case("connection") {
            let close = h
                .value
                .split(|&b| b == b',')
                .any(|t| t.trim_ascii().eq_ignore_ascii_case(b"close"));
            f.close |= close;
        } else if name.eq_ignore_ascii_case("expect") {
            f.expect_continue = h.value.trim_ascii().eq_ignore_ascii_case(b"100-continue");
        } else if name.eq_ignore_ascii_case("content-type") {
            let media = h.value.split(|&b| b == b';').next().unwrap_or(&[]);
            f.json = media.trim_ascii().eq_ignore_ascii_case(b"application/json");
        }
    }
    let length = length.unwrap_or(0);
    if length > bounds.max_body_bytes as u64 {
        return Err(refuse(
            413,
            format!(
                "the body of {length} bytes exceeds the limit of {} bytes; send a smaller one",
                bounds.max_body_bytes
            ),
        ));
    }
    f.content_length = length as usize;
    Ok(f)
}

/// The endpoint at `path`, or the status and message refusing it.
fn route(path: &str) -> Result<Endpoint, (u16, String)> {
    if path.contains('?') {
        return Err((
            400,
            format!(
                "{} has a query string, which no endpoint takes; send the path alone",
                shorten(path)
            ),
        ));
    }
    path.strip_prefix(PREFIX)
        .and_then(Endpoint::from_name)
        .ok_or_else(|| {
            (
                404,
                format!(
                    "no endpoint at {}; the API serves the paths docs/api.md lists",
                    shorten(path)
                ),
            )
        })
}

/// At most [`PATH_IN_MESSAGE`] characters of a client's text, for a message.
fn shorten(s: &str) -> String {
    match s.char_indices().nth(PATH_IN_MESSAGE) {
        Some((at, _)) => format!("{}...", &s[..at]),
        None => s.to_string(),
    }
}

/// The reason phrase of `status`.
pub fn reason(status: u16) -> &'static str {
    match status {
        100 => "Continue",
        200 => "OK",
        204 => "No Content",
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        409 => "Conflict",
        411 => "Length Required",
        413 => "Content Too Large",
        415 => "Unsupported Media Type",
        500 => "Internal Server Error",
        503 => "Service Unavailable",
        _ => "Unknown",
    }
}

/// What the server sends before a body the client holds back for it.
pub const CONTINUE: &[u8] = b"HTTP/1.1 100 Continue\r\n\r\n";

/// Appends `response` to `out`: no body (nor its headers) for 204, else `Content-Type:
/// application/json` and `Content-Length`; `Allow` for a 405; `Connection: close` when the
/// connection closes after it.
pub fn write_response(response: &Response, allow: Option<Method>, close: bool, out: &mut Vec<u8>) {
    use std::io::Write;
    let status = response.status;
    // Vec's Write never fails.
    let _ = write!(out, "HTTP/1.1 {status} {}\r\n", reason(status));
    if let Some(m) = allow {
        let _ = write!(out, "Allow: {}\r\n", m.as_str());
    }
    if close {
        out.extend_from_slice(b"Connection: close\r\n");
    }
    match (&response.body, status) {
        (_, 204) => {}
        (Some(body), _) => {
            let _ = write!(
                out,
                "Content-Type: application/json\r\nContent-Length: {}\r\n",
                body.len()
            );
        }
        (None, _) => out.extend_from_slice(b"Content-Length: 0\r\n"),
    }
    out.extend_from_slice(b"\r\n");
    if let (Some(body), false) = (&response.body, status == 204) {
        out.extend_from_slice(body);
    }
}

#[cfg(test)]
mod tests;
