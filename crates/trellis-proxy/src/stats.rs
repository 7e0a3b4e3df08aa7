//! Proxy-internal counters, rendered in Prometheus text format on the admin port. (Istio's
//! request metrics, with their labels, arrive with the observability work.)

use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};

use trellis_identity::tls::Certified;

use crate::config::Config;

macro_rules! counters {
    ($($field:ident => $name:literal, $kind:literal, $help:literal;)*) => {
        /// Process-wide counters.
        #[derive(Debug, Default)]
        pub struct Stats {
            $(pub $field: AtomicU64,)*
            /// Authorization denials by policy ("namespace/name", or the ALLOW policies
            /// none of whose rules matched). Bounded by the policies a workload has.
            pub denials_by_policy: std::sync::Mutex<std::collections::BTreeMap<String, u64>>,
        }

        impl Stats {
            fn write_counters(&self, out: &mut String) {
                $(
                    let _ = writeln!(out, "# HELP {} {}", $name, $help);
                    let _ = writeln!(out, "# TYPE {} {}", $name, $kind);
                    let _ = writeln!(out, "{} {}", $name, self.$field.load(Ordering::Relaxed));
                )*
            }
        }
    };
}

counters! {
    downstream_cx_total => "trellis_proxy_downstream_connections_total", "counter", "Connections accepted.";
    downstream_cx_active => "trellis_proxy_downstream_connections_active", "gauge", "Connections open now.";
    requests_total => "trellis_proxy_requests_total", "counter", "HTTP requests proxied.";
    responses_5xx_total => "trellis_proxy_responses_5xx_total", "counter", "HTTP responses with a 5xx status (from upstream or the proxy).";
    upstream_connect_failures_total => "trellis_proxy_upstream_connect_failures_total", "counter", "Upstream connections that could not be made (UF).";
    blackhole_total => "trellis_proxy_blackhole_connections_total", "counter", "Outbound connections refused by REGISTRY_ONLY (BlackHoleCluster).";
    passthrough_total => "trellis_proxy_passthrough_connections_total", "counter", "Outbound connections to unknown destinations passed through (PassthroughCluster).";
    detection_timeouts_total => "trellis_proxy_protocol_detection_timeouts_total", "counter", "Connections whose protocol detection ended on the timeout (treated as TCP).";
    mirror_requests_total => "trellis_proxy_mirror_requests_total", "counter", "Requests copied to a mirror.";
    mirror_skipped_total => "trellis_proxy_mirror_skipped_total", "counter", "Requests not mirrored (streaming body, missing mirror cluster, or the mirror budget was full).";
    rate_limited_total => "trellis_proxy_rate_limited_requests_total", "counter", "Requests refused by a local rate limit (429, RL).";
    config_updates_total => "trellis_proxy_config_updates_total", "counter", "Snapshots applied.";
    tls_handshake_errors_total => "trellis_proxy_tls_handshake_errors_total", "counter", "TLS handshakes (gateway and mesh mTLS) that failed or timed out.";
    inbound_plaintext_refused_total => "trellis_proxy_inbound_plaintext_refused_total", "counter", "Inbound connections refused because PeerAuthentication is STRICT and they were not mesh mTLS.";
    jwt_rejections_total => "trellis_proxy_jwt_rejections_total", "counter", "Inbound requests refused (401) because their JWT did not verify.";
    authorization_denials_total => "trellis_proxy_authorization_denials_total", "counter", "Inbound requests and connections denied by an AuthorizationPolicy (403 RBAC, or closed).";
    inbound_mtls_connections_total => "trellis_proxy_inbound_mtls_connections_total", "counter", "Inbound connections from peer proxies over mesh mutual TLS.";
    dns_updates_total => "trellis_proxy_dns_updates_total", "counter", "Endpoint updates after a STRICT_DNS name resolved differently.";
    retry_overflow_total => "trellis_proxy_retry_overflow_total", "counter", "Retries not made because the cluster's maxRetries were in flight.";
    config_rejections_total => "trellis_proxy_config_rejections_total", "counter", "Snapshots refused (the last good one stays).";
    certificates_issued_total => "trellis_proxy_certificates_issued_total", "counter", "Workload certificates received from the CA (first and renewals).";
    certificate_failures_total => "trellis_proxy_certificate_failures_total", "counter", "Certificate requests that failed (the current certificate stays).";
}

impl Stats {
    pub fn inc(c: &AtomicU64) {
        c.fetch_add(1, Ordering::Relaxed);
    }

