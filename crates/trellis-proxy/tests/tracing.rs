//! Distributed tracing through two proxies (outbound → inbound → app) with a fixture OTLP
//! collector on loopback (OTLP/HTTP, protobuf, decoded here): a trace keeps its id through
//! both hops, each proxy reports one span (CLIENT, then SERVER, parent to child), B3 in
//! comes out as B3 and W3C, and sampling follows the upstream decision, else the
//! percentage (0 % and 100 %).

mod common;
use common::{outbound_on, start_with_stats};

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
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
use trellis_proxy::trace::otlp::{AnyValue, ExportTraceServiceRequest, KeyValue, OtlpSpan};
use trellis_testkit::HttpServer;
use trellis_testkit::http_client::{HttpClient, HttpResponse};

const LIMIT: Duration = Duration::from_secs(20);

type Spans = Arc<Mutex<Vec<(String, OtlpSpan)>>>;

/// A fixture collector: the spans it was given (each with its resource's `service.name`)
/// and the number of exports that brought them.
struct Collector {
    addr: SocketAddr,
    spans: Spans,
    exports: Arc<AtomicUsize>,
}

/// What a collector speaks.
#[derive(Clone, Copy, PartialEq)]
enum Wire {
    /// `POST /v1/traces`, OTLP protobuf.
    OtlpHttp,
    /// `POST /api/v2/spans`, Zipkin v2 JSON (decoded into the OTLP form here).
    Zipkin,
}

/// An HTTP/1.1 collector on loopback.
async fn collector() -> (SocketAddr, Spans) {
    let c = http_collector(Wire::OtlpHttp).await;
    (c.addr, c.spans)
}

async fn http_collector(wire: Wire) -> Collector {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let spans: Spans = Arc::default();
    let exports = Arc::new(AtomicUsize::new(0));
    let (kept, counted) = (Arc::clone(&spans), Arc::clone(&exports));
    tokio::spawn(async move {
        while let Ok((mut sock, _)) = listener.accept().await {
            let (kept, counted) = (Arc::clone(&kept), Arc::clone(&counted));
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
                    let body = &buf[end + 4..end + 4 + len];
                    match wire {
                        Wire::OtlpHttp => {
                            assert!(head.starts_with("post /v1/traces "), "{head}");
                            assert!(
                                head.contains("content-type: application/x-protobuf"),
                                "{head}"
                            );
                            let req =
                                ExportTraceServiceRequest::decode(body).expect("OTLP protobuf");
                            keep(&kept, req);
                        }
                        Wire::Zipkin => {
                            assert!(head.starts_with("post /api/v2/spans "), "{head}");
                            assert!(head.contains("content-type: application/json"), "{head}");
                            keep_zipkin(&kept, body);
                        }
                    }
                    counted.fetch_add(1, Ordering::SeqCst);
                    let _ = sock
                        .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
                        .await;
                    return;
                }
            });
        }
    });
    Collector {
        addr,
        spans,
        exports,
    }
}

/// A collector of OTLP over gRPC (h2c, `TraceService/Export`), answering grpc-status 0.
/// With `one_call_each`, it closes each connection a moment after its first call (as a
/// collector that restarts, or a load balancer that drops idle connections, does).
async fn grpc_collector(one_call_each: bool) -> Collector {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let spans: Spans = Arc::default();
    let exports = Arc::new(AtomicUsize::new(0));
    let (kept, counted) = (Arc::clone(&spans), Arc::clone(&exports));
    tokio::spawn(async move {
        while let Ok((sock, _)) = listener.accept().await {
            let (kept, counted) = (Arc::clone(&kept), Arc::clone(&counted));
            tokio::spawn(async move {
                let Ok(mut conn) = h2::server::handshake(sock).await else {
                    return;
                };
                if one_call_each {
                    // Calls are served until 200 ms after the first; then the connection
                    // is dropped (closed).
                    let mut until = None;
                    loop {
                        let next = match until {
                            None => conn.accept().await,
                            Some(t) => match tokio::time::timeout_at(t, conn.accept()).await {
                                Ok(next) => next,
                                Err(_) => return,
                            },
                        };
                        let Some(Ok((req, respond))) = next else {
                            return;
                        };
                        let (kept, counted) = (Arc::clone(&kept), Arc::clone(&counted));
                        tokio::spawn(export_call(req, respond, kept, counted));
                        until.get_or_insert(
                            tokio::time::Instant::now() + Duration::from_millis(200),
                        );
                    }
                }
                // The connection is driven by `accept`: each call is served in a task.
                while let Some(Ok((req, respond))) = conn.accept().await {
                    let (kept, counted) = (Arc::clone(&kept), Arc::clone(&counted));
                    tokio::spawn(export_call(req, respond, kept, counted));
                }
            });
        }
    });
    Collector {
        addr,
        spans,
        exports,
    }
}

