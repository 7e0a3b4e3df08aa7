//! Sidecar validation.

use super::*;

pub(super) fn sidecar(v: &mut V, s: &Sidecar) {
    if s.ingress.is_empty()
        && s.egress.is_empty()
        && s.outbound_traffic_policy.is_none()
        && s.inbound_connection_pool.is_none()
    {
        v.err("spec", "empty Sidecar configuration");
    }
    if let Some(sel) = &s.workload_selector {
        selector_labels(v, "spec.workloadSelector.labels", &sel.labels);
        if sel.labels.is_empty() {
            v.warn(
                "spec.workloadSelector",
                "a workloadSelector without labels applies to every workload in the namespace",
            );
        }
    }
    let mut ingress_ports = HashSet::new();
    for (i, ing) in s.ingress.iter().enumerate() {
        let p = format!("spec.ingress[{i}]");
        match ing.port.number {
            Some(n) => {
                port(v, &format!("{p}.port.number"), n);
                if !ingress_ports.insert((ing.bind.clone(), n)) {
                    v.err(
                        format!("{p}.port.number"),
                        format!("port {n} is used by more than one ingress listener"),
                    );
                }
            }
            None => v.err(
                format!("{p}.port.number"),
                "ingress listeners need a port number",
            ),
        }
        if let Some(ep) = &ing.default_endpoint {
            if !is_default_endpoint(ep) {
                v.err(format!("{p}.defaultEndpoint"), format!("{ep:?} must be 127.0.0.1:PORT, 0.0.0.0:PORT, [::1]:PORT, [::]:PORT or unix:///path"));
            }
        }
        if let Some(pool) = &ing.connection_pool {
            connection_pool(v, &format!("{p}.connectionPool"), pool);
        }
        if let Some(tls) = &ing.tls {
            if matches!(
                tls.mode,
                Some(ServerTlsMode::IstioMutual | ServerTlsMode::AutoPassthrough)
            ) {
                v.err(format!("{p}.tls.mode"), "ISTIO_MUTUAL and AUTO_PASSTHROUGH are not allowed on sidecar ingress listeners");
            }
            if tls.credential_name.is_some() {
                v.err(
                    format!("{p}.tls.credentialName"),
                    "credentialName is not supported on sidecar ingress listeners",
                );
            }
        }
        if let Some(b) = &ing.bind {
            if b.parse::<IpAddr>().is_err() {
                v.err(
                    format!("{p}.bind"),
                    format!("bind {b:?} must be an IP address"),
                );
            }
        }
    }
    let mut portless = 0;
    for (i, eg) in s.egress.iter().enumerate() {
        let p = format!("spec.egress[{i}]");
        if eg.hosts.is_empty() {
            v.err(
                format!("{p}.hosts"),
                "an egress listener needs at least one host",
            );
        }
        let mut seen = HashSet::new();
        for (j, h) in eg.hosts.iter().enumerate() {
            let hp = format!("{p}.hosts[{j}]");
            sidecar_egress_host(v, &hp, h);
            if !seen.insert(h.as_str()) {
                v.warn(&hp, format!("duplicate egress host {h:?}"));
            }
        }
        if eg.hosts.len() > 1 && eg.hosts.iter().any(|h| h == "*/*") {
            v.warn(
                format!("{p}.hosts"),
                "\"*/*\" selects every host; the other hosts add nothing",
            );
        }
        match eg.port.as_ref().and_then(|pt| pt.number) {
            Some(n) => port(v, &format!("{p}.port.number"), n),
            None => {
                portless += 1;
                if i + 1 != s.egress.len() {
                    v.err(
                        &p,
                        "the egress listener without a port must be the last one",
                    );
                }
            }
        }
        if let Some(b) = &eg.bind {
            if b.parse::<IpAddr>().is_err() && !b.starts_with("unix://") {
                v.err(
                    format!("{p}.bind"),
                    format!("bind {b:?} must be an IP address or unix:// path"),
                );
            }
        }
    }
    if portless > 1 {
        v.err("spec.egress", "only one egress listener may omit the port");
    }
    if let Some(otp) = &s.outbound_traffic_policy {
        if let Some(proxy) = &otp.egress_proxy {
            if otp.mode != Some(OutboundTrafficPolicyMode::AllowAny) {
                v.err(
                    "spec.outboundTrafficPolicy.egressProxy",
                    "egressProxy may only be set with mode ALLOW_ANY",
                );
            }
            destination(v, "spec.outboundTrafficPolicy.egressProxy", proxy);
        }
    }
    if let Some(pool) = &s.inbound_connection_pool {
        connection_pool(v, "spec.inboundConnectionPool", pool);
    }
}

pub(super) fn is_default_endpoint(ep: &str) -> bool {
    if let Some(path) = ep.strip_prefix("unix://") {
        return path.starts_with('/') || path.starts_with('@');
    }
    let Some((host, port)) = ep.rsplit_once(':') else {
        return false;
    };
    matches!(host, "127.0.0.1" | "0.0.0.0" | "[::1]" | "[::]")
        && port.parse::<u16>().is_ok_and(|p| p > 0)
}

/// Sidecar egress hosts are `namespace/dnsName`: namespace `*`, `.`, `~` or a name.
pub(super) fn sidecar_egress_host(v: &mut V, p: &str, h: &str) {
    let Some((ns, name)) = h.split_once('/') else {
        v.err(p, format!("egress host {h:?} must be of the form namespace/dnsName (e.g. \"./*\", \"istio-system/*\", \"*/reviews.default.svc.cluster.local\")"));
        return;
    };
    if !(ns == "*" || ns == "." || ns == "~" || is_dns1123_label(ns)) {
        v.err(p, format!("invalid namespace {ns:?} in egress host {h:?}"));
    }
    if name.is_empty() {
        v.err(p, format!("egress host {h:?} has an empty DNS name"));
    } else {
        host(v, p, name, true);
    }
}
