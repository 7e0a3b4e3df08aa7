//! The link's server against a real, independent HTTP/2 client (the h2 crate's), against
//! the link's own client, and against raw frames from a peer that misbehaves.

use std::time::Duration;

use bytes::{BufMut, Bytes, BytesMut};
use http::{HeaderMap, HeaderValue, Request, Response, StatusCode};
use http_body::Body;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use trellis_link::{Config, RecvStream, SendStream, frame};

const T: Duration = Duration::from_secs(10);

async fn next_frame(
    body: &mut RecvStream,
) -> Option<Result<http_body::Frame<Bytes>, trellis_link::Error>> {
    std::future::poll_fn(|cx| std::pin::Pin::new(&mut *body).poll_frame(cx)).await
}

/// What the test server does with a request, chosen by its path.
async fn handle(req: Request<RecvStream>, mut tx: SendStream) {
    let path = req.uri().path().to_string();
    let (parts, mut body) = req.into_parts();
    match path.as_str() {
        "/echo" => {
            tx.send_response(Response::new(()), false).expect("respond");
            while let Some(frame) = next_frame(&mut body).await {
                // A client that breaks the rules gets its stream reset: nothing to echo.
                let Ok(frame) = frame else {
                    return;
                };
                match frame.into_data() {
                    Ok(d) => {
                        std::future::poll_fn(|cx| tx.poll_ready(cx))
                            .await
                            .expect("ready");
                        tx.send_data(d, false).expect("data");
                    }
                    Err(f) => {
                        let mut t = f.into_trailers().expect("trailers");
                        t.insert("x-echoed", HeaderValue::from_static("yes"));
                        tx.send_trailers(t).expect("trailers");
                        return;
                    }
                }
            }
            tx.send_data(Bytes::new(), true).expect("end");
        }
        "/hold" => {
            // Answers only when the client gives up: reports the reset.
            let reason = std::future::poll_fn(|cx| tx.poll_reset(cx)).await;
            let _ = HELD.set(reason);
        }
        "/slow" => {
            tokio::time::sleep(Duration::from_millis(300)).await;
            tx.send_response(Response::new(()), false).expect("respond");
            tx.send_data(Bytes::from_static(b"late"), true)
                .expect("data");
        }
        p => {
            let mut resp = Response::new(());
            *resp.status_mut() = StatusCode::OK;
            resp.headers_mut()
                .insert("x-path", HeaderValue::from_str(p).expect("path"));
            resp.headers_mut().insert(
                "x-authority",
                HeaderValue::from_str(parts.uri.authority().map_or("", |a| a.as_str()))
                    .expect("authority"),
            );
            resp.headers_mut()
                .insert("content-length", HeaderValue::from_static("1024"));
            // The client may have reset the stream already (the misbehaving ones do).
            if tx.send_response(resp, false).is_ok() {
                let _ = tx.send_data(Bytes::from(vec![b'x'; 1024]), true);
            }
        }
    }
}

static HELD: std::sync::OnceLock<trellis_link::Reason> = std::sync::OnceLock::new();

/// A link server on loopback, serving each connection until it ends, or, once `stop`
/// says so, until it has drained. Sends on `ended` when a connection's accept loop ends.
async fn server(
    config: Config,
) -> (
    std::net::SocketAddr,
    tokio::sync::watch::Sender<bool>,
    tokio::sync::mpsc::UnboundedReceiver<()>,
) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let (ended_tx, ended_rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok((sock, _)) = listener.accept().await {
            let mut stop = stop_rx.clone();
            let config = config.clone();
            let ended = ended_tx.clone();
            tokio::spawn(async move {
                let mut conn = trellis_link::serve(sock, config);
                let mut stopping = false;
                loop {
                    tokio::select! {
                        next = conn.accept() => match next {
                            Some((req, tx)) => {
                                tokio::spawn(handle(req, tx));
                            }
                            None => break,
                        },
                        _ = stop.changed(), if !stopping => {
                            stopping = true;
                            conn.graceful_shutdown();
                        }
                    }
                }
                let _ = ended.send(());
            });
        }
    });
    (addr, stop_tx, ended_rx)
}

