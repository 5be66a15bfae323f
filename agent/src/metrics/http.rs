//! Just enough HTTP/1.1 to be scraped: `GET /metrics` (and `HEAD`), one request per
//! connection, answered with `Connection: close`.
//!
//! A full HTTP stack would be most of the agent's dependency tree for one read-only page; the
//! scrape protocol needs only this. Requests are bounded in size, time and concurrency so that a
//! slow or hostile client cannot hold the agent's memory or its runtime.

use std::{sync::Arc, time::Duration};

use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::{TcpListener, TcpStream},
    sync::Semaphore,
    task::JoinSet,
};
use tokio_util::sync::CancellationToken;

use super::{encode::CONTENT_TYPE, Exporter};

/// The longest request head read; a scrape's is a few hundred bytes.
const MAX_HEAD: usize = 8 * 1024;
/// How long a client may take to send its request and read the answer.
const IO_TIMEOUT: Duration = Duration::from_secs(10);
/// Connections served at once; more wait in the kernel's accept queue.
const MAX_CONNECTIONS: usize = 16;

const INDEX: &str = "<html><head><title>nodeward</title></head><body>\
<h1>nodeward</h1><p><a href=\"/metrics\">metrics</a></p></body></html>\n";

/// Accepts scrapes until `cancel` fires; connections in flight are dropped then.
pub async fn serve(
    listener: TcpListener,
    exporter: Arc<Exporter>,
    cancel: CancellationToken,
) -> Result<(), String> {
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
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
        let exporter = Arc::clone(&exporter);
        connections.spawn(async move {
            if let Err(e) = tokio::time::timeout(IO_TIMEOUT * 2, answer(stream, exporter)).await {
                tracing::debug!(%peer, error = %e, "metrics: client too slow");
            }
            drop(permit);
        });
    }
}

/// What the request asked for.
#[derive(Debug, PartialEq, Eq)]
enum Route {
    Metrics { head: bool },
    Index { head: bool },
    NotFound,
    MethodNotAllowed,
    BadRequest,
}

/// Reads the request line of a complete request head.
fn route(head: &str) -> Route {
    let Some(line) = head.lines().next() else {
        return Route::BadRequest;
    };
    let mut parts = line.split(' ');
    let (Some(method), Some(target), Some(version)) = (parts.next(), parts.next(), parts.next())
    else {
        return Route::BadRequest;
    };
    if !version.starts_with("HTTP/1.") {
        return Route::BadRequest;
    }
    let head = match method {
        "GET" => false,
        "HEAD" => true,
        _ => return Route::MethodNotAllowed,
    };
    // Prometheus may add query parameters; they select nothing here.
    let path = target.split('?').next().unwrap_or(target);
    match path {
        "/metrics" => Route::Metrics { head },
        "/" => Route::Index { head },
        _ => Route::NotFound,
    }
}

async fn answer(mut stream: TcpStream, exporter: Arc<Exporter>) -> std::io::Result<()> {
    let Some(head) = read_head(&mut stream).await? else {
        return respond(&mut stream, 400, "text/plain", b"bad request\n", false).await;
    };
    match route(&head) {
        Route::Metrics { head } => {
            // A scrape reads /proc files and makes bpf() calls: off the async workers.
            let body = tokio::task::spawn_blocking(move || exporter.render())
                .await
                .map_err(std::io::Error::other)?;
            respond(&mut stream, 200, CONTENT_TYPE, body.as_bytes(), head).await
        }
        Route::Index { head } => {
            respond(&mut stream, 200, "text/html", INDEX.as_bytes(), head).await
        }
        Route::NotFound => respond(&mut stream, 404, "text/plain", b"not found\n", false).await,
        Route::MethodNotAllowed => {
            respond(&mut stream, 405, "text/plain", b"only GET\n", false).await
        }
        Route::BadRequest => respond(&mut stream, 400, "text/plain", b"bad request\n", false).await,
    }
}

/// Reads up to the blank line that ends the head. `None`: too long, or the client hung up.
async fn read_head(stream: &mut TcpStream) -> std::io::Result<Option<String>> {
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    loop {
        let n = tokio::time::timeout(IO_TIMEOUT, stream.read(&mut chunk))
            .await
            .map_err(|_| std::io::Error::from(std::io::ErrorKind::TimedOut))??;
        if n == 0 {
            return Ok(None);
        }
        buf.extend_from_slice(&chunk[..n]);
        if buf.windows(4).any(|w| w == b"\r\n\r\n") || buf.windows(2).any(|w| w == b"\n\n") {
            return Ok(Some(String::from_utf8_lossy(&buf).into_owned()));
        }
        if buf.len() > MAX_HEAD {
            return Ok(None);
        }
    }
}

async fn respond(
    stream: &mut TcpStream,
    status: u16,
    content_type: &str,
    body: &[u8],
    head_only: bool,
) -> std::io::Result<()> {
    let reason = match status {
        200 => "OK",
        404 => "Not Found",
        405 => "Method Not Allowed",
        _ => "Bad Request",
    };
    let mut out = format!(
        "HTTP/1.1 {status} {reason}\r\nContent-Type: {content_type}\r\n\
         Content-Length: {}\r\nConnection: close\r\n",
        body.len()
    )
    .into_bytes();
    if status == 405 {
        out.extend_from_slice(b"Allow: GET, HEAD\r\n");
    }
    out.extend_from_slice(b"\r\n");
    if !head_only {
        out.extend_from_slice(body);
    }
    tokio::time::timeout(IO_TIMEOUT, async {
        stream.write_all(&out).await?;
        stream.shutdown().await
    })
    .await
    .map_err(|_| std::io::Error::from(std::io::ErrorKind::TimedOut))?
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes_scrapes_and_refuses_the_rest() {
        assert_eq!(
            route("GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n"),
            Route::Metrics { head: false }
        );
        assert_eq!(
            route("GET /metrics?name[]=x HTTP/1.1\r\n\r\n"),
            Route::Metrics { head: false }
        );
        assert_eq!(
            route("HEAD /metrics HTTP/1.0\r\n\r\n"),
            Route::Metrics { head: true }
        );
        assert_eq!(
            route("GET / HTTP/1.1\r\n\r\n"),
            Route::Index { head: false }
        );
        assert_eq!(route("GET /debug HTTP/1.1\r\n\r\n"), Route::NotFound);
        assert_eq!(
            route("POST /metrics HTTP/1.1\r\n\r\n"),
            Route::MethodNotAllowed
        );
        assert_eq!(route("GET /metrics\r\n\r\n"), Route::BadRequest);
        assert_eq!(route("GET /metrics SPDY/3\r\n\r\n"), Route::BadRequest);
        assert_eq!(route(""), Route::BadRequest);
    }
}
