//! ServiceEntry, WorkloadEntry and WorkloadGroup validation.

use super::*;

pub(super) fn service_entry(v: &mut V, s: &ServiceEntry) {
    if s.hosts.is_empty() {
        v.err("spec.hosts", "a ServiceEntry needs at least one host");
    }
    for (i, h) in s.hosts.iter().enumerate() {
        if h == "*" {
            v.err(
                format!("spec.hosts[{i}]"),
                "hostname cannot be the wildcard `*`",
            );
        } else {
            host(v, &format!("spec.hosts[{i}]"), h, true);
        }
    }
    let resolution = s.resolution.unwrap_or(Resolution::None);
    for (i, a) in s.addresses.iter().enumerate() {
        if let Some(e) = cidr_error(a) {
            v.err(format!("spec.addresses[{i}]"), e);
        } else if a.contains('/') && !matches!(resolution, Resolution::None | Resolution::Static) {
            v.err(
                format!("spec.addresses[{i}]"),
                "CIDR addresses are allowed only with NONE or STATIC resolution",
            );
        }
    }
    let mut names = HashSet::new();
    let mut numbers = HashSet::new();
    for (i, p) in s.ports.iter().enumerate() {
        let pp = format!("spec.ports[{i}]");
        port(v, &format!("{pp}.number"), p.number);
        if let Some(t) = p.target_port {
            port(v, &format!("{pp}.targetPort"), t);
        }
        if !is_port_name(&p.name) {
            v.err(
                format!("{pp}.name"),
                format!("invalid port name {:?}", p.name),
            );
        }
        if !names.insert(p.name.as_str()) {
            v.err(
                format!("{pp}.name"),
                format!("port name {:?} is already defined", p.name),
            );
        }
        if !numbers.insert(p.number) {
            v.err(
                format!("{pp}.number"),
                format!("port {} is already defined", p.number),
            );
        }
    }
    if s.workload_selector.is_some() && !s.endpoints.is_empty() {
        v.err(
            "spec",
            "only one of workloadSelector or endpoints can be set",
        );
    }
    if let Some(sel) = &s.workload_selector {
        selector_labels(v, "spec.workloadSelector.labels", &sel.labels);
    }
    match resolution {
        Resolution::None if !s.endpoints.is_empty() => {
            v.err(
                "spec.endpoints",
                "endpoints must not be set with resolution NONE",
            );
        }
        Resolution::Static if s.endpoints.is_empty() && s.workload_selector.is_none() => {
            v.warn(
                "spec.endpoints",
                "resolution STATIC without endpoints or a workloadSelector has no endpoints",
            );
        }
        Resolution::DnsRoundRobin if s.endpoints.len() > 1 => {
            v.err(
                "spec.endpoints",
                "DNS_ROUND_ROBIN resolution allows at most one endpoint",
            );
        }
        Resolution::Dns | Resolution::DnsRoundRobin if s.endpoints.is_empty() => {
            for (i, h) in s.hosts.iter().enumerate() {
                if h.starts_with('*') {
                    v.err(format!("spec.hosts[{i}]"), "hosts must be fully qualified (no wildcard) with DNS resolution and no endpoints");
                }
            }
        }
        _ => {}
    }
    let port_names: HashSet<&str> = s.ports.iter().map(|p| p.name.as_str()).collect();
    for (i, e) in s.endpoints.iter().enumerate() {
        let ep = format!("spec.endpoints[{i}]");
        addressed_workload_entry(v, &ep, e);
        if resolution == Resolution::Static {
            if let Some(a) = &e.address {
                if !a.starts_with("unix://") && a.parse::<IpAddr>().is_err() {
                    v.err(
                        format!("{ep}.address"),
                        format!("{a:?} must be an IP address with STATIC resolution"),
                    );
                }
            }
        }
        for name in e.ports.keys() {
            if !port_names.contains(name.as_str()) {
                v.err(
                    join_key(&format!("{ep}.ports"), name),
                    format!("endpoint port {name:?} is not a port of the ServiceEntry"),
                );
            }
        }
    }
    export_to(v, "spec.exportTo", &s.export_to);
}

