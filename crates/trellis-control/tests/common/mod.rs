//! What several of these test binaries share: the reviews service with two subsets, the
//! VirtualService that sends everything to v2, parsing, and bounded waiting.
#![allow(dead_code)] // each test binary uses its own part

use std::time::{Duration, Instant};

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
