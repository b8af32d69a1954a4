//! A small blocking HTTP/1.1 client for the control API (used by `usernet port`, `ps`,
//! `flows`, `top` and `capture`).
//!
//! One request per connection (`Connection: close`): write the request, read until the
//! server closes, then split status line, headers and body (Content-Length or chunked).
//! Every read and write has a timeout, so a hung server cannot hang the CLI. [`stream`] is
//! the exception: it reads a body as it comes, for as long as it lasts (`/v1/capture`).

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

/// How long one request may take.
pub const TIMEOUT: Duration = Duration::from_secs(30);
/// Largest response accepted.
const MAX_RESPONSE: u64 = 16 * 1024 * 1024;

/// Why a request failed. The OS error is part of the message, so it is not also a `source`
/// (`usernet` prints the whole chain, `{:#}`, and it would come twice); the rule of
/// `BindError` in crates/host/src/publish/listen.rs.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot connect to the usernet API at {path}: {err}")]
    Connect { path: String, err: std::io::Error },
    #[error("talking to the usernet API: {0}")]
    Io(std::io::Error),
    #[error("malformed answer from the usernet API: {0}")]
    Malformed(&'static str),
}

impl From<std::io::Error> for ClientError {
    fn from(err: std::io::Error) -> ClientError {
        ClientError::Io(err)
    }
}

/// An HTTP answer.
#[derive(Debug)]
pub struct Response {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Response {
    /// The first header named `name` (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(n, _)| n.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
    }

    /// The error message of a failed request: `{"error": "..."}` or the body as text.
    pub fn error_message(&self) -> String {
        if let Ok(v) = serde_json::from_slice::<serde_json::Value>(&self.body)
            && let Some(msg) = v.get("error").and_then(|m| m.as_str())
        {
            return msg.to_string();
        }
        let text = String::from_utf8_lossy(&self.body).trim().to_string();
        if text.is_empty() { format!("the usernet API answered {}", self.status) } else { text }
    }
}

/// Sends one request to the API at `socket` and reads the whole answer.
pub fn request(socket: &Path, method: &str, path: &str, body: Option<&[u8]>) -> Result<Response, ClientError> {
    request_within(socket, method, path, body, TIMEOUT)
}

/// [`request`] with another bound than [`TIMEOUT`] on each read and write.
pub fn request_within(
    socket: &Path,
    method: &str,
    path: &str,
    body: Option<&[u8]>,
    timeout: Duration,
) -> Result<Response, ClientError> {
    let mut stream =
        UnixStream::connect(socket).map_err(|err| ClientError::Connect { path: socket.display().to_string(), err })?;
    stream.set_read_timeout(Some(timeout))?;
    stream.set_write_timeout(Some(timeout))?;
    let body = body.unwrap_or_default();
    let mut req =
        format!("{method} {path} HTTP/1.1\r\nHost: usernet\r\nConnection: close\r\nContent-Length: {}\r\n", body.len());
    if !body.is_empty() {
        req.push_str("Content-Type: application/json\r\n");
    }
    req.push_str("\r\n");
    stream.write_all(req.as_bytes())?;
    stream.write_all(body)?;
    let mut raw = Vec::new();
    stream.take(MAX_RESPONSE).read_to_end(&mut raw)?;
    parse_response(&raw)
}

/// Sends `value` as JSON.
pub fn request_json(
    socket: &Path,
    method: &str,
    path: &str,
    value: &serde_json::Value,
) -> Result<Response, ClientError> {
    let body = serde_json::to_vec(value).map_err(|_| ClientError::Malformed("request body"))?;
    request(socket, method, path, Some(&body))
}

/// A body being read as it arrives (see [`stream`]).
pub struct Streaming {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    reader: std::io::BufReader<UnixStream>,
    chunked: bool,
    /// Bytes left in the current chunk (chunked), or None before the first chunk.
    left: Option<usize>,
    done: bool,
}

impl Streaming {
    /// Another handle on the connection (to shut it down from another thread).
    pub fn connection(&self) -> std::io::Result<UnixStream> {
        self.reader.get_ref().try_clone()
    }

