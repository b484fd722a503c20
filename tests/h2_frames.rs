//! RFC 9113 error handling on the h2c listener, with a raw frame client (no h2 library on the
//! client side, so nothing corrects what the test sends): a bad connection preface, frames
//! on the wrong stream, stream limits, flow-control violations and an oversized header list.
//! Each must end in the error the RFC names, never a hang, a crash or a served request.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use crate::support;

use std::time::Duration;

use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

// Frame types (RFC 9113 6).
const DATA: u8 = 0x0;
const HEADERS: u8 = 0x1;
const RST_STREAM: u8 = 0x3;
const SETTINGS: u8 = 0x4;
const GOAWAY: u8 = 0x7;
const WINDOW_UPDATE: u8 = 0x8;
const END_STREAM: u8 = 0x1;
const END_HEADERS: u8 = 0x4;
const ACK: u8 = 0x1;

// Error codes (RFC 9113 7).
const PROTOCOL_ERROR: u32 = 0x1;
const FLOW_CONTROL_ERROR: u32 = 0x3;
const REFUSED_STREAM: u32 = 0x7;

#[derive(Debug)]
struct Frame {
    kind: u8,
    flags: u8,
    stream: u32,
    payload: Vec<u8>,
}

impl Frame {
    /// The error code of a GOAWAY or RST_STREAM.
    fn error_code(&self) -> u32 {
        let at = if self.kind == GOAWAY { 4 } else { 0 };
        u32::from_be_bytes(self.payload[at..at + 4].try_into().unwrap())
    }
}

fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(9 + payload.len());
    out.extend_from_slice(&(payload.len() as u32).to_be_bytes()[1..]);
    out.push(kind);
    out.push(flags);
    out.extend_from_slice(&stream.to_be_bytes());
    out.extend_from_slice(payload);
    out
}

/// A GET of `/` for `app.test` in HPACK without Huffman: `:method GET`, `:scheme http`,
/// `:path /` from the static table, `:authority` as a literal.
fn get_headers() -> Vec<u8> {
    let mut block = vec![0x82, 0x86, 0x84, 0x41, 8];
    block.extend_from_slice(b"app.test");
    block
}

struct Conn {
    tcp: TcpStream,
    buf: Vec<u8>,
}

impl Conn {
    /// Connects, sends the preface and an empty SETTINGS, and acknowledges the server's.
    async fn open(gw: &Gateway) -> (Conn, Frame) {
        let mut c = Conn {
            tcp: TcpStream::connect(gw.addr).await.unwrap(),
            buf: Vec::new(),
        };
        c.send(PREFACE).await;
        c.send(&frame(SETTINGS, 0, 0, &[])).await;
        let settings = loop {
            let f = c.next().await.expect("the server's SETTINGS");
            if f.kind == SETTINGS && f.flags & ACK == 0 {
                break f;
            }
        };
        c.send(&frame(SETTINGS, ACK, 0, &[])).await;
        (c, settings)
    }

    async fn send(&mut self, bytes: &[u8]) {
        self.tcp.write_all(bytes).await.unwrap();
    }

    /// The next frame; `None` when the server closed the connection (or sent nothing for 5 s,
    /// which fails the caller's expectation as a hang would).
    async fn next(&mut self) -> Option<Frame> {
        loop {
            if self.buf.len() >= 9 {
                let len = u32::from_be_bytes([0, self.buf[0], self.buf[1], self.buf[2]]) as usize;
                if self.buf.len() >= 9 + len {
                    let f = Frame {
                        kind: self.buf[3],
                        flags: self.buf[4],
                        stream: u32::from_be_bytes(self.buf[5..9].try_into().unwrap())
                            & 0x7fff_ffff,
                        payload: self.buf[9..9 + len].to_vec(),
                    };
                    self.buf.drain(..9 + len);
                    return Some(f);
                }
            }
            let mut chunk = [0u8; 16384];
            let n = tokio::time::timeout(Duration::from_secs(5), self.tcp.read(&mut chunk))
                .await
                .ok()?
                .ok()?;
            if n == 0 {
                return None;
            }
            self.buf.extend_from_slice(&chunk[..n]);
        }
    }

    /// Frames until one of `kinds` arrives (skipping SETTINGS acks, WINDOW_UPDATEs, PINGs).
    async fn until(&mut self, kinds: &[u8]) -> Option<Frame> {
        loop {
            let f = self.next().await?;
            if kinds.contains(&f.kind) {
                return Some(f);
            }
        }
    }
}

