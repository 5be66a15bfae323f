//! Lets stock gRPC clients in whose `:authority` h2 refuses. grpc-core since 1.57 (Python
//! grpcio, grpc-java, Bazel) and grpcurl before 1.9 send a Unix socket's path (or its
//! %-encoding) as the HTTP/2 `:authority`; h2, under tonic, parses it as a URI authority,
//! fails, and resets the stream with PROTOCOL_ERROR before any tower layer sees the request
//! (hyperium/h2#487 is still open, and h2 has no option to relax it).
//!
//! So the fix sits between the accepted socket (after TLS) and tonic: [`H2Fix`] follows the
//! client-to-server HTTP/2 frames, decodes every header block with the client's HPACK state, and
//! when a block's `:authority` is one h2 would refuse, hands h2 that block re-encoded with
//! `localhost` in its place. A re-encoded block is all literals without indexing, which every
//! HPACK decoder takes without a dynamic table of its own; from the first such block on, the
//! client's dynamic table holds entries h2's does not, so every later block on the connection is
//! re-encoded too. Before that, and on connections whose authorities are all valid (TCP clients
//! name `host:port`), header blocks reach h2 byte for byte.
//!
//! Frames other than HEADERS/CONTINUATION stay in the buffer h2 reads into (DATA is not copied);
//! only bytes read together with a header block, or a frame head split across two reads, go
//! through a buffer of the adapter's own. The server-to-client direction is not touched. Input
//! that is not HTTP/2, or that breaks its framing or its HPACK, is handed over unchanged from
//! there on, for h2 to refuse as it would without the adapter.

use std::{
    io,
    ops::Range,
    pin::Pin,
    task::{ready, Context, Poll},
};

use loona_hpack::Decoder;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tonic::transport::server::Connected;

/// What a malformed `:authority` becomes: what grpc-core sent before 1.57.
pub const REPLACEMENT_AUTHORITY: &[u8] = b"localhost";

/// The connection preface a client sends before its first frame (RFC 9113 §3.4).
const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
const FRAME_HEAD: usize = 9;
const HEADERS: u8 = 0x1;
const CONTINUATION: u8 = 0x9;
const END_STREAM: u8 = 0x1;
const END_HEADERS: u8 = 0x4;
const PADDED: u8 = 0x8;
const PRIORITY: u8 = 0x20;
/// The largest frame payload every HTTP/2 endpoint accepts (RFC 9113 §4.2: SETTINGS_MAX_FRAME_SIZE
/// can only raise it), so re-encoded blocks are cut at it whatever h2 advertised.
pub const MAX_FRAME: usize = 16_384;
/// The HPACK dynamic table size h2 advertises: hyper's server leaves SETTINGS_HEADER_TABLE_SIZE at
/// the protocol's default, so a client's table may grow to this and no further.
const TABLE_SIZE: usize = 4_096;
/// A header block (all its frames) above this is handed over unchanged: hyper refuses header
/// lists over 16 KiB anyway, and the adapter must not buffer without bound.
const MAX_BLOCK: usize = 256 * 1024;
/// Decoded header list size (RFC 7541 §4.1 sizes) above which a block is handed over unchanged:
/// a few bytes of indexes can name kilobytes of table entries each.
const MAX_DECODED: usize = 1024 * 1024;
/// How much is read at once while a header block is being gathered.
const GATHER_READ: usize = 8 * 1024;

/// Whether h2 takes `value` as an `:authority`: the parser h2 itself applies.
pub fn authority_is_valid(value: &[u8]) -> bool {
    http::uri::Authority::try_from(value).is_ok()
}

/// Where the client's byte stream is, as far as the adapter has looked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Scan {
    /// Inside the connection preface, this many bytes of it seen.
    Preface(usize),
    /// At the start of a frame.
    Frame,
    /// Inside a frame that passes, this many payload bytes to go.
    Payload(usize),
    /// Everything passes unchanged from here on.
    Off,
}

/// The length, type, flags and stream of the frame whose head starts `bytes` (at least 9).
fn frame_head(bytes: &[u8]) -> (usize, u8, u8, u32) {
    let len = usize::from(bytes[0]) << 16 | usize::from(bytes[1]) << 8 | usize::from(bytes[2]);
    let stream = u32::from_be_bytes([bytes[5], bytes[6], bytes[7], bytes[8]]) & 0x7fff_ffff;
    (len, bytes[3], bytes[4], stream)
}

