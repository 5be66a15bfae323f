//! The scrape endpoint on hyper 1 and axum, the HTTP stack tonic already brings: `GET /metrics`
//! (and `HEAD`, which axum answers with the same head), 405 for other methods there, 404
//! elsewhere.
//!
//! Bounded so that a slow or hostile client cannot hold the agent's memory or its runtime, nor
//! keep Prometheus out: at most [`MAX_CONNECTIONS`] connections are open at once (more wait in
//! the kernel's accept queue), a request head must arrive within [`IO_TIMEOUT`], a whole
//! connection ends after [`CONNECTION_TIMEOUT`], and each connection serves one request (as
//! Prometheus's scrapes need no keep-alive across a scrape interval). Rendering is what costs,
//! so at most [`MAX_SCRAPES`] render at once; that permit is taken only once a whole request
//! head has arrived, so clients that connect and trickle bytes hold a cheap connection slot,
//! never a scrape slot (issue 19: 16 such clients used to starve Prometheus); and one source
//! address holds at most [`MAX_PER_SOURCE`] connections, so it cannot take them all.
//!
//! With `metrics.tls_cert` the same server speaks HTTPS only ([`super::tls`]): the handshake
//! runs inside the connection's slot and must finish within [`IO_TIMEOUT`], like a request
//! head, so a client that never finishes it holds no more than a plain slow client does.

use std::{net::IpAddr, sync::Arc, time::Duration};

use axum::{
    extract::State,
    http::{header, StatusCode},
    response::{IntoResponse as _, Response},
    routing::get,
    Router,
};
use hyper_util::{
    rt::{TokioIo, TokioTimer},
    service::TowerToHyperService,
};
use tokio::{
    io::{AsyncRead, AsyncWrite},
    net::{TcpListener, TcpStream},
    sync::Semaphore,
    task::JoinSet,
};
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;

use super::{encode::CONTENT_TYPE, Exporter};

/// How long a client may take to send its request head.
const IO_TIMEOUT: Duration = Duration::from_secs(10);
/// How long one connection may last in all: request, rendering and the answer.
const CONNECTION_TIMEOUT: Duration = Duration::from_secs(20);
/// Connections open at once, reading their request or being answered; more wait in the
/// kernel's accept queue. Each costs a task and hyper's read buffer.
const MAX_CONNECTIONS: usize = 256;
/// Scrapes rendered at once; a request past it waits (within [`CONNECTION_TIMEOUT`]).
const MAX_SCRAPES: usize = 16;
/// Connections one source address may hold; more from it are closed at once, so that one
/// client cannot take all [`MAX_CONNECTIONS`].
const MAX_PER_SOURCE: usize = 32;

/// Open connections per source address.
#[derive(Debug, Default)]
struct Sources(std::sync::Mutex<std::collections::HashMap<IpAddr, usize>>);

/// One connection counted against its source; uncounted on drop.
#[derive(Debug)]
struct SourceSlot {
    sources: Arc<Sources>,
    ip: IpAddr,
}

impl Sources {
    /// A slot for `ip`, or `None` when it holds [`MAX_PER_SOURCE`] connections already.
    fn take(self: &Arc<Self>, ip: IpAddr) -> Option<SourceSlot> {
        // A poisoned lock only means a panic elsewhere mid-update of a counter: keep counting.
        let mut open = self
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let n = open.entry(ip).or_insert(0);
        if *n >= MAX_PER_SOURCE {
            return None;
        }
        *n += 1;
        Some(SourceSlot {
            sources: Arc::clone(self),
            ip,
        })
    }
}

impl Drop for SourceSlot {
    fn drop(&mut self) {
        let mut open = self
            .sources
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(n) = open.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                open.remove(&self.ip);
            }
        }
    }
}

/// What a scrape needs: the exporter and the scrape slots.
#[derive(Clone)]
struct Scrapes {
    exporter: Arc<Exporter>,
    slots: Arc<Semaphore>,
}

/// The routes: `/metrics` only.
fn router(exporter: Arc<Exporter>) -> Router {
    Router::new()
        .route("/metrics", get(scrape))
        .fallback(|| async { (StatusCode::NOT_FOUND, "not found\n") })
        .with_state(Scrapes {
            exporter,
            slots: Arc::new(Semaphore::new(MAX_SCRAPES)),
        })
}

async fn scrape(State(scrapes): State<Scrapes>) -> Response {
    // The handler runs only once hyper has read the whole request head: a client still
    // sending its head holds no scrape slot.
    let Ok(_slot) = scrapes.slots.acquire_owned().await else {
        return (StatusCode::SERVICE_UNAVAILABLE, "shutting down\n").into_response();
    };
    let exporter = scrapes.exporter;
    // A scrape reads /proc files and makes bpf() calls: off the async workers.
    match tokio::task::spawn_blocking(move || exporter.render()).await {
        Ok(body) => ([(header::CONTENT_TYPE, CONTENT_TYPE)], body).into_response(),
        Err(e) => {
            tracing::error!(error = %e, "metrics: rendering a scrape failed");
            (StatusCode::INTERNAL_SERVER_ERROR, "scrape failed\n").into_response()
        }
    }
}

