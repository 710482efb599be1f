//! A small HTTP/1.1 client over std's `TcpStream` for a daemon's own API (`bitnode demo`, `bitnode bench
//! serve`): one request per connection (`Connection: close`), a body framed by `Content-Length`, chunked
//! transfer coding or the end of the connection, and server-sent events read line by line as they
//! arrive. Plain `http://` only: the API is for loopback, or behind the owner's own TLS proxy. hyper's
//! client would do the same with more to build, on a machine where every crate costs minutes.
use anyhow::{bail, Context};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::time::Duration;

/// An answer whose head has been read; the body is read with [`Answer::body`] or [`Answer::events`].
pub struct Answer {
    pub status: u16,
    /// Header names in lower case.
    pub headers: Vec<(String, String)>,
    body: Box<dyn BufRead + Send>,
}

/// Splits `http://host:port/prefix` into the address to connect to and the path prefix (no trailing `/`).
fn split_url(base: &str) -> anyhow::Result<(String, String)> {
    let rest = base
        .strip_prefix("http://")
        .with_context(|| format!("{base:?} is not an http:// URL"))?;
    let (hostport, prefix) = rest.split_once('/').unwrap_or((rest, ""));
    if hostport.is_empty() {
        bail!("{base:?} names no host");
    }
    let prefix = prefix.trim_end_matches('/');
    Ok((
        hostport.to_string(),
        if prefix.is_empty() {
            String::new()
        } else {
            format!("/{prefix}")
        },
    ))
}

/// `POST {base}{path}` with a JSON body (and a bearer token when given); returns once the head is read.
/// `timeout` bounds every read and write, not the whole answer (a long stream is fine while it moves).
pub fn post_json(base: &str, path: &str, token: Option<&str>, body: &str, timeout: Duration) -> anyhow::Result<Answer> {
    request(base, "POST", path, token, Some(body), timeout)
}

/// `GET {base}{path}`.
pub fn get(base: &str, path: &str, token: Option<&str>, timeout: Duration) -> anyhow::Result<Answer> {
    request(base, "GET", path, token, None, timeout)
}

fn request(
    base: &str,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: Option<&str>,
    timeout: Duration,
) -> anyhow::Result<Answer> {
    let (hostport, prefix) = split_url(base)?;
    let mut s = TcpStream::connect(&hostport).with_context(|| format!("connecting to {hostport}"))?;
    s.set_read_timeout(Some(timeout))?;
    s.set_write_timeout(Some(timeout))?;
    // Small writes and a streaming answer: no Nagle delay on either.
    let _ = s.set_nodelay(true);
    let mut head = format!("{method} {prefix}{path} HTTP/1.1\r\nHost: {hostport}\r\nConnection: close\r\n");
    if let Some(t) = token {
        head.push_str(&format!("Authorization: Bearer {t}\r\n"));
    }
    let body = body.unwrap_or("");
    if method == "POST" {
        head.push_str(&format!(
            "Content-Type: application/json\r\nContent-Length: {}\r\n",
            body.len()
        ));
    }
    head.push_str("\r\n");
    s.write_all(head.as_bytes())?;
    s.write_all(body.as_bytes())?;
    s.flush()?;
    let mut r = BufReader::new(s);
    let mut line = String::new();
    r.read_line(&mut line).context("reading the status line")?;
    let status: u16 = line
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .with_context(|| format!("a malformed status line: {line:?}"))?;
    let mut headers = vec![];
    loop {
        line.clear();
        if r.read_line(&mut line)? == 0 {
            bail!("the connection closed inside the answer's head");
        }
        let l = line.trim_end();
        if l.is_empty() {
            break;
        }
        if let Some((k, v)) = l.split_once(':') {
            headers.push((k.trim().to_ascii_lowercase(), v.trim().to_string()));
        }
    }
    let find = |k: &str| headers.iter().find(|(n, _)| n == k).map(|(_, v)| v.as_str());
    let body: Box<dyn BufRead + Send> = if find("transfer-encoding").is_some_and(|v| v.eq_ignore_ascii_case("chunked"))
    {
        Box::new(BufReader::new(Chunked {
            inner: r,
            left: 0,
            done: false,
        }))
    } else if let Some(n) = find("content-length") {
        let n: u64 = n
            .parse()
            .with_context(|| format!("a malformed Content-Length: {n:?}"))?;
        Box::new(r.take(n))
    } else {
        Box::new(r)
    };
    Ok(Answer { status, headers, body })
}