async fn h2c_gateway() -> (Gateway, MockServer) {
    let up = mock("app").await;
    let gw = Gateway::start(&format!(
        "{}\n[upstreams.app]\nendpoints = [\"{}\"]\n[[routes]]\nname = \"app\"\npath_prefix = \"/\"\nupstream = \"app\"\n",
        server("h2c = true\nh2_max_concurrent_streams = 2"),
        up.addr()
    ))
    .await;
    (gw, up)
}

/// RFC 9113 3.4: a connection preface that is not exactly the preface is a connection error
/// (here: it does not even become HTTP/1.1), and nothing reaches the upstream.
#[tokio::test]
async fn a_bad_preface_ends_the_connection() {
    let (gw, up) = h2c_gateway().await;
    let mut tcp = TcpStream::connect(gw.addr).await.unwrap();
    tcp.write_all(b"PRI * HTTP/2.0\r\n\r\nXX\r\n\r\n")
        .await
        .unwrap();
    let mut out = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(10), tcp.read_to_end(&mut out)).await;
    assert!(read.is_ok(), "the gateway closes the connection");
    let text = String::from_utf8_lossy(&out);
    assert!(
        out.is_empty() || text.starts_with("HTTP/1.1 4") || out.get(3) == Some(&GOAWAY),
        "refused: {text:?}"
    );
    assert!(up.requests().is_empty());
}

/// RFC 9113 6.1: DATA on stream 0 is a connection error of type PROTOCOL_ERROR.
#[tokio::test]
async fn data_on_stream_zero_is_a_protocol_error() {
    let (gw, _up) = h2c_gateway().await;
    let (mut c, _) = Conn::open(&gw).await;
    c.send(&frame(DATA, 0, 0, b"hello")).await;
    let goaway = c.until(&[GOAWAY]).await.expect("GOAWAY");
    assert_eq!(goaway.error_code(), PROTOCOL_ERROR);
}

/// RFC 9113 5.1.1: a client opens odd-numbered streams; HEADERS on an even one is a
/// PROTOCOL_ERROR.
#[tokio::test]
async fn headers_on_an_even_stream_is_a_protocol_error() {
    let (gw, up) = h2c_gateway().await;
    let (mut c, _) = Conn::open(&gw).await;
    c.send(&frame(HEADERS, END_HEADERS | END_STREAM, 2, &get_headers()))
        .await;
    let goaway = c.until(&[GOAWAY]).await.expect("GOAWAY");
    assert_eq!(goaway.error_code(), PROTOCOL_ERROR);
    assert!(up.requests().is_empty());
}

/// RFC 9113 6.5.2 and 5.1.2: the server advertises its stream limit, serves streams within
/// it, and refuses one beyond it with REFUSED_STREAM (the connection stays up).
#[tokio::test]
async fn streams_beyond_the_advertised_limit_are_refused() {
    let (gw, _up) = h2c_gateway().await;
    let (mut c, settings) = Conn::open(&gw).await;
    let advertised = settings
        .payload
        .chunks(6)
        .find(|s| u16::from_be_bytes([s[0], s[1]]) == 0x3)
        .map(|s| u32::from_be_bytes(s[2..6].try_into().unwrap()));
    assert_eq!(advertised, Some(2), "SETTINGS_MAX_CONCURRENT_STREAMS");
    // Three streams opened and left open (no END_STREAM): the third is one too many.
    for id in [1, 3, 5] {
        c.send(&frame(HEADERS, END_HEADERS, id, &get_headers()))
            .await;
    }
    let rst = c.until(&[RST_STREAM, GOAWAY]).await.expect("a refusal");
    assert_eq!((rst.kind, rst.stream), (RST_STREAM, 5), "{rst:?}");
    assert_eq!(rst.error_code(), REFUSED_STREAM);
    // The first two still complete.
    c.send(&frame(DATA, END_STREAM, 1, &[])).await;
    let answer = c.until(&[HEADERS]).await.expect("stream 1 answered");
    assert_eq!(answer.stream, 1);
}

