//! The Prometheus endpoint: a minimal HTTP/1.1 responder for GET (and HEAD) /metrics
//! (OpenMetrics when the client asks for it, as Prometheus does, else the text format 0.0.4),
//! /healthz (the daemon answers) and /readyz (its programs are attached), a bounded number of
//! connections at a time.

use std::time::Duration;

use bytes::Bytes;
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::TcpStream,
    sync::OwnedSemaphorePermit,
};

use super::metrics::{OPENMETRICS, TEXT_FORMAT, to_text_format};

/// Metrics connections served at once; the next one is answered 503 and closed.
pub const MAX_METRICS_CLIENTS: usize = 8;
const READ_TIMEOUT: Duration = Duration::from_secs(5);
const WRITE_TIMEOUT: Duration = Duration::from_secs(10);

/// Whether `buf` holds a whole request head: an empty line, ended by CRLF or by a bare LF.
fn head_complete(buf: &[u8]) -> bool {
    buf.windows(2).any(|w| w == b"\n\n") || buf.windows(3).any(|w| w == b"\n\r\n")
}

/// Answers a connection over the cap at once with 503, without reading its request; the
/// answer is small enough for the socket buffer, so this never blocks.
pub fn refuse_busy(stream: &TcpStream) {
    let body = "busy: too many metrics requests at once; retry\n";
    let _ = stream.try_write(
        format!(
            "HTTP/1.1 503 Service Unavailable\r\nRetry-After: 1\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        )
        .as_bytes(),
    );
}

/// Whether the request head asks for OpenMetrics in its Accept header.
fn wants_openmetrics(req: &str) -> bool {
    req.lines().skip(1).any(|h| {
        h.split_once(':').is_some_and(|(name, value)| {
            name.trim().eq_ignore_ascii_case("accept")
                && value.contains("application/openmetrics-text")
        })
    })
}

/// The status line, content type, extra header lines and body for a request head.
fn route(
    req: &str,
    ready: bool,
    metrics: impl FnOnce() -> Bytes,
) -> (&'static str, &'static str, &'static str, Bytes) {
    let first = req.lines().next().unwrap_or("");
    let mut parts = first.split_whitespace();
    let (method, path) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    if method != "GET" && method != "HEAD" {
        return (
            "405 Method Not Allowed",
            "text/plain",
            "Allow: GET, HEAD\r\n",
            Bytes::from_static(b"only GET and HEAD\n"),
        );
    }
    if path == "/metrics" || path.starts_with("/metrics?") {
        let page = metrics();
        if wants_openmetrics(req) {
            ("200 OK", OPENMETRICS, "", page)
        } else {
            let text = to_text_format(&String::from_utf8_lossy(&page));
            ("200 OK", TEXT_FORMAT, "", Bytes::from(text))
        }
    } else if path == "/healthz" {
        ("200 OK", "text/plain", "", Bytes::from_static(b"ok\n"))
    } else if path == "/readyz" {
        if ready {
            ("200 OK", "text/plain", "", Bytes::from_static(b"ready\n"))
        } else {
            (
                "503 Service Unavailable",
                "text/plain",
                "",
                Bytes::from_static(b"not ready: no kernel program attached\n"),
            )
        }
    } else if path == "/" {
        (
            "200 OK",
            "text/plain",
            "",
            Bytes::from_static(b"tcptrace: metrics at /metrics, /healthz, /readyz\n"),
        )
    } else {
        (
            "404 Not Found",
            "text/plain",
            "",
            Bytes::from_static(b"not found; metrics are at /metrics\n"),
        )
    }
}

/// The whole answer to one request head: HEAD gets GET's head (same length) and no body.
fn respond(req: &[u8], ready: bool, metrics: impl FnOnce() -> Bytes) -> (String, Bytes) {
    let req = String::from_utf8_lossy(req);
    let first = req.lines().next().unwrap_or("");
    let (status, ctype, extra, body) = route(&req, ready, metrics);
    let head = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\n{extra}Connection: close\r\n\r\n",
        body.len()
    );
    let body = if first.starts_with("HEAD ") {
        Bytes::new()
    } else {
        body
    };
    (head, body)
}

