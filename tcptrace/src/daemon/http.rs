//! The Prometheus endpoint: a minimal HTTP/1.1 responder for GET /metrics.

use std::time::Duration;

use bytes::Bytes;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

/// Answers one HTTP request; `metrics` renders the exposition text.
pub async fn serve_metrics(mut stream: tokio::net::TcpStream, metrics: impl FnOnce() -> Bytes) {
    let mut buf = vec![0u8; 8192];
    let mut n = 0;
    // Read the request head (we only need its first line).
    let head = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            match stream.read(&mut buf[n..]).await {
                Ok(0) | Err(_) => break,
                Ok(k) => {
                    n += k;
                    if buf[..n].windows(4).any(|w| w == b"\r\n\r\n") || n == buf.len() {
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
    let req = String::from_utf8_lossy(&buf[..n]);
    let first = req.lines().next().unwrap_or("");
    let mut parts = first.split_whitespace();
    let (method, path) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let (status, ctype, body) = if method != "GET" {
        (
            "405 Method Not Allowed",
            "text/plain",
            Bytes::from_static(b"only GET\n"),
        )
    } else if path == "/metrics" || path.starts_with("/metrics?") {
        (
            "200 OK",
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
            metrics(),
        )
    } else if path == "/" {
        (
            "200 OK",
            "text/plain",
            Bytes::from_static(b"tcptrace: metrics at /metrics\n"),
        )
    } else {
        (
            "404 Not Found",
            "text/plain",
            Bytes::from_static(b"not found; metrics are at /metrics\n"),
        )
    };
    let head = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    // Head and body go out in one write (the body is shared, not copied into the head).
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
}