async fn h2_client(addr: std::net::SocketAddr) -> h2::client::SendRequest<Bytes> {
    let sock = TcpStream::connect(addr).await.expect("connect");
    let (sender, conn) = h2::client::handshake(sock).await.expect("handshake");
    tokio::spawn(async move {
        let _ = conn.await;
    });
    sender
}

fn get(path: &str) -> Request<()> {
    Request::builder()
        .uri(format!("http://ratings.default:9080{path}"))
        .body(())
        .expect("request")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_h2_client_gets_answers_in_sequence_and_in_parallel() {
    let (addr, _stop, _ended) = server(Config::default()).await;
    let sender = h2_client(addr).await;
    for i in 0..100 {
        let path = format!("/seq/{}", i % 5);
        let mut s = sender.clone().ready().await.expect("ready");
        let (resp, _) = s.send_request(get(&path), true).expect("send");
        let resp = tokio::time::timeout(T, resp)
            .await
            .expect("in time")
            .expect("response");
        assert_eq!(resp.status(), StatusCode::OK);
        assert_eq!(resp.headers()["x-path"], path.as_str());
        assert_eq!(resp.headers()["x-authority"], "ratings.default:9080");
        let mut body = resp.into_body();
        let mut n = 0;
        while let Some(d) = body.data().await {
            let d = d.expect("data");
            let _ = body.flow_control().release_capacity(d.len());
            n += d.len();
        }
        assert_eq!(n, 1024);
    }
    let mut tasks = Vec::new();
    for i in 0..64 {
        let sender = sender.clone();
        tasks.push(tokio::spawn(async move {
            let path = format!("/par/{i}");
            let mut s = sender.ready().await.expect("ready");
            let (resp, _) = s.send_request(get(&path), true).expect("send");
            let resp = tokio::time::timeout(T, resp)
                .await
                .expect("in time")
                .expect("response");
            resp.headers()["x-path"] == path.as_str()
        }));
    }
    for t in tasks {
        assert!(t.await.expect("task"));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_bodies_and_trailers_stream_through_both_ways() {
    let (addr, _stop, _ended) = server(Config::default()).await;
    let sender = h2_client(addr).await;
    let req = Request::builder()
        .method("POST")
        .uri(format!("http://{addr}/echo"))
        .body(())
        .expect("request");
    let mut s = sender.ready().await.expect("ready");
    let (resp, mut tx) = s.send_request(req, false).expect("send");
    let total = 6 << 20;
    let sender = tokio::spawn(async move {
        let chunk = Bytes::from(vec![9u8; 32 << 10]);
        let mut sent = 0;
        while sent < total {
            tx.reserve_capacity(chunk.len());
            let mut c = chunk.clone();
            while !c.is_empty() {
                let n = std::future::poll_fn(|cx| tx.poll_capacity(cx))
                    .await
                    .expect("capacity")
                    .expect("capacity");
                tx.send_data(c.split_to(n.min(c.len())), false)
                    .expect("data");
            }
            sent += chunk.len();
        }
        let mut t = HeaderMap::new();
        t.insert("grpc-status", HeaderValue::from_static("0"));
        tx.send_trailers(t).expect("trailers");
    });
    let resp = tokio::time::timeout(T, resp)
        .await
        .expect("in time")
        .expect("response");
    let mut body = resp.into_body();
    let mut n = 0;
    while let Some(d) = tokio::time::timeout(T, body.data()).await.expect("in time") {
        let d = d.expect("data");
        assert!(d.iter().all(|&b| b == 9));
        let _ = body.flow_control().release_capacity(d.len());
        n += d.len();
    }
    assert_eq!(n, total);
    let trailers = body.trailers().await.expect("trailers").expect("some");
    assert_eq!(trailers["grpc-status"], "0");
    assert_eq!(trailers["x-echoed"], "yes");
    sender.await.expect("sender");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_links_own_client_and_server_agree() {
    let (addr, _stop, _ended) = server(Config::default()).await;
    let sock = TcpStream::connect(addr).await.expect("connect");
    let client = trellis_link::handshake(sock, Config::default());
    for i in 0..300 {
        let path = format!("/own/{}", i % 3);
        let (resp, _tx) = client.send_request(&get(&path), true, None).expect("send");
        let resp = tokio::time::timeout(T, resp)
            .await
            .expect("in time")
            .expect("response");
        assert_eq!(resp.headers()["x-path"], path.as_str());
        let mut body = resp.into_body();
        let mut n = 0;
        while let Some(f) = next_frame(&mut body).await {
            n += f.expect("frame").into_data().map_or(0, |d| d.len());
        }
        assert_eq!(n, 1024);
    }
    let req = Request::builder()
        .method("POST")
        .uri(format!("http://{addr}/echo"))
        .body(())
        .expect("request");
    let (resp, mut tx) = client.send_request(&req, false, None).expect("send");
    tx.send_data(Bytes::from(vec![1u8; 3 << 20]), false)
        .expect("data");
    let mut t = HeaderMap::new();
    t.insert("x-t", HeaderValue::from_static("1"));
    tx.send_trailers(t).expect("trailers");
    let resp = tokio::time::timeout(T, resp)
        .await
        .expect("in time")
        .expect("response");
    let mut body = resp.into_body();
    let (mut n, mut trailers) = (0, None);
    while let Some(f) = tokio::time::timeout(T, next_frame(&mut body))
        .await
        .expect("in time")
    {
        match f.expect("frame").into_data() {
            Ok(d) => n += d.len(),
            Err(f) => trailers = f.into_trailers().ok(),
        }
    }
    assert_eq!(n, 3 << 20);
    assert_eq!(trailers.expect("trailers")["x-echoed"], "yes");
    assert_eq!(client.streams(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_reset_reaches_the_handler_and_oversized_heads_get_431() {
    let (addr, _stop, _ended) = server(Config {
        max_header_list: 4 << 10,
        ..Config::default()
    })
    .await;
    let sender = h2_client(addr).await;
    let mut s = sender.clone().ready().await.expect("ready");
    let (resp, _) = s.send_request(get("/hold"), true).expect("send");
    // Gives the server time to take the stream, then gives up on it.
    tokio::time::sleep(Duration::from_millis(100)).await;
    drop(resp);
    drop(s);
    for _ in 0..100 {
        if HELD.get().is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(HELD.get(), Some(&trellis_link::Reason::CANCEL));
    let mut big = get("/big");
    big.headers_mut().insert(
        "x-big",
        HeaderValue::from_str(&"b".repeat(8 << 10)).expect("value"),
    );
    let mut s = sender.clone().ready().await.expect("ready");
    let (resp, _) = s.send_request(big, true).expect("send");
    let resp = tokio::time::timeout(T, resp)
        .await
        .expect("in time")
        .expect("response");
    assert_eq!(resp.status(), StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE);
    // The connection still serves.
    let mut s = sender.ready().await.expect("ready");
    let (resp, _) = s.send_request(get("/after"), true).expect("send");
    let resp = tokio::time::timeout(T, resp)
        .await
        .expect("in time")
        .expect("response");
    assert_eq!(resp.status(), StatusCode::OK);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_graceful_shutdown_finishes_streams_in_flight_then_ends() {
    let (addr, stop, mut ended) = server(Config {
        max_concurrent_streams: 2,
        ..Config::default()
    })
    .await;
    let sender = h2_client(addr).await;
    // Ten at once against a limit of two: the client queues, nothing is refused.
    let mut tasks = Vec::new();
    for i in 0..10 {
        let sender = sender.clone();
        tasks.push(tokio::spawn(async move {
            let mut s = sender.ready().await.expect("ready");
            let (resp, _) = s.send_request(get(&format!("/n/{i}")), true).expect("send");
            tokio::time::timeout(T, resp)
                .await
                .expect("in time")
                .expect("response")
                .status()
        }));
    }
    for t in tasks {
        assert_eq!(t.await.expect("task"), StatusCode::OK);
    }
    let mut s = sender.clone().ready().await.expect("ready");
    let (slow, _) = s.send_request(get("/slow"), true).expect("send");
    tokio::time::sleep(Duration::from_millis(50)).await;
    stop.send(true).expect("stop");
    let resp = tokio::time::timeout(T, slow)
        .await
        .expect("in time")
        .expect("served");
    let mut body = resp.into_body();
    let data = body.data().await.expect("data").expect("data");
    assert_eq!(data, "late");
    // Drained: the accept loop ends.
    tokio::time::timeout(T, ended.recv())
        .await
        .expect("ended in time");
}

/// Raw frames for the misbehaving peers below.
fn raw_frame(dst: &mut BytesMut, kind: u8, flags: u8, stream: u32, payload: &[u8]) {
    frame::put_head(dst, payload.len(), kind, flags, stream);
    dst.put_slice(payload);
}

/// A request head block: GET / on `http://a` (static table entries and one literal).
const GET_BLOCK: &[u8] = &[0x82, 0x86, 0x84, 0x01, 0x01, b'a'];

/// POST /echo on `http://a`.
const POST_BLOCK: &[u8] = &[
    0x83, 0x86, 0x04, 0x05, b'/', b'e', b'c', b'h', b'o', 0x01, 0x01, b'a',
];

/// Sends `frames` after the preface and reads until the server closes; the GOAWAY error
/// code it sent, if any.
async fn misbehave(addr: std::net::SocketAddr, frames: BytesMut) -> Option<u32> {
    let mut sock = TcpStream::connect(addr).await.expect("connect");
    let mut out = BytesMut::from(frame::PREFACE);
    raw_frame(&mut out, frame::SETTINGS, 0, 0, &[]);
    out.extend_from_slice(&frames);
    // The server may close before taking everything: a failed write is expected then.
    let _ = sock.write_all(&out).await;
    let mut got = Vec::new();
    let _ = tokio::time::timeout(T, sock.read_to_end(&mut got))
        .await
        .expect("closed in time");
    let mut pos = 0;
    let mut goaway = None;
    while pos + 9 <= got.len() {
        let h = frame::Head::parse(&got[pos..]);
        if h.kind == frame::GOAWAY && pos + 17 <= got.len() {
            let p = &got[pos + 9..];
            goaway = Some(u32::from_be_bytes([p[4], p[5], p[6], p[7]]));
        }
        pos += 9 + h.len;
    }
    goaway
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn misbehaving_clients_are_disconnected_with_the_reason() {
    let (addr, _stop, _ended) = server(Config::default()).await;
    // Rapid reset: streams opened and reset at once, far beyond the budget.
    let mut f = BytesMut::new();
    for i in 0..5000u32 {
        let id = 1 + 2 * i;
        raw_frame(
            &mut f,
            frame::HEADERS,
            frame::END_HEADERS | frame::END_STREAM,
            id,
            GET_BLOCK,
        );
        raw_frame(&mut f, frame::RST_STREAM, 0, id, &8u32.to_be_bytes());
    }
    assert_eq!(
        misbehave(addr, f).await,
        Some(0xb),
        "rapid reset: ENHANCE_YOUR_CALM"
    );
    // Resets the client provokes (a zero window increment on each stream it opens) cost
    // as much as resets it sends.
    let mut f = BytesMut::new();
    for i in 0..5000u32 {
        let id = 1 + 2 * i;
        raw_frame(&mut f, frame::HEADERS, frame::END_HEADERS, id, POST_BLOCK);
        raw_frame(&mut f, frame::WINDOW_UPDATE, 0, id, &0u32.to_be_bytes());
    }
    assert_eq!(
        misbehave(addr, f).await,
        Some(0xb),
        "provoked resets: ENHANCE_YOUR_CALM"
    );
    // A PING flood.
    let mut f = BytesMut::new();
    for _ in 0..5000 {
        raw_frame(&mut f, frame::PING, 0, 0, &[0; 8]);
    }
    assert_eq!(misbehave(addr, f).await, Some(0xb), "PING flood");
    // A CONTINUATION flood: a header block that never ends.
    let mut f = BytesMut::new();
    raw_frame(&mut f, frame::HEADERS, 0, 1, GET_BLOCK);
    for _ in 0..200 {
        raw_frame(&mut f, frame::CONTINUATION, 0, 1, &[0x40; 16_000]);
    }
    assert_eq!(misbehave(addr, f).await, Some(0xb), "CONTINUATION flood");
    // A header block that does not decode: index 70 with an empty dynamic table.
    let mut f = BytesMut::new();
    raw_frame(
        &mut f,
        frame::HEADERS,
        frame::END_HEADERS | frame::END_STREAM,
        1,
        &[0x80 | 70],
    );
    assert_eq!(misbehave(addr, f).await, Some(0x9), "COMPRESSION_ERROR");
    // A frame larger than the server allows.
    let mut f = BytesMut::new();
    raw_frame(&mut f, frame::DATA, 0, 1, &vec![0u8; 20_000]);
    assert_eq!(misbehave(addr, f).await, Some(0x6), "FRAME_SIZE_ERROR");
    // Not HTTP/2 at all: closed without a word.
    let mut sock = TcpStream::connect(addr).await.expect("connect");
    sock.write_all(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
        .await
        .expect("write");
    let mut got = Vec::new();
    let _ = tokio::time::timeout(T, sock.read_to_end(&mut got))
        .await
        .expect("closed in time");
    // The server keeps serving well-behaved clients.
    let sender = h2_client(addr).await;
    let mut s = sender.ready().await.expect("ready");
    let (resp, _) = s.send_request(get("/fine"), true).expect("send");
    let resp = tokio::time::timeout(T, resp)
        .await
        .expect("in time")
        .expect("response");
    assert_eq!(resp.status(), StatusCode::OK);
}

/// Frames from a raw connection until `want` says stop (or the time is up).
async fn read_frames(
    sock: &mut TcpStream,
    mut want: impl FnMut(&frame::Head, &[u8]) -> bool,
) -> bool {
    let mut buf = BytesMut::new();
    let deadline = tokio::time::Instant::now() + T;
    loop {
        while buf.len() >= 9 {
            let h = frame::Head::parse(&buf);
            if buf.len() < 9 + h.len {
                break;
            }
            let f = buf.split_to(9 + h.len);
            if want(&h, &f[9..]) {
                return true;
            }
        }
        let mut chunk = [0u8; 16384];
        match tokio::time::timeout_at(deadline, sock.read(&mut chunk)).await {
            Ok(Ok(n)) if n > 0 => buf.extend_from_slice(&chunk[..n]),
            _ => return false,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_goaway_leaves_its_streams_served_and_overruns_reset_only_their_stream() {
    let (addr, _stop, _ended) = server(Config::default()).await;
    // GOAWAY(0) from a client after its request (as Go's client sends when it shuts down):
    // the request in flight is still answered.
    let mut sock = TcpStream::connect(addr).await.expect("connect");
    let mut out = BytesMut::from(frame::PREFACE);
    raw_frame(&mut out, frame::SETTINGS, 0, 0, &[]);
    let slow: &[u8] = &[
        0x82, 0x86, 0x04, 0x05, b'/', b's', b'l', b'o', b'w', 0x01, 0x01, b'a',
    ];
    raw_frame(
        &mut out,
        frame::HEADERS,
        frame::END_HEADERS | frame::END_STREAM,
        1,
        slow,
    );
    raw_frame(&mut out, frame::GOAWAY, 0, 0, &[0, 0, 0, 0, 0, 0, 0, 0]);
    sock.write_all(&out).await.expect("write");
    let answered = read_frames(&mut sock, |h, _| h.kind == frame::HEADERS && h.stream == 1).await;
    assert!(
        answered,
        "the stream in flight was answered after the client's GOAWAY"
    );
    // A stream that overruns its window (1 MiB) is reset alone, FLOW_CONTROL_ERROR.
    let mut sock = TcpStream::connect(addr).await.expect("connect");
    let mut out = BytesMut::from(frame::PREFACE);
    raw_frame(&mut out, frame::SETTINGS, 0, 0, &[]);
    raw_frame(&mut out, frame::HEADERS, frame::END_HEADERS, 1, POST_BLOCK);
    for _ in 0..70 {
        raw_frame(&mut out, frame::DATA, 0, 1, &[7u8; 16_000]);
    }
    raw_frame(
        &mut out,
        frame::HEADERS,
        frame::END_HEADERS | frame::END_STREAM,
        3,
        GET_BLOCK,
    );
    sock.write_all(&out).await.expect("write");
    let (mut reset, mut other) = (false, false);
    let done = read_frames(&mut sock, |h, p| {
        if h.kind == frame::RST_STREAM && h.stream == 1 {
            reset = p == 3u32.to_be_bytes();
        }
        if h.kind == frame::HEADERS && h.stream == 3 {
            other = true;
        }
        reset && other
    })
    .await;
    assert!(
        done,
        "stream 1 reset with FLOW_CONTROL_ERROR ({reset}), stream 3 answered ({other})"
    );
}