pub(super) fn is_port_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() < 63
        && name.bytes().all(|c| c.is_ascii_alphanumeric() || c == b'-')
        && !name.starts_with('-')
        && !name.ends_with('-')
}

/// WorkloadEntries and ServiceEntry endpoints need an address (or a network that reaches
/// them through a gateway); WorkloadGroup templates must not have one.
pub(super) fn addressed_workload_entry(v: &mut V, p: &str, e: &WorkloadEntry) {
    if e.address.as_deref().unwrap_or_default().is_empty() && e.network.is_none() {
        v.err(format!("{p}.address"), "address is required (or network)");
    }
    workload_entry(v, p, e);
}

pub(super) fn workload_entry(v: &mut V, p: &str, e: &WorkloadEntry) {
    let addr = e.address.as_deref().unwrap_or_default();
    if let Some(path) = addr.strip_prefix("unix://") {
        if !(path.starts_with('/') || path.starts_with('@')) {
            v.err(
                format!("{p}.address"),
                "a unix socket address must be an absolute path or an abstract socket (@name)",
            );
        }
        if path.ends_with('/') {
            v.err(
                format!("{p}.address"),
                "a unix socket address must not be a directory",
            );
        }
        if !e.ports.is_empty() {
            v.err(
                format!("{p}.ports"),
                "a unix socket address cannot have ports",
            );
        }
    } else if !addr.is_empty() && addr.parse::<IpAddr>().is_err() {
        host(v, &format!("{p}.address"), addr, false);
    }
    for (name, n) in &e.ports {
        let pp = join_key(&format!("{p}.ports"), name);
        if !is_port_name(name) {
            v.err(&pp, format!("invalid port name {name:?}"));
        }
        port(v, &pp, *n);
    }
    labels(v, &format!("{p}.labels"), &e.labels);
    if let Some(sa) = &e.service_account {
        if !is_dns1123_subdomain(sa) {
            v.err(
                format!("{p}.serviceAccount"),
                format!("invalid service account name {sa:?}"),
            );
        }
    }
}

pub(super) fn workload_group(v: &mut V, s: &WorkloadGroup) {
    workload_entry(v, "spec.template", &s.template);
    if s.template.address.as_deref().is_some_and(|a| !a.is_empty()) {
        v.err(
            "spec.template.address",
            "a WorkloadGroup template must not set an address",
        );
    }
    if let Some(m) = &s.metadata {
        labels(v, "spec.metadata.labels", &m.labels);
    }
    if let Some(pr) = &s.probe {
        probe(v, "spec.probe", pr);
    }
}

pub(super) fn probe(v: &mut V, p: &str, pr: &ReadinessProbe) {
    let kinds = usize::from(pr.http_get.is_some())
        + usize::from(pr.tcp_socket.is_some())
        + usize::from(pr.exec.is_some())
        + usize::from(pr.grpc.is_some());
    if kinds > 1 {
        v.err(p, "only one of httpGet, tcpSocket, exec or grpc may be set");
    }
    if kinds == 0 {
        v.err(p, "a probe needs one of httpGet, tcpSocket, exec or grpc");
    }
    if let Some(h) = &pr.http_get {
        port(v, &format!("{p}.httpGet.port"), h.port);
        if let Some(s) = &h.scheme {
            if !matches!(s.as_str(), "" | "HTTP" | "HTTPS") {
                v.err(
                    format!("{p}.httpGet.scheme"),
                    "scheme must be HTTP or HTTPS",
                );
            }
        }
    }
    if let Some(t) = &pr.tcp_socket {
        port(v, &format!("{p}.tcpSocket.port"), t.port);
    }
    if let Some(g) = &pr.grpc {
        port(v, &format!("{p}.grpc.port"), g.port);
    }
    if let Some(e) = &pr.exec {
        if e.command.is_empty() {
            v.err(format!("{p}.exec.command"), "command must not be empty");
        }
    }
    for (field, val) in [
        ("initialDelaySeconds", pr.initial_delay_seconds),
        ("timeoutSeconds", pr.timeout_seconds),
        ("periodSeconds", pr.period_seconds),
        ("successThreshold", pr.success_threshold),
        ("failureThreshold", pr.failure_threshold),
    ] {
        non_negative(v, format!("{p}.{field}"), val);
    }
}
