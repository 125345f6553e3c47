use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::Arc;

use super::*;

/// Starts the accept loop on a free port with a handler that echoes the
/// request back as JSON; returns the address.
fn start() -> String {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let handler: Handler = Arc::new(|req: &Request| {
        if req.path == "/panic" {
            panic!("handler failure on purpose");
        }
        if req.path == "/nocontent" {
            return Reply::empty(204).with_header("X-Kind", "none");
        }
        Reply::json_value(
            200,
            &serde_json::json!({
                "method": req.method,
                "path": req.path,
                "body": String::from_utf8_lossy(&req.body),
                "x": req.header("x-test"),
            }),
        )
        .with_header("X-Reply", "yes")
        .with_header("Content-Length", "999")
        .with_header("Bad\r\nHeader", "dropped")
    });
    std::thread::spawn(move || accept_loop("test", &listener, &handler));
    addr
}

struct Resp {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Resp {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
    fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap()
    }
}

/// Reads one response; `head` says the request was HEAD (no body follows).
fn read_resp(reader: &mut impl BufRead, head: bool) -> Resp {
    let mut line = String::new();
    reader.read_line(&mut line).unwrap();
    assert!(line.starts_with("HTTP/1.1 "), "{line:?}");
    let status = line[9..12].parse().unwrap();
    let mut headers = Vec::new();
    loop {
        let mut line = String::new();
        reader.read_line(&mut line).unwrap();
        let line = line.trim_end_matches("\r\n");
        if line.is_empty() {
            break;
        }
        let (k, v) = line.split_once(": ").unwrap();
        headers.push((k.to_owned(), v.to_owned()));
    }
    let mut resp = Resp {
        status,
        headers,
        body: Vec::new(),
    };
    if !head {
        if let Some(len) = resp.header("content-length") {
            let mut body = vec![0; len.parse().unwrap()];
            reader.read_exact(&mut body).unwrap();
            resp.body = body;
        }
    }
    resp
}

fn connect(addr: &str) -> (TcpStream, BufReader<TcpStream>) {
    let stream = TcpStream::connect(addr).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let reader = BufReader::new(stream.try_clone().unwrap());
    (stream, reader)
}

fn assert_closed(reader: &mut BufReader<TcpStream>) {
    let mut rest = Vec::new();
    reader.read_to_end(&mut rest).unwrap();
    assert!(rest.is_empty(), "{:?}", String::from_utf8_lossy(&rest));
}

#[test]
fn keep_alive_and_pipelining() {
    let addr = start();
    let (mut s, mut r) = connect(&addr);
    s.write_all(b"GET /a?q=1 HTTP/1.1\r\nHost: x\r\nX-Test:  v1 \r\n\r\n")
        .unwrap();
    let a = read_resp(&mut r, false);
    assert_eq!(a.status, 200);
    assert_eq!(a.json()["path"], "/a");
    assert_eq!(a.json()["x"], "v1");
    assert_eq!(a.header("x-reply"), Some("yes"));
    assert_eq!(a.header("connection"), None);
    assert_eq!(
        a.header("content-length").unwrap(),
        a.body.len().to_string()
    );
    assert!(a.header("bad\r\nheader").is_none());

    // Two pipelined requests in one write, the second one closing.
    s.write_all(
        b"POST /b HTTP/1.1\r\nContent-Length: 5\r\n\r\nhelloPOST /c HTTP/1.1\r\nContent-Length: 3\r\nConnection: close\r\n\r\nbye",
    )
    .unwrap();
    let b = read_resp(&mut r, false);
    assert_eq!(
        (b.json()["method"].clone(), b.json()["body"].clone()),
        ("POST".into(), "hello".into())
    );
    let c = read_resp(&mut r, false);
    assert_eq!(c.json()["body"], "bye");
    assert_eq!(c.header("connection"), Some("close"));
    assert_closed(&mut r);
}

#[test]
fn chunked_body() {
    let addr = start();
    let (mut s, mut r) = connect(&addr);
    s.write_all(
        b"POST /x HTTP/1.1\r\nTransfer-Encoding: Chunked\r\n\r\n5;ext=1\r\nhello\r\n6\r\n world\r\n0\r\nTrailer: t\r\n\r\n",
    )
    .unwrap();
    assert_eq!(read_resp(&mut r, false).json()["body"], "hello world");
    // The connection is still usable afterwards.
    s.write_all(b"GET /y HTTP/1.1\r\n\r\n").unwrap();
    assert_eq!(read_resp(&mut r, false).json()["path"], "/y");
}

