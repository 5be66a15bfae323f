//! The adapter against h2 itself: client byte streams written by hand (HPACK as RFC 7541 spells
//! it), fed through [`H2Fix`] to a real h2 server, which must take every request, with the
//! fields the client meant.

use std::{
    collections::VecDeque,
    pin::Pin,
    task::{Context, Poll},
    time::Duration,
};

use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWrite, ReadBuf};

use super::*;

/// A client's bytes, handed out in the given pieces; writes are dropped. After the last piece:
/// the end of the stream, or (for h2, which must not see the end before it answers) nothing.
struct Script {
    pieces: VecDeque<Vec<u8>>,
    end: bool,
}

impl Script {
    fn new(pieces: Vec<Vec<u8>>, end: bool) -> Self {
        Self {
            pieces: pieces.into(),
            end,
        }
    }
}

impl AsyncRead for Script {
    fn poll_read(
        mut self: Pin<&mut Self>,
        _: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let Some(piece) = self.pieces.front_mut() else {
            return if self.end {
                Poll::Ready(Ok(()))
            } else {
                Poll::Pending
            };
        };
        let n = piece.len().min(buf.remaining());
        buf.put_slice(&piece[..n]);
        piece.drain(..n);
        if piece.is_empty() {
            self.pieces.pop_front();
        }
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for Script {
    fn poll_write(
        self: Pin<&mut Self>,
        _: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Poll::Ready(Ok(buf.len()))
    }
    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }
    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let mut f = Vec::new();
    push_frame_head(&mut f, payload.len(), kind, flags, stream);
    f.extend_from_slice(payload);
    f
}

/// The preface and an empty SETTINGS frame.
fn start() -> Vec<u8> {
    let mut s = PREFACE.to_vec();
    s.extend(frame(0x4, 0, 0, &[]));
    s
}

/// An HPACK string literal, not Huffman coded (RFC 7541 §5.2).
fn string(s: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    loona_hpack::encoder::encode_integer_into(s.len(), 7, 0, &mut out).expect("Vec");
    out.extend_from_slice(s);
    out
}

/// A literal with incremental indexing and a static-table name (RFC 7541 §6.2.1): the client
/// adds it to its dynamic table.
fn indexing(name_index: u8, value: &[u8]) -> Vec<u8> {
    let mut out = vec![0x40 | name_index];
    out.extend(string(value));
    out
}

/// A literal without indexing with a new name (RFC 7541 §6.2.2).
fn literal(name: &[u8], value: &[u8]) -> Vec<u8> {
    let mut out = vec![0x00];
    out.extend(string(name));
    out.extend(string(value));
    out
}

/// A gRPC request's block: `:method POST` and `:scheme http` (static indexes 3 and 6), `:path`
/// (name index 4), the `:authority` representation given, content-type and te.
fn grpc_fields(path: &[u8], authority: &[u8]) -> Vec<u8> {
    let mut b = vec![0x83, 0x86, 0x04];
    b.extend(string(path));
    b.extend_from_slice(authority);
    b.extend(literal(b"content-type", b"application/grpc"));
    b.extend(literal(b"te", b"trailers"));
    b
}

/// A request's HEADERS frame: `fields` then `authority`, END_HEADERS, the stream ended or not.
fn request(stream: u32, authority: &[u8], end_stream: bool) -> Vec<u8> {
    let block = grpc_fields(b"/nodeward.v1.NodeHealth/GetNodeHealth", authority);
    let flags = END_HEADERS | if end_stream { END_STREAM } else { 0 };
    frame(HEADERS, flags, stream, &block)
}

/// A socket path as grpc-core sends it, without indexing (name index 1, `:authority`).
fn path_authority() -> Vec<u8> {
    let mut a = vec![0x01];
    a.extend(string(b"/run/nodeward/nodeward.sock"));
    a
}

/// What h2 makes of the requests: for each, its authority, its `x-*` fields and its body.
#[derive(Debug, PartialEq, Eq)]
struct Served {
    authority: Option<String>,
    extra: Vec<(String, String)>,
    body: Vec<u8>,
}

/// Serves `requests` requests with h2 from the client's `pieces`, through the adapter.
async fn h2_serves(pieces: Vec<Vec<u8>>, requests: usize) -> Vec<Served> {
    let served = async {
        let mut conn = h2::server::handshake(H2Fix::new(Script::new(pieces, false)))
            .await
            .expect("h2 handshake");
        let mut out = Vec::new();
        for n in 0..requests {
            let (req, _respond) = conn
                .accept()
                .await
                .unwrap_or_else(|| panic!("h2 closed before request {n}"))
                .unwrap_or_else(|e| panic!("h2 refused request {n}: {e}"));
            let authority = req.uri().authority().map(ToString::to_string);
            let extra = req
                .headers()
                .iter()
                .filter(|(k, _)| k.as_str().starts_with("x-"))
                .map(|(k, v)| {
                    (
                        k.to_string(),
                        String::from_utf8_lossy(v.as_bytes()).into_owned(),
                    )
                })
                .collect();
            let mut body = Vec::new();
            let mut stream = req.into_body();
            if !stream.is_end_stream() {
                while let Some(chunk) = stream.data().await {
                    let chunk = chunk.expect("body data");
                    let _ = stream.flow_control().release_capacity(chunk.len());
                    body.extend_from_slice(&chunk);
                }
            }
            out.push(Served {
                authority,
                extra,
                body,
            });
        }
        out
    };
    // Only a hang is caught here (a stream h2 reset and never hands out): no timing is asserted.
    tokio::time::timeout(Duration::from_secs(30), served)
        .await
        .expect("h2 served every request")
}

/// What the adapter hands on for `pieces`, read to the end.
async fn adapted(pieces: Vec<Vec<u8>>) -> (Vec<u8>, bool) {
    let mut fix = H2Fix::new(Script::new(pieces, true));
    let mut out = Vec::new();
    fix.read_to_end(&mut out).await.expect("read");
    (out, fix.re_encoded())
}

/// The frames of a client stream after the preface: (type, flags, stream, payload).
fn frames_of(bytes: &[u8]) -> Vec<(u8, u8, u32, Vec<u8>)> {
    let mut rest = bytes.strip_prefix(PREFACE).expect("preface");
    let mut out = Vec::new();
    while !rest.is_empty() {
        let (len, kind, flags, stream) = frame_head(rest);
        out.push((
            kind,
            flags,
            stream,
            rest[FRAME_HEAD..FRAME_HEAD + len].to_vec(),
        ));
        rest = &rest[FRAME_HEAD + len..];
    }
    out
}

fn served(authority: &str) -> Served {
    Served {
        authority: Some(authority.to_owned()),
        extra: Vec::new(),
        body: Vec::new(),
    }
}

#[test]
fn authorities_h2_refuses_are_the_ones_replaced() {
    for bad in [
        &b"/run/nodeward/nodeward.sock"[..],
        b"%2Frun%2Fnodeward%2Fnodeward.sock",
        b"unix:%2Frun%2Fnodeward.sock",
        b"",
    ] {
        assert!(!authority_is_valid(bad), "{}", String::from_utf8_lossy(bad));
    }
    for good in [
        &b"localhost"[..],
        b"127.0.0.1:50051",
        b"[::1]:443",
        b"node-1.example",
    ] {
        assert!(
            authority_is_valid(good),
            "{}",
            String::from_utf8_lossy(good)
        );
    }
}

#[tokio::test]
async fn a_socket_path_authority_reaches_h2_as_localhost_with_the_other_fields() {
    let mut block = grpc_fields(b"/nodeward.v1.NodeHealth/GetNodeHealth", &path_authority());
    block.extend(literal(b"x-caller", b"rollout"));
    let mut bytes = start();
    bytes.extend(frame(HEADERS, END_HEADERS | END_STREAM, 1, &block));
    let got = h2_serves(vec![bytes.clone()], 1).await;
    assert_eq!(
        got,
        [Served {
            extra: vec![("x-caller".to_owned(), "rollout".to_owned())],
            ..served("localhost")
        }]
    );
    let (_, re_encoded) = adapted(vec![bytes]).await;
    assert!(re_encoded);
}

#[tokio::test]
async fn valid_authorities_pass_byte_for_byte() {
    let mut authority = vec![0x01];
    authority.extend(string(b"127.0.0.1:50051"));
    let mut bytes = start();
    bytes.extend(request(1, &authority, true));
    // RFC 7541 C.4.1: "www.example.com", Huffman coded, as the name-indexed :authority.
    let huffman = [
        0x01, 0x8c, 0xf1, 0xe3, 0xc2, 0xe5, 0xf2, 0x3a, 0x6b, 0xa0, 0xab, 0x90, 0xf4, 0xff,
    ];
    bytes.extend(request(3, &huffman, true));
    let (out, re_encoded) = adapted(vec![bytes.clone()]).await;
    assert_eq!(out, bytes);
    assert!(!re_encoded);
    let got = h2_serves(vec![bytes], 2).await;
    assert_eq!(got, [served("127.0.0.1:50051"), served("www.example.com")]);
}

#[tokio::test]
async fn an_authority_named_by_its_index_in_the_clients_dynamic_table_is_replaced_too() {
    let mut bytes = start();
    // Request 1: a valid authority and a field the client indexes (dynamic index 62); the
    // block passes unchanged, so h2's table gets the entry too.
    let mut authority = vec![0x01];
    authority.extend(string(b"localhost:1"));
    let mut block1 = grpc_fields(b"/a", &authority);
    block1.push(0x40);
    block1.extend(string(b"x-trace"));
    block1.extend(string(b"t-1"));
    bytes.extend(frame(HEADERS, END_HEADERS | END_STREAM, 1, &block1));
    // Request 2: the socket path, indexed by the client (it becomes index 62, x-trace 63),
    // and x-trace by its index.
    let mut block2 = grpc_fields(b"/b", &indexing(1, b"/run/nodeward/nodeward.sock"));
    block2.push(0x80 | 63);
    bytes.extend(frame(HEADERS, END_HEADERS | END_STREAM, 3, &block2));
    // Request 3: both by index only.
    let mut block3 = grpc_fields(b"/c", &[0x80 | 62]);
    block3.push(0x80 | 63);
    bytes.extend(frame(HEADERS, END_HEADERS | END_STREAM, 5, &block3));
    let trace = vec![("x-trace".to_owned(), "t-1".to_owned())];
    let got = h2_serves(vec![bytes], 3).await;
    assert_eq!(
        got,
        [
            Served {
                extra: trace.clone(),
                ..served("localhost:1")
            },
            Served {
                extra: trace.clone(),
                ..served("localhost")
            },
            Served {
                extra: trace,
                ..served("localhost")
            },
        ]
    );
}

#[tokio::test]
async fn a_block_larger_than_a_frame_is_cut_into_continuations() {
    // 40,000 bytes of value: the client sends it in three frames, and so does the adapter (its
    // literal is no shorter), each at most MAX_FRAME.
    let big = vec![b'v'; 40_000];
    let mut block = grpc_fields(b"/nodeward.v1.NodeHealth/ListContainers", &path_authority());
    block.extend(literal(b"x-big", &big));
    let mut bytes = start();
    let mut chunks = block.chunks(MAX_FRAME).peekable();
    let mut first = true;
    while let Some(chunk) = chunks.next() {
        let last = chunks.peek().is_none();
        let kind = if first { HEADERS } else { CONTINUATION };
        let mut flags = if last { END_HEADERS } else { 0 };
        if first {
            flags |= END_STREAM;
        }
        bytes.extend(frame(kind, flags, 1, chunk));
        first = false;
    }
    let (out, _) = adapted(vec![bytes.clone()]).await;
    let frames = frames_of(&out);
    let heads: Vec<(u8, u8)> = frames.iter().skip(1).map(|f| (f.0, f.1)).collect();
    assert_eq!(
        heads,
        [
            (HEADERS, END_STREAM),
            (CONTINUATION, 0),
            (CONTINUATION, END_HEADERS)
        ]
    );
    assert!(frames
        .iter()
        .all(|f| f.3.len() <= MAX_FRAME && (f.2 == 1 || f.0 == 0x4)));
    let got = h2_serves(vec![bytes], 1).await;
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].authority.as_deref(), Some("localhost"));
    // Compared without printing 40,000 bytes on a failure.
    let whole = got[0].extra.len() == 1 && got[0].extra[0].1.as_bytes() == big.as_slice();
    assert!(whole, "x-big did not arrive whole");
}