/// How many bytes at the start of `input` pass to h2 as they are; `scan` moves past them. It
/// stops at the head of a HEADERS frame and at a frame head not yet read whole.
fn passing(scan: &mut Scan, input: &[u8]) -> usize {
    let mut pos = 0;
    loop {
        match *scan {
            Scan::Off => return input.len(),
            Scan::Preface(seen) => {
                let n = (PREFACE.len() - seen).min(input.len() - pos);
                if input[pos..pos + n] != PREFACE[seen..seen + n] {
                    *scan = Scan::Off;
                    return input.len();
                }
                pos += n;
                if seen + n < PREFACE.len() {
                    *scan = Scan::Preface(seen + n);
                    return pos;
                }
                *scan = Scan::Frame;
            }
            Scan::Payload(left) => {
                let n = left.min(input.len() - pos);
                pos += n;
                if n < left {
                    *scan = Scan::Payload(left - n);
                    return pos;
                }
                *scan = Scan::Frame;
            }
            Scan::Frame => {
                let rest = &input[pos..];
                if rest.len() < FRAME_HEAD {
                    return pos;
                }
                let (len, kind, _, _) = frame_head(rest);
                if kind == HEADERS {
                    return pos;
                }
                pos += FRAME_HEAD;
                *scan = Scan::Payload(len);
            }
        }
    }
}

/// A header block at the start of the gathered bytes.
#[derive(Debug, PartialEq, Eq)]
enum Block {
    /// Its frames end here (the one with END_HEADERS included).
    Complete(usize),
    /// More bytes are needed.
    Incomplete,
    /// Not a well-formed block, or too large to gather: h2 gets it as it is.
    Unusable,
}

/// Finds the HEADERS frame and CONTINUATIONs of one header block at the start of `bytes`.
fn gather(bytes: &[u8]) -> Block {
    let mut pos = 0;
    let mut first_stream = None;
    loop {
        if bytes.len() < pos + FRAME_HEAD {
            return Block::Incomplete;
        }
        let (len, kind, flags, stream) = frame_head(&bytes[pos..]);
        let expected = if first_stream.is_none() {
            HEADERS
        } else {
            CONTINUATION
        };
        if kind != expected || first_stream.is_some_and(|s| s != stream) {
            return Block::Unusable;
        }
        first_stream = Some(stream);
        let end = pos + FRAME_HEAD + len;
        if end > MAX_BLOCK {
            return Block::Unusable;
        }
        if bytes.len() < end {
            return Block::Incomplete;
        }
        pos = end;
        if flags & END_HEADERS != 0 {
            return Block::Complete(pos);
        }
    }
}

/// The client's HPACK state and the buffers a block is rewritten with (kept between blocks).
struct Rewriter {
    decoder: Decoder<'static>,
    /// Set at the first block re-encoded: from then on h2's table no longer matches the client's.
    re_encode_all: bool,
    fragment: Vec<u8>,
    /// The decoded fields: names and values in `arena`, each a range into it.
    arena: Vec<u8>,
    fields: Vec<(Range<usize>, Range<usize>)>,
    encoded: Vec<u8>,
}

/// Why a header block is handed over unchanged (with everything after it).
#[derive(Debug)]
struct Unusable;

impl Rewriter {
    fn new() -> Self {
        let mut decoder = Decoder::new();
        decoder.set_max_allowed_table_size(TABLE_SIZE);
        Self {
            decoder,
            re_encode_all: false,
            fragment: Vec::new(),
            arena: Vec::new(),
            fields: Vec::new(),
            encoded: Vec::new(),
        }
    }

    /// Appends to `out` what h2 gets for the header block in `frames` (as [`gather`] found it):
    /// the frames themselves, or the block re-encoded.
    fn fix(&mut self, frames: &[u8], out: &mut Vec<u8>) -> Result<(), Unusable> {
        let (_, _, flags, stream) = frame_head(frames);
        let priority = self.fragment_of(frames)?;
        self.decode()?;
        let malformed = self.fields.iter().any(|(name, value)| {
            &self.arena[name.clone()] == b":authority"
                && !authority_is_valid(&self.arena[value.clone()])
        });
        if !malformed && !self.re_encode_all {
            out.extend_from_slice(frames);
            return Ok(());
        }
        if !self.re_encode_all {
            tracing::debug!(
                "gRPC client sent a malformed :authority; re-encoding its header blocks"
            );
            self.re_encode_all = true;
        }
        self.encode();
        write_frames(stream, flags & END_STREAM, priority, &self.encoded, out);
        Ok(())
    }

