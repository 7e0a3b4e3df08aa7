//! The control plane with three real proxies in process: a watched config directory, the
//! push loop, and proxies following their sessions. Editing a VirtualService file changes
//! the routing within a second, deleting it reverts, a file with an error is refused while
//! the previous configuration keeps serving, and a snapshot a proxy refuses shows as a NACK
//! with the proxy's reason.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use trellis_control::registry::{Instance, InstancePort};
use trellis_control::server::{ControlPlane, Debounce};
use trellis_control::{ConfigStore, DirectorySource};
use trellis_proxy::sockets::FixedOriginalDst;
use trellis_proxy::{Config, LoadEnv, ProxyHandle, ProxyOptions};
use trellis_testkit::{HttpServer, http_client};

mod common;
use common::{ALL_TO_V2, SERVICES};

fn instance(name: &str, ns: &str, labels: &[(&str, &str)], port: u16) -> Instance {
    Instance {
        name: name.to_string(),
        workload: name.to_string(),
        namespace: ns.to_string(),
        labels: labels
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect::<BTreeMap<_, _>>(),
        service_account: name.to_string(),
        addresses: vec![IpAddr::from([127, 0, 0, 1])],
        ports: vec![InstancePort {
            name: Some("http".into()),
            port,
            protocol: None,
        }],
        locality: None,
        entry: false,
    }
}

/// Sends `n` requests through `proxy` and counts them at (v1, v2).
async fn spread(proxy: SocketAddr, v1: &HttpServer, v2: &HttpServer, n: u64) -> (u64, u64) {
    let before = (v1.stats().requests(), v2.stats().requests());
    let mut c = http_client::HttpClient::http1(proxy)
        .await
        .expect("connect");
    for _ in 0..n {
        let r = c
            .get("reviews.shop:9080", "/bytes/1")
            .await
            .expect("response");
        assert_eq!(r.status, 200);
    }
    (
        v1.stats().requests() - before.0,
        v2.stats().requests() - before.1,
    )
}

