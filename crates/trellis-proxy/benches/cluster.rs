//! Per-request cluster work: picking an endpoint with each load balancer, and the outlier
//! detection bookkeeping after a response, on a cluster of 100 endpoints.
//!
//! `cargo bench -p trellis-proxy --bench cluster`

use criterion::{Criterion, black_box, criterion_group, criterion_main};
use trellis_proxy::Config;
use trellis_proxy::config::Outcome;
use trellis_xds::snapshot::Snapshot;

fn cluster(lb: &str) -> Config {
    let eps: Vec<String> = (0..100)
        .map(|i| format!("{{address: \"10.0.{}.{}:80\"}}", i / 250, i % 250 + 1))
        .collect();
    let yaml = format!(
        "services:\n- hostname: a.default.svc.cluster.local\n  ports: [{{port: 80, cluster: c}}]\nclusters:\n- name: c\n  loadBalancer: {lb}\n  outlierDetection: {{consecutive5xxErrors: 1000000}}\n  endpoints: [{}]\n",
        eps.join(", ")
    );
    Config::from_wire(
        Snapshot::from_text(&yaml, "b.yaml").expect("snapshot"),
        None,
    )
    .expect("config")
}

fn bench(c: &mut Criterion) {
    for lb in ["ROUND_ROBIN", "LEAST_REQUEST", "RANDOM"] {
        let cfg = cluster(lb);
        let cl = &cfg.clusters[0];
        c.bench_function(&format!("pick {lb} of 100"), |b| {
            b.iter(|| black_box(cl.pick().map(|e| e.addr)))
        });
    }
    let cfg = cluster("ROUND_ROBIN");
    let cl = &cfg.clusters[0];
    let ep = cl.endpoints[0].clone();
    c.bench_function("outlier report: success", |b| {
        b.iter(|| cl.report(black_box(&ep), Outcome::Status(200)))
    });
    c.bench_function("outlier report: failure below the threshold", |b| {
        b.iter(|| cl.report(black_box(&ep), Outcome::Status(500)))
    });
}

criterion_group!(benches, bench);
criterion_main!(benches);
