//! `api.limits.max_connection_age`: a connection that reaches it gets a GOAWAY, read here off
//! the wire with a bare HTTP/2 connection (no gRPC library to hide what the server sends), while
//! a call already open on it still completes.

use std::time::Duration;

use nodeward_tests::api::{api_config, health_config, TempDir, TestApi};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

const SETTINGS: u8 = 0x4;
const GOAWAY: u8 = 0x7;
const ACK: u8 = 0x1;

/// One HTTP/2 frame as it came off the wire: (type, flags, payload).
async fn read_frame(s: &mut tokio::net::UnixStream) -> std::io::Result<(u8, u8, Vec<u8>)> {
    let mut head = [0u8; 9];
    s.read_exact(&mut head).await?;
    let len = usize::from(head[0]) << 16 | usize::from(head[1]) << 8 | usize::from(head[2]);
    let mut payload = vec![0u8; len];
    s.read_exact(&mut payload).await?;
    Ok((head[3], head[4], payload))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_past_its_maximum_age_gets_a_goaway() {
    let dir = TempDir::new("api-conn-age");
    let mut config = api_config(&dir);
    config.limits.max_connection_age = Duration::from_secs(1);
    // No keep-alive pings: any GOAWAY comes from the age limit.
    config.limits.http2_keepalive_interval = Duration::ZERO;
    let api = TestApi::start(config, health_config()).await;

    let mut s = tokio::net::UnixStream::connect(&api.socket)
        .await
        .expect("connect");
    s.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
        .await
        .expect("preface");
    s.write_all(&[0, 0, 0, SETTINGS, 0, 0, 0, 0, 0])
        .await
        .expect("empty SETTINGS");
    let started = tokio::time::Instant::now();
    let exchange = async {
        loop {
            let (kind, flags, payload) = read_frame(&mut s)
                .await
                .expect("the connection stays open until the GOAWAY");
            match kind {
                SETTINGS if flags & ACK == 0 => {
                    s.write_all(&[0, 0, 0, SETTINGS, ACK, 0, 0, 0, 0])
                        .await
                        .expect("SETTINGS ack");
                }
                GOAWAY => return payload,
                _ => {}
            }
        }
    };
    // The bound only keeps a failure from hanging the suite.
    let goaway = tokio::time::timeout(Duration::from_secs(30), exchange)
        .await
        .expect("a GOAWAY once the connection is past its maximum age");
    assert!(
        started.elapsed() >= Duration::from_millis(900),
        "the GOAWAY came at the age limit, not at once: {:?}",
        started.elapsed()
    );
    // Last-Stream-ID (no stream was opened), then the error code: NO_ERROR, a graceful one.
    assert!(goaway.len() >= 8, "{goaway:?}");
    let error = u32::from_be_bytes([goaway[4], goaway[5], goaway[6], goaway[7]]);
    assert_eq!(error, 0, "NO_ERROR: a graceful GOAWAY");
}
