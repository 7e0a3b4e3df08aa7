//! The link's client against a real, independent HTTP/2 server (the h2 crate's), over
//! loopback TCP: every behaviour the proxy relies on.

use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Request, Response, StatusCode};
use http_body::Body;
use tokio::net::{TcpListener, TcpStream};
use trellis_link::{Client, Config, Error, Reason};

const T: Duration = Duration::from_secs(10);

/// What the test server does with a request, chosen by its path.
async fn serve_stream(req: Request<h2::RecvStream>, mut respond: h2::server::SendResponse<Bytes>) {
    let path = req.uri().path().to_string();
    let (parts, mut body) = req.into_parts();
    match path.as_str() {
        "/reset" => {
            respond.send_reset(h2::Reason::INTERNAL_ERROR);
        }
        "/echo" => {
            // Streams the request body back as it arrives, then the request's trailers.
            let mut resp = Response::new(());
            if let Some(ct) = parts.headers.get("content-type") {
                resp.headers_mut().insert("content-type", ct.clone());
            }
            let mut tx = respond.send_response(resp, false).expect("respond");
            while let Some(chunk) = body.data().await {
                let chunk = chunk.expect("request data");
                let _ = body.flow_control().release_capacity(chunk.len());
                tx.reserve_capacity(chunk.len());
                let mut chunk = chunk;
                while !chunk.is_empty() {
                    let n = std::future::poll_fn(|cx| tx.poll_capacity(cx))
                        .await
                        .expect("capacity")
                        .expect("capacity");
                    let part = chunk.split_to(n.min(chunk.len()));
                    tx.send_data(part, false).expect("send");
                }
            }
            let trailers = body.trailers().await.expect("trailers");
            let mut out = trailers.unwrap_or_default();
            out.insert("x-echoed", HeaderValue::from_static("yes"));
            tx.send_trailers(out).expect("trailers");
        }
        "/head" => {
            // A HEAD answer: the length of a body that is not sent.
            let mut resp = Response::new(());
            resp.headers_mut()
                .insert("content-length", HeaderValue::from_static("1024"));
            respond.send_response(resp, true).expect("respond");
        }
        "/big-headers" => {
            let mut resp = Response::new(());
            for i in 0..40 {
                let v = format!("{i}-{}", "h".repeat(1000));
                resp.headers_mut()
                    .append("x-big", HeaderValue::from_str(&v).expect("value"));
            }
            respond.send_response(resp, true).expect("respond");
        }
        "/slow" => {
            let mut tx = respond
                .send_response(Response::new(()), false)
                .expect("respond");
            // Sends a little, then waits for the client to give up.
            let _ = tx.send_data(Bytes::from_static(b"first"), false);
            let reason = std::future::poll_fn(|cx| tx.poll_reset(cx)).await;
            let _ = SLOW_RESET.set(format!("{:?}", reason.ok()));
        }
        p => {
            // Answers with the path, the request id and a 1 KiB body.
            let mut resp = Response::new(());
            *resp.status_mut() = StatusCode::OK;
            resp.headers_mut()
                .insert("x-path", HeaderValue::from_str(p).expect("path"));
            if let Some(id) = parts.headers.get("x-request-id") {
                resp.headers_mut().insert("x-request-id", id.clone());
            }
            resp.headers_mut()
                .insert("content-length", HeaderValue::from_static("1024"));
            let mut tx = respond.send_response(resp, false).expect("respond");
            tx.send_data(Bytes::from(vec![b'x'; 1024]), true)
                .expect("send");
        }
    }
}

static SLOW_RESET: std::sync::OnceLock<String> = std::sync::OnceLock::new();

/// An h2 server on loopback; each accepted connection is served until it ends, or until
/// the returned sender says to shut down gracefully.
async fn server(
    max_streams: Option<u32>,
) -> (std::net::SocketAddr, tokio::sync::watch::Sender<bool>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    tokio::spawn(async move {
        while let Ok((sock, _)) = listener.accept().await {
            let mut stop = stop_rx.clone();
            tokio::spawn(async move {
                let mut b = h2::server::Builder::new();
                if let Some(m) = max_streams {
                    b.max_concurrent_streams(m);
                }
                let Ok(mut conn) = b.handshake::<_, Bytes>(sock).await else {
                    return;
                };
                let mut stopping = false;
                loop {
                    tokio::select! {
                        next = conn.accept() => match next {
                            Some(Ok((req, respond))) => {
                                tokio::spawn(serve_stream(req, respond));
                            }
                            _ => return,
                        },
                        _ = stop.changed(), if !stopping => {
                            stopping = true;
                            conn.graceful_shutdown();
                        }
                    }
                }
            });
        }
    });
    (addr, stop_tx)
}

async fn connect(addr: std::net::SocketAddr) -> Client {
    let sock = TcpStream::connect(addr).await.expect("connect");
    trellis_link::handshake(sock, Config::default())
}

