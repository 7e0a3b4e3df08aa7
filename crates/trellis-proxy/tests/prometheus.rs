//! A real Prometheus server (Debian's `prometheus`) scrapes two proxies on loopback, and
//! the PromQL query Istio's dashboards are built on,
//! `sum(rate(istio_requests_total{reporter="destination"}[1m])) by (destination_service)`,
//! returns the service the traffic went to. Skipped, with a note, when `prometheus` is not
//! installed (CI installs it).

mod common;
use common::{outbound_on, start_with_stats};

use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tokio::time::timeout;
use trellis_proxy::ProxyOptions;
use trellis_testkit::{HttpServer, http_client};

const LIMIT: Duration = Duration::from_secs(20);

struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("port")
}

/// `q`, percent-encoded for a URL query.
fn encode(q: &str) -> String {
    q.bytes()
        .map(|b| match b {
            b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'_' | b'.' | b'-' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prometheus_scrapes_the_mesh_and_promql_finds_the_services() {
    if Command::new("prometheus")
        .arg("--version")
        .output()
        .is_err()
    {
        eprintln!("prometheus not installed (apt-get install prometheus): skipping");
        return;
    }
    let app = HttpServer::start().await.expect("app");
    let (inbound, inbound_stats) = start_with_stats(
        &format!(
            "version: in\nworkload:\n  name: reviews-v1\n  namespace: shop\n  labels: {{app: reviews}}\n  inboundPorts: [{{port: {p}, name: http}}]\nservices:\n- hostname: reviews.shop.svc.cluster.local\n  ports: [{{port: 9080, name: http, cluster: r}}]\nclusters:\n- name: r\n  endpoints: [{{address: \"127.0.0.2:{p}\", workload: reviews-v1, namespace: shop}}]\n",
            p = app.addr.port()
        ),
        ProxyOptions {
            inbound_listen: vec![("127.0.0.1:0".parse().expect("addr"), app.addr.port())],
            ..ProxyOptions::default()
        },
    )
    .await;
    let (outbound, outbound_stats) = start_with_stats(
        &format!(
            "version: out\nworkload:\n  name: web\n  namespace: shop\nservices:\n- hostname: reviews.shop.svc.cluster.local\n  ports: [{{port: 9080, name: http, cluster: r}}]\nclusters:\n- name: r\n  endpoints: [{{address: \"{}\", proxied: true, workload: reviews-v1, namespace: shop}}]\n",
            inbound.inbound_addrs[0]
        ),
        outbound_on("reviews.shop.svc.cluster.local", 9080),
    )
    .await;

    let dir = tempfile::tempdir().expect("tempdir");
    let config = dir.path().join("prometheus.yml");
    std::fs::write(
        &config,
        format!(
            "global: {{scrape_interval: 1s, evaluation_interval: 1s}}\nscrape_configs:\n- job_name: mesh\n  metrics_path: /stats/prometheus\n  static_configs:\n  - targets: [\"{inbound_stats}\", \"{outbound_stats}\"]\n"
        ),
    )
    .expect("config");
    let prom: SocketAddr = ([127, 0, 0, 1], free_port()).into();
    let _prometheus = Killed(
        Command::new("prometheus")
            .arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.path().join("data").display()
            ))
            .arg(format!("--web.listen-address={prom}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("prometheus"),
    );

    // Steady traffic while Prometheus scrapes; the query is asked until it answers with
    // the service (bounded: 60 s).
    let query = encode(
        r#"sum(rate(istio_requests_total{reporter="destination"}[1m])) by (destination_service)"#,
    );
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut answer = String::new();
    let mut found = false;
    while Instant::now() < deadline {
        for _ in 0..5 {
            let r = timeout(
                LIMIT,
                http_client::get(
                    outbound.outbound_addrs[0],
                    "reviews.shop.svc.cluster.local:9080",
                    "/bytes/16",
                ),
            )
            .await
            .expect("in time")
            .expect("response");
            assert_eq!(r.status, 200);
        }
        if let Ok(Ok(r)) = timeout(
            Duration::from_secs(5),
            http_client::get(prom, "localhost", &format!("/api/v1/query?query={query}")),
        )
        .await
        {
            answer = String::from_utf8_lossy(&r.body).into_owned();
            let v: serde_json::Value = serde_json::from_str(&answer).unwrap_or_default();
            found = v["data"]["result"].as_array().is_some_and(|rs| {
                rs.iter().any(|s| {
                    s["metric"]["destination_service"] == "reviews.shop.svc.cluster.local"
                        && s["value"][1]
                            .as_str()
                            .and_then(|x| x.parse::<f64>().ok())
                            .is_some_and(|rate| rate > 0.0)
                })
            });
            if found {
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    assert!(found, "PromQL did not find the service: {answer}");
}