    /// The whole body of an answer that is not the stream asked for (an error, say).
    pub fn into_response(mut self) -> Result<Response, ClientError> {
        let mut body = Vec::new();
        (&mut self).take(MAX_RESPONSE).read_to_end(&mut body)?;
        Ok(Response { status: self.status, headers: self.headers, body })
    }

    fn read_chunk_size(&mut self) -> std::io::Result<usize> {
        use std::io::BufRead;
        let mut line = String::new();
        if self.left.is_some() {
            // The CRLF that ends the previous chunk.
            self.reader.read_line(&mut line)?;
            line.clear();
        }
        if self.reader.read_line(&mut line)? == 0 {
            return Err(std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "the usernet API closed mid-stream"));
        }
        let size = line.split(';').next().unwrap_or("").trim();
        usize::from_str_radix(size, 16)
            .map_err(|_| std::io::Error::new(std::io::ErrorKind::InvalidData, "malformed chunk size"))
    }
}

impl Read for Streaming {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        if self.done || buf.is_empty() {
            return Ok(0);
        }
        if !self.chunked {
            return self.reader.read(buf);
        }
        if self.left.is_none_or(|n| n == 0) {
            let size = self.read_chunk_size()?;
            self.left = Some(size);
            if size == 0 {
                self.done = true;
                return Ok(0);
            }
        }
        let want = buf.len().min(self.left.unwrap_or(0));
        let n = self.reader.read(&mut buf[..want])?;
        if n == 0 {
            return Err(std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "the usernet API closed mid-chunk"));
        }
        self.left = self.left.map(|l| l - n);
        Ok(n)
    }
}

/// Sends a GET to the API at `socket` and returns once the answer's headers are in; its
/// body is then read as it arrives, with no timeout (a capture may be quiet for long).
pub fn stream(socket: &Path, path: &str) -> Result<Streaming, ClientError> {
    use std::io::BufRead;
    let mut stream =
        UnixStream::connect(socket).map_err(|err| ClientError::Connect { path: socket.display().to_string(), err })?;
    stream.set_read_timeout(Some(TIMEOUT))?;
    stream.set_write_timeout(Some(TIMEOUT))?;
    write!(stream, "GET {path} HTTP/1.1\r\nHost: usernet\r\nConnection: close\r\n\r\n")?;
    let mut reader = std::io::BufReader::new(stream);
    let mut head = String::new();
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line)? == 0 {
            return Err(ClientError::Malformed("no end of headers"));
        }
        if line == "\r\n" || line == "\n" {
            break;
        }
        head.push_str(&line);
        if head.len() > 64 * 1024 {
            return Err(ClientError::Malformed("headers too long"));
        }
    }
    let mut lines = head.lines();
    let status = (lines.next().and_then(|l| l.split(' ').nth(1)).and_then(|s| s.parse::<u16>().ok()))
        .ok_or(ClientError::Malformed("status line"))?;
    let headers: Vec<(String, String)> =
        lines.filter_map(|l| l.split_once(':')).map(|(n, v)| (n.trim().to_string(), v.trim().to_string())).collect();
    let chunked =
        headers.iter().any(|(n, v)| n.eq_ignore_ascii_case("transfer-encoding") && v.eq_ignore_ascii_case("chunked"));
    reader.get_ref().set_read_timeout(None)?;
    Ok(Streaming { status, headers, reader, chunked, left: None, done: false })
}

fn parse_response(raw: &[u8]) -> Result<Response, ClientError> {
    let end = raw.windows(4).position(|w| w == b"\r\n\r\n").ok_or(ClientError::Malformed("no end of headers"))?;
    let head = std::str::from_utf8(&raw[..end]).map_err(|_| ClientError::Malformed("headers"))?;
    let rest = &raw[end + 4..];
    let mut lines = head.split("\r\n");
    let status_line = lines.next().ok_or(ClientError::Malformed("no status line"))?;
    let status = status_line
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse::<u16>().ok())
        .ok_or(ClientError::Malformed("status line"))?;
    let headers: Vec<(String, String)> =
        lines.filter_map(|l| l.split_once(':')).map(|(n, v)| (n.trim().to_string(), v.trim().to_string())).collect();
    let mut response = Response { status, headers, body: Vec::new() };
    if response.header("transfer-encoding").is_some_and(|v| v.eq_ignore_ascii_case("chunked")) {
        response.body = dechunk(rest)?;
    } else if let Some(len) = response.header("content-length") {
        let len: usize = len.parse().map_err(|_| ClientError::Malformed("content-length"))?;
        if rest.len() < len {
            return Err(ClientError::Malformed("body shorter than content-length"));
        }
        response.body = rest[..len].to_vec();
    } else {
        response.body = rest.to_vec();
    }
    Ok(response)
}