type Service = TowerToHyperService<Router>;

/// Why one connection ended badly (logged at debug level: a scraper's problem, not ours).
#[derive(Debug, thiserror::Error)]
enum ConnectionError {
    #[error("TLS handshake failed: {0}")]
    Handshake(std::io::Error),
    #[error("TLS handshake not finished within {IO_TIMEOUT:?}")]
    HandshakeTimeout,
    #[error("{0}")]
    Http(#[from] hyper::Error),
}

/// One request on `io`, plain or TLS.
async fn http1<I>(io: I, service: Service) -> Result<(), ConnectionError>
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(IO_TIMEOUT)
        .keep_alive(false)
        .serve_connection(TokioIo::new(io), service)
        .await?;
    Ok(())
}

/// Serves one connection: the TLS handshake first when `tls` is set.
async fn connection(
    stream: TcpStream,
    tls: Option<TlsAcceptor>,
    service: Service,
) -> Result<(), ConnectionError> {
    let Some(tls) = tls else {
        return http1(stream, service).await;
    };
    let stream = tokio::time::timeout(IO_TIMEOUT, crate::api::tls::handshake(&tls, stream))
        .await
        .map_err(|_| ConnectionError::HandshakeTimeout)?
        .map_err(ConnectionError::Handshake)?;
    http1(stream, service).await
}

/// Accepts scrapes until `cancel` fires; connections in flight are dropped then. With `tls`,
/// every connection must complete a TLS handshake first.
pub async fn serve(
    listener: TcpListener,
    exporter: Arc<Exporter>,
    tls: Option<TlsAcceptor>,
    cancel: CancellationToken,
) -> Result<(), String> {
    let service = TowerToHyperService::new(router(exporter));
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let sources = Arc::new(Sources::default());
    let mut connections = JoinSet::new();
    loop {
        // Reap finished connections so the set does not grow with every scrape.
        while connections.try_join_next().is_some() {}
        let permit = tokio::select! {
            () = cancel.cancelled() => return Ok(()),
            permit = Arc::clone(&slots).acquire_owned() => {
                permit.map_err(|e| format!("connection limit closed: {e}"))?
            }
        };
        let (stream, peer) = tokio::select! {
            () = cancel.cancelled() => return Ok(()),
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    // EMFILE and friends pass; back off a little so we do not spin on them.
                    tracing::warn!(error = %e, "metrics: accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let Some(source) = sources.take(peer.ip()) else {
            tracing::debug!(%peer, "metrics: too many connections from this address");
            continue;
        };
        let (service, tls) = (service.clone(), tls.clone());
        connections.spawn(async move {
            let connection = connection(stream, tls, service);
            match tokio::time::timeout(CONNECTION_TIMEOUT, connection).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => tracing::debug!(%peer, error = %e, "metrics: connection failed"),
                Err(_) => tracing::debug!(%peer, "metrics: client too slow"),
            }
            drop((permit, source));
        });
    }
}

#[cfg(test)]
mod tests {
    use axum::{body::Body, http::Request};
    use tower::ServiceExt as _;

    use super::*;

    async fn answer(method: &str, uri: &str) -> (StatusCode, Option<String>, Vec<u8>) {
        let mut exporter = Exporter::new();
        exporter.add(|m| m.gauge("nodeward_test", "Test.", &[], 1.0));
        let request = Request::builder()
            .method(method)
            .uri(uri)
            .body(Body::empty())
            .expect("a request");
        let response = router(Arc::new(exporter))
            .oneshot(request)
            .await
            .expect("the router answers");
        let status = response.status();
        let content_type = response
            .headers()
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        let body = axum::body::to_bytes(response.into_body(), 1 << 20)
            .await
            .expect("a body");
        (status, content_type, body.to_vec())
    }

    #[tokio::test]
    async fn get_metrics_is_the_scrape_in_the_text_format() {
        let (status, content_type, body) = answer("GET", "/metrics?name[]=x").await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(content_type.as_deref(), Some(CONTENT_TYPE));
        assert_eq!(
            String::from_utf8_lossy(&body),
            "# HELP nodeward_test Test.\n# TYPE nodeward_test gauge\nnodeward_test 1\n"
        );
    }

    /// Over real loopback sockets: clients that connect and send their request head a byte at
    /// a time must not keep a scrape out.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_scrape_succeeds_while_16_clients_trickle_their_request() {
        use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let mut exporter = Exporter::new();
        exporter.add(|m| m.gauge("nodeward_test", "Test.", &[], 1.0));
        let cancel = CancellationToken::new();
        let server = tokio::spawn(serve(listener, Arc::new(exporter), None, cancel.clone()));

