//! Distributed tracing through two proxies (outbound → inbound → app) with a fixture OTLP
//! collector on loopback (OTLP/HTTP, protobuf, decoded here): a trace keeps its id through
//! both hops, each proxy reports one span (CLIENT, then SERVER, parent to child), B3 in
//! comes out as B3 and W3C, and sampling follows the upstream decision, else the
//! percentage (0 % and 100 %).

mod common;
use common::start_with_stats;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::Method;
use http_body_util::Empty;
use prost::Message as _;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::time::timeout;
use trellis_proxy::ProxyOptions;
use trellis_proxy::trace::otlp::{ExportTraceServiceRequest, OtlpSpan};
use trellis_testkit::HttpServer;
use trellis_testkit::http_client::{HttpClient, HttpResponse};

const LIMIT: Duration = Duration::from_secs(20);

type Spans = Arc<Mutex<Vec<(String, OtlpSpan)>>>;

/// A collector: `POST /v1/traces` with an OTLP protobuf body; each span is kept with the
/// `service.name` of its resource.
async fn collector() -> (SocketAddr, Spans) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let spans: Spans = Arc::default();
    let kept = Arc::clone(&spans);
    tokio::spawn(async move {
        while let Ok((mut sock, _)) = listener.accept().await {
            let kept = Arc::clone(&kept);
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut chunk = [0u8; 16384];
                // Bounded: a request head, then its Content-Length of body.
                for _ in 0..1000 {
                    let Ok(n) = sock.read(&mut chunk).await else {
                        return;
                    };
                    if n == 0 {
                        return;
                    }
                    buf.extend_from_slice(&chunk[..n]);
                    let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") else {
                        continue;
                    };
                    let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
                    let len: usize = head
                        .lines()
                        .find_map(|l| l.strip_prefix("content-length:"))
                        .and_then(|v| v.trim().parse().ok())
                        .unwrap_or(0);
                    if buf.len() < end + 4 + len {
                        continue;
                    }
                    assert!(head.starts_with("post /v1/traces "), "{head}");
                    assert!(
                        head.contains("content-type: application/x-protobuf"),
                        "{head}"
                    );
                    let req = ExportTraceServiceRequest::decode(&buf[end + 4..end + 4 + len])
                        .expect("OTLP protobuf");
                    keep(&kept, req);
                    let _ = sock
                        .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
                        .await;
                    return;
                }
            });
        }
    });
    (addr, spans)
}

/// Keeps each span of an export with its resource's `service.name`.
fn keep(spans: &Spans, req: ExportTraceServiceRequest) {
    let mut kept = spans.lock().expect("lock");
    for rs in req.resource_spans {
        let service = rs
            .resource
            .as_ref()
            .and_then(|r| r.attributes.first())
            .and_then(|kv| kv.value.as_ref()?.string_value.clone())
            .unwrap_or_default();
        for ss in rs.scope_spans {
            for s in ss.spans {
                kept.push((service.clone(), s));
            }
        }
    }
}

fn telemetry(collector: SocketAddr, sampling: f64) -> String {
    format!(
        r#"  telemetry:
    tracing:
    - mode: CLIENT_AND_SERVER
      providers: [otel]
      randomSamplingPercentage: {sampling}
    providers:
    - name: otel
      kind: opentelemetry
      service: "{ip}"
      port: {port}
      path: /v1/traces
"#,
        ip = collector.ip(),
        port = collector.port()
    )
}

/// An outbound and an inbound proxy in front of `app`, tracing at `sampling` percent:
/// the outbound proxy's listener.
async fn mesh(
    app: &HttpServer,
    collector: SocketAddr,
    sampling: f64,
) -> (
    trellis_proxy::ProxyHandle,
    trellis_proxy::ProxyHandle,
    SocketAddr,
) {
    let inbound_yaml = format!(
        "version: in\nworkload:\n  name: reviews-v1\n  namespace: shop\n  serviceAccount: reviews\n  labels: {{app: reviews, version: v1}}\n  inboundPorts: [{{port: {}, name: http}}]\n{}",
        app.addr.port(),
        telemetry(collector, sampling)
    );
    let (inbound, _) = start_with_stats(
        &inbound_yaml,
        ProxyOptions {
            inbound_listen: vec![("127.0.0.1:0".parse().expect("addr"), app.addr.port())],
            ..ProxyOptions::default()
        },
    )
    .await;
    let peer = inbound.inbound_addrs[0];
    let outbound_yaml = format!(
        "version: out\nworkload:\n  name: web\n  namespace: shop\n  serviceAccount: web\n  labels: {{app: web, version: v2}}\n{}services:\n- hostname: reviews.shop.svc.cluster.local\n  ports: [{{port: 9080, name: http, cluster: reviews}}]\nclusters:\n- name: reviews\n  endpoints: [{{address: \"{peer}\", proxied: true, workload: reviews-v1, namespace: shop}}]\n",
        telemetry(collector, sampling)
    );
    let (outbound, _) = start_with_stats(
        &outbound_yaml,
        ProxyOptions {
            outbound_listen: vec![(
                "127.0.0.1:0".parse().expect("addr"),
                "reviews.shop.svc.cluster.local".into(),
                9080,
            )],
            ..ProxyOptions::default()
        },
    )
    .await;
    let front = outbound.outbound_addrs[0];
    (inbound, outbound, front)
}

/// GET /echo through the mesh with `headers`; the app echoes what it received as
/// `x-echo-h-*`.
async fn get(front: SocketAddr, headers: &[(&str, &str)]) -> HttpResponse {
    let mut client = HttpClient::http1(front).await.expect("connect");
    let mut req = client.request(Method::GET, "reviews.shop.svc.cluster.local:9080", "/echo");
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let resp = timeout(
        LIMIT,
        client.send(req.body(Empty::<Bytes>::new()).expect("request")),
    )
    .await
    .expect("in time")
    .expect("response");
    assert_eq!(resp.status, 200);
    resp
}

