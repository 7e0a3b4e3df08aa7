//! The lean HTTP/1.1 upstream client against a scripted app that answers with exact
//! bytes: every way a response body can be delimited, interim responses, connections the
//! app closes while they sit in the pool, and responses that must be refused.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use http::Method;
use http_body_util::BodyExt;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::time::timeout;
use trellis_proxy::{Config, ProxyHandle, ProxyOptions};
use trellis_testkit::http_client::{self, HttpClient};
use trellis_xds::snapshot::Snapshot;

const LIMIT: Duration = Duration::from_secs(20);

/// What the scripted app does with one request.
struct Reply {
    bytes: Vec<u8>,
    /// Close the connection after writing.
    close: bool,
}

fn reply(bytes: &str) -> Reply {
    Reply {
        bytes: bytes.as_bytes().to_vec(),
        close: false,
    }
}

/// A scripted app: answers the n-th request it receives (over all connections) with
/// `script(n, request)`. Records connections and the raw requests.
struct App {
    addr: SocketAddr,
    conns: Arc<AtomicUsize>,
    requests: Arc<Mutex<Vec<String>>>,
}

async fn app(script: impl Fn(usize, &str) -> Reply + Send + Sync + 'static) -> App {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let conns = Arc::new(AtomicUsize::new(0));
    let requests = Arc::new(Mutex::new(Vec::new()));
    let script = Arc::new(script);
    let (c, r) = (Arc::clone(&conns), Arc::clone(&requests));
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            c.fetch_add(1, Ordering::SeqCst);
            let (script, r) = (Arc::clone(&script), Arc::clone(&r));
            tokio::spawn(async move {
                let mut buf = Vec::new();
                // Bounded: one connection carries at most 100 requests in these tests.
                for _ in 0..100 {
                    // Read one request: head, then a content-length body if any.
                    let head_end = loop {
                        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                            break i + 4;
                        }
                        let mut chunk = [0u8; 4096];
                        match s.read(&mut chunk).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => buf.extend_from_slice(&chunk[..n]),
                        }
                    };
                    let head = String::from_utf8_lossy(&buf[..head_end]).to_lowercase();
                    let len = head
                        .lines()
                        .find_map(|l| l.strip_prefix("content-length:"))
                        .and_then(|v| v.trim().parse::<usize>().ok())
                        .unwrap_or(0);
                    while buf.len() < head_end + len {
                        let mut chunk = [0u8; 4096];
                        match s.read(&mut chunk).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => buf.extend_from_slice(&chunk[..n]),
                        }
                    }
                    let request: Vec<u8> = buf.drain(..head_end + len).collect();
                    let request = String::from_utf8_lossy(&request).into_owned();
                    let n = {
                        let mut all = r.lock().unwrap_or_else(PoisonError::into_inner);
                        all.push(request.clone());
                        all.len()
                    };
                    let out = script(n, &request);
                    if s.write_all(&out.bytes).await.is_err() {
                        return;
                    }
                    if out.close {
                        let _ = s.shutdown().await;
                        return;
                    }
                }
            });
        }
    });
    App {
        addr,
        conns,
        requests,
    }
}

/// An inbound proxy in front of the app's port.
async fn inbound(app: &App, extra: &str) -> ProxyHandle {
    let port = app.addr.port();
    let raw = Snapshot::from_text(
        &format!(
            "workload:\n  name: app\n  inboundPorts:\n  - {{port: {port}, name: http}}\n{extra}"
        ),
        "h1.yaml",
    )
    .expect("snapshot");
    trellis_proxy::start(
        Config::from_wire(raw, None).expect("converts"),
        ProxyOptions {
            inbound_listen: vec![("127.0.0.1:0".parse().expect("addr"), port)],
            ..ProxyOptions::default()
        },
    )
    .await
    .expect("proxy")
}