        let stop_trickling = CancellationToken::new();
        let mut tricklers = JoinSet::new();
        for _ in 0..16 {
            let mut s = tokio::net::TcpStream::connect(addr).await.expect("connect");
            s.write_all(b"GET /met").await.expect("first bytes");
            let stop = stop_trickling.clone();
            tricklers.spawn(async move {
                for b in b"rics HTTP/1.1\r\nX-Slow: ".iter().cycle() {
                    tokio::select! {
                        () = stop.cancelled() => return,
                        () = tokio::time::sleep(Duration::from_millis(200)) => {}
                    }
                    if s.write_all(&[*b]).await.is_err() {
                        return;
                    }
                }
            });
        }

        let scrape = async {
            let mut s = tokio::net::TcpStream::connect(addr).await?;
            s.write_all(b"GET /metrics HTTP/1.1\r\nHost: t\r\n\r\n")
                .await?;
            let mut answer = Vec::new();
            s.read_to_end(&mut answer).await?;
            Ok::<_, std::io::Error>(answer)
        };
        // The one client timeout the issue asks for: a scrape within 2 s.
        let answer = tokio::time::timeout(Duration::from_secs(2), scrape)
            .await
            .expect("the scrape is answered within 2 s")
            .expect("the scrape's socket works");
        let answer = String::from_utf8_lossy(&answer);
        assert!(answer.starts_with("HTTP/1.1 200 "), "{answer}");
        assert!(answer.ends_with("nodeward_test 1\n"), "{answer}");

        stop_trickling.cancel();
        while tricklers.join_next().await.is_some() {}
        cancel.cancel();
        server
            .await
            .expect("server task")
            .expect("server ends cleanly");
    }

    /// One address that opens more connections than the whole server holds cannot keep a
    /// scrape from another address out: past its share its connections are closed at once.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn one_address_cannot_take_every_connection() {
        use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let mut exporter = Exporter::new();
        exporter.add(|m| m.gauge("nodeward_test", "Test.", &[], 1.0));
        let cancel = CancellationToken::new();
        let server = tokio::spawn(serve(listener, Arc::new(exporter), None, cancel.clone()));

        let mut idle = Vec::new();
        for _ in 0..MAX_CONNECTIONS + 8 {
            let mut s = tokio::net::TcpStream::connect(addr).await.expect("connect");
            // Those past the share may be closed already; what matters is that they connected.
            s.write_all(b"GET /met").await.ok();
            idle.push(s);
        }
        let scrape = async {
            // Another loopback address: the whole 127/8 is local.
            let socket = tokio::net::TcpSocket::new_v4()?;
            socket.bind("127.0.0.2:0".parse().expect("addr"))?;
            let mut s = socket.connect(addr).await?;
            s.write_all(b"GET /metrics HTTP/1.1\r\nHost: t\r\n\r\n")
                .await?;
            let mut answer = Vec::new();
            s.read_to_end(&mut answer).await?;
            Ok::<_, std::io::Error>(answer)
        };
        let answer = tokio::time::timeout(Duration::from_secs(2), scrape)
            .await
            .expect("the scrape is answered within 2 s")
            .expect("the scrape's socket works");
        let answer = String::from_utf8_lossy(&answer);
        assert!(answer.starts_with("HTTP/1.1 200 "), "{answer}");

        drop(idle);
        cancel.cancel();
        server
            .await
            .expect("server task")
            .expect("server ends cleanly");
    }

    #[test]
    fn a_source_gets_its_share_and_it_comes_back_on_close() {
        let sources = Arc::new(Sources::default());
        let (a, b): (IpAddr, IpAddr) = (
            "10.0.0.1".parse().expect("ip"),
            "10.0.0.2".parse().expect("ip"),
        );
        let held: Vec<SourceSlot> = (0..MAX_PER_SOURCE)
            .map(|_| sources.take(a).expect("within the share"))
            .collect();
        assert!(sources.take(a).is_none(), "past the share");
        assert!(
            sources.take(b).is_some(),
            "another address has its own share"
        );
        drop(held);
        assert!(
            sources.take(a).is_some(),
            "closed connections give their slots back"
        );
    }

    #[tokio::test]
    async fn head_has_no_body_other_paths_are_404_and_other_methods_405() {
        let (status, _, body) = answer("HEAD", "/metrics").await;
        assert_eq!((status, body.len()), (StatusCode::OK, 0));
        for path in ["/", "/debug", "/metrics/x"] {
            assert_eq!(answer("GET", path).await.0, StatusCode::NOT_FOUND, "{path}");
        }
        assert_eq!(
            answer("POST", "/metrics").await.0,
            StatusCode::METHOD_NOT_ALLOWED
        );
    }
}
