//! What several of these test binaries share: the reviews service with two subsets, the
//! VirtualService that sends everything to v2, parsing, and bounded waiting.
#![allow(dead_code)] // each test binary uses its own part

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::net::TcpListener;
use trellis_control::ConfigStore;
use trellis_control::ads::Auth;
use trellis_control::server::{ControlPlane, Debounce};
use trellis_identity::{Ca, Tokens};

use trellis_api::{LoadOptions, Resource, parse_text};

pub const SERVICES: &str = r#"
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
  - {name: v2, labels: {version: v2}}
"#;

pub const ALL_TO_V2: &str = r#"
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: reviews, namespace: shop}
spec:
  hosts: [reviews]
  http:
  - route: [{destination: {host: reviews, subset: v2}}]
"#;

pub fn parse(yaml: &str) -> Vec<Resource> {
    parse_text(yaml, "cfg.yaml", &LoadOptions::default())
        .into_iter()
        .map(|p| {
            p.resource()
                .cloned()
                .unwrap_or_else(|| panic!("{:?}", p.diagnostics))
        })
        .collect()
}

/// True as soon as `f` is, polling every 20 ms; false once `within` has passed.
pub async fn eventually<F: FnMut() -> bool>(within: Duration, mut f: F) -> bool {
    let deadline = Instant::now() + within;
    while Instant::now() < deadline {
        if f() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    false
}

/// A control plane serving `config` on TLS (its certificate names `trellis-control` and
/// 127.0.0.1) with the CA of `ca_dir` (tokens signed with the key of
/// `tokens_dir`), on `addr` (a free port when None); its store, and its tasks (to abort
/// it).
pub async fn tls_control_plane(
    config: &str,
    ca_dir: &std::path::Path,
    tokens_dir: &std::path::Path,
    addr: Option<SocketAddr>,
) -> (
    SocketAddr,
    Arc<ControlPlane>,
    Arc<ConfigStore>,
    Vec<tokio::task::JoinHandle<()>>,
) {
    let auth = Arc::new(Auth {
        ca: Ca::load_or_create(ca_dir, "cluster.local").expect("ca"),
        tokens: Tokens::load_or_create(tokens_dir).expect("tokens"),
    });
    let store = Arc::new(ConfigStore::new());
    for r in parse(config) {
        store.apply(r);
    }
    let cp = ControlPlane::new(Arc::clone(&store), Debounce::default());
    let (creds, renew) = trellis_control::ads::serving_credentials(
        Arc::clone(&auth),
        vec!["trellis-control".into()],
        vec!["127.0.0.1".parse().expect("ip")],
    )
    .expect("serving certificate");
    let tls = trellis_identity::tls::server_config(creds, &[b"h2"]).expect("tls");
    let listener = TcpListener::bind(addr.unwrap_or_else(|| "127.0.0.1:0".parse().expect("addr")))
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let tasks = vec![
        tokio::spawn(Arc::clone(&cp).run()),
        tokio::spawn(renew),
        tokio::spawn(trellis_control::ads::publish_trust_roots(
            Arc::clone(&auth),
            Arc::clone(&cp),
            Duration::from_millis(50),
        )),
        tokio::spawn(trellis_control::ads::serve_with(
            listener,
            Arc::clone(&cp),
            Some(auth),
            Some(Arc::new(tls)),
        )),
    ];
    (addr, cp, store, tasks)
}