/// Polls (every 50 ms, at most `within`) until `f` holds.
async fn within<F, Fut>(within: Duration, mut f: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + within;
    while Instant::now() < deadline {
        if f().await {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    false
}

fn write(dir: &Path, name: &str, text: &str) {
    std::fs::write(dir.join(name), text).expect("write");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn config_changes_reach_three_proxies() {
    let dir = tempfile::tempdir().expect("tempdir");
    write(dir.path(), "services.yaml", SERVICES);
    let store = Arc::new(ConfigStore::new());
    let source = DirectorySource::new(dir.path(), Arc::clone(&store))
        .with_debounce(Duration::from_millis(20));
    let watch = Arc::new(source).watch().expect("watch");
    let cp = ControlPlane::new(
        Arc::clone(&store),
        Debounce {
            quiet: Duration::from_millis(50),
            max: Duration::from_millis(300),
        },
    );
    tokio::spawn(Arc::clone(&cp).run());

    // The two reviews versions (their own proxies are not part of this test: they are
    // registered as the instances behind the service).
    let (v1, v2) = (
        HttpServer::start().await.expect("v1"),
        HttpServer::start().await.expect("v2"),
    );
    let _s1 = cp.connect(instance(
        "reviews-v1",
        "shop",
        &[("app", "reviews"), ("version", "v1")],
        v1.addr.port(),
    ));
    let _s2 = cp.connect(instance(
        "reviews-v2",
        "shop",
        &[("app", "reviews"), ("version", "v2")],
        v2.addr.port(),
    ));

    // Three client sidecars that follow their sessions.
    let mut proxies: Vec<(u64, Arc<ProxyHandle>)> = Vec::new();
    for i in 0..3 {
        let mut session = cp.connect(instance(
            &format!("web-{i}"),
            "web",
            &[("app", "web")],
            8080,
        ));
        let first = session
            .snapshots
            .wait_for(Option::is_some)
            .await
            .expect("first snapshot")
            .clone()
            .expect("snapshot");
        let vip = first
            .scope
            .services
            .iter()
            .find(|s| s.hostname == "reviews.shop.svc.cluster.local")
            .and_then(|s| s.addresses.first())
            .and_then(|a| a.parse::<IpAddr>().ok())
            .expect("reviews has a virtual IP");
        let handle = Arc::new(
            trellis_proxy::start(
                Config::empty(),
                ProxyOptions {
                    outbound_capture: Some("127.0.0.1:0".parse().expect("addr")),
                    original_dst: Arc::new(FixedOriginalDst(SocketAddr::new(vip, 9080))),
                    ..ProxyOptions::default()
                },
            )
            .await
            .expect("proxy"),
        );
        let (follower, cp2, id) = (Arc::clone(&handle), Arc::clone(&cp), session.id);
        tokio::spawn(async move {
            let env = LoadEnv::default();
            loop {
                let snap = session.snapshots.borrow_and_update().clone();
                if let Some(snap) = snap {
                    let version = snap.version.clone();
                    match follower.apply(snap.snapshot(), &env) {
                        Ok(()) => cp2.ack(id, &version),
                        Err(e) => cp2.nack(id, &version, &e),
                    }
                }
                if session.snapshots.changed().await.is_err() {
                    return;
                }
            }
        });
        proxies.push((id, handle));
    }
    let addr = |i: usize| proxies[i].1.outbound_addrs[0];

    // No VirtualService: both versions.
    assert!(
        within(Duration::from_secs(2), || async {
            proxies.iter().all(|(_, p)| {
                p.config()
                    .clusters
                    .iter()
                    .any(|c| c.name.contains("|v2|") && !c.endpoints.is_empty())
            })
        })
        .await
    );
    let (a, b) = spread(addr(0), &v1, &v2, 40).await;
    assert!(a > 0 && b > 0, "both versions: {a} / {b}");

    // A VirtualService file appears: every proxy routes to v2 within a second.
    let t = Instant::now();
    write(dir.path(), "reviews-vs.yaml", ALL_TO_V2);
    let (rv1, rv2) = (&v1, &v2);
    for i in 0..3 {
        let a = addr(i);
        let left = Duration::from_secs(1).saturating_sub(t.elapsed());
        assert!(
            within(left, || async move { spread(a, rv1, rv2, 4).await.0 == 0 }).await,
            "proxy {i} routes to v2 within 1 s of the edit"
        );
    }
    let (a, b) = spread(addr(1), &v1, &v2, 20).await;
    assert_eq!((a, b), (0, 20));

    // Deleted: back to both.
    std::fs::remove_file(dir.path().join("reviews-vs.yaml")).expect("remove");
    assert!(
        within(Duration::from_secs(2), || async {
            spread(addr(2), &v1, &v2, 10).await.0 > 0
        })
        .await,
        "routing reverts"
    );

    // A file with an error is refused; what was serving keeps serving.
    write(
        dir.path(),
        "reviews-vs.yaml",
        "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: reviews, namespace: shop}\nspec:\n  hosts: [reviews]\n  http: [{route: [{destination: {host: reviews, subset: v2}, weight: 70}]}]\n  bogus: 1\n",
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(!watch.diagnostics().is_empty(), "the bad file is reported");
    let (a, b) = spread(addr(0), &v1, &v2, 20).await;
    assert!(a > 0 && b > 0, "still both versions: {a} / {b}");

    // A snapshot the proxies cannot take (an invalid header name for consistent hashing,
    // which only the proxy checks): NACKed with the proxy's reason, old routing kept.
    write(
        dir.path(),
        "services.yaml",
        &SERVICES.replace(
            "  host: reviews\n",
            "  host: reviews\n  trafficPolicy:\n    loadBalancer: {consistentHash: {httpHeaderName: \"bad header\"}}\n",
        ),
    );
    let nacked = within(Duration::from_secs(2), || async {
        let st = cp.status();
        proxies.iter().all(|(id, _)| {
            st.iter().any(|s| {
                s.id == *id
                    && s.nacked
                        .as_ref()
                        .is_some_and(|(_, e)| e.contains("invalid header"))
            })
        })
    })
    .await;
    assert!(nacked, "{:#?}", cp.status());
    let (a, b) = spread(addr(1), &v1, &v2, 20).await;
    assert!(
        a > 0 && b > 0,
        "the refused snapshot changed nothing: {a} / {b}"
    );
    for (id, _) in &proxies {
        cp.disconnect(*id);
    }
}