fn get(path: &str) -> Request<()> {
    Request::builder()
        .uri(format!("http://reviews.default:9080{path}"))
        .header("user-agent", "link-test")
        .header("x-request-id", format!("id-{path}"))
        .body(())
        .expect("request")
}

async fn collect(
    mut body: trellis_link::RecvStream,
) -> Result<(Vec<u8>, Option<HeaderMap>), Error> {
    let mut data = Vec::new();
    let mut trailers = None;
    while let Some(frame) =
        std::future::poll_fn(|cx| std::pin::Pin::new(&mut body).poll_frame(cx)).await
    {
        let frame = frame?;
        match frame.into_data() {
            Ok(d) => data.extend_from_slice(&d),
            Err(f) => trailers = f.into_trailers().ok(),
        }
    }
    Ok((data, trailers))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_in_sequence_and_in_parallel_share_one_connection() {
    let (addr, _stop) = server(None).await;
    let client = connect(addr).await;
    for i in 0..200 {
        let path = format!("/seq/{}", i % 7);
        let (resp, _tx) = client.send_request(&get(&path), true, None).expect("send");
        let resp = tokio::time::timeout(T, resp)
            .await
            .expect("in time")
            .expect("response");
        assert_eq!(resp.status(), StatusCode::OK);
        assert_eq!(resp.version(), http::Version::HTTP_2);
        assert_eq!(resp.headers()["x-path"], path.as_str());
        assert_eq!(
            resp.headers()["x-request-id"],
            format!("id-{path}").as_str()
        );
        assert_eq!(resp.body().size_hint().exact(), Some(1024));
        let (data, _) = collect(resp.into_body()).await.expect("body");
        assert_eq!(data.len(), 1024);
    }
    let mut tasks = Vec::new();
    for i in 0..64 {
        let client = client.clone();
        tasks.push(tokio::spawn(async move {
            let path = format!("/par/{i}");
            let (resp, _tx) = client.send_request(&get(&path), true, None).expect("send");
            let resp = tokio::time::timeout(T, resp)
                .await
                .expect("in time")
                .expect("response");
            assert_eq!(resp.headers()["x-path"], path.as_str());
            collect(resp.into_body()).await.expect("body").0.len()
        }));
    }
    for t in tasks {
        assert_eq!(t.await.expect("task"), 1024);
    }
    // Every stream is forgotten once done.
    assert_eq!(client.streams(), 0);
    assert!(!client.is_closed());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bodies_larger_than_every_window_stream_both_ways_with_trailers() {
    let (addr, _stop) = server(None).await;
    let client = connect(addr).await;
    let req = Request::builder()
        .method("POST")
        .uri(format!("http://{addr}/echo"))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(())
        .expect("request");
    let (resp, mut tx) = client.send_request(&req, false, None).expect("send");
    // 6 MiB in 64 KiB chunks: more than the server's stream (64 KiB) and connection
    // windows, so both directions wait on WINDOW_UPDATEs.
    let total = 6 << 20;
    let sender = tokio::spawn(async move {
        let chunk = Bytes::from(vec![7u8; 64 << 10]);
        let mut sent = 0;
        while sent < total {
            std::future::poll_fn(|cx| tx.poll_ready(cx))
                .await
                .expect("ready");
            tx.send_data(chunk.clone(), false).expect("data");
            sent += chunk.len();
        }
        let mut t = HeaderMap::new();
        t.insert("grpc-status", HeaderValue::from_static("0"));
        tx.send_trailers(t).expect("trailers");
        tx
    });
    let resp = tokio::time::timeout(T, resp)
        .await
        .expect("in time")
        .expect("response");
    assert_eq!(resp.headers()["content-type"], "application/grpc");
    let (data, trailers) = tokio::time::timeout(T, collect(resp.into_body()))
        .await
        .expect("in time")
        .expect("body");
    assert_eq!(data.len(), total);
    assert!(data.iter().all(|&b| b == 7));
    let trailers = trailers.expect("trailers");
    assert_eq!(trailers["grpc-status"], "0");
    assert_eq!(trailers["x-echoed"], "yes");
    drop(sender.await.expect("sender"));
    assert_eq!(client.streams(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reset_stream_fails_alone_and_large_header_blocks_arrive_whole() {
    let (addr, _stop) = server(None).await;
    let client = connect(addr).await;
    let (resp, _tx) = client
        .send_request(&get("/reset"), true, None)
        .expect("send");
    let err = tokio::time::timeout(T, resp)
        .await
        .expect("in time")
        .expect_err("reset");
    assert_eq!(err, Error::Reset(Reason::INTERNAL_ERROR));
    // 40 KiB of headers: HEADERS and CONTINUATION frames, Huffman-coded by h2.
    let (resp, _tx) = client
        .send_request(&get("/big-headers"), true, None)
        .expect("send");
    let resp = tokio::time::timeout(T, resp)
        .await
        .expect("in time")
        .expect("response");
    let big: Vec<&HeaderValue> = resp.headers().get_all("x-big").iter().collect();
    assert_eq!(big.len(), 40);
    assert!(big[39].to_str().expect("text").starts_with("39-hhh"));
    // HEAD: the Content-Length describes no body here.
    let mut head = get("/head");
    *head.method_mut() = http::Method::HEAD;
    let (resp, _tx) = client.send_request(&head, true, None).expect("send");
    let resp = tokio::time::timeout(T, resp)
        .await
        .expect("in time")
        .expect("response");
    assert_eq!(resp.headers()["content-length"], "1024");
    let (data, _) = collect(resp.into_body())
        .await
        .expect("a bodiless HEAD answer");
    assert!(data.is_empty());
    // The connection still serves.
    let (resp, _tx) = client
        .send_request(&get("/after"), true, None)
        .expect("send");
    let resp = tokio::time::timeout(T, resp)
        .await
        .expect("in time")
        .expect("response");
    assert_eq!(resp.status(), StatusCode::OK);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn headers_beyond_the_limit_fail_that_stream_only() {
    let (addr, _stop) = server(None).await;
    let sock = TcpStream::connect(addr).await.expect("connect");
    let client = trellis_link::handshake(
        sock,
        Config {
            max_header_list: 8 << 10,
            ..Config::default()
        },
    );
    let (resp, _tx) = client
        .send_request(&get("/big-headers"), true, None)
        .expect("send");
    let err = tokio::time::timeout(T, resp)
        .await
        .expect("in time")
        .expect_err("too big");
    assert!(matches!(err, Error::Malformed(_)), "{err}");
    let (resp, _tx) = client
        .send_request(&get("/fine"), true, None)
        .expect("send");
    let resp = tokio::time::timeout(T, resp)
        .await
        .expect("in time")
        .expect("response");
    assert_eq!(resp.status(), StatusCode::OK);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropping_a_response_cancels_its_stream_at_the_server() {
    let (addr, _stop) = server(None).await;
    let client = connect(addr).await;
    let (resp, _tx) = client
        .send_request(&get("/slow"), true, None)
        .expect("send");
    let resp = tokio::time::timeout(T, resp)
        .await
        .expect("in time")
        .expect("response");
    let mut body = resp.into_body();
    let first = std::future::poll_fn(|cx| std::pin::Pin::new(&mut body).poll_frame(cx))
        .await
        .expect("a frame")
        .expect("data");
    assert_eq!(first.into_data().expect("data"), "first");
    drop(body);
    drop(_tx);
    for _ in 0..100 {
        if SLOW_RESET.get().is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(SLOW_RESET.get().map(String::as_str), Some("Some(CANCEL)"));
    assert_eq!(client.streams(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_peers_stream_limit_and_goaway_are_honoured() {
    let (addr, stop) = server(Some(1)).await;
    let client = connect(addr).await;
    // The server's SETTINGS arrive with the first exchange.
    let (resp, _tx) = client
        .send_request(&get("/warm"), true, None)
        .expect("send");
    let resp = tokio::time::timeout(T, resp)
        .await
        .expect("in time")
        .expect("response");
    drop(resp);
    let (resp, _tx) = client
        .send_request(&get("/slow"), true, None)
        .expect("send");
    let slow = tokio::time::timeout(T, resp)
        .await
        .expect("in time")
        .expect("response");
    assert!(
        !client.has_room(None),
        "the server allows one stream at a time"
    );
    assert_eq!(
        client.send_request(&get("/busy"), true, None).err(),
        Some(Error::Busy)
    );
    drop(slow);
    drop(_tx);
    for _ in 0..100 {
        if client.has_room(None) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(client.has_room(None));
    assert!(!client.has_room(Some(0)));
    // A graceful shutdown: GOAWAY; the client takes no new streams.
    stop.send(true).expect("stop");
    for _ in 0..100 {
        if client.is_closed() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(client.is_closed());
    assert!(matches!(
        client.send_request(&get("/late"), true, None),
        Err(Error::Closed(_))
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vanished_server_fails_requests_in_flight() {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let server = tokio::spawn(async move {
        let (sock, _) = listener.accept().await.expect("accept");
        let mut conn = h2::server::Builder::new()
            .handshake::<_, Bytes>(sock)
            .await
            .expect("handshake");
        // Takes the request, then drops the whole connection without answering.
        let _req = conn.accept().await;
    });
    let client = connect(addr).await;
    let (resp, _tx) = client
        .send_request(&get("/never"), true, None)
        .expect("send");
    let err = tokio::time::timeout(T, resp)
        .await
        .expect("in time")
        .expect_err("fails");
    assert!(matches!(err, Error::Closed(_) | Error::Reset(_)), "{err}");
    server.await.expect("server");
    for _ in 0..100 {
        if client.is_closed() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(client.is_closed());
}