#[tokio::test]
async fn padded_headers_with_priority_keep_the_priority_and_lose_the_padding() {
    let block = grpc_fields(b"/nodeward.v1.NodeHealth/GetNodeHealth", &path_authority());
    let pad = 7u8;
    let priority = [0x00, 0x00, 0x00, 0x00, 0x0f];
    let mut payload = vec![pad];
    payload.extend(priority);
    payload.extend(&block);
    payload.extend(vec![0u8; usize::from(pad)]);
    let mut bytes = start();
    bytes.extend(frame(
        HEADERS,
        END_HEADERS | END_STREAM | PADDED | PRIORITY,
        1,
        &payload,
    ));
    let (out, _) = adapted(vec![bytes.clone()]).await;
    let frames = frames_of(&out);
    let (kind, flags, _, payload) = &frames[1];
    assert_eq!(
        (*kind, *flags),
        (HEADERS, END_HEADERS | END_STREAM | PRIORITY)
    );
    assert_eq!(payload[..5], priority);
    assert_eq!(h2_serves(vec![bytes], 1).await, [served("localhost")]);
}

#[tokio::test]
async fn frames_split_at_every_byte_still_reach_h2_whole_with_their_data() {
    let mut bytes = start();
    bytes.extend(request(1, &path_authority(), false));
    // A gRPC message: flag, length, payload.
    let message = [0u8, 0, 0, 0, 3, 1, 2, 3];
    bytes.extend(frame(0x0, 0, 1, &message[..4]));
    bytes.extend(frame(0x0, END_STREAM, 1, &message[4..]));
    bytes.extend(request(3, &path_authority(), true));
    let pieces: Vec<Vec<u8>> = bytes.iter().map(|b| vec![*b]).collect();
    let got = h2_serves(pieces.clone(), 2).await;
    assert_eq!(
        got,
        [
            Served {
                body: message.to_vec(),
                ..served("localhost")
            },
            served("localhost")
        ]
    );
    // Read in pieces or at once, h2 is handed the same bytes.
    assert_eq!(adapted(pieces).await.0, adapted(vec![bytes]).await.0);
}

