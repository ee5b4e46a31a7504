//! The Prometheus endpoint, served by hyper (HTTP/1.1 only): GET and HEAD of /metrics
//! (OpenMetrics when the client asks for it, as Prometheus does, else the text format 0.0.4),
//! /healthz (the daemon answers) and /readyz (its programs are attached); 404 elsewhere, 405
//! for other methods. Connections are kept alive between requests, closed when a request's
//! head (or the next one) does not arrive within [`HEADER_TIMEOUT`], and at most
//! [`MAX_METRICS_CLIENTS`] are served at once.

use std::{convert::Infallible, time::Duration};

use bytes::Bytes;
use http_body_util::Full;
use hyper::{
    Method, Request, Response, StatusCode,
    header::{ACCEPT, ALLOW, CONTENT_TYPE, HeaderValue, RETRY_AFTER},
    service::service_fn,
};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::{net::TcpStream, sync::OwnedSemaphorePermit};

use super::metrics::{OPENMETRICS, TEXT_FORMAT, to_text_format};

/// Metrics connections served at once; the next one is answered 503 and closed.
pub const MAX_METRICS_CLIENTS: usize = 8;
/// How long a request's head may take to arrive, and how long a kept-alive connection may
/// wait for its next request.
const HEADER_TIMEOUT: Duration = Duration::from_secs(5);
/// The longest a connection is served, however busy (a client reading its answers too slowly
/// keeps a connection slot no longer than this).
const CONNECTION_MAX: Duration = Duration::from_secs(60);

/// Answers a connection over the cap at once with 503, without reading its request and
/// without a task of its own; the answer is small enough for the socket buffer, so this never
/// blocks.
pub fn refuse_busy(stream: &TcpStream) {
    const BUSY: &str = "HTTP/1.1 503 Service Unavailable\r\nRetry-After: 1\r\n\
        Content-Type: text/plain\r\nContent-Length: 47\r\nConnection: close\r\n\r\n\
        busy: too many metrics requests at once; retry\n";
    let _ = stream.try_write(BUSY.as_bytes());
}

/// Whether the request asks for OpenMetrics in its Accept header(s).
fn wants_openmetrics<B>(req: &Request<B>) -> bool {
    req.headers().get_all(ACCEPT).iter().any(|v| {
        let v = v.as_bytes();
        let want = b"application/openmetrics-text";
        v.windows(want.len()).any(|w| w == want)
    })
}

fn plain(status: StatusCode, body: &'static str) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from_static(body.as_bytes())));
    *r.status_mut() = status;
    r.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("text/plain"));
    r
}

/// The answer to one request; `metrics` renders the exposition text (OpenMetrics), called
/// only for /metrics. HEAD is answered like GET: hyper sends the head (with its length) and no
/// body.
fn respond<B>(
    req: &Request<B>,
    ready: bool,
    metrics: impl FnOnce() -> Bytes,
) -> Response<Full<Bytes>> {
    if req.method() != Method::GET && req.method() != Method::HEAD {
        let mut r = plain(StatusCode::METHOD_NOT_ALLOWED, "only GET and HEAD\n");
        r.headers_mut()
            .insert(ALLOW, HeaderValue::from_static("GET, HEAD"));
        return r;
    }
    match req.uri().path() {
        "/metrics" => {
            let page = metrics();
            let (ctype, body) = if wants_openmetrics(req) {
                (OPENMETRICS, page)
            } else {
                let text = to_text_format(&String::from_utf8_lossy(&page));
                (TEXT_FORMAT, Bytes::from(text))
            };
            let mut r = Response::new(Full::new(body));
            r.headers_mut()
                .insert(CONTENT_TYPE, HeaderValue::from_static(ctype));
            r
        }
        "/healthz" => plain(StatusCode::OK, "ok\n"),
        "/readyz" if ready => plain(StatusCode::OK, "ready\n"),
        "/readyz" => {
            let mut r = plain(
                StatusCode::SERVICE_UNAVAILABLE,
                "not ready: no kernel program attached\n",
            );
            r.headers_mut()
                .insert(RETRY_AFTER, HeaderValue::from_static("1"));
            r
        }
        "/" => plain(
            StatusCode::OK,
            "tcptrace: metrics at /metrics, /healthz, /readyz\n",
        ),
        _ => plain(
            StatusCode::NOT_FOUND,
            "not found; metrics are at /metrics\n",
        ),
    }
}

