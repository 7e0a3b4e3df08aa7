//! Control-plane scale: N in-process proxies (each the sidecar of one instance of one of N
//! services) connected to a control plane whose mesh has N services. Measures the time from
//! a VirtualService change to the last proxy holding it, the control plane's RSS per
//! connected proxy, and the size of one proxy's snapshot.
//!
//! `cargo bench -p trellis-control --bench push -- [N ...]` (default 100 1000).

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use trellis_api::{LoadOptions, parse_text};
use trellis_control::ConfigStore;
use trellis_control::registry::{Instance, InstancePort};
use trellis_control::server::{ControlPlane, Debounce, Session};

fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.split_whitespace().next()?.parse().ok())
        })
        .unwrap_or(0)
}

fn services(n: usize) -> String {
    (0..n)
        .map(|i| {
            format!(
                "apiVersion: v1\nkind: Service\nmetadata: {{name: svc-{i}, namespace: mesh}}\nspec:\n  selector: {{app: svc-{i}}}\n  ports: [{{name: http, port: 80}}]\n---\n"
            )
        })
        .collect()
}

fn vs(version: usize) -> String {
    format!(
        "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {{name: svc-0, namespace: mesh}}\nspec:\n  hosts: [svc-0]\n  http:\n  - name: change-{version}\n    route: [{{destination: {{host: svc-0}}}}]\n"
    )
}

fn apply(store: &ConfigStore, yaml: &str) {
    for p in parse_text(yaml, "bench.yaml", &LoadOptions::default()) {
        if let Some(r) = p.resource() {
            store.apply(r.clone());
        }
    }
}

fn has_change(s: &Session, version: usize) -> bool {
    let want = format!("change-{version}");
    s.snapshots.borrow().as_ref().is_some_and(|snap| {
        snap.scope.services.iter().any(|svc| {
            svc.ports
                .iter()
                .any(|p| p.http_routes.iter().any(|r| r.name == want))
        })
    })
}

fn run(n: usize) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        let store = Arc::new(ConfigStore::new());
        apply(&store, &services(n));
        let quiet = Duration::from_millis(10);
        let cp = ControlPlane::new(Arc::clone(&store), Debounce { quiet, max: Duration::from_millis(100) });
        tokio::spawn(Arc::clone(&cp).run());
        let before = rss_kib();
        let sessions: Vec<Session> = (0..n)
            .map(|i| {
                cp.connect(Instance {
                    name: format!("svc-{i}-0"),
                    workload: format!("svc-{i}"),
                    namespace: "mesh".into(),
                    labels: BTreeMap::from([("app".to_string(), format!("svc-{i}"))]),
                    service_account: format!("svc-{i}"),
                    addresses: vec![IpAddr::V4(Ipv4Addr::from(0x0a00_0000 + i as u32))],
                    ports: vec![InstancePort { name: Some("http".into()), port: 80, protocol: None }],
                    locality: None,
                    entry: false,
                })
            })
            .collect();
        // Wait (bounded) for every proxy's first snapshot.
        let deadline = Instant::now() + Duration::from_secs(600);
        while Instant::now() < deadline && sessions.iter().any(|s| s.snapshots.borrow().is_none()) {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let connected = rss_kib();
        let snapshot_bytes = sessions[0]
            .snapshots
            .borrow()
            .as_ref()
            .map_or(0, |s| {
                s.parts.iter().map(|p| p.any.value.len()).sum::<usize>()
                    + s.proxy_part().any.value.len()
            });
        let mut times = Vec::new();
        for round in 1..=5 {
            let start = Instant::now();
            apply(&store, &vs(round));
            let deadline = start + Duration::from_secs(600);
            while Instant::now() < deadline && !sessions.iter().all(|s| has_change(s, round)) {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            times.push(start.elapsed().saturating_sub(quiet));
        }
        times.sort();
        println!(
            "{n} services, {n} proxies: change to the last proxy (minus the {quiet:?} debounce): median {:?}, max {:?}; control-plane RSS {:.1} MiB after connecting ({:.3} MiB per proxy); one snapshot {:.1} KiB encoded",
            times[times.len() / 2],
            times[times.len() - 1],
            connected as f64 / 1024.0,
            (connected.saturating_sub(before)) as f64 / 1024.0 / n as f64,
            snapshot_bytes as f64 / 1024.0,
        );
    });
}

fn main() {
    let ns: Vec<usize> = std::env::args()
        .skip(1)
        .filter_map(|a| a.parse().ok())
        .collect();
    for n in if ns.is_empty() { vec![100, 1000] } else { ns } {
        run(n);
    }
}