#[tokio::test]
async fn what_is_not_http2_or_breaks_its_framing_passes_unchanged() {
    let http1 = b"GET /metrics HTTP/1.1\r\nHost: /x\r\n\r\n".to_vec();
    assert_eq!(adapted(vec![http1.clone()]).await.0, http1);
    // A CONTINUATION of another stream in the middle of a block: h2's to refuse.
    let mut bytes = start();
    let block = grpc_fields(b"/a", &[]);
    bytes.extend(frame(HEADERS, END_STREAM, 1, &block));
    bytes.extend(frame(CONTINUATION, END_HEADERS, 3, &path_authority()));
    bytes.extend(frame(0x6, 0, 0, &[0; 8]));
    let (out, re_encoded) = adapted(vec![bytes.clone()]).await;
    assert_eq!(out, bytes);
    assert!(!re_encoded);
    // A block that does not decode (an index past both tables).
    let mut bytes = start();
    bytes.extend(frame(HEADERS, END_HEADERS, 1, &[0x80 | 0x7f, 0x10]));
    assert_eq!(adapted(vec![bytes.clone()]).await.0, bytes);
}

#[tokio::test]
async fn without_the_adapter_h2_refuses_a_socket_path_authority() {
    // What the adapter is for: the same bytes straight to h2 give no request.
    let mut bytes = start();
    bytes.extend(request(1, &path_authority(), true));
    let mut conn = h2::server::handshake(Script::new(vec![bytes], true))
        .await
        .expect("h2 handshake");
    let first = conn.accept().await;
    assert!(
        !matches!(first, Some(Ok(_))),
        "h2 took a socket path as :authority; the adapter may no longer be needed"
    );
}