    /// Gathers the block's fragment (without padding and priority) into `self.fragment`;
    /// returns the HEADERS frame's priority fields, if it has them.
    fn fragment_of(&mut self, frames: &[u8]) -> Result<Option<[u8; 5]>, Unusable> {
        self.fragment.clear();
        let mut priority = None;
        let mut pos = 0;
        while pos < frames.len() {
            let (len, _, flags, _) = frame_head(&frames[pos..]);
            let mut payload = &frames[pos + FRAME_HEAD..pos + FRAME_HEAD + len];
            if pos == 0 {
                if flags & PADDED != 0 {
                    let (&pad, rest) = payload.split_first().ok_or(Unusable)?;
                    let keep = rest.len().checked_sub(usize::from(pad)).ok_or(Unusable)?;
                    payload = &rest[..keep];
                }
                if flags & PRIORITY != 0 {
                    let (fields, rest) = payload.split_first_chunk::<5>().ok_or(Unusable)?;
                    priority = Some(*fields);
                    payload = rest;
                }
            }
            self.fragment.extend_from_slice(payload);
            pos += FRAME_HEAD + len;
        }
        Ok(priority)
    }

    /// Decodes `self.fragment` with the client's table into `self.fields`.
    fn decode(&mut self) -> Result<(), Unusable> {
        let (arena, fields) = (&mut self.arena, &mut self.fields);
        arena.clear();
        fields.clear();
        let mut size = 0usize;
        self.decoder
            .decode_with_cb(&self.fragment, |name, value| {
                // RFC 7541 §4.1: a field's size is its name and value plus 32.
                size = size.saturating_add(name.len() + value.len() + 32);
                if size > MAX_DECODED {
                    return;
                }
                let n = arena.len()..arena.len() + name.len();
                arena.extend_from_slice(&name);
                let v = arena.len()..arena.len() + value.len();
                arena.extend_from_slice(&value);
                fields.push((n, v));
            })
            .map_err(|e| {
                tracing::debug!(error = %e, "a gRPC client's header block does not decode; passing it on as it is");
                Unusable
            })?;
        if size > MAX_DECODED {
            return Err(Unusable);
        }
        Ok(())
    }

    /// Encodes `self.fields` as literals without indexing, new names, no Huffman (RFC 7541
    /// §6.2.2), with a malformed `:authority` replaced.
    fn encode(&mut self) {
        self.encoded.clear();
        for (name, value) in &self.fields {
            let name = &self.arena[name.clone()];
            let mut value = &self.arena[value.clone()];
            if name == b":authority" && !authority_is_valid(value) {
                value = REPLACEMENT_AUTHORITY;
            }
            self.encoded.push(0x00);
            for s in [name, value] {
                // The high bit clear: not Huffman coded.
                loona_hpack::encoder::encode_integer_into(s.len(), 7, 0, &mut self.encoded)
                    .expect("writing to a Vec cannot fail");
                self.encoded.extend_from_slice(s);
            }
        }
    }
}

fn push_frame_head(out: &mut Vec<u8>, len: usize, kind: u8, flags: u8, stream: u32) {
    let len = u32::try_from(len).unwrap_or(u32::MAX).to_be_bytes();
    out.extend_from_slice(&[len[1], len[2], len[3], kind, flags]);
    out.extend_from_slice(&stream.to_be_bytes());
}

/// Writes `block` as a HEADERS frame (with `flags` and `priority`) and as many CONTINUATION
/// frames as [`MAX_FRAME`] makes it take.
fn write_frames(
    stream: u32,
    flags: u8,
    priority: Option<[u8; 5]>,
    block: &[u8],
    out: &mut Vec<u8>,
) {
    let first_room = MAX_FRAME - priority.map_or(0, |p| p.len());
    let (first, mut rest) = block.split_at(first_room.min(block.len()));
    let mut first_flags = flags;
    if priority.is_some() {
        first_flags |= PRIORITY;
    }
    if rest.is_empty() {
        first_flags |= END_HEADERS;
    }
    let prio_len = priority.map_or(0, |p| p.len());
    push_frame_head(out, prio_len + first.len(), HEADERS, first_flags, stream);
    if let Some(p) = priority {
        out.extend_from_slice(&p);
    }
    out.extend_from_slice(first);
    while !rest.is_empty() {
        let (chunk, more) = rest.split_at(MAX_FRAME.min(rest.len()));
        let flags = if more.is_empty() { END_HEADERS } else { 0 };
        push_frame_head(out, chunk.len(), CONTINUATION, flags, stream);
        out.extend_from_slice(chunk);
        rest = more;
    }
}