fn echoed<'a>(resp: &'a HttpResponse, name: &str) -> &'a str {
    resp.headers
        .get(format!("x-echo-h-{name}"))
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// The spans of `trace` once there are `n` of them (bounded wait: spans leave in batches).
async fn spans_of(spans: &Spans, trace: &str, n: usize) -> Vec<(String, OtlpSpan)> {
    for _ in 0..100 {
        let found: Vec<(String, OtlpSpan)> = spans
            .lock()
            .expect("lock")
            .iter()
            .filter(|(_, s)| hex(&s.trace_id) == trace)
            .cloned()
            .collect();
        if found.len() >= n {
            return found;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("fewer than {n} spans of trace {trace}");
}

fn attr<'a>(s: &'a OtlpSpan, key: &str) -> &'a str {
    s.attributes
        .iter()
        .find(|kv| kv.key == key)
        .and_then(|kv| kv.value.as_ref()?.string_value.as_deref())
        .unwrap_or("")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trace_keeps_its_id_through_two_hops_with_linked_spans() {
    let app = HttpServer::start().await.expect("app");
    let (collector, spans) = collector().await;
    // Sampling 0 %: only upstream decisions make spans here.
    let (_inbound, _outbound, front) = mesh(&app, collector, 0.0).await;

    // W3C in, sampled by the caller.
    let trace = "4bf92f3577b34da6a3ce929d0e0e4736";
    let resp = get(
        front,
        &[(
            "traceparent",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        )],
    )
    .await;
    let seen = echoed(&resp, "traceparent");
    assert!(
        seen.starts_with(&format!("00-{trace}-")) && seen.ends_with("-01"),
        "{seen}"
    );
    let found = spans_of(&spans, trace, 2).await;
    let client = found
        .iter()
        .find(|(_, s)| s.kind == 3)
        .expect("a CLIENT span");
    let server = found
        .iter()
        .find(|(_, s)| s.kind == 2)
        .expect("a SERVER span");
    assert_eq!(
        hex(&client.1.parent_span_id),
        "00f067aa0ba902b7",
        "the caller's span is the parent"
    );
    assert_eq!(
        server.1.parent_span_id, client.1.span_id,
        "the server span is the client's child"
    );
    // The app's request carries the server span as its parent.
    assert_eq!(seen, format!("00-{trace}-{}-01", hex(&server.1.span_id)));
    assert_eq!(client.0, "web.shop");
    assert_eq!(server.0, "reviews.shop");
    assert_eq!(client.1.name, "reviews.shop.svc.cluster.local:9080/*");
    assert_eq!(attr(&client.1, "http.method"), "GET");
    assert_eq!(attr(&client.1, "http.status_code"), "200");
    assert_eq!(attr(&client.1, "upstream_cluster"), "reviews");
    assert_eq!(
        attr(&server.1, "http.url"),
        "http://reviews.shop.svc.cluster.local:9080/echo"
    );
    assert!(!attr(&server.1, "guid:x-request-id").is_empty());
    assert!(client.1.end_time_unix_nano >= client.1.start_time_unix_nano);

    // B3 in (sampled): B3 and W3C out, one trace.
    let b3_trace = "80f198ee56343ba864fe8b2a57d3eff7";
    let resp = get(
        front,
        &[
            ("x-b3-traceid", b3_trace),
            ("x-b3-spanid", "e457b5a2e4d86bd1"),
            ("x-b3-sampled", "1"),
        ],
    )
    .await;
    assert_eq!(echoed(&resp, "x-b3-traceid"), b3_trace);
    assert!(echoed(&resp, "traceparent").starts_with(&format!("00-{b3_trace}-")));
    assert_eq!(echoed(&resp, "x-b3-sampled"), "1");
    assert_eq!(spans_of(&spans, b3_trace, 2).await.len(), 2);

    // No context, 0 %: a trace starts, unsampled, and nothing is reported.
    let resp = get(front, &[]).await;
    let tp = echoed(&resp, "traceparent").to_string();
    assert!(tp.ends_with("-00"), "{tp}");
    let new_trace = tp.split('-').nth(1).expect("trace id").to_string();
    tokio::time::sleep(Duration::from_millis(600)).await;
    let reported = spans
        .lock()
        .expect("lock")
        .iter()
        .filter(|(_, s)| hex(&s.trace_id) == new_trace)
        .count();
    assert_eq!(reported, 0, "an unsampled trace reports nothing");
    // And a caller's "not sampled" is kept.
    let resp = get(
        front,
        &[(
            "traceparent",
            "00-11111111111111111111111111111111-2222222222222222-00",
        )],
    )
    .await;
    assert!(echoed(&resp, "traceparent").ends_with("-00"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn at_100_percent_every_new_trace_is_reported() {
    let app = HttpServer::start().await.expect("app");
    let (collector, spans) = collector().await;
    let (_inbound, _outbound, front) = mesh(&app, collector, 100.0).await;
    let resp = get(front, &[]).await;
    let tp = echoed(&resp, "traceparent").to_string();
    assert!(tp.ends_with("-01"), "{tp}");
    let trace = tp.split('-').nth(1).expect("trace id").to_string();
    let found = spans_of(&spans, &trace, 2).await;
    // A new trace: the client span is its root.
    let client = found
        .iter()
        .find(|(_, s)| s.kind == 3)
        .expect("a CLIENT span");
    assert!(client.1.parent_span_id.is_empty());
}