/// An outbound proxy for `app:80` whose one endpoint is the app (no proxy in front of it).
/// Its default retry policy makes it hold small request bodies in full.
async fn outbound(app: &App) -> ProxyHandle {
    outbound_with(app, "").await
}

/// `outbound`, with more settings for the app's cluster (YAML lines, indented by two).
async fn outbound_with(app: &App, cluster: &str) -> ProxyHandle {
    let raw = Snapshot::from_text(
        &format!(
            "services:\n- hostname: app.default.svc.cluster.local\n  ports: [{{port: 80, name: http, cluster: app}}]\nclusters:\n- name: app\n  endpoints: [{{address: \"{}\"}}]\n{cluster}",
            app.addr
        ),
        "h1-out.yaml",
    )
    .expect("snapshot");
    trellis_proxy::start(
        Config::from_wire(raw, None).expect("converts"),
        ProxyOptions {
            outbound_listen: vec![("127.0.0.1:0".parse().expect("addr"), "app".to_string(), 80)],
            ..ProxyOptions::default()
        },
    )
    .await
    .expect("proxy")
}

#[tokio::test]
async fn every_body_framing_arrives_whole_and_reusable_connections_are_reused() {
    let app = app(|n, _| match n {
        1 => reply("HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nhello"),
        2 => reply("HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhello\r\n6;x=y\r\n world\r\n0\r\n\r\n"),
        3 => reply("HTTP/1.1 204 No Content\r\n\r\n"),
        4 => reply("HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\n"), // a HEAD request
        _ => Reply {
            bytes: b"HTTP/1.1 200 OK\r\n\r\nuntil the end".to_vec(),
            close: true,
        },
    })
    .await;
    let p = inbound(&app, "").await;
    let mut c = HttpClient::http1(p.inbound_addrs[0])
        .await
        .expect("connect");
    let run = async {
        let r = c.get("app", "/a").await.expect("length");
        assert_eq!((r.status.as_u16(), &r.body[..]), (200, &b"hello"[..]));
        let r = c.get("app", "/b").await.expect("chunked");
        assert_eq!((r.status.as_u16(), &r.body[..]), (200, &b"hello world"[..]));
        let r = c.get("app", "/c").await.expect("204");
        assert_eq!((r.status.as_u16(), r.body.len()), (204, 0));
        let req = c
            .request(Method::HEAD, "app", "/d")
            .body(
                http_body_util::Empty::new()
                    .map_err(|e| match e {})
                    .boxed_unsync(),
            )
            .expect("request");
        let r = c.send(req).await.expect("head");
        assert_eq!((r.status.as_u16(), r.body.len()), (200, 0));
        assert_eq!(r.header("content-length"), Some("100"));
        let r = c.get("app", "/f").await.expect("until close");
        assert_eq!(
            (r.status.as_u16(), &r.body[..]),
            (200, &b"until the end"[..])
        );
    };
    timeout(LIMIT, run).await.expect("in time");
    // Five exchanges on one kept-alive connection; the close-delimited one ended it.
    assert_eq!(app.conns.load(Ordering::SeqCst), 1);
    let requests = app
        .requests
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .clone();
    assert!(
        requests[3].starts_with("HEAD /d HTTP/1.1\r\n"),
        "{:?}",
        requests[3]
    );
    // The next request needs (and gets) a new connection.
    let r = timeout(LIMIT, http_client::get(p.inbound_addrs[0], "app", "/g"))
        .await
        .expect("in time")
        .expect("after close");
    assert_eq!(r.status.as_u16(), 200);
    assert_eq!(app.conns.load(Ordering::SeqCst), 2);
}