/// An accepted connection (after TLS, if any) as the gRPC server reads it; see the module
/// documentation. Writes go straight to the connection.
pub struct H2Fix<IO> {
    io: IO,
    scan: Scan,
    /// Read from `io`, not yet handed to h2 nor passed by [`passing`].
    gathered: Vec<u8>,
    /// Ready for h2: passed bytes that went through `gathered`, and header blocks.
    ready: Vec<u8>,
    ready_from: usize,
    rewriter: Rewriter,
}

impl<IO> std::fmt::Debug for H2Fix<IO> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("H2Fix")
            .field("scan", &self.scan)
            .field("gathered", &self.gathered.len())
            .field("re_encode_all", &self.rewriter.re_encode_all)
            .finish_non_exhaustive()
    }
}

/// What handing on the gathered bytes left to do.
enum Next {
    /// Deliver `ready`, or read on directly.
    Go,
    /// A header block or a frame head is incomplete: read more into `gathered`.
    Read,
}

impl<IO> H2Fix<IO> {
    pub fn new(io: IO) -> Self {
        Self {
            io,
            scan: Scan::Preface(0),
            gathered: Vec::new(),
            ready: Vec::new(),
            ready_from: 0,
            rewriter: Rewriter::new(),
        }
    }

    /// Whether a header block of this connection has been re-encoded (for tests).
    pub fn re_encoded(&self) -> bool {
        self.rewriter.re_encode_all
    }

    /// Moves what it can from `gathered` to `ready`.
    fn hand_on(&mut self) -> Next {
        loop {
            let pass = passing(&mut self.scan, &self.gathered);
            self.ready.extend_from_slice(&self.gathered[..pass]);
            self.gathered.drain(..pass);
            if self.gathered.is_empty() {
                return Next::Go;
            }
            if self.gathered.len() < FRAME_HEAD {
                return Next::Read;
            }
            // `passing` stopped at a HEADERS frame.
            let fixed = match gather(&self.gathered) {
                Block::Incomplete => return Next::Read,
                Block::Unusable => Err(Unusable),
                Block::Complete(end) => self
                    .rewriter
                    .fix(&self.gathered[..end], &mut self.ready)
                    .map(|()| end),
            };
            match fixed {
                Ok(end) => {
                    self.gathered.drain(..end);
                }
                Err(Unusable) => {
                    self.scan = Scan::Off;
                    self.ready.append(&mut self.gathered);
                    return Next::Go;
                }
            }
        }
    }
}

impl<IO: AsyncRead + Unpin> AsyncRead for H2Fix<IO> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        loop {
            if this.ready_from < this.ready.len() {
                let n = buf.remaining().min(this.ready.len() - this.ready_from);
                buf.put_slice(&this.ready[this.ready_from..this.ready_from + n]);
                this.ready_from += n;
                if this.ready_from == this.ready.len() {
                    this.ready.clear();
                    this.ready_from = 0;
                }
                return Poll::Ready(Ok(()));
            }
            if !this.gathered.is_empty() {
                if let Next::Go = this.hand_on() {
                    continue;
                }
                let mut chunk = [0u8; GATHER_READ];
                let mut chunk = ReadBuf::new(&mut chunk);
                ready!(Pin::new(&mut this.io).poll_read(cx, &mut chunk))?;
                if chunk.filled().is_empty() {
                    // The client closed mid-block: h2 gets what it sent, then the end.
                    this.scan = Scan::Off;
                    this.ready.append(&mut this.gathered);
                } else {
                    this.gathered.extend_from_slice(chunk.filled());
                }
                continue;
            }
            // Straight into h2's buffer; what must not pass yet moves to `gathered`.
            let start = buf.filled().len();
            ready!(Pin::new(&mut this.io).poll_read(cx, buf))?;
            let read = buf.filled().len() - start;
            if read == 0 {
                return Poll::Ready(Ok(()));
            }
            let pass = passing(&mut this.scan, &buf.filled()[start..]);
            if pass < read {
                this.gathered
                    .extend_from_slice(&buf.filled()[start + pass..]);
                buf.set_filled(start + pass);
            }
            if pass > 0 {
                return Poll::Ready(Ok(()));
            }
        }
    }
}

impl<IO: AsyncWrite + Unpin> AsyncWrite for H2Fix<IO> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}

/// The caller's identity (peer credentials, address, client certificate) is the connection's.
impl<IO: Connected> Connected for H2Fix<IO> {
    type ConnectInfo = IO::ConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.io.connect_info()
    }
}

#[cfg(test)]
#[path = "h2fix_tests.rs"]
mod tests;
