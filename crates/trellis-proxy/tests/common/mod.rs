//! What several of these test binaries share.
#![allow(dead_code)] // each test binary uses its own part

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;

use trellis_proxy::admin::{self, AdminContext};
use trellis_proxy::{Config, ProxyHandle, ProxyOptions};
use trellis_xds::snapshot::Snapshot;

/// A proxy serving the snapshot `yaml`, and the address of its public endpoints
/// (readiness and `/stats/prometheus`) on loopback.
pub async fn start_with_stats(yaml: &str, options: ProxyOptions) -> (ProxyHandle, SocketAddr) {
    let raw = Snapshot::from_text(yaml, "t.yaml").expect("snapshot");
    let p = trellis_proxy::start(Config::from_wire(raw, None).expect("converts"), options)
        .await
        .expect("proxy");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let ctx = Arc::new(AdminContext {
        shared: Arc::clone(&p.shared),
        set_log_level: None,
        quit: Arc::new(tokio::sync::Notify::new()),
        ready: Arc::new(AtomicBool::new(true)),
    });
    tokio::spawn(admin::serve_public(listener, ctx));
    (p, addr)
}

/// Options with one explicit outbound listener on loopback for `service:port`.
pub fn outbound_on(service: &str, port: u16) -> ProxyOptions {
    ProxyOptions {
        outbound_listen: vec![("127.0.0.1:0".parse().expect("addr"), service.into(), port)],
        ..ProxyOptions::default()
    }
}

/// A workload certificate for spiffe://cluster.local/ns/`ns`/sa/`sa` from `ca`, as the
/// control plane issues it: the chain (leaf first) and the key (PKCS#8 DER).
pub fn workload_certificate(
    ca: &trellis_identity::Ca,
    tokens: &trellis_identity::Tokens,
    ns: &str,
    sa: &str,
) -> (Vec<String>, Vec<u8>) {
    let id = trellis_identity::Identity {
        trust_domain: "cluster.local".into(),
        namespace: ns.into(),
        service_account: sa.into(),
    };
    let (key, csr) = trellis_identity::workload_key_and_csr(&id).expect("csr");
    let token = tokens.issue(ns, sa, std::time::Duration::from_secs(60));
    let chain = ca
        .create_certificate(tokens, &token, &csr, std::time::Duration::from_secs(3600))
        .expect("certificate");
    (chain, key)
}