/// Frames of any type, flags and length (HEADERS and CONTINUATION among them, well formed or
/// not), after a valid preface.
fn any_client_bytes() -> impl proptest::strategy::Strategy<Value = Vec<u8>> {
    use proptest::prelude::*;
    let frame_strategy = (
        prop_oneof![
            Just(0u8),
            Just(HEADERS),
            Just(CONTINUATION),
            Just(4u8),
            Just(6u8),
            any::<u8>()
        ],
        any::<u8>(),
        0u32..4,
        proptest::collection::vec(any::<u8>(), 0..48),
    );
    proptest::collection::vec(frame_strategy, 0..8).prop_map(|frames| {
        let mut bytes = start();
        for (kind, flags, stream, payload) in frames {
            bytes.extend(frame(kind, flags, stream, &payload));
        }
        bytes
    })
}

fn adapted_now(pieces: Vec<Vec<u8>>) -> Vec<u8> {
    tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("runtime")
        .block_on(adapted(pieces))
        .0
}

proptest::proptest! {
    #[test]
    fn any_input_in_any_pieces_is_handed_on_alike_without_panicking(
        bytes in any_client_bytes(),
        cuts in proptest::collection::vec(1usize..40, 0..12),
    ) {
        let mut pieces = Vec::new();
        let mut rest = bytes.as_slice();
        for cut in cuts {
            let (piece, more) = rest.split_at(cut.min(rest.len()));
            pieces.push(piece.to_vec());
            rest = more;
        }
        pieces.push(rest.to_vec());
        proptest::prop_assert_eq!(adapted_now(pieces), adapted_now(vec![bytes]));
    }
}