/// Answers one HTTP request; `metrics` renders the exposition text (OpenMetrics), `ready`
/// says whether the kernel programs are attached. `_permit` holds one of the connection slots
/// until the answer is written or the client is dropped.
pub async fn serve_metrics(
    mut stream: TcpStream,
    _permit: OwnedSemaphorePermit,
    ready: bool,
    metrics: impl FnOnce() -> Bytes,
) {
    let mut buf = vec![0u8; 8192];
    let mut n = 0;
    // Read the request head (we only need its first line).
    let head = tokio::time::timeout(READ_TIMEOUT, async {
        loop {
            match stream.read(&mut buf[n..]).await {
                Ok(0) | Err(_) => break,
                Ok(k) => {
                    n += k;
                    if head_complete(&buf[..n]) || n == buf.len() {
                        break;
                    }
                }
            }
        }
    })
    .await;
    if head.is_err() {
        return;
    }
    let (head, body) = respond(&buf[..n], ready, metrics);
    // Head and body go out in one write (the body is shared, not copied into the head).
    let _ = tokio::time::timeout(WRITE_TIMEOUT, async {
        let mut bufs = [
            std::io::IoSlice::new(head.as_bytes()),
            std::io::IoSlice::new(&body),
        ];
        let mut bufs = &mut bufs[..];
        while !bufs.is_empty() {
            match stream.write_vectored(bufs).await {
                Ok(0) | Err(_) => break,
                Ok(n) => std::io::IoSlice::advance_slices(&mut bufs, n),
            }
        }
        let _ = stream.shutdown().await;
    })
    .await;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn body() -> Bytes {
        Bytes::from_static(b"tcptrace_events_total 1\n")
    }

    #[test]
    fn head_like_get_without_body() {
        let (get_head, get_body) = respond(b"GET /metrics HTTP/1.1\r\n\r\n", true, body);
        let (head_head, head_body) = respond(b"HEAD /metrics HTTP/1.1\r\n\r\n", true, body);
        assert!(get_head.starts_with("HTTP/1.1 200 OK\r\n"), "{get_head}");
        assert_eq!(head_head, get_head);
        assert!(head_head.contains("Content-Length: 24\r\n"), "{head_head}");
        assert_eq!(get_body, body());
        assert!(head_body.is_empty());
        let (post, _) = respond(b"POST /metrics HTTP/1.1\r\n\r\n", true, body);
        assert!(post.starts_with("HTTP/1.1 405 "), "{post}");
        assert!(post.contains("Allow: GET, HEAD\r\n"), "{post}");
    }

    #[test]
    fn bare_lf_ends_the_head() {
        assert!(head_complete(b"GET /metrics HTTP/1.0\n\n"));
        assert!(head_complete(b"GET /metrics HTTP/1.0\nHost: x\n\n"));
        assert!(head_complete(b"GET /metrics HTTP/1.0\r\nHost: x\r\n\r\n"));
        assert!(!head_complete(b"GET /metrics HTTP/1.0\r\nHost: x\r\n"));
        let (h, _) = respond(b"GET /metrics HTTP/1.0\nHost: x\n\n", true, body);
        assert!(h.starts_with("HTTP/1.1 200 OK"), "{h}");
    }

    #[test]
    fn health_readiness_and_formats() {
        let (h, b) = respond(b"GET /healthz HTTP/1.1\r\n\r\n", false, body);
        assert!(h.starts_with("HTTP/1.1 200 OK\r\n") && b == "ok\n", "{h}");
        let (h, _) = respond(b"GET /readyz HTTP/1.1\r\n\r\n", true, body);
        assert!(h.starts_with("HTTP/1.1 200 OK\r\n"), "{h}");
        let (h, _) = respond(b"GET /readyz HTTP/1.1\r\n\r\n", false, body);
        assert!(h.starts_with("HTTP/1.1 503 "), "{h}");
        let (h, _) = respond(b"GET /nope HTTP/1.1\r\n\r\n", true, body);
        assert!(h.starts_with("HTTP/1.1 404 "), "{h}");
        let om = || Bytes::from_static(b"# HELP c C.\n# TYPE c counter\nc_total 1\n# EOF\n");
        let (h, b) = respond(
            b"GET /metrics HTTP/1.1\r\naccept: application/openmetrics-text;version=1.0.0,text/plain;q=0.5\r\n\r\n",
            true,
            om,
        );
        assert!(
            h.contains("Content-Type: application/openmetrics-text"),
            "{h}"
        );
        assert_eq!(b, om());
        let (h, b) = respond(b"GET /metrics HTTP/1.1\r\nAccept: */*\r\n\r\n", true, om);
        assert!(h.contains("Content-Type: text/plain; version=0.0.4"), "{h}");
        assert_eq!(b, "# HELP c_total C.\n# TYPE c_total counter\nc_total 1\n");
    }
}