/// One `Export` call: its spans kept, grpc-status 0 in the trailers.
async fn export_call(
    req: http::Request<h2::RecvStream>,
    mut respond: h2::server::SendResponse<Bytes>,
    kept: Spans,
    counted: Arc<AtomicUsize>,
) {
    assert_eq!(
        req.uri().path(),
        "/opentelemetry.proto.collector.trace.v1.TraceService/Export"
    );
    assert_eq!(req.headers()["content-type"], "application/grpc");
    let mut body = req.into_body();
    let mut framed = Vec::new();
    while let Some(Ok(data)) = body.data().await {
        let _ = body.flow_control().release_capacity(data.len());
        framed.extend_from_slice(&data);
    }
    // One gRPC message: flag, length, then the message.
    assert_eq!(framed[0], 0, "not compressed");
    let len = u32::from_be_bytes([framed[1], framed[2], framed[3], framed[4]]);
    assert_eq!(framed.len(), 5 + len as usize);
    keep(
        &kept,
        ExportTraceServiceRequest::decode(&framed[5..]).expect("OTLP protobuf"),
    );
    counted.fetch_add(1, Ordering::SeqCst);
    let head = http::Response::builder()
        .header("content-type", "application/grpc")
        .body(())
        .expect("response");
    let Ok(mut stream) = respond.send_response(head, false) else {
        return;
    };
    let mut trailers = http::HeaderMap::new();
    trailers.insert("grpc-status", http::HeaderValue::from_static("0"));
    let _ = stream.send_trailers(trailers);
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

/// Keeps Zipkin v2 spans in the OTLP form (ids from hex, kind SERVER 2 / CLIENT 3, tags as
/// attributes).
fn keep_zipkin(spans: &Spans, body: &[u8]) {
    let list: Vec<serde_json::Value> = serde_json::from_slice(body).expect("Zipkin JSON");
    let unhex = |v: &serde_json::Value| -> Vec<u8> {
        let s = v.as_str().unwrap_or("");
        (0..s.len() / 2)
            .map(|i| u8::from_str_radix(&s[2 * i..2 * i + 2], 16).expect("hex"))
            .collect()
    };
    let mut kept = spans.lock().expect("lock");
    for z in list {
        let attributes = z["tags"]
            .as_object()
            .expect("tags")
            .iter()
            .map(|(k, v)| KeyValue {
                key: k.clone(),
                value: Some(AnyValue {
                    string_value: v.as_str().map(str::to_string),
                }),
            })
            .collect();
        let start = z["timestamp"].as_u64().expect("timestamp") * 1000;
        let span = OtlpSpan {
            trace_id: unhex(&z["traceId"]),
            span_id: unhex(&z["id"]),
            parent_span_id: unhex(&z["parentId"]),
            name: z["name"].as_str().expect("name").to_string(),
            kind: match z["kind"].as_str() {
                Some("SERVER") => 2,
                Some("CLIENT") => 3,
                other => panic!("kind {other:?}"),
            },
            start_time_unix_nano: start,
            end_time_unix_nano: start + z["duration"].as_u64().expect("duration") * 1000,
            attributes,
            status: None,
        };
        let service = z["localEndpoint"]["serviceName"]
            .as_str()
            .expect("serviceName")
            .to_string();
        kept.push((service, span));
    }
}

/// A provider's fields after its name: `kind`, the collector's address, then `more`
/// (`"\n      field: value"` lines).
fn provider_fields(kind: &str, collector: SocketAddr, more: &str) -> String {
    format!(
        "kind: {kind}\n      service: \"{}\"\n      port: {}{more}",
        collector.ip(),
        collector.port()
    )
}

/// The trace id of the `traceparent` the app received.
fn trace_of(resp: &HttpResponse) -> String {
    let tp = echoed(resp, "traceparent");
    tp.split('-').nth(1).expect("trace id").to_string()
}

/// A trace's CLIENT and SERVER spans, the server span the client's child.
fn client_and_server(found: &[(String, OtlpSpan)]) -> (&(String, OtlpSpan), &(String, OtlpSpan)) {
    let client = found
        .iter()
        .find(|(_, s)| s.kind == 3)
        .expect("a CLIENT span");
    let server = found
        .iter()
        .find(|(_, s)| s.kind == 2)
        .expect("a SERVER span");
    assert_eq!(server.1.parent_span_id, client.1.span_id, "parent link");
    (client, server)
}

fn telemetry(collector: SocketAddr, sampling: f64) -> String {
    tracing_yaml(
        &provider_fields("opentelemetry", collector, "\n      path: /v1/traces"),
        sampling,
        "",
    )
}

/// A Telemetry that traces both sides to one provider (`provider`: its fields after the
/// name), with `extra` fields for the tracing entry.
fn tracing_yaml(provider: &str, sampling: f64, extra: &str) -> String {
    format!(
        r#"  telemetry:
    tracing:
    - mode: CLIENT_AND_SERVER
      providers: [p]
      randomSamplingPercentage: {sampling}
{extra}    providers:
    - name: p
      {provider}
"#
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
    let (inbound, outbound, front, _) = mesh_with(app, &telemetry(collector, sampling)).await;
    (inbound, outbound, front)
}

/// The same with any telemetry (`tracing_yaml`): also the outbound proxy's stats address.
async fn mesh_with(
    app: &HttpServer,
    telemetry: &str,
) -> (
    trellis_proxy::ProxyHandle,
    trellis_proxy::ProxyHandle,
    SocketAddr,
    SocketAddr,
) {
    let inbound_yaml = format!(
        "version: in\nworkload:\n  name: reviews-v1\n  namespace: shop\n  serviceAccount: reviews\n  labels: {{app: reviews, version: v1}}\n  inboundPorts: [{{port: {}, name: http}}]\n{}",
        app.addr.port(),
        telemetry
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
        telemetry
    );
    let (outbound, stats) = start_with_stats(
        &outbound_yaml,
        outbound_on("reviews.shop.svc.cluster.local", 9080),
    )
    .await;
    let front = outbound.outbound_addrs[0];
    (inbound, outbound, front, stats)
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
    // (The server span is the client span's child.)
    let (client, server) = client_and_server(&found);
    assert_eq!(
        hex(&client.1.parent_span_id),
        "00f067aa0ba902b7",
        "the caller's span is the parent"
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
    let (client, _) = client_and_server(&found);
    assert!(client.1.parent_span_id.is_empty());
}

/// A counter's value from a proxy's `/stats/prometheus`.
async fn counter(stats: SocketAddr, name: &str) -> u64 {
    let mut client = HttpClient::http1(stats).await.expect("connect");
    let req = client
        .request(Method::GET, &stats.to_string(), "/stats/prometheus")
        .body(Empty::<Bytes>::new())
        .expect("request");
    let resp = timeout(LIMIT, client.send(req))
        .await
        .expect("in time")
        .expect("scrape");
    let text = String::from_utf8_lossy(&resp.body).to_string();
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
        .unwrap_or_else(|| panic!("no {name} in {text}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_opentelemetry_provider_without_http_gets_otlp_over_grpc() {
    let app = HttpServer::start().await.expect("app");
    let c = grpc_collector(false).await;
    // What the control plane sends for `opentelemetry: {service, port}` (no `http`).
    let provider = provider_fields("opentelemetry", c.addr, "\n      grpc: true");
    let (_inbound, _outbound, front, _) =
        mesh_with(&app, &tracing_yaml(&provider, 100.0, "")).await;
    // Two traces, far enough apart to leave in two exports on the one connection.
    let mut traces = Vec::new();
    for _ in 0..2 {
        traces.push(trace_of(&get(front, &[]).await));
        spans_of(&c.spans, &traces[traces.len() - 1], 2).await;
    }
    for trace in &traces {
        let found = spans_of(&c.spans, trace, 2).await;
        let (client, _) = client_and_server(&found);
        assert_eq!(client.0, "web.shop");
    }
    assert!(c.exports.load(Ordering::SeqCst) >= 2);
}

/// The exporter keeps its gRPC connection between batches; when the collector has closed
/// it meanwhile, the batch goes again on a new connection instead of being lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_grpc_connection_the_collector_closed_is_replaced_without_losing_a_batch() {
    let app = HttpServer::start().await.expect("app");
    let c = grpc_collector(true).await;
    let provider = provider_fields("opentelemetry", c.addr, "\n      grpc: true");
    let (_inbound, _outbound, front, _) =
        mesh_with(&app, &tracing_yaml(&provider, 100.0, "")).await;
    for _ in 0..3 {
        let trace = trace_of(&get(front, &[]).await);
        let found = spans_of(&c.spans, &trace, 2).await;
        client_and_server(&found);
        // Past the moment the collector closes the connection the batch went on.
        tokio::time::sleep(Duration::from_millis(400)).await;
    }
    assert!(c.exports.load(Ordering::SeqCst) >= 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn zipkin_gets_v2_json_spans_in_batches() {
    let app = HttpServer::start().await.expect("app");
    let c = http_collector(Wire::Zipkin).await;
    let provider = provider_fields("zipkin", c.addr, "");
    let (_inbound, _outbound, front, _) =
        mesh_with(&app, &tracing_yaml(&provider, 100.0, "")).await;
    // 40 requests back to back: 80 spans, which leave in a few batches, not 80 posts.
    let mut traces = Vec::new();
    for _ in 0..40 {
        traces.push(trace_of(&get(front, &[]).await));
    }
    for trace in &traces {
        let found = spans_of(&c.spans, trace, 2).await;
        let (client, server) = client_and_server(&found);
        assert!(client.1.parent_span_id.is_empty(), "a new trace's root");
        assert_eq!(
            (client.0.as_str(), server.0.as_str()),
            ("web.shop", "reviews.shop")
        );
        assert_eq!(attr(&server.1, "http.status_code"), "200");
        assert_eq!(attr(&client.1, "upstream_cluster"), "reviews");
    }
    let exports = c.exports.load(Ordering::SeqCst);
    assert!(
        (1..=20).contains(&exports),
        "80 spans came in {exports} exports"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn custom_tags_and_sampling_by_request_id() {
    let app = HttpServer::start().await.expect("app");
    let c = http_collector(Wire::OtlpHttp).await;
    let provider = provider_fields("opentelemetry", c.addr, "");
    let extra = "      customTags:\n        team: {literal: payments}\n        path_var: {environment: PATH}\n        unset_var: {environment: TRELLIS_TEST_SURELY_UNSET, defaultValue: none}\n        user: {header: x-user, defaultValue: anonymous}\n";
    let (_inbound, _outbound, front, _) =
        mesh_with(&app, &tracing_yaml(&provider, 50.0, extra)).await;

    // At 50 %, by request id (the default): each id is always sampled or never; some of
    // these twelve are sampled and some not (fixed ids: the outcome is the same every run).
    let ids: Vec<String> = (0..12).map(|i| format!("req-id-{i}")).collect();
    let mut sampled_per_id = Vec::new();
    for id in &ids {
        let mut sampled = 0;
        for _ in 0..3 {
            let resp = get(front, &[("x-request-id", id), ("x-user", "alice")]).await;
            if echoed(&resp, "traceparent").ends_with("-01") {
                sampled += 1;
            }
        }
        sampled_per_id.push(sampled);
    }
    assert!(
        sampled_per_id.iter().all(|n| *n == 0 || *n == 3),
        "{sampled_per_id:?}"
    );
    assert!(sampled_per_id.contains(&0) && sampled_per_id.contains(&3));

    // The custom tags, on both sides' spans.
    let i = sampled_per_id
        .iter()
        .position(|n| *n == 3)
        .expect("one sampled");
    // A header tag takes the request's header, else its default.
    for (user, seen) in [(Some("alice"), "alice"), (None, "anonymous")] {
        let mut headers = vec![("x-request-id", ids[i].as_str())];
        headers.extend(user.map(|u| ("x-user", u)));
        let trace = trace_of(&get(front, &headers).await);
        for (_, span) in spans_of(&c.spans, &trace, 2).await {
            assert_eq!(attr(&span, "team"), "payments");
            let path = std::env::var("PATH").unwrap_or_default();
            assert_eq!(attr(&span, "path_var"), &path[..path.len().min(256)]);
            assert_eq!(attr(&span, "unset_var"), "none");
            assert_eq!(attr(&span, "user"), seen);
            assert_eq!(attr(&span, "guid:x-request-id"), ids[i]);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_request_id_sampling_each_request_rolls_its_own() {
    let app = HttpServer::start().await.expect("app");
    let c = http_collector(Wire::OtlpHttp).await;
    let provider = provider_fields("opentelemetry", c.addr, "");
    let extra = "      useRequestIdForTraceSampling: false\n";
    let (_inbound, _outbound, front, _) =
        mesh_with(&app, &tracing_yaml(&provider, 50.0, extra)).await;
    // One id, 24 requests: both decisions come (all alike: one chance in 8 million).
    let mut sampled = 0;
    for _ in 0..24 {
        let resp = get(front, &[("x-request-id", "one-id")]).await;
        if echoed(&resp, "traceparent").ends_with("-01") {
            sampled += 1;
        }
    }
    assert!((1..24).contains(&sampled), "{sampled} of 24 sampled");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_collector_that_never_answers_holds_no_request_and_its_spans_are_counted_dropped() {
    let app = HttpServer::start().await.expect("app");
    // Accepts, never reads, never answers.
    let silent = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = silent.local_addr().expect("addr");
    let held = Arc::new(Mutex::new(Vec::new()));
    let keep_open = Arc::clone(&held);
    tokio::spawn(async move {
        while let Ok((sock, _)) = silent.accept().await {
            keep_open.lock().expect("lock").push(sock);
        }
    });
    let provider = provider_fields(
        "opentelemetry",
        addr,
        "\n      path: /v1/traces\n      timeout: 1s",
    );
    let (_inbound, _outbound, front, stats) =
        mesh_with(&app, &tracing_yaml(&provider, 100.0, "")).await;
    let before = counter(stats, "trellis_proxy_spans_dropped_total").await;
    // 30 requests finish without waiting on the collector (its exports wait a second
    // each: had a request waited for one, these would take 30 s and more).
    let all = timeout(Duration::from_secs(10), async {
        for _ in 0..30 {
            get(front, &[]).await;
        }
    })
    .await;
    assert!(all.is_ok(), "requests waited on the collector");
    // Their 60 spans are dropped (timed out) and counted.
    let mut dropped = 0;
    for _ in 0..100 {
        dropped = counter(stats, "trellis_proxy_spans_dropped_total").await - before;
        if dropped >= 60 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(dropped >= 60, "{dropped} spans counted dropped");
}