impl Answer {
    pub fn header(&self, name: &str) -> Option<&str> {
        let name = name.to_ascii_lowercase();
        self.headers.iter().find(|(n, _)| *n == name).map(|(_, v)| v.as_str())
    }

    /// The whole body.
    pub fn body(mut self) -> anyhow::Result<Vec<u8>> {
        let mut v = vec![];
        self.body.read_to_end(&mut v).context("reading the answer's body")?;
        Ok(v)
    }

    /// The body as server-sent events: `on_data` gets each `data:` payload as it arrives (a payload of
    /// several `data:` lines joined by newlines) until `[DONE]`, the end of the body, or `on_data`
    /// returning false.
    pub fn events(mut self, mut on_data: impl FnMut(&str) -> bool) -> anyhow::Result<()> {
        let mut data = String::new();
        let mut line = String::new();
        loop {
            line.clear();
            if self.body.read_line(&mut line).context("reading the event stream")? == 0 {
                return Ok(());
            }
            let l = line.trim_end_matches(['\r', '\n']);
            if l.is_empty() {
                // The end of one event.
                if data.is_empty() {
                    continue;
                }
                if data == "[DONE]" || !on_data(&data) {
                    return Ok(());
                }
                data.clear();
            } else if let Some(d) = l.strip_prefix("data:") {
                if !data.is_empty() {
                    data.push('\n');
                }
                data.push_str(d.strip_prefix(' ').unwrap_or(d));
            }
            // Comments (`:`), `event:`, `id:` and `retry:` lines carry nothing the API sends.
        }
    }
}

/// The chunked transfer coding, decoded: `<hex size>[;ext]\r\n<bytes>\r\n`, ended by a size of 0.
struct Chunked<R> {
    inner: R,
    left: u64,
    done: bool,
}

impl<R: BufRead> Read for Chunked<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let bad = |m: &str| std::io::Error::new(std::io::ErrorKind::InvalidData, m.to_string());
        if self.done || buf.is_empty() {
            return Ok(0);
        }
        if self.left == 0 {
            let mut line = String::new();
            if self.inner.read_line(&mut line)? == 0 {
                return Err(bad("the connection closed inside a chunked body"));
            }
            let size = line.trim().split(';').next().unwrap_or("");
            self.left = u64::from_str_radix(size.trim(), 16).map_err(|_| bad("a malformed chunk size"))?;
            if self.left == 0 {
                // Trailers, up to the empty line, are not read: the connection closes after this answer.
                self.done = true;
                return Ok(0);
            }
        }
        let want = buf.len().min(self.left.min(usize::MAX as u64) as usize);
        let n = self.inner.read(&mut buf[..want])?;
        if n == 0 {
            return Err(bad("the connection closed inside a chunk"));
        }
        self.left -= n as u64;
        if self.left == 0 {
            let mut crlf = String::new();
            self.inner.read_line(&mut crlf)?;
        }
        Ok(n)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn chunked_bodies_and_event_streams_are_decoded() {
        // Events split across chunks at odd places, as a server's writes may fall.
        let pieces = ["data: {", "\"a\":1}\n\n", "data: x\ndata: y\n\ndata: [DONE]", "\n\n"];
        let mut wire: String = pieces.iter().map(|p| format!("{:x};ext\r\n{p}\r\n", p.len())).collect();
        wire.push_str("0\r\n\r\n");
        let wire = wire.into_bytes();
        let body = BufReader::new(Chunked {
            inner: BufReader::new(&wire[..]),
            left: 0,
            done: false,
        });
        let a = Answer {
            status: 200,
            headers: vec![],
            body: Box::new(std::io::Cursor::new(
                body.bytes().map(|b| b.unwrap()).collect::<Vec<u8>>(),
            )),
        };
        let mut got = vec![];
        a.events(|d| {
            got.push(d.to_string());
            true
        })
        .unwrap();
        assert_eq!(got, vec!["{\"a\":1}".to_string(), "x\ny".to_string()]);
        assert_eq!(
            split_url("http://127.0.0.1:7879/v1/").unwrap(),
            ("127.0.0.1:7879".into(), "/v1".into())
        );
        assert_eq!(split_url("http://h:1").unwrap(), ("h:1".into(), String::new()));
        assert!(split_url("https://h:1").is_err());
    }
}
