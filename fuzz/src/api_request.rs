//! Target `api_request`: the machine API's request parser (`api::http::parse`) and response
//! writer, fed a client's bytes in fuzz-chosen pieces the way a connection of `api::server`
//! receives them, under fuzz-chosen size bounds; each whole request is answered and the rest
//! parsed on (pipelining), as the server does.
//!
//! Invariants:
//! - nothing panics;
//! - `More` without a head only while the bytes held fit `max_header_bytes`, and with a head
//!   only while they fit the head and body bounds together;
//! - a request's `len` is within what was received and its body is the tail of those bytes,
//!   at most `max_body_bytes`, empty where its endpoint takes none; the bytes start with its
//!   endpoint's method and path;
//! - a refusal is a 4xx with a body `{"error": "<a sentence>"}` and nothing else; `Allow`
//!   comes with 405 and only with it; a refusal whose end is unknown closes the connection;
//! - every answer as written is one well-formed HTTP/1.1 response: httparse reads it whole,
//!   its `Content-Length` is its body's length, and a 204 has neither;
//! - bytes after a decision do not change it: a request or refusal of known `len` parses the
//!   same from its own `len` bytes.

use api::http::{parse, write_response, Bounds, Parsed};
use api::{Method, Response};

use crate::{Input, Seed};

/// The bounds the first two input bytes choose: small, so the fuzzer meets them.
fn bounds(input: &mut Input<'_>) -> Bounds {
    Bounds {
        max_header_bytes: 16 + usize::from(input.u8()) * 4,
        max_body_bytes: usize::from(input.u8()),
    }
}

/// Checks one written answer; returns its status.
fn check_written(response: &Response, allow: Option<Method>, close: bool) -> u16 {
    let mut out = Vec::new();
    write_response(response, allow, close, &mut out);
    let mut headers = [httparse::EMPTY_HEADER; 8];
    let mut r = httparse::Response::new(&mut headers);
    let head = match r.parse(&out) {
        Ok(httparse::Status::Complete(n)) => n,
        other => panic!("an answer httparse cannot read whole: {other:?}"),
    };
    let status = r.code.expect("a status");
    assert_eq!(status, response.status);
    let find = |name: &str| {
        r.headers
            .iter()
            .find(|h| h.name.eq_ignore_ascii_case(name))
            .map(|h| std::str::from_utf8(h.value).expect("ASCII header"))
    };
    let length = find("content-length").map(|v| v.parse::<usize>().expect("a length"));
    if status == 204 {
        assert_eq!(length, None);
        assert_eq!(find("content-type"), None);
        assert_eq!(out.len(), head);
    } else {
        assert_eq!(length, Some(out.len() - head));
    }
    assert_eq!(find("allow"), allow.map(Method::as_str));
    assert_eq!(find("connection").is_some(), close);
    status
}

/// Checks a refusal of the server's own.
fn check_refusal(response: &Response, allow: Option<Method>) {
    assert!((400..500).contains(&response.status), "{}", response.status);
    assert_eq!(allow.is_some(), response.status == 405);
    let body = response.body.as_deref().expect("a refusal has a body");
    let value: serde_json::Value = serde_json::from_slice(body).expect("JSON");
    let object = value.as_object().expect("an object");
    assert_eq!(object.len(), 1);
    let message = object["error"].as_str().expect("a string");
    assert!(!message.is_empty() && message.contains("; "), "{message}");
}