#[tokio::test]
async fn a_buffered_body_goes_with_its_length_and_interim_responses_are_skipped() {
    let app = app(|_, _| {
        reply("HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 201 Created\r\ncontent-length: 2\r\n\r\nok")
    })
    .await;
    let p = outbound(&app).await;
    let mut c = HttpClient::http1(p.outbound_addrs[0])
        .await
        .expect("connect");
    let run = async {
        for _ in 0..3 {
            let r = c.post("app", "/e", "payload").await.expect("post");
            assert_eq!((r.status.as_u16(), &r.body[..]), (201, &b"ok"[..]));
        }
    };
    timeout(LIMIT, run).await.expect("in time");
    assert_eq!(app.conns.load(Ordering::SeqCst), 1);
    let requests = app
        .requests
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .clone();
    assert_eq!(requests.len(), 3);
    for r in &requests {
        assert!(
            r.starts_with("POST /e HTTP/1.1\r\n") && r.ends_with("\r\n\r\npayload"),
            "{r:?}"
        );
        assert_eq!(
            r.to_lowercase().matches("content-length: 7\r\n").count(),
            1,
            "{r:?}"
        );
    }
}

#[tokio::test]
async fn chunked_trailers_reach_an_http2_client() {
    let app = app(|_, _| {
        reply("HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n2\r\nhi\r\n0\r\ngrpc-status: 7\r\n\r\n")
    })
    .await;
    let p = inbound(&app, "").await;
    // As a peer proxy would send it: HTTP/2, with the app's version in a header.
    let mut c = HttpClient::h2c(p.inbound_addrs[0]).await.expect("connect");
    let req = c
        .request(Method::GET, "app", "/t")
        .header("x-trellis-downstream-version", "1.1")
        .body(
            http_body_util::Empty::new()
                .map_err(|e| match e {})
                .boxed_unsync(),
        )
        .expect("request");
    let r = timeout(LIMIT, c.send(req))
        .await
        .expect("in time")
        .expect("response");
    assert_eq!((r.status.as_u16(), &r.body[..]), (200, &b"hi"[..]));
    let t = r.trailers.expect("trailers");
    assert_eq!(t.get("grpc-status").map(|v| v.as_bytes()), Some(&b"7"[..]));
    let requests = app
        .requests
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .clone();
    assert!(
        requests[0].starts_with("GET /t HTTP/1.1\r\n"),
        "{:?}",
        requests[0]
    );
}

