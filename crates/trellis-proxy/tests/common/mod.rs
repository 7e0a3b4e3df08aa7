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
