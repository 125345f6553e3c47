//! Minimal HTTP/1.1 plumbing shared by both stand-ins, on `std::net` alone: a
//! thread per connection (so a deliberately slow answer never blocks other
//! connections), whole-body requests and responses, keep-alive, and one log
//! line per request on stderr.
//!
//! Deliberately small and strict rather than complete: request heads and
//! bodies are size-limited, `Content-Length` and `chunked` bodies are read,
//! anything ambiguous is answered with a 4xx and the connection is closed.

use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::Arc;
use std::time::Duration;

/// Bodies above this size are refused with 413; no legitimate test request comes close.
const MAX_BODY: usize = 4 * 1024 * 1024;
/// Longest request line or header line.
const MAX_LINE: usize = 16 * 1024;
/// Request line plus all header lines.
const MAX_HEAD: usize = 64 * 1024;
const MAX_HEADERS: usize = 100;
/// An idle keep-alive connection (or a stalled client) is dropped after this.
const IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a closing connection waits for the peer to stop sending, so that
/// unread request bytes don't turn the close into a reset that eats the reply.
const LINGER: Duration = Duration::from_millis(500);

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
    let listener =
        TcpListener::bind(listen).map_err(|e| format!("cannot listen on {listen}: {e}"))?;
    let addr = listener
        .local_addr()
        .map(|a| a.to_string())
        .unwrap_or_else(|_| listen.to_owned());
    let mut stdout = io::stdout();
    // If stdout is gone nobody can learn the port; keep serving regardless.
    let _ = writeln!(stdout, "listening on http://{addr}");
    let _ = stdout.flush();
    eprintln!("{name}: listening on http://{addr}");
    accept_loop(name, &listener, &handler);
    Ok(())
}

/// Accepts connections forever, one thread each.
fn accept_loop(name: &str, listener: &TcpListener, handler: &Handler) {
    loop {
        let stream = match listener.accept() {
            Ok((stream, _)) => stream,
            Err(e) => {
                // E.g. EMFILE or ECONNABORTED: log, back off a little, go on.
                eprintln!("{name}: accept failed: {e}");
                std::thread::sleep(Duration::from_millis(10));
                continue;
            }
        };
        let handler = Arc::clone(handler);
        let thread_name = name.to_owned();
        let spawned = std::thread::Builder::new()
            .name(format!("{name}-conn"))
            .spawn(move || connection(&thread_name, stream, &handler));
        if let Err(e) = spawned {
            // The stream moved into the failed closure and is closed with it.
            eprintln!("{name}: cannot spawn connection thread: {e}");
        }
    }
}

/// Serves one connection until the peer closes it, asks for `close`, goes
/// idle for [`IDLE_TIMEOUT`], or sends something unparsable.
fn connection(name: &str, stream: TcpStream, handler: &Handler) {
    // Best effort: a failure here only costs latency or a stuck idle thread.
    let _ = stream.set_nodelay(true);
    let _ = stream.set_read_timeout(Some(IDLE_TIMEOUT));
    let _ = stream.set_write_timeout(Some(IDLE_TIMEOUT));
    let mut writer = match stream.try_clone() {
        Ok(w) => w,
        Err(e) => {
            eprintln!("{name}: cannot clone connection: {e}");
            return;
        }
    };
    let mut reader = BufReader::new(stream);
    loop {
        let (request, keep_alive) = match read_request(&mut reader, &mut writer) {
            Ok(Some(parsed)) => parsed,
            // Clean close between requests, or idle timeout: nothing to say.
            Ok(None) => return,
            Err(Failure::Io(e)) => {
                if !matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock
                        | io::ErrorKind::TimedOut
                        | io::ErrorKind::ConnectionReset
                        | io::ErrorKind::BrokenPipe
                ) {
                    eprintln!("{name}: cannot read request: {e}");
                }
                return;
            }
            Err(Failure::Status(status, why)) => {
                eprintln!("{name}: bad request: {why} -> {status}");
                let _ = write_reply(&mut writer, false, &Reply::empty(status), false);
                linger_close(reader.get_ref());
                return;
            }
        };
        let reply = match catch_unwind(AssertUnwindSafe(|| handler(&request.inner))) {
            Ok(reply) => reply,
            Err(_) => {
                eprintln!("{name}: handler panicked");
                Reply::empty(500)
            }
        };
        eprintln!(
            "{name}: {} {} -> {}",
            request.inner.method, request.target, reply.status
        );
        let head_only = request.inner.method == "HEAD";
        if let Err(e) = write_reply(&mut writer, head_only, &reply, keep_alive) {
            eprintln!("{name}: cannot send response: {e}");
            return;
        }
        if !keep_alive {
            linger_close(reader.get_ref());
            return;
        }
    }
}