    /// Counts a denial by `policy`.
    pub fn denied_by(&self, policy: &str) {
        Stats::inc(&self.authorization_denials_total);
        let mut m = self
            .denials_by_policy
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        // Policies come and go with snapshots; the map stays small (one entry per policy
        // that ever denied), and a runaway count of names is capped.
        if m.len() < 1024 || m.contains_key(policy) {
            *m.entry(policy.to_string()).or_default() += 1;
        }
    }

    /// Prometheus text exposition.
    pub fn render(&self, cfg: &Config, cert: Option<&Certified>) -> String {
        let mut out = String::with_capacity(4096);
        self.write_counters(&mut out);
        let _ = writeln!(
            out,
            "# HELP trellis_proxy_access_log_dropped_total Access log lines dropped because the writer's queue was full.\n# TYPE trellis_proxy_access_log_dropped_total counter\ntrellis_proxy_access_log_dropped_total {}",
            crate::accesslog::DROPPED.load(Ordering::Relaxed)
        );
        let _ = writeln!(
            out,
            "# HELP trellis_proxy_spans_exported_total Trace spans sent to a collector.\n# TYPE trellis_proxy_spans_exported_total counter\ntrellis_proxy_spans_exported_total {}\n# HELP trellis_proxy_spans_dropped_total Trace spans dropped: the exporter's queue was full or the collector did not take them.\n# TYPE trellis_proxy_spans_dropped_total counter\ntrellis_proxy_spans_dropped_total {}",
            crate::trace::EXPORTED.load(Ordering::Relaxed),
            crate::trace::DROPPED.load(Ordering::Relaxed)
        );
        {
            let m = self
                .denials_by_policy
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            let _ = writeln!(
                out,
                "# HELP trellis_proxy_authorization_denials_by_policy_total Denials by AuthorizationPolicy."
            );
            let _ = writeln!(
                out,
                "# TYPE trellis_proxy_authorization_denials_by_policy_total counter"
            );
            for (policy, n) in m.iter() {
                let _ = writeln!(
                    out,
                    "trellis_proxy_authorization_denials_by_policy_total{{policy=\"{}\"}} {n}",
                    escape(policy)
                );
            }
        }
        if let Some(c) = cert {
            let _ = writeln!(
                out,
                "# HELP trellis_proxy_certificate_expiration_timestamp_seconds When the workload certificate in use expires (Unix time)."
            );
            let _ = writeln!(
                out,
                "# TYPE trellis_proxy_certificate_expiration_timestamp_seconds gauge"
            );
            let _ = writeln!(
                out,
                "trellis_proxy_certificate_expiration_timestamp_seconds{{identity=\"{}\"}} {}",
                escape(c.spiffe.as_deref().unwrap_or("")),
                c.not_after
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| d.as_secs())
            );
        }
        let _ = writeln!(out, "# HELP trellis_proxy_config_info The snapshot in use.");
        let _ = writeln!(out, "# TYPE trellis_proxy_config_info gauge");
        let _ = writeln!(
            out,
            "trellis_proxy_config_info{{version=\"{}\"}} 1",
            escape(&cfg.version)
        );
        let _ = writeln!(
            out,
            "# HELP trellis_proxy_route_requests_total Requests per HTTP route (a VirtualService rule, by its name)."
        );
        let _ = writeln!(out, "# TYPE trellis_proxy_route_requests_total counter");
        for t in &cfg.targets {
            let Some(table) = &t.routes else { continue };
            for (r, p) in table.routes().iter().zip(&t.route_policies) {
                let _ = writeln!(
                    out,
                    "trellis_proxy_route_requests_total{{host=\"{}\",port=\"{}\",route=\"{}\"}} {}",
                    escape(&t.hostname),
                    t.port,
                    escape(&r.name),
                    p.requests.load(Ordering::Relaxed)
                );
            }
        }
        let _ = writeln!(
            out,
            "# HELP trellis_proxy_endpoint_requests_total Requests per upstream endpoint."
        );
        let _ = writeln!(out, "# TYPE trellis_proxy_endpoint_requests_total counter");
        for c in &cfg.clusters {
            for e in &c.endpoints {
                let _ = writeln!(
                    out,
                    "trellis_proxy_endpoint_requests_total{{cluster=\"{}\",endpoint=\"{}\"}} {}",
                    escape(&c.name),
                    e.addr,
                    e.stats.requests.load(Ordering::Relaxed)
                );
            }
        }
        out
    }
}

/// A Prometheus label value, escaped.
pub(crate) fn escape(s: &str) -> String {
    s.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}