pub fn run(data: &[u8]) {
    let mut input = Input::new(data);
    let bounds = bounds(&mut input);
    let mut buf: Vec<u8> = Vec::new();
    while !input.is_empty() {
        buf.extend_from_slice(input.short_bytes(255));
        // Answer every whole request held, as a connection does once its answer is sent.
        loop {
            let parsed = parse(&buf, bounds);
            let (len, close) = match &parsed {
                Parsed::More { head: None } => {
                    assert!(buf.len() <= bounds.max_header_bytes);
                    break;
                }
                Parsed::More { head: Some(_) } => {
                    assert!(buf.len() < bounds.max_header_bytes + bounds.max_body_bytes);
                    break;
                }
                Parsed::Request {
                    endpoint,
                    body,
                    len,
                    close,
                } => {
                    assert!(*len <= buf.len() && body.end == *len && body.start <= body.end);
                    assert!(body.len() <= bounds.max_body_bytes);
                    assert!(body.is_empty() || endpoint.takes_body());
                    // httparse skips empty lines before the request line.
                    let start = buf.iter().position(|&b| b != b'\r' && b != b'\n');
                    let line = format!("{} {} ", endpoint.method().as_str(), endpoint.path());
                    assert!(buf[start.unwrap_or(0)..].starts_with(line.as_bytes()));
                    let answer = Response::json(200, &serde_json::json!({}));
                    check_written(&answer, None, *close);
                    check_written(&Response::no_content(), None, *close);
                    (Some(*len), *close)
                }
                Parsed::Refused {
                    response,
                    allow,
                    len,
                    close,
                } => {
                    check_refusal(response, *allow);
                    assert!(len.is_some() || *close);
                    assert!(len.is_none_or(|n| n <= buf.len()));
                    check_written(response, *allow, *close);
                    (*len, *close)
                }
            };
            if let Some(n) = len {
                assert_eq!(
                    parse(&buf[..n], bounds),
                    parsed,
                    "more bytes changed a decision"
                );
            }
            match (len, close) {
                (Some(n), false) => {
                    buf.drain(..n);
                }
                // The connection closes: nothing after counts.
                _ => return,
            }
        }
    }
}

pub fn seeds() -> Vec<(&'static str, Vec<u8>)> {
    let with = |bounds: [u8; 2], pieces: &[&[u8]]| {
        let mut s = Seed::new();
        s.u8(bounds[0]).u8(bounds[1]);
        for p in pieces {
            for chunk in p.chunks(255) {
                s.short_bytes(chunk);
            }
        }
        s.0
    };
    let roomy = [255, 255];
    vec![
        (
            "ping-keepalive",
            with(
                roomy,
                &[
                    b"GET /api/v1/vmm.ping HTTP/1.1\r\nHost: localhost\r\n\r\n",
                    b"GET /api/v1/vm.info HTTP/1.1\r\nHost: localhost\r\nAccept: */*\r\n\r\n",
                ],
            ),
        ),
        (
            "create-in-pieces",
            with(
                roomy,
                &[
                    b"PUT /api/v1/vm.create HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n",
                    b"Expect: 100-continue\r\nContent-Length: 54\r\n\r\n",
                    br#"{"cpus":{"boot_vcpus":2},"memory":{"size":1073741824}}"#,
                    b"PUT /api/v1/vm.boot HTTP/1.1\r\nConnection: close\r\n\r\n",
                ],
            ),
        ),
        (
            "refusals",
            with(
                roomy,
                &[
                    b"GET /api/v1/vm.nope HTTP/1.1\r\n\r\n",
                    b"POST /api/v1/vm.info HTTP/1.1\r\n\r\n",
                    b"GET /api/v1/vm.info?x=1 HTTP/1.1\r\n\r\n",
                    b"PUT /api/v1/vm.pause HTTP/1.1\r\nContent-Length: 2\r\n\r\n{}",
                    b"PUT /api/v1/vm.create HTTP/1.1\r\nContent-Type: text/plain\r\nContent-Length: 2\r\n\r\n{}",
                    b"PUT /api/v1/vm.create HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n",
                ],
            ),
        ),
        (
            "too-large",
            with(
                [8, 4],
                &[b"PUT /api/v1/vm.create HTTP/1.1\r\nContent-Length: 5\r\n\r\nhello"],
            ),
        ),
        (
            "http10-malformed",
            with(
                roomy,
                &[
                    b"GET /api/v1/vmm.ping HTTP/1.0\r\n\r\n",
                    b"GET /api/v1/vmm.ping HTTP/1.1\r\nno colon\r\n\r\n",
                ],
            ),
        ),
    ]
}