/// Half-closes, then drains what the peer still sends for a moment, so the
/// final close doesn't reset the connection before the reply was read.
fn linger_close(stream: &TcpStream) {
    let _ = stream.shutdown(Shutdown::Write);
    let _ = stream.set_read_timeout(Some(LINGER));
    let mut sink = [0u8; 4096];
    let mut total = 0usize;
    let mut reader = stream;
    while total < MAX_BODY {
        match reader.read(&mut sink) {
            Ok(0) | Err(_) => break,
            Ok(n) => total += n,
        }
    }
}

/// Why a request could not be read.
#[derive(Debug)]
enum Failure {
    /// The connection failed; close without answering.
    Io(io::Error),
    /// Answer with this status, then close.
    Status(u16, String),
}

impl From<io::Error> for Failure {
    fn from(e: io::Error) -> Self {
        Failure::Io(e)
    }
}

fn bad(why: impl Into<String>) -> Failure {
    Failure::Status(400, why.into())
}

/// A parsed request plus its raw target, for the log line.
#[derive(Debug)]
struct Incoming {
    inner: Request,
    target: String,
}

/// Reads one request. `Ok(None)` if the peer closed (or idled out) before
/// sending a byte of it. The `bool` is whether the connection stays open
/// after the reply. `interim` receives `100 Continue` when asked for.
fn read_request<R: BufRead, W: Write>(
    reader: &mut R,
    interim: &mut W,
) -> Result<Option<(Incoming, bool)>, Failure> {
    let mut head_budget = MAX_HEAD;
    // RFC 9112 §2.2: ignore at least one empty line before the request line.
    let line = loop {
        match read_line(reader, &mut head_budget) {
            Ok(None) => return Ok(None),
            Ok(Some(line)) if line.is_empty() => continue,
            Ok(Some(line)) => break line,
            Err(Failure::Io(e))
                if head_budget == MAX_HEAD
                    && matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                    ) =>
            {
                return Ok(None)
            }
            Err(e) => return Err(e),
        }
    };
    let mut parts = line.split(' ');
    let (method, target, version) = match (parts.next(), parts.next(), parts.next(), parts.next()) {
        (Some(m), Some(t), Some(v), None) if !m.is_empty() && !t.is_empty() => (m, t, v),
        _ => return Err(bad(format!("malformed request line {line:?}"))),
    };
    if !method.bytes().all(is_token_byte) {
        return Err(bad(format!("malformed method {method:?}")));
    }
    let http10 = match version {
        "HTTP/1.1" => false,
        "HTTP/1.0" => true,
        v if v.starts_with("HTTP/") => {
            return Err(Failure::Status(505, format!("unsupported version {v:?}")))
        }
        v => return Err(bad(format!("malformed version {v:?}"))),
    };
    let method = method.to_ascii_uppercase();
    let target = target.to_owned();

    let mut headers: Vec<(String, String)> = Vec::new();
    loop {
        let line = read_line(reader, &mut head_budget)?
            .ok_or_else(|| Failure::Io(io::ErrorKind::UnexpectedEof.into()))?;
        if line.is_empty() {
            break;
        }
        if headers.len() >= MAX_HEADERS {
            return Err(Failure::Status(431, "too many headers".into()));
        }
        let Some((name, value)) = line.split_once(':') else {
            return Err(bad(format!("malformed header line {line:?}")));
        };
        // Also rejects obsolete line folding (a line starting with whitespace).
        if name.is_empty() || !name.bytes().all(is_token_byte) {
            return Err(bad(format!("malformed header name {name:?}")));
        }
        headers.push((name.to_owned(), value.trim_matches([' ', '\t']).to_owned()));
    }

    let connection_has = |token: &str| {
        headers
            .iter()
            .filter(|(k, _)| k.eq_ignore_ascii_case("connection"))
            .flat_map(|(_, v)| v.split(','))
            .any(|t| t.trim().eq_ignore_ascii_case(token))
    };
    let mut keep_alive = if http10 {
        connection_has("keep-alive")
    } else {
        !connection_has("close")
    };

    let transfer_encoding: Vec<&str> = headers
        .iter()
        .filter(|(k, _)| k.eq_ignore_ascii_case("transfer-encoding"))
        .flat_map(|(_, v)| v.split(','))
        .map(str::trim)
        .filter(|t| !t.is_empty())
        .collect();
    let lengths: Vec<&str> = headers
        .iter()
        .filter(|(k, _)| k.eq_ignore_ascii_case("content-length"))
        .flat_map(|(_, v)| v.split(','))
        .map(str::trim)
        .collect();

    let expects_continue = !http10
        && headers.iter().any(|(k, v)| {
            k.eq_ignore_ascii_case("expect") && v.eq_ignore_ascii_case("100-continue")
        });
    let send_continue = |writer: &mut W| -> io::Result<()> {
        if expects_continue {
            writer.write_all(b"HTTP/1.1 100 Continue\r\n\r\n")?;
            writer.flush()?;
        }
        Ok(())
    };

    let body = if !transfer_encoding.is_empty() {
        if http10 {
            return Err(bad("Transfer-Encoding in an HTTP/1.0 request"));
        }
        if !matches!(transfer_encoding[..], [only] if only.eq_ignore_ascii_case("chunked")) {
            return Err(Failure::Status(
                501,
                format!("unsupported Transfer-Encoding {transfer_encoding:?}"),
            ));
        }
        // RFC 9112 §6.1: with both, Transfer-Encoding wins and the
        // connection must not be reused.
        if !lengths.is_empty() {
            keep_alive = false;
        }
        send_continue(interim)?;
        read_chunked(reader)?
    } else if let Some(first) = lengths.first() {
        if lengths.iter().any(|l| l != first) {
            return Err(bad(format!("conflicting Content-Length {lengths:?}")));
        }
        if first.is_empty() || !first.bytes().all(|b| b.is_ascii_digit()) {
            return Err(bad(format!("malformed Content-Length {first:?}")));
        }
        let len: usize = match first.parse() {
            Ok(len) if len <= MAX_BODY => len,
            _ => return Err(Failure::Status(413, format!("body of {first} bytes"))),
        };
        if len > 0 {
            send_continue(interim)?;
        }
        let mut body = vec![0u8; len];
        reader.read_exact(&mut body)?;
        body
    } else {
        Vec::new()
    };

    let path = target
        .split(['?', '#'])
        .next()
        .unwrap_or_default()
        .to_owned();
    Ok(Some((
        Incoming {
            inner: Request {
                method,
                path,
                headers,
                body,
            },
            target,
        },
        keep_alive,
    )))
}