fn dechunk(mut data: &[u8]) -> Result<Vec<u8>, ClientError> {
    let mut out = Vec::new();
    loop {
        let eol = data.windows(2).position(|w| w == b"\r\n").ok_or(ClientError::Malformed("chunk size"))?;
        let size_text = std::str::from_utf8(&data[..eol]).map_err(|_| ClientError::Malformed("chunk size"))?;
        let size_text = size_text.split(';').next().unwrap_or("").trim();
        let size = usize::from_str_radix(size_text, 16).map_err(|_| ClientError::Malformed("chunk size"))?;
        data = &data[eol + 2..];
        if size == 0 {
            return Ok(out);
        }
        if data.len() < size + 2 {
            return Err(ClientError::Malformed("truncated chunk"));
        }
        out.extend_from_slice(&data[..size]);
        data = &data[size + 2..];
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// How often `cause` appears in `e` as `usernet` prints it (`{:#}`, the whole chain).
    fn times_printed(e: ClientError, cause: &str) -> usize {
        format!("{:#}", anyhow::Error::from(e)).matches(cause).count()
    }

    #[test]
    fn a_cause_is_printed_once() {
        let missing = Path::new("/nonexistent-usernet-dir/api.sock");
        let e = request(missing, "GET", "/v1/ports", None).unwrap_err();
        let enoent = std::io::Error::from_raw_os_error(libc::ENOENT).to_string();
        assert_eq!(e.to_string(), format!("cannot connect to the usernet API at {}: {enoent}", missing.display()));
        assert_eq!(times_printed(e, &enoent), 1);
        // Not a socket: connect(2) is refused.
        let file = std::env::temp_dir().join(format!("usernet-client-test-{}", std::process::id()));
        std::fs::write(&file, b"").unwrap();
        let e = stream(&file, "/v1/capture").err().unwrap();
        std::fs::remove_file(&file).unwrap();
        let refused = std::io::Error::from_raw_os_error(libc::ECONNREFUSED).to_string();
        assert_eq!(times_printed(e, &refused), 1);
        let reset = std::io::Error::from(std::io::ErrorKind::ConnectionReset);
        let text = reset.to_string();
        let e = ClientError::from(reset);
        assert_eq!(e.to_string(), format!("talking to the usernet API: {text}"));
        assert_eq!(times_printed(e, &text), 1);
    }

    #[test]
    fn content_length() {
        let r = parse_response(b"HTTP/1.1 201 Created\r\ncontent-length: 2\r\n\r\n[]").unwrap();
        assert_eq!(r.status, 201);
        assert_eq!(r.body, b"[]");
    }

    #[test]
    fn chunked() {
        let r = parse_response(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2;x=y\r\nde\r\n0\r\n\r\n",
        )
        .unwrap();
        assert_eq!(r.body, b"abcde");
    }

    #[test]
    fn malformed() {
        assert!(parse_response(b"garbage").is_err());
        assert!(parse_response(b"HTTP/1.1 xx\r\n\r\n").is_err());
        assert!(parse_response(b"HTTP/1.1 200 OK\r\ncontent-length: 9\r\n\r\nab").is_err());
        assert!(parse_response(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n").is_err());
    }

    #[test]
    fn error_messages() {
        let r = Response {
            status: 409,
            headers: vec![],
            body: br#"{"error":"Bind for 0.0.0.0:8000 failed: port is already allocated"}"#.to_vec(),
        };
        assert_eq!(r.error_message(), "Bind for 0.0.0.0:8000 failed: port is already allocated");
        let r = Response { status: 500, headers: vec![], body: b"proxy not found\n".to_vec() };
        assert_eq!(r.error_message(), "proxy not found");
    }
}
