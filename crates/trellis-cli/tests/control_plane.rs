//! `trellis control-plane` as a process, proxies following it over Delta ADS, and
//! `trellis proxy-status` showing them in sync, then showing the NACK when they refuse a
//! snapshot (with their reason) while they keep serving the previous one.

use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use trellis_proxy::{Config, LoadEnv, ProxyOptions};
use trellis_testkit::{HttpServer, http_client};
use trellis_xds::ads::Announce;

const SERVICES: &str = r#"
apiVersion: trellis.dev/v1alpha1
kind: Workload
metadata: {name: reviews-v1, namespace: shop, labels: {app: reviews, version: v1}}
spec: {serviceAccount: reviews-v1, command: [sleep, "1"]}
---
apiVersion: trellis.dev/v1alpha1
kind: Workload
metadata: {name: web-0, namespace: web, labels: {app: web}}
spec: {serviceAccount: web-0, command: [sleep, "1"]}
---
apiVersion: v1
kind: Service
metadata: {name: reviews, namespace: shop}
spec:
  selector: {app: reviews}
  ports: [{name: http, port: 9080, targetPort: http}]
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: reviews, namespace: shop}
spec:
  host: reviews
  subsets:
  - {name: v1, labels: {version: v1}}
"#;

struct Running(Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_addr() -> SocketAddr {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    l.local_addr().expect("addr")
}

fn announce(name: &str, ns: &str, labels: &[(&str, &str)], port: u16) -> Announce {
    Announce {
        name: name.into(),
        namespace: ns.into(),
        service_account: name.into(),
        labels: labels
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        addresses: vec!["127.0.0.1".into()],
        ports: vec![(Some("http".into()), port)],
        locality: None,
        workload_group: None,
    }
}

fn proxy_status(debug: SocketAddr) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_trellis"))
        .args(["proxy-status", "--control-plane", &debug.to_string()])
        .output()
        .expect("runs");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

async fn eventually(within: Duration, mut f: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + within;
    while Instant::now() < deadline {
        if f() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    false
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxies_follow_the_control_plane_and_proxy_status_shows_a_nack() {
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(dir.path().join("services.yaml"), SERVICES).expect("write");
    let (xds, debug) = (free_addr(), free_addr());
    let data = tempfile::tempdir().expect("tempdir");
    let _cp = Running(
        Command::new(env!("CARGO_BIN_EXE_trellis"))
            .args(["control-plane", "--config-dir"])
            .arg(dir.path())
            .args([
                "--listen",
                &xds.to_string(),
                "--debug-listen",
                &debug.to_string(),
            ])
            .args([
                "--debounce",
                "20ms",
                "--debounce-max",
                "200ms",
                "--data-dir",
            ])
            .arg(data.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("control plane starts"),
    );
    assert!(
        eventually(Duration::from_secs(10), || std::net::TcpStream::connect(
            debug
        )
        .is_ok())
        .await,
        "the control plane listens"
    );

    // The app behind reviews (its proxy announces it), and a client's sidecar.
    let app = HttpServer::start().await.expect("app");
    let mut proxies = Vec::new();
    for (a, listen) in [
        (
            announce(
                "reviews-v1",
                "shop",
                &[("app", "reviews"), ("version", "v1")],
                app.addr.port(),
            ),
            None,
        ),
        (
            announce("web-0", "web", &[("app", "web")], 8080),
            Some(("reviews.shop", 9080u16)),
        ),
    ] {
        let p = trellis_proxy::start(
            Config::empty(),
            ProxyOptions {
                outbound_listen: listen
                    .map(|(h, port)| {
                        vec![("127.0.0.1:0".parse().expect("addr"), h.to_string(), port)]
                    })
                    .unwrap_or_default(),
                ..ProxyOptions::default()
            },
        )
        .await
        .expect("proxy");
        // Each proxy shows a token for its identity, made by `trellis token`.
        let out = Command::new(env!("CARGO_BIN_EXE_trellis"))
            .args([
                "token",
                "-n",
                &a.namespace,
                "--service-account",
                &a.service_account,
                "--data-dir",
            ])
            .arg(data.path())
            .output()
            .expect("trellis token");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let token = String::from_utf8_lossy(&out.stdout).trim().to_string();
        // Over TLS: the control plane's certificate chains to the root it made on first
        // start, and has the name `trellis-control`.
        let root = std::fs::read_to_string(data.path().join("ca-cert.pem")).expect("root");
        let ep = trellis_proxy::xds::Endpoint::tls(xds, &root, "trellis-control").expect("ep");
        // reviews-v1 also keeps a workload certificate (web-0 does not ask for one: with
        // one it would speak mTLS to reviews' endpoint, which here is the app itself).
        if a.name == "reviews-v1" {
            tokio::spawn(trellis_proxy::identity::maintain(
                ep.clone(),
                trellis_proxy::xds::Token::Fixed(token.clone()),
                trellis_proxy::identity::CertRequest {
                    identity: trellis_identity::Identity {
                        trust_domain: "cluster.local".into(),
                        namespace: a.namespace.clone(),
                        service_account: a.service_account.clone(),
                    },
                    instance: a.name.clone(),
                    ttl: Duration::from_secs(3 * 3600),
                },
                Arc::clone(&p.shared),
            ));
        }
        tokio::spawn(trellis_proxy::xds::follow_with_token(
            ep,
            a,
            Some(token),
            Arc::clone(&p.shared),
            LoadEnv::default(),
        ));
        proxies.push(p);
    }
    let web = &proxies[1];
    assert!(
        eventually(Duration::from_secs(10), || web
            .config()
            .clusters
            .iter()
            .any(
                |c| c.name.starts_with("outbound|9080|v1|") && !c.endpoints.is_empty()
            ))
        .await,
        "web-0 learned reviews' endpoint"
    );
    let get = || async {
        http_client::get(web.outbound_addrs[0], "reviews.shop:9080", "/bytes/1")
            .await
            .expect("response")
            .status
            .as_u16()
    };
    assert_eq!(get().await, 200);
    let status = {
        let mut last = String::new();
        // Both synced, and reviews-v1's certificate shows when it expires (3 h, less the
        // seconds the test has taken).
        let synced = eventually(Duration::from_secs(5), || {
            last = proxy_status(debug);
            last.lines()
                .skip(1)
                .filter(|l| l.contains("SYNCED"))
                .count()
                == 2
                && last.lines().any(|l| {
                    l.starts_with("reviews-v1.shop ")
                        && (l.contains(" in 2h59m") || l.contains(" in 3h "))
                })
                && last
                    .lines()
                    .any(|l| l.starts_with("web-0.web ") && l.contains(" - "))
        })
        .await;
        assert!(synced, "{last}");
        last
    };
    assert!(
        status.contains("web-0.web") && status.contains("reviews-v1.shop"),
        "{status}"
    );
    // Both proxies acknowledged what they were sent: two convergence times, and the
    // pushes were timed.
    let metrics = http_client::get(debug, "control-plane", "/metrics")
        .await
        .expect("metrics");
    let text = String::from_utf8_lossy(&metrics.body).into_owned();
    assert!(
        text.lines().any(
            |l| l.starts_with("trellis_control_proxy_convergence_seconds_count ")
                && l.split(' ').nth(1).and_then(|n| n.parse::<u64>().ok()) >= Some(2)
        ),
        "{text}"
    );
    assert!(
        text.contains("trellis_control_certificates_issued_total 1\n"),
        "{text}"
    );
    assert!(
        text.contains("# TYPE trellis_control_push_seconds histogram")
            && !text.contains("trellis_control_push_seconds_count 0\n"),
        "{text}"
    );
    // Resources went out, and pushes in flight are reported.
    assert!(
        text.contains("# TYPE trellis_control_pushes_in_flight gauge"),
        "{text}"
    );
    let value = |prefix: &str| -> Option<u64> {
        text.lines()
            .find(|l| l.starts_with(prefix))
            .and_then(|l| l.rsplit(' ').next()?.parse().ok())
    };
    assert!(
        value("trellis_control_resources_sent_total{type=\"cluster\"} ") >= Some(1)
            && value("trellis_control_resources_sent_total{type=\"proxy\"} ") >= Some(2),
        "{text}"
    );
    // Each proxy's ACK of a change counts from the change (both proxies joined: changes).
    assert!(
        value("trellis_control_config_convergence_seconds_count ") >= Some(2),
        "{text}"
    );
    assert!(
        value("trellis_control_translation_seconds_count ") >= Some(1),
        "{text}"
    );
    // What web-0 was sent, through the control plane.
    let config = |args: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_trellis"))
            .args(["proxy-config"])
            .args(args)
            .args(["--control-plane", &debug.to_string()])
            .output()
            .expect("runs")
    };
    let out = config(&["web-0.web", "endpoints"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains(&format!("127.0.0.1:{}", app.addr.port()))
            && text.contains("outbound|9080|v1|reviews.shop.svc.cluster.local"),
        "{text}"
    );
    let out = config(&["web-0.web", "listeners"]);
    assert!(String::from_utf8_lossy(&out.stdout).contains("reviews.shop.svc.cluster.local"));
    // reviews-v1's identity, its certificate's expiry and the mesh's trust bundle.
    let out = config(&["reviews-v1.shop", "secrets"]);
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        text.contains("spiffe://cluster.local/ns/shop/sa/reviews-v1")
            && (text.contains(" in 2h59m") || text.contains(" in 3h")),
        "{text}"
    );
    assert!(
        text.lines().any(|l| l.contains("CN=Trellis root CA")
            && (l.contains(" in 3649d") || l.contains(" in 3650d"))),
        "{text}"
    );
    let out = config(&["reviews-v1.shop", "secrets", "-o", "json"]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json secrets");
    assert_eq!(v["trustRoots"].as_array().map(Vec::len), Some(1));
    // The same as YAML, which parses back to the same document.
    let out = config(&["web-0.web", "clusters", "-o", "yaml"]);
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let json: serde_json::Value =
        serde_json::from_slice(&config(&["web-0.web", "clusters", "-o", "json"]).stdout)
            .expect("json clusters");
    let docs = yaml_rust2::YamlLoader::load_from_str(&text).expect("yaml clusters");
    let names = |v: &serde_json::Value| -> Vec<String> {
        v.as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|c| c["name"].as_str().map(str::to_string))
                    .collect()
            })
            .unwrap_or_default()
    };
    let yaml_names: Vec<String> = docs[0]
        .as_vec()
        .map(|a| {
            a.iter()
                .filter_map(|c| c["name"].as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default();
    assert!(!yaml_names.is_empty(), "{text}");
    assert_eq!(yaml_names, names(&json));
    let out = config(&["nobody.web"]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("no connected proxy"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // A DestinationRule the proxies cannot take: both NACK with their reason, and keep
    // serving what they had.
    std::fs::write(
        dir.path().join("services.yaml"),
        SERVICES.replace(
            "  host: reviews\n",
            "  host: reviews\n  trafficPolicy:\n    loadBalancer: {consistentHash: {httpHeaderName: \"bad header\"}}\n",
        ),
    )
    .expect("write");
    let mut last = String::new();
    let nacked = eventually(Duration::from_secs(10), || {
        last = proxy_status(debug);
        last.lines()
            .filter(|l| l.contains("NACKED") && l.contains("invalid header"))
            .count()
            == 2
    })
    .await;
    assert!(nacked, "{last}");
    assert_eq!(get().await, 200, "the refused snapshot changed nothing");
}