/// Reads a `chunked` body (RFC 9112 §7.1), discarding extensions and trailers.
fn read_chunked<R: BufRead>(reader: &mut R) -> Result<Vec<u8>, Failure> {
    let mut body = Vec::new();
    let mut budget = MAX_HEAD;
    loop {
        let line = read_line(reader, &mut budget)?
            .ok_or_else(|| Failure::Io(io::ErrorKind::UnexpectedEof.into()))?;
        let size = line.split(';').next().unwrap_or_default().trim();
        if size.is_empty() || !size.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(bad(format!("malformed chunk size {line:?}")));
        }
        let size = match usize::from_str_radix(size, 16) {
            Ok(n) if n <= MAX_BODY - body.len() => n,
            _ => return Err(Failure::Status(413, "chunked body too large".into())),
        };
        if size == 0 {
            break;
        }
        let start = body.len();
        body.resize(start + size, 0);
        reader.read_exact(&mut body[start..])?;
        let mut crlf = [0u8; 2];
        reader.read_exact(&mut crlf)?;
        if &crlf != b"\r\n" {
            return Err(bad("chunk not followed by CRLF"));
        }
    }
    // Trailer section, up to the empty line.
    loop {
        let line = read_line(reader, &mut budget)?
            .ok_or_else(|| Failure::Io(io::ErrorKind::UnexpectedEof.into()))?;
        if line.is_empty() {
            return Ok(body);
        }
    }
}