#[test]
fn head_http10_and_no_content() {
    let addr = start();
    let (mut s, mut r) = connect(&addr);
    s.write_all(b"HEAD /h HTTP/1.1\r\n\r\nGET /nocontent HTTP/1.1\r\n\r\n")
        .unwrap();
    let h = read_resp(&mut r, true);
    assert_eq!(h.status, 200);
    assert!(
        h.header("content-length")
            .unwrap()
            .parse::<usize>()
            .unwrap()
            > 0
    );
    let n = read_resp(&mut r, false);
    assert_eq!(n.status, 204);
    assert_eq!(n.header("content-length"), None);
    assert_eq!(n.header("x-kind"), Some("none"));

    // HTTP/1.0 closes unless asked to keep alive.
    s.write_all(b"GET /old HTTP/1.0\r\nConnection: keep-alive\r\n\r\nGET /old2 HTTP/1.0\r\n\r\n")
        .unwrap();
    assert_eq!(read_resp(&mut r, false).json()["path"], "/old");
    let last = read_resp(&mut r, false);
    assert_eq!(last.json()["path"], "/old2");
    assert_eq!(last.header("connection"), Some("close"));
    assert_closed(&mut r);
}

#[test]
fn expect_continue() {
    let addr = start();
    let (mut s, mut r) = connect(&addr);
    s.write_all(b"POST /e HTTP/1.1\r\nExpect: 100-continue\r\nContent-Length: 2\r\n\r\n")
        .unwrap();
    let mut line = String::new();
    r.read_line(&mut line).unwrap();
    assert_eq!(line, "HTTP/1.1 100 Continue\r\n");
    r.read_line(&mut line).unwrap();
    s.write_all(b"ok").unwrap();
    assert_eq!(read_resp(&mut r, false).json()["body"], "ok");
}

#[test]
fn malformed_requests_are_refused_and_closed() {
    let addr = start();
    let cases: [(&[u8], u16); 8] = [
        (b"GARBAGE\r\n\r\n", 400),
        (b"GET / HTTP/2.0\r\n\r\n", 505),
        (b"GET / HTTP/1.1\r\nNo colon\r\n\r\n", 400),
        (b"GET / HTTP/1.1\r\nX: a\r\n folded\r\n\r\n", 400),
        (
            b"POST / HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nab",
            400,
        ),
        (b"POST / HTTP/1.1\r\nContent-Length: -1\r\n\r\n", 400),
        (
            b"POST / HTTP/1.1\r\nContent-Length: 99999999999\r\n\r\n",
            413,
        ),
        (b"POST / HTTP/1.1\r\nTransfer-Encoding: gzip\r\n\r\n", 501),
    ];
    for (raw, status) in cases {
        let (mut s, mut r) = connect(&addr);
        s.write_all(raw).unwrap();
        let resp = read_resp(&mut r, false);
        assert_eq!(resp.status, status, "{}", String::from_utf8_lossy(raw));
        assert_eq!(resp.header("connection"), Some("close"));
        assert_closed(&mut r);
    }
    let (mut s, mut r) = connect(&addr);
    let mut huge = b"GET / HTTP/1.1\r\nX: ".to_vec();
    huge.extend(std::iter::repeat_n(b'a', MAX_LINE + 10));
    huge.extend_from_slice(b"\r\n\r\n");
    s.write_all(&huge).unwrap();
    assert_eq!(read_resp(&mut r, false).status, 431);
}

#[test]
fn handler_panic_is_a_500() {
    let addr = start();
    let (mut s, mut r) = connect(&addr);
    s.write_all(b"GET /panic HTTP/1.1\r\n\r\nGET /after HTTP/1.1\r\n\r\n")
        .unwrap();
    assert_eq!(read_resp(&mut r, false).status, 500);
    assert_eq!(read_resp(&mut r, false).json()["path"], "/after");
}

#[test]
fn peer_close_before_request_is_quiet() {
    let addr = start();
    drop(TcpStream::connect(&addr).unwrap());
    let (mut s, mut r) = connect(&addr);
    s.write_all(b"\r\nGET /ok HTTP/1.1\r\n\r\n").unwrap();
    assert_eq!(read_resp(&mut r, false).status, 200);
}

#[test]
fn burst_of_connections() {
    let addr = start();
    let threads: Vec<_> = (0..64)
        .map(|i| {
            let addr = addr.clone();
            std::thread::spawn(move || {
                let (mut s, mut r) = connect(&addr);
                for j in 0..5 {
                    let body = format!("{i}-{j}");
                    s.write_all(
                        format!(
                            "POST /burst HTTP/1.1\r\nContent-Length: {}\r\n\r\n{body}",
                            body.len()
                        )
                        .as_bytes(),
                    )
                    .unwrap();
                    assert_eq!(read_resp(&mut r, false).json()["body"], body);
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
}
