use super::*;

const BOUNDS: Bounds = Bounds {
    max_header_bytes: 512,
    max_body_bytes: 64,
};

fn status(p: &Parsed) -> u16 {
    match p {
        Parsed::Refused { response, .. } => response.status,
        other => panic!("not refused: {other:?}"),
    }
}

#[test]
fn a_get_without_body_is_routed_and_kept_alive() {
    let req = b"GET /api/v1/vm.info HTTP/1.1\r\nHost: x\r\n\r\n";
    assert_eq!(
        parse(req, BOUNDS),
        Parsed::Request {
            endpoint: Endpoint::VmInfo,
            body: req.len()..req.len(),
            len: req.len(),
            close: false
        }
    );
}

#[test]
fn a_body_is_waited_for_then_framed_by_its_length() {
    let head =
        b"PUT /api/v1/vm.create HTTP/1.1\r\nContent-Length: 4\r\nExpect: 100-continue\r\n\r\n";
    let more = Parsed::More {
        head: Some(Head {
            expect_continue: true,
        }),
    };
    assert_eq!(parse(head, BOUNDS), more);
    let mut all = head.to_vec();
    all.extend_from_slice(b"{}{}GET");
    match parse(&all, BOUNDS) {
        Parsed::Request { body, len, .. } => {
            assert_eq!(&all[body], b"{}{}");
            assert_eq!(len, all.len() - 3);
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn http_1_0_and_connection_close_close() {
    for req in [
        &b"GET /api/v1/vmm.ping HTTP/1.0\r\n\r\n"[..],
        b"GET /api/v1/vmm.ping HTTP/1.1\r\nConnection: keep-alive, Close\r\n\r\n",
    ] {
        assert!(matches!(
            parse(req, BOUNDS),
            Parsed::Request { close: true, .. }
        ));
    }
}

#[test]
fn each_framing_error_gets_its_status_and_closes() {
    let cases: [(&[u8], u16); 7] = [
        (b"GET /api/v1/vm.info HTTP/1.1\r\nbad header\r\n\r\n", 400),
        (
            b"PUT /api/v1/vm.create HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n",
            411,
        ),
        (
            b"PUT /api/v1/vm.create HTTP/1.1\r\nContent-Length: 65\r\n\r\n",
            413,
        ),
        (
            b"PUT /api/v1/vm.create HTTP/1.1\r\nContent-Length: -1\r\n\r\n",
            400,
        ),
        (
            b"PUT /api/v1/vm.create HTTP/1.1\r\nContent-Length: 99999999999999999999999\r\n\r\n",
            400,
        ),
        (
            b"PUT /api/v1/vm.create HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
            400,
        ),
        (&[b'G'; 600], 413),
    ];
    for (req, want) in cases {
        let p = parse(req, BOUNDS);
        assert_eq!(status(&p), want, "{}", String::from_utf8_lossy(req));
        assert!(matches!(
            p,
            Parsed::Refused {
                len: None,
                close: true,
                ..
            }
        ));
    }
    let many: String = (0..40).map(|i| format!("H{i}: v\r\n")).collect();
    let req = format!("GET /api/v1/vm.info HTTP/1.1\r\n{many}\r\n");
    assert_eq!(
        status(&parse(
            req.as_bytes(),
            Bounds {
                max_header_bytes: 4096,
                ..BOUNDS
            }
        )),
        413
    );
}

#[test]
fn routing_errors_keep_the_connection() {
    let cases: [(&[u8], u16, Option<Method>); 5] = [
        (b"GET /api/v1/vm.nothing HTTP/1.1\r\n\r\n", 404, None),
        (b"GET /api/v1/vm.info?x=1 HTTP/1.1\r\n\r\n", 400, None),
        (b"POST /api/v1/vm.info HTTP/1.1\r\n\r\n", 405, Some(Method::Get)),
        (b"PUT /api/v1/vm.boot HTTP/1.1\r\nContent-Length: 2\r\n\r\n{}", 400, None),
        (b"PUT /api/v1/vm.create HTTP/1.1\r\nContent-Type: text/plain\r\nContent-Length: 2\r\n\r\n{}", 415, None),
    ];
    for (req, want, want_allow) in cases {
        match parse(req, BOUNDS) {
            Parsed::Refused {
                response,
                allow,
                len,
                close,
            } => {
                assert_eq!(response.status, want);
                assert_eq!(allow, want_allow);
                assert_eq!(len, Some(req.len()));
                assert!(!close);
            }
            other => panic!("{other:?}"),
        }
    }
}

#[test]
fn responses_carry_their_framing() {
    let mut out = Vec::new();
    write_response(&Response::no_content(), None, false, &mut out);
    assert_eq!(out, b"HTTP/1.1 204 No Content\r\n\r\n");
    out.clear();
    write_response(
        &Response::error(405, "m"),
        Some(Method::Put),
        true,
        &mut out,
    );
    let text = String::from_utf8(out).unwrap();
    assert!(
        text.starts_with("HTTP/1.1 405 Method Not Allowed\r\nAllow: PUT\r\nConnection: close\r\n")
    );
    assert!(
        text.ends_with("Content-Length: 13\r\n\r\n{\"error\":\"m\"}"),
        "{text}"
    );
}
