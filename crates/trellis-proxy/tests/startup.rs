//! A proxy that takes its configuration from the control plane (`--xds`) holds what it
//! intercepts until the first snapshot is in place, and is not ready before: a request
//! made in that moment is served by the snapshot, not sent where an empty configuration
//! would send it.

mod common;
use common::start_with_stats;

use std::time::Duration;

use tokio::time::timeout;
use trellis_proxy::{Config, ProxyOptions};
use trellis_testkit::{HttpServer, http_client};
use trellis_xds::snapshot::Snapshot;

const LIMIT: Duration = Duration::from_secs(20);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_wait_for_the_first_snapshot_and_readiness_says_so() {
    let app = HttpServer::start().await.expect("app");
    let (p, admin) = start_with_stats(
        "version: empty\n",
        ProxyOptions {
            outbound_listen: vec![(
                "127.0.0.1:0".parse().expect("addr"),
                "app.shop.svc.cluster.local".into(),
                80,
            )],
            wait_for_config: true,
            ..ProxyOptions::default()
        },
    )
    .await;
    let ready = || async {
        timeout(
            LIMIT,
            http_client::get(admin, "localhost", "/healthz/ready"),
        )
        .await
        .expect("in time")
        .expect("readiness")
    };
    let before = ready().await;
    assert_eq!(before.status, 503);
    assert!(String::from_utf8_lossy(&before.body).contains("first configuration"));

    // A request while there is no snapshot yet…
    let front = p.outbound_addrs[0];
    let request = tokio::spawn(async move {
        timeout(
            LIMIT,
            http_client::get(front, "app.shop.svc.cluster.local", "/bytes/3"),
        )
        .await
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!request.is_finished(), "the request waits for the snapshot");
    // …is served by the first one.
    let yaml = format!(
        "version: first\nservices:\n- hostname: app.shop.svc.cluster.local\n  ports: [{{port: 80, name: http, cluster: app}}]\nclusters:\n- name: app\n  endpoints: [{{address: \"{}\"}}]\n",
        app.addr
    );
    let raw = Snapshot::from_text(&yaml, "t.yaml").expect("snapshot");
    p.shared
        .update(Config::from_wire(raw, None).expect("converts"));
    let resp = request
        .await
        .expect("joined")
        .expect("in time")
        .expect("response");
    assert_eq!(resp.status, 200);
    assert_eq!(resp.body.len(), 3);
    assert_eq!(ready().await.status, 200);
}

/// Without a control plane, connections wait for the first snapshot only within one
/// window from the start: once it has passed, a new connection is dealt with at once (with
/// no configuration, the listener's service is unknown and the connection is closed), not
/// held for the whole window again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_wait_for_a_first_snapshot_is_one_window_not_one_per_connection() {
    let (p, _) = start_with_stats(
        "version: empty\n",
        ProxyOptions {
            outbound_listen: vec![(
                "127.0.0.1:0".parse().expect("addr"),
                "app.shop.svc.cluster.local".into(),
                80,
            )],
            wait_for_config: true,
            ..ProxyOptions::default()
        },
    )
    .await;
    let front = p.outbound_addrs[0];
    let get = || async move {
        let start = std::time::Instant::now();
        let r = timeout(
            LIMIT,
            http_client::get(front, "app.shop.svc.cluster.local", "/"),
        )
        .await
        .expect("in time");
        assert!(r.is_err(), "no configuration, yet an answer: {r:?}");
        start.elapsed()
    };
    let waited = get().await;
    assert!(
        waited >= trellis_proxy::proxy::FIRST_CONFIG_WAIT - Duration::from_secs(1),
        "the first connection waited {waited:?}"
    );
    let waited = get().await;
    assert!(
        waited < Duration::from_secs(2),
        "a connection after the window waited {waited:?}"
    );
}