/// One CRLF- (or bare LF-) terminated line without its terminator, or `None`
/// at end of stream before any byte. Charges `budget` and fails once it is
/// spent or a line exceeds [`MAX_LINE`].
fn read_line<R: BufRead>(reader: &mut R, budget: &mut usize) -> Result<Option<String>, Failure> {
    let limit = MAX_LINE.min(*budget) + 1;
    let mut raw = Vec::new();
    let n = reader.take(limit as u64).read_until(b'\n', &mut raw)?;
    if n == 0 {
        return Ok(None);
    }
    if raw.last() != Some(&b'\n') {
        if n >= limit {
            return Err(Failure::Status(431, "request head too large".into()));
        }
        return Err(Failure::Io(io::ErrorKind::UnexpectedEof.into()));
    }
    *budget = budget.saturating_sub(n);
    raw.pop();
    if raw.last() == Some(&b'\r') {
        raw.pop();
    }
    String::from_utf8(raw)
        .map(Some)
        .map_err(|_| bad("request head is not UTF-8"))
}

/// RFC 9110 `tchar`.
fn is_token_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

/// Writes `reply` in one go. Framing headers are ours: any `Content-Length`,
/// `Transfer-Encoding` or `Connection` from the handler is dropped, as is any
/// header that would break the framing.
fn write_reply<W: Write>(
    writer: &mut W,
    head_only: bool,
    reply: &Reply,
    keep_alive: bool,
) -> io::Result<()> {
    let status = if (100..=999).contains(&reply.status) && !(100..200).contains(&reply.status) {
        reply.status
    } else {
        500
    };
    let mut out = Vec::with_capacity(256 + reply.body.len());
    out.extend_from_slice(format!("HTTP/1.1 {status} {}\r\n", reason(status)).as_bytes());
    for (name, value) in &reply.headers {
        let framing = ["content-length", "transfer-encoding", "connection"]
            .iter()
            .any(|f| name.eq_ignore_ascii_case(f));
        let valid = !name.is_empty()
            && name.bytes().all(is_token_byte)
            && !value.bytes().any(|b| b == b'\r' || b == b'\n');
        if framing || !valid {
            continue;
        }
        out.extend_from_slice(format!("{name}: {value}\r\n").as_bytes());
    }
    // 204 and 304 carry no body (RFC 9110 §6.4.1); 204 no Content-Length either.
    let bodiless = status == 204 || status == 304;
    if status != 204 && status != 304 {
        out.extend_from_slice(format!("Content-Length: {}\r\n", reply.body.len()).as_bytes());
    }
    if !keep_alive {
        out.extend_from_slice(b"Connection: close\r\n");
    }
    out.extend_from_slice(b"\r\n");
    if !head_only && !bodiless {
        out.extend_from_slice(&reply.body);
    }
    writer.write_all(&out)?;
    writer.flush()
}

fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        201 => "Created",
        202 => "Accepted",
        204 => "No Content",
        304 => "Not Modified",
        400 => "Bad Request",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        409 => "Conflict",
        411 => "Length Required",
        413 => "Content Too Large",
        415 => "Unsupported Media Type",
        429 => "Too Many Requests",
        431 => "Request Header Fields Too Large",
        500 => "Internal Server Error",
        501 => "Not Implemented",
        502 => "Bad Gateway",
        503 => "Service Unavailable",
        504 => "Gateway Timeout",
        505 => "HTTP Version Not Supported",
        _ => "Unknown",
    }
}

#[cfg(test)]
mod tests;
