//! Minimal HTTP plumbing shared by both stand-ins: a thread per request (so a
//! deliberately slow answer never blocks the others), whole-body requests and
//! responses, and one log line per request on stderr.

use std::io::{Cursor, Read, Write};
use std::sync::Arc;

/// Bodies above this size are cut off; no legitimate test request comes close.
const MAX_BODY: u64 = 4 * 1024 * 1024;

/// A request with its body already read.
#[derive(Debug, Clone)]
pub struct Request {
    /// Upper-case method, e.g. `POST`.
    pub method: String,
    /// Path without the query string.
    pub path: String,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Request {
    /// First header with this name (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// A complete response.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Reply {
    /// A response with no body and no headers.
    pub fn empty(status: u16) -> Self {
        Reply {
            status,
            headers: Vec::new(),
            body: Vec::new(),
        }
    }

    /// A response with `Content-Type: application/json`.
    pub fn json(status: u16, body: impl Into<Vec<u8>>) -> Self {
        Reply::empty(status)
            .with_header("Content-Type", "application/json")
            .with_body(body)
    }

    /// Serialises `value` with serde_json (for the non-Go parts of the API).
    pub fn json_value<T: serde::Serialize>(status: u16, value: &T) -> Self {
        match serde_json::to_vec(value) {
            Ok(body) => Reply::json(status, body),
            Err(_) => Reply::empty(500),
        }
    }

    pub fn with_header(mut self, name: &str, value: &str) -> Self {
        self.headers.push((name.to_owned(), value.to_owned()));
        self
    }

    pub fn with_body(mut self, body: impl Into<Vec<u8>>) -> Self {
        self.body = body.into();
        self
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// Something that answers requests; called concurrently from many threads.
pub type Handler = Arc<dyn Fn(&Request) -> Reply + Send + Sync>;

/// Binds `listen`, prints `listening on http://ADDR` on stdout (the line the
/// tests wait for), then serves forever. Returns only if binding fails.
pub fn serve(name: &str, listen: &str, handler: Handler) -> Result<(), String> {
    let server =
        tiny_http::Server::http(listen).map_err(|e| format!("cannot listen on {listen}: {e}"))?;
    let addr = server
        .server_addr()
        .to_ip()
        .map(|a| a.to_string())
        .unwrap_or_else(|| listen.to_owned());
    let mut stdout = std::io::stdout();
    // If stdout is gone nobody can learn the port; keep serving regardless.
    let _ = writeln!(stdout, "listening on http://{addr}");
    let _ = stdout.flush();
    eprintln!("{name}: listening on http://{addr}");

    for incoming in server.incoming_requests() {
        let handler = Arc::clone(&handler);
        let thread_name = name.to_owned();
        let spawned = std::thread::Builder::new()
            .name(format!("{name}-req"))
            .spawn(move || answer(&thread_name, incoming, &handler));
        if let Err(e) = spawned {
            eprintln!("{name}: cannot spawn request thread: {e}");
        }
    }
    Ok(())
}

fn answer(name: &str, mut incoming: tiny_http::Request, handler: &Handler) {
    let method = incoming.method().as_str().to_ascii_uppercase();
    let url = incoming.url().to_owned();
    let path = url.split(['?', '#']).next().unwrap_or_default().to_owned();
    let headers = incoming
        .headers()
        .iter()
        .map(|h| {
            (
                h.field.as_str().as_str().to_owned(),
                h.value.as_str().to_owned(),
            )
        })
        .collect();
    let mut body = Vec::new();
    let reply = match incoming.as_reader().take(MAX_BODY).read_to_end(&mut body) {
        Ok(_) => handler(&Request {
            method: method.clone(),
            path,
            headers,
            body,
        }),
        Err(e) => {
            eprintln!("{name}: cannot read request body: {e}");
            Reply::empty(400)
        }
    };
    eprintln!("{name}: {method} {url} -> {}", reply.status);

    let headers = reply
        .headers
        .iter()
        .filter_map(|(k, v)| tiny_http::Header::from_bytes(k.as_bytes(), v.as_bytes()).ok())
        .collect();
    let len = reply.body.len();
    let response = tiny_http::Response::new(
        tiny_http::StatusCode(reply.status),
        headers,
        Cursor::new(reply.body),
        Some(len),
        None,
    );
    if let Err(e) = incoming.respond(response) {
        eprintln!("{name}: cannot send response: {e}");
    }
}