/// RFC 9113 6.9.1: a WINDOW_UPDATE that takes the connection window above 2^31-1 is a
/// FLOW_CONTROL_ERROR; 6.9: an increment of 0 is a PROTOCOL_ERROR.
#[tokio::test]
async fn flow_control_violations_end_the_connection() {
    let (gw, _up) = h2c_gateway().await;
    let (mut c, _) = Conn::open(&gw).await;
    c.send(&frame(WINDOW_UPDATE, 0, 0, &0x7fff_ffffu32.to_be_bytes()))
        .await;
    let goaway = c.until(&[GOAWAY]).await.expect("GOAWAY");
    assert_eq!(goaway.error_code(), FLOW_CONTROL_ERROR);

    let (mut c, _) = Conn::open(&gw).await;
    c.send(&frame(WINDOW_UPDATE, 0, 0, &0u32.to_be_bytes()))
        .await;
    let goaway = c.until(&[GOAWAY]).await.expect("GOAWAY");
    assert_eq!(goaway.error_code(), PROTOCOL_ERROR);
}

/// RFC 9113 10.5.1: a header list beyond the server's limit (64 KiB decoded) is refused
/// without reaching the upstream; the connection survives for the next request.
#[tokio::test]
async fn an_oversized_header_list_is_refused() {
    let (gw, up) = h2c_gateway().await;
    let (mut c, _) = Conn::open(&gw).await;
    // One literal header field of 70,000 bytes, split into HEADERS + CONTINUATION frames
    // within the default 16 KiB frame size.
    let mut block = get_headers();
    block.push(0x40); // literal with incremental indexing, new name
    block.push(6);
    block.extend_from_slice(b"x-huge");
    let value = vec![b'a'; 70_000];
    // HPACK integer of the length with a 7-bit prefix.
    let mut len = value.len() - 127;
    block.push(0x7f);
    while len >= 128 {
        block.push((len % 128) as u8 | 0x80);
        len /= 128;
    }
    block.push(len as u8);
    block.extend_from_slice(&value);
    let chunks: Vec<&[u8]> = block.chunks(16_000).collect();
    for (i, chunk) in chunks.iter().enumerate() {
        let (kind, flags) = match (i, i + 1 == chunks.len()) {
            (0, true) => (HEADERS, END_HEADERS | END_STREAM),
            (0, false) => (HEADERS, END_STREAM),
            (_, true) => (0x9, END_HEADERS),
            (_, false) => (0x9, 0),
        };
        c.send(&frame(kind, flags, 1, chunk)).await;
    }
    let refused = c
        .until(&[HEADERS, RST_STREAM, GOAWAY])
        .await
        .expect("an answer");
    // A 431 (or another 4xx) answer, a stream reset or a GOAWAY; a HEADERS answer is not the
    // upstream's 200 (static-table index 8, 0x88).
    if refused.kind == HEADERS {
        assert_ne!(refused.payload.first(), Some(&0x88), "not 200");
    }
    eprintln!(
        "oversized header list answered with frame type {}",
        refused.kind
    );
    assert!(up.requests().is_empty(), "nothing reached the upstream");
}

/// gRPC over HTTP/2, "Responses": a Trailers-Only answer is one HEADERS frame that ends the
/// stream. The gateway's own gRPC errors are sent so (a client that waits for trailers after
/// a HEADERS without END_STREAM would report INTERNAL instead of the status).
#[tokio::test]
async fn a_gateway_grpc_error_is_one_headers_frame_that_ends_the_stream() {
    let up = mock("app").await;
    let gw = Gateway::start(&format!(
        "{}\n[upstreams.app]\nendpoints = [\"{}\"]\n[[routes]]\nname = \"app\"\npath_prefix = \"/only/\"\nupstream = \"app\"\ngrpc = true\n",
        server("h2c = true"),
        up.addr()
    ))
    .await;
    let (mut c, _) = Conn::open(&gw).await;
    // A gRPC call of `/` (no route): content-type from the static table (index 31), literal.
    let mut block = get_headers();
    block.extend_from_slice(&[0x5f, 16]);
    block.extend_from_slice(b"application/grpc");
    c.send(&frame(HEADERS, END_HEADERS | END_STREAM, 1, &block))
        .await;
    let answer = c
        .until(&[HEADERS, DATA, RST_STREAM, GOAWAY])
        .await
        .expect("an answer");
    assert_eq!((answer.kind, answer.stream), (HEADERS, 1), "{answer:?}");
    assert_eq!(
        answer.flags & END_STREAM,
        END_STREAM,
        "the HEADERS frame ends the stream"
    );
    assert!(up.requests().is_empty());
}
