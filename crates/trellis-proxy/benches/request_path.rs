//! Per-request work besides routing and load balancing: recording Istio's metrics for a
//! request, a VirtualService's header changes, hop-by-hop header removal, and reading
//! and writing the trace context.
//!
//! `cargo bench -p trellis-proxy --bench request_path`

use std::sync::Arc;
use std::time::Duration;

use criterion::{Criterion, black_box, criterion_group, criterion_main};
use http::{HeaderMap, HeaderName, HeaderValue};
use trellis_proxy::config::HeaderOps;
use trellis_proxy::metrics::{
    Enabled, HttpRequest, IstioMetrics, Reporter, ServiceMeta, WorkloadMeta,
};

/// A browser-like request head.
fn request_headers() -> HeaderMap {
    let mut h = HeaderMap::new();
    for (k, v) in [
        ("host", "reviews.shop.svc.cluster.local:9080"),
        (
            "user-agent",
            "Mozilla/5.0 (X11; Linux x86_64) Gecko/20100101 Firefox/120.0",
        ),
        ("accept", "text/html,application/xhtml+xml"),
        ("accept-encoding", "gzip, deflate, br"),
        ("x-request-id", "5c7a9e0e-0b4f-4c1d-9f0e-6d1f3f7f2a11"),
        ("end-user", "jason"),
        ("cookie", "session=abc123; theme=dark"),
        ("connection", "keep-alive"),
    ] {
        h.insert(HeaderName::from_static(k), HeaderValue::from_static(v));
    }
    h
}

fn bench(c: &mut Criterion) {
    let metrics = IstioMetrics::default();
    let labels = [("app", "web"), ("version", "v1")];
    let source = WorkloadMeta::of(
        "web-v1",
        "shop",
        Some("spiffe://cluster.local/ns/shop/sa/web"),
        labels.iter().copied(),
    );
    let labels = [("app", "reviews"), ("version", "v2")];
    let destination = WorkloadMeta::of(
        "reviews-v2",
        "shop",
        Some("spiffe://cluster.local/ns/shop/sa/reviews"),
        labels.iter().copied(),
    );
    let service = ServiceMeta::of("reviews.shop.svc.cluster.local");
    let request = HttpRequest {
        reporter: Reporter::Source,
        source: Arc::clone(&source),
        destination: Arc::clone(&destination),
        service: Arc::clone(&service),
        grpc: false,
        code: 200,
        grpc_status: None,
        flags: "-",
        mtls: true,
        duration: Duration::from_micros(830),
        request_bytes: 0,
        response_bytes: 1024,
        enabled: Enabled::ALL,
        tags: None,
    };
    c.bench_function("record a request's Istio metrics", |b| {
        b.iter(|| metrics.record_http(black_box(&request)))
    });

    let ops = HeaderOps {
        set: vec![(
            HeaderName::from_static("x-canary"),
            HeaderValue::from_static("reviews-v2"),
        )],
        add: vec![(
            HeaderName::from_static("x-trace-note"),
            HeaderValue::from_static("mesh"),
        )],
        remove: vec![HeaderName::from_static("cookie")],
    };
    let head = request_headers();
    c.bench_function("VirtualService headers: set, add and remove", |b| {
        b.iter_batched_ref(
            || head.clone(),
            |h| ops.apply(black_box(h)),
            criterion::BatchSize::SmallInput,
        )
    });
    c.bench_function("strip hop-by-hop headers", |b| {
        b.iter_batched_ref(
            || head.clone(),
            |h| trellis_proxy::http::strip_hop_by_hop(black_box(h)),
            criterion::BatchSize::SmallInput,
        )
    });
    let mut traced = request_headers();
    traced.insert(
        "traceparent",
        HeaderValue::from_static("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"),
    );
    c.bench_function("read a W3C trace context", |b| {
        b.iter(|| black_box(trellis_proxy::trace::extract(black_box(&traced))))
    });
}

criterion_group!(benches, bench);
criterion_main!(benches);