#[tokio::test]
async fn a_connection_the_app_closed_while_pooled_is_not_used() {
    // The app closes every connection after its response, without saying so: the next
    // request must find that out and go on a new connection, not fail.
    let app = app(|_, _| Reply {
        bytes: b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok".to_vec(),
        close: true,
    })
    .await;
    let p = inbound(&app, "").await;
    let mut c = HttpClient::http1(p.inbound_addrs[0])
        .await
        .expect("connect");
    for i in 0..5 {
        let r = timeout(LIMIT, c.get("app", "/x"))
            .await
            .expect("in time")
            .expect("response");
        assert_eq!(r.status.as_u16(), 200, "request {i}: {:?}", r.body);
        // Let the close reach the proxy's idle connection.
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(app.conns.load(Ordering::SeqCst), 5);
    // A POST is never sent twice, so it must not be written to a dead connection at all.
    let out = outbound(&app).await;
    let mut c = HttpClient::http1(out.outbound_addrs[0])
        .await
        .expect("connect");
    for i in 0..3 {
        let r = timeout(LIMIT, c.post("app", "/y", "body"))
            .await
            .expect("in time")
            .expect("response");
        assert_eq!(r.status.as_u16(), 200, "POST {i}: {:?}", r.body);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(app.conns.load(Ordering::SeqCst), 8);
}

#[tokio::test]
async fn a_close_racing_the_request_is_retried_for_idempotent_methods_only() {
    // The app reads the second request on a connection and closes without answering: the
    // race a keep-alive timeout makes. A GET goes again on a new connection (the inbound
    // proxy has no retry policy: this is the client's own resend); a POST is not sent twice.
    let app = app(|n, req| {
        if (req.starts_with("GET /second") && n == 2) || req.starts_with("POST /second") {
            Reply {
                bytes: Vec::new(),
                close: true,
            }
        } else {
            reply("HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
        }
    })
    .await;
    let p = inbound(&app, "").await;
    let mut c = HttpClient::http1(p.inbound_addrs[0])
        .await
        .expect("connect");
    let run = async {
        assert_eq!(
            c.get("app", "/first").await.expect("first").status.as_u16(),
            200
        );
        let r = c.get("app", "/second").await.expect("second");
        assert_eq!(r.status.as_u16(), 200, "{:?}", r.body);
    };
    timeout(LIMIT, run).await.expect("in time");
    assert_eq!(app.conns.load(Ordering::SeqCst), 2);
    // The POST through an outbound proxy, where the body is held in full (the lean client).
    let out = outbound(&app).await;
    let mut c = HttpClient::http1(out.outbound_addrs[0])
        .await
        .expect("connect");
    let run = async {
        assert_eq!(
            c.get("app", "/first").await.expect("first").status.as_u16(),
            200
        );
        let r = c.post("app", "/second", "once").await.expect("second");
        assert_eq!(r.status.as_u16(), 503, "{:?}", r.body);
        assert_eq!(r.header("x-trellis-response-flags"), Some("UC"));
    };
    timeout(LIMIT, run).await.expect("in time");
    let posts = app
        .requests
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .iter()
        .filter(|r| r.starts_with("POST"))
        .count();
    assert_eq!(posts, 1);
}

#[tokio::test]
async fn malformed_responses_are_refused_with_503() {
    for bad in [
        "HTTP/1.1 200 OK\r\ncontent-length: 2\r\ncontent-length: 3\r\n\r\nok",
        "HTTP/1.1 200 OK\r\ncontent-length: nope\r\n\r\n",
        "HTTP/1.1 2000 Odd\r\n\r\n",
        "this is not http\r\n\r\n",
        "HTTP/1.1 101 Switching Protocols\r\n\r\n",
    ] {
        let app = app(move |_, _| Reply {
            bytes: bad.as_bytes().to_vec(),
            close: true,
        })
        .await;
        let p = inbound(&app, "").await;
        let r = timeout(LIMIT, http_client::get(p.inbound_addrs[0], "app", "/"))
            .await
            .expect("in time")
            .expect("response");
        assert_eq!(r.status.as_u16(), 503, "{bad:?}: {:?}", r.body);
        assert_eq!(r.header("x-trellis-response-flags"), Some("UC"), "{bad:?}");
    }
}

#[tokio::test]
async fn a_body_cut_short_ends_the_downstream_response_in_error() {
    let app = app(|_, _| Reply {
        bytes: b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\nonly this".to_vec(),
        close: true,
    })
    .await;
    let p = inbound(&app, "").await;
    let r = timeout(LIMIT, http_client::get(p.inbound_addrs[0], "app", "/"))
        .await
        .expect("in time");
    // The status went out before the body failed: the client sees a broken body.
    assert!(r.is_err(), "{r:?}");
}

#[tokio::test]
async fn connections_idle_past_the_cluster_timeout_are_not_reused() {
    let app = app(|_, _| reply("HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")).await;
    let p = outbound_with(&app, "  idleTimeout: 150ms\n").await;
    let mut c = HttpClient::http1(p.outbound_addrs[0])
        .await
        .expect("connect");
    let run = async {
        assert_eq!(c.get("app", "/1").await.expect("1").status.as_u16(), 200);
        tokio::time::sleep(Duration::from_millis(400)).await;
        assert_eq!(c.get("app", "/2").await.expect("2").status.as_u16(), 200);
        assert_eq!(c.get("app", "/3").await.expect("3").status.as_u16(), 200);
    };
    timeout(LIMIT, run).await.expect("in time");
    // The first connection idled out; the second carried requests 2 and 3.
    assert_eq!(app.conns.load(Ordering::SeqCst), 2);
}