/// Serves one metrics connection until the client closes it, goes quiet for
/// [`HEADER_TIMEOUT`], or [`CONNECTION_MAX`] has passed. `ready` says whether the kernel
/// programs are attached, `metrics` renders the page (each call may share one rendering with
/// other clients). `_permit` holds one of the connection slots until then.
pub async fn serve_metrics(
    stream: TcpStream,
    _permit: OwnedSemaphorePermit,
    ready: impl Fn() -> bool + Send + Sync + 'static,
    metrics: impl Fn() -> Bytes + Send + Sync + 'static,
) {
    let service = service_fn(move |req: Request<hyper::body::Incoming>| {
        let resp = respond(&req, ready(), &metrics);
        std::future::ready(Ok::<_, Infallible>(resp))
    });
    let conn = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_TIMEOUT)
        .keep_alive(true)
        // A client that closes its side after its request still gets the answer.
        .half_close(true)
        .serve_connection(TokioIo::new(stream), service);
    // Errors (a client gone, a malformed request answered 400 by hyper, a timeout) end this
    // one connection and concern nobody else.
    let _ = tokio::time::timeout(CONNECTION_MAX, conn).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn body() -> Bytes {
        Bytes::from_static(b"tcptrace_events_total 1\n")
    }

    /// The raw answers from a real connection served by [`serve_metrics`]: each request is
    /// sent once the answer to the one before has arrived (its end is `ends`), then the
    /// client closes its side and reads the rest.
    fn exchanges(requests: &[(&[u8], &str)], ready: bool) -> String {
        use std::io::{Read as _, Write as _};
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let addr = listener.local_addr().unwrap();
            let requests: Vec<(Vec<u8>, String)> = requests
                .iter()
                .map(|(r, e)| (r.to_vec(), e.to_string()))
                .collect();
            let client = std::thread::spawn(move || {
                let mut c = std::net::TcpStream::connect(addr).unwrap();
                c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
                let mut out = Vec::new();
                let last = requests.len() - 1;
                for (i, (request, ends)) in requests.into_iter().enumerate() {
                    c.write_all(&request).unwrap();
                    if i == last {
                        break;
                    }
                    let mut buf = [0u8; 4096];
                    while !String::from_utf8_lossy(&out).ends_with(&ends) {
                        let n = c.read(&mut buf).unwrap();
                        assert!(n > 0, "closed early: {}", String::from_utf8_lossy(&out));
                        out.extend_from_slice(&buf[..n]);
                    }
                }
                c.shutdown(std::net::Shutdown::Write).unwrap();
                let _ = c.read_to_end(&mut out);
                String::from_utf8_lossy(&out).into_owned()
            });
            let (s, _) = listener.accept().await.unwrap();
            let permit = std::sync::Arc::new(tokio::sync::Semaphore::new(1))
                .try_acquire_owned()
                .unwrap();
            serve_metrics(s, permit, move || ready, body).await;
            client.join().unwrap()
        })
    }

    fn exchange(request: &[u8], ready: bool) -> String {
        exchanges(&[(request, "")], ready)
    }

    #[test]
    fn head_like_get_without_body() {
        let get = exchange(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n", true);
        let head = exchange(b"HEAD /metrics HTTP/1.1\r\nHost: x\r\n\r\n", true);
        assert!(get.starts_with("HTTP/1.1 200 OK\r\n"), "{get}");
        assert!(get.ends_with("\r\n\r\ntcptrace_events_total 1\n"), "{get}");
        assert!(head.starts_with("HTTP/1.1 200 OK\r\n"), "{head}");
        assert!(head.contains("content-length: 24\r\n"), "{head}");
        assert!(
            head.ends_with("\r\n\r\n"),
            "no body after HEAD's head: {head}"
        );
        let post = exchange(
            b"POST /metrics HTTP/1.1\r\nHost: x\r\ncontent-length: 0\r\n\r\n",
            true,
        );
        assert!(post.starts_with("HTTP/1.1 405 "), "{post}");
        assert!(post.contains("allow: GET, HEAD\r\n"), "{post}");
    }

    #[test]
    fn keep_alive_serves_several_requests_on_one_connection() {
        let two = exchanges(
            &[
                (b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n", "\r\n\r\nok\n"),
                (b"GET /metrics?x=1 HTTP/1.1\r\nHost: x\r\n\r\n", ""),
            ],
            true,
        );
        assert_eq!(two.matches("HTTP/1.1 200 OK\r\n").count(), 2, "{two}");
        assert!(two.ends_with("tcptrace_events_total 1\n"), "{two}");
    }

    #[test]
    fn malformed_request_gets_400() {
        let bad = exchange(b"\x01\x02 nonsense\r\n\r\n", true);
        assert!(bad.starts_with("HTTP/1.1 400 "), "{bad:?}");
    }

    fn request(path: &str, accept: Option<&str>) -> Request<()> {
        let mut b = Request::get(path);
        if let Some(a) = accept {
            b = b.header(ACCEPT, a);
        }
        b.body(()).unwrap()
    }

    fn text(r: Response<Full<Bytes>>) -> (StatusCode, String, Bytes) {
        use http_body_util::BodyExt as _;
        let status = r.status();
        let ctype = r
            .headers()
            .get(CONTENT_TYPE)
            .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
            .unwrap_or_default();
        let body = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap()
            .block_on(r.into_body().collect())
            .unwrap()
            .to_bytes();
        (status, ctype, body)
    }

    #[test]
    fn health_readiness_and_formats() {
        let (s, _, b) = text(respond(&request("/healthz", None), false, body));
        assert_eq!((s, &b[..]), (StatusCode::OK, &b"ok\n"[..]));
        let (s, _, _) = text(respond(&request("/readyz", None), true, body));
        assert_eq!(s, StatusCode::OK);
        let (s, _, _) = text(respond(&request("/readyz", None), false, body));
        assert_eq!(s, StatusCode::SERVICE_UNAVAILABLE);
        let (s, _, _) = text(respond(&request("/nope", None), true, body));
        assert_eq!(s, StatusCode::NOT_FOUND);
        let om = || Bytes::from_static(b"# HELP c C.\n# TYPE c counter\nc_total 1\n# EOF\n");
        let (s, ctype, b) = text(respond(
            &request(
                "/metrics",
                Some("application/openmetrics-text;version=1.0.0,text/plain;q=0.5"),
            ),
            true,
            om,
        ));
        assert_eq!(s, StatusCode::OK);
        assert!(ctype.starts_with("application/openmetrics-text"), "{ctype}");
        assert_eq!(b, om());
        let (_, ctype, b) = text(respond(&request("/metrics", Some("*/*")), true, om));
        assert!(ctype.starts_with("text/plain; version=0.0.4"), "{ctype}");
        assert_eq!(b, "# HELP c_total C.\n# TYPE c_total counter\nc_total 1\n");
    }
}
