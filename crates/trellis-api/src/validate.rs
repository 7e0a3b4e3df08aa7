//! Validation with Istio's semantics: the checks Istio's admission webhook and CRD schemas
//! make (required fields, host syntax, weights, regexes, ports, durations, exclusive
//! fields, CIDRs, policy combinations). Each finding carries the field path it is about;
//! the loader turns paths into file positions.
//!
//! Where Trellis is stricter than current Istio it says so in docs/compatibility.md (route
//! weights must sum to 100 when a route has more than one destination, as Istio required
//! before 1.9; Envoy would silently normalise them).

use std::collections::{BTreeMap, HashSet};
use std::net::IpAddr;

use crate::common::{
    Duration, Labels, MatchLabelsSelector, Percent, PolicyTargetReference, StringMatch,
};
use crate::de::join_key;
use crate::kube::ServiceSpec;
use crate::networking::*;
use crate::resource::{Level, Resource, Spec};
use crate::security::*;
use crate::telemetry::{TagOperation, Telemetry};
use crate::workload::WorkloadSpec;

/// A validation finding.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Issue {
    pub level: Level,
    pub path: String,
    pub message: String,
}

/// Longest regex accepted (Istio's limit).
pub const MAX_REGEX_LEN: usize = 1024;

#[derive(Default)]
struct V {
    issues: Vec<Issue>,
}

impl V {
    fn err(&mut self, path: impl Into<String>, message: impl Into<String>) {
        self.issues.push(Issue {
            level: Level::Error,
            path: path.into(),
            message: message.into(),
        });
    }

    fn warn(&mut self, path: impl Into<String>, message: impl Into<String>) {
        self.issues.push(Issue {
            level: Level::Warning,
            path: path.into(),
            message: message.into(),
        });
    }
}

/// Validates one resource on its own (cross-resource checks are the analyzers' job).
pub fn validate(r: &Resource) -> Vec<Issue> {
    let mut v = V::default();
    validate_meta(&mut v, r);
    match &r.spec {
        Spec::VirtualService(s) => virtual_service(&mut v, s),
        Spec::DestinationRule(s) => destination_rule(&mut v, s),
        Spec::Gateway(s) => gateway(&mut v, s, r.name()),
        Spec::ServiceEntry(s) => service_entry(&mut v, s),
        Spec::Sidecar(s) => sidecar(&mut v, s),
        Spec::WorkloadEntry(s) => workload_entry(&mut v, "spec", s),
        Spec::WorkloadGroup(s) => workload_group(&mut v, s),
        Spec::PeerAuthentication(s) => peer_authentication(&mut v, s),
        Spec::AuthorizationPolicy(s) => authorization_policy(&mut v, s),
        Spec::RequestAuthentication(s) => request_authentication(&mut v, s),
        Spec::Telemetry(s) => telemetry(&mut v, s),
        Spec::Service(s) => service(&mut v, s),
        Spec::Namespace(_) => {}
        Spec::Workload(s) => workload(&mut v, s),
    }
    v.issues
}

// ---------------------------------------------------------------------------------------
// Shared checks
// ---------------------------------------------------------------------------------------

fn validate_meta(v: &mut V, r: &Resource) {
    let name = r.name();
    if name.is_empty() {
        v.err("metadata.name", "missing required field `name`");
    } else if !is_dns1123_subdomain(name) {
        v.err(
            "metadata.name",
            format!("{name:?} is not a valid name (lowercase letters, digits, '-' and '.', starting and ending with a letter or digit, at most 253 characters)"),
        );
    }
    let ns = r.namespace();
    if r.kind.namespaced() && !is_dns1123_label(ns) {
        v.err(
            "metadata.namespace",
            format!("{ns:?} is not a valid namespace name (lowercase letters, digits and '-', at most 63 characters)"),
        );
    }
    labels(v, "metadata.labels", &r.meta.labels);
}

/// RFC 1123 label: `[a-z0-9]([-a-z0-9]*[a-z0-9])?`, at most 63 characters.
pub fn is_dns1123_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

/// RFC 1123 subdomain: dot-separated labels, at most 253 characters.
pub fn is_dns1123_subdomain(s: &str) -> bool {
    s.len() <= 253 && s.split('.').all(is_dns1123_label)
}

/// A DNS name label as hosts use it (letters of either case, digits, '-', '_').
fn is_host_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .all(|c| c.is_ascii_alphanumeric() || c == b'-' || c == b'_')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

/// Why a host is not valid, if it is not: `*`, `*.example.com`, `reviews`,
/// `reviews.default.svc.cluster.local`, or an IP address.
pub fn host_error(host: &str, allow_wildcard: bool) -> Option<String> {
    if host.is_empty() {
        return Some("host must not be empty".to_string());
    }
    if host.parse::<IpAddr>().is_ok() {
        return None;
    }
    if host == "*" {
        return (!allow_wildcard).then(|| "wildcard host `*` is not allowed here".to_string());
    }
    if host.len() > 255 {
        return Some(format!("host {host:?} is longer than 255 characters"));
    }
    let rest = match host.strip_prefix("*.") {
        Some(rest) if allow_wildcard => rest,
        Some(_) => return Some(format!("wildcard host {host:?} is not allowed here")),
        None => host,
    };
    if rest.contains('*') {
        return Some(format!(
            "host {host:?} has a partial wildcard; `*` may only be the whole host or its first label (`*.example.com`)"
        ));
    }
    let rest = rest.strip_suffix('.').unwrap_or(rest);
    for label in rest.split('.') {
        if !is_host_label(label) {
            return Some(format!(
                "host {host:?} is not a valid DNS name (label {label:?})"
            ));
        }
    }
    None
}

fn host(v: &mut V, path: &str, host: &str, allow_wildcard: bool) {
    if let Some(e) = host_error(host, allow_wildcard) {
        v.err(path, e);
    }
}

fn port(v: &mut V, path: &str, n: u32) {
    if !(1..=65535).contains(&n) {
        v.err(path, format!("port {n} must be in 1..65535"));
    }
}

fn regex(v: &mut V, path: &str, re: &str) {
    if re.is_empty() {
        v.err(path, "regex must not be empty");
    } else if re.len() > MAX_REGEX_LEN {
        v.err(
            path,
            format!("regex is longer than {MAX_REGEX_LEN} characters"),
        );
    } else if let Err(e) = regex::Regex::new(re) {
        let detail = e.to_string();
        let last = detail.lines().last().unwrap_or_default().trim().to_string();
        v.err(path, format!("invalid regex {re:?}: {last}"));
    }
}

fn string_match(v: &mut V, path: &str, m: &StringMatch, allow_empty_prefix: bool) {
    if m.set_count() > 1 {
        v.err(path, "only one of exact, prefix or regex may be set");
    }
    if let Some(re) = &m.regex {
        regex(v, &format!("{path}.regex"), re);
    }
    if let Some(p) = &m.prefix {
        if p.is_empty() && !allow_empty_prefix {
            v.err(format!("{path}.prefix"), "prefix must not be empty");
        }
    }
}

/// Durations that Istio's CRDs require to be at least 1ms.
fn duration(v: &mut V, path: &str, d: Option<&Duration>) {
    if let Some(d) = d {
        if d.0 < std::time::Duration::from_millis(1) {
            v.err(path, format!("duration {d} must be at least 1ms"));
        }
    }
}

fn percent(v: &mut V, path: &str, p: Option<&Percent>) {
    if let Some(p) = p {
        if !(0.0..=100.0).contains(&p.value) {
            v.err(
                format!("{path}.value"),
                format!("percentage {} must be in 0..100", p.value),
            );
        }
    }
}

/// Why a CIDR (or a bare IP address) is not valid, if it is not.
pub fn cidr_error(s: &str) -> Option<String> {
    let (addr, prefix) = match s.split_once('/') {
        Some((a, p)) => (a, Some(p)),
        None => (s, None),
    };
    let Ok(ip) = addr.parse::<IpAddr>() else {
        return Some(format!(
            "{s:?} is not an IP address or CIDR (e.g. 10.0.0.0/8)"
        ));
    };
    if let Some(prefix) = prefix {
        let max = if ip.is_ipv4() { 32 } else { 128 };
        match prefix.parse::<u8>() {
            Ok(p) if p <= max => {}
            _ => return Some(format!("{s:?}: prefix length must be 0..{max}")),
        }
    }
    None
}

fn cidrs(v: &mut V, path: &str, list: &[String]) {
    for (i, c) in list.iter().enumerate() {
        if let Some(e) = cidr_error(c) {
            v.err(format!("{path}[{i}]"), e);
        }
    }
}

/// Kubernetes label keys (`[prefix/]name`) and values.
fn labels(v: &mut V, path: &str, labels: &Labels) {
    for (k, val) in labels {
        let p = join_key(path, k);
        if let Some(e) = label_key_error(k) {
            v.err(&p, e);
        }
        if val.len() > 63
            || !val
                .bytes()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'-' | b'_' | b'.'))
            || val.starts_with(['-', '_', '.'])
            || val.ends_with(['-', '_', '.'])
        {
            v.err(&p, format!("invalid label value {val:?} (at most 63 letters, digits, '-', '_' or '.', starting and ending with a letter or digit)"));
        }
    }
}

fn label_key_error(k: &str) -> Option<String> {
    let (prefix, name) = match k.rsplit_once('/') {
        Some((p, n)) => (Some(p), n),
        None => (None, k),
    };
    if let Some(p) = prefix {
        if !is_dns1123_subdomain(p) {
            return Some(format!(
                "invalid label key {k:?}: prefix must be a DNS subdomain"
            ));
        }
    }
    let ok = !name.is_empty()
        && name.len() <= 63
        && name
            .bytes()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'-' | b'_' | b'.'))
        && name.as_bytes()[0].is_ascii_alphanumeric()
        && name.as_bytes()[name.len() - 1].is_ascii_alphanumeric();
    (!ok).then(|| format!("invalid label key {k:?}"))
}

fn selector_labels(v: &mut V, path: &str, labels: &Labels) {
    for (k, val) in labels {
        let p = join_key(path, k);
        if k.is_empty() {
            v.err(&p, "label key must not be empty");
        } else if k.contains('*') {
            v.err(&p, "wildcard not allowed in label key match");
        }
        if val.contains('*') {
            v.err(&p, "wildcard not allowed in label value match");
        }
    }
}

fn export_to(v: &mut V, path: &str, list: &[String]) {
    let mut seen = HashSet::new();
    for (i, ns) in list.iter().enumerate() {
        let p = format!("{path}[{i}]");
        if !seen.insert(ns.as_str()) {
            v.err(&p, format!("duplicate exportTo entry {ns:?}"));
        }
        if !matches!(ns.as_str(), "." | "*" | "~") && !is_dns1123_label(ns) {
            v.err(
                &p,
                format!("exportTo entry {ns:?} must be \".\", \"*\", \"~\" or a namespace name"),
            );
        }
    }
    if list.len() > 1 && list.iter().any(|n| n == "*") {
        v.err(
            path,
            "cannot mix \"*\" (export to all namespaces) with other exportTo entries",
        );
    }
    if list.len() > 1 && list.iter().any(|n| n == "~") {
        v.err(
            path,
            "cannot mix \"~\" (export to no namespace) with other exportTo entries",
        );
    }
}

fn target_refs(
    v: &mut V,
    has_selector: bool,
    target_ref: Option<&PolicyTargetReference>,
    target_refs: &[PolicyTargetReference],
) {
    let count = usize::from(has_selector)
        + usize::from(target_ref.is_some())
        + usize::from(!target_refs.is_empty());
    if count > 1 {
        v.err(
            "spec",
            "only one of selector, targetRef or targetRefs can be set",
        );
    }
    let all = target_ref
        .map(|r| ("spec.targetRef".to_string(), r))
        .into_iter()
        .chain(
            target_refs
                .iter()
                .enumerate()
                .map(|(i, r)| (format!("spec.targetRefs[{i}]"), r)),
        );
    for (p, r) in all {
        if r.namespace.as_deref().is_some_and(|n| !n.is_empty()) {
            v.err(
                format!("{p}.namespace"),
                "cross namespace referencing is not currently supported",
            );
        }
        if !matches!(
            r.kind.as_str(),
            "Service" | "ServiceEntry" | "Gateway" | "GatewayClass"
        ) {
            v.err(format!("{p}.kind"), format!("targetRef kind {:?} is not supported (Service, ServiceEntry, Gateway or GatewayClass)", r.kind));
        }
        if r.name.is_empty() {
            v.err(format!("{p}.name"), "name must not be empty");
        }
    }
}

fn match_labels(v: &mut V, path: &str, sel: Option<&MatchLabelsSelector>) {
    if let Some(s) = sel {
        selector_labels(v, &format!("{path}.matchLabels"), &s.match_labels);
    }
}

// ---------------------------------------------------------------------------------------
// VirtualService
// ---------------------------------------------------------------------------------------

fn virtual_service(v: &mut V, s: &VirtualService) {
    let mesh_bound = s.gateways.is_empty() || s.gateways.iter().any(|g| g == "mesh");
    if s.hosts.is_empty() && !s.gateways.is_empty() {
        v.err(
            "spec.gateways",
            "a delegate VirtualService (one without hosts) must not name gateways",
        );
    }
    let mut seen = HashSet::new();
    for (i, h) in s.hosts.iter().enumerate() {
        let p = format!("spec.hosts[{i}]");
        if h == "*" && mesh_bound {
            v.err(
                &p,
                "wildcard host `*` is not allowed for VirtualServices bound to the mesh gateway",
            );
        } else {
            host(v, &p, h, true);
        }
        if !seen.insert(h.to_ascii_lowercase()) {
            v.err(&p, format!("duplicate host {h:?}"));
        }
    }
    for (i, g) in s.gateways.iter().enumerate() {
        gateway_ref(v, &format!("spec.gateways[{i}]"), g);
    }
    if s.http.is_empty() && s.tcp.is_empty() && s.tls.is_empty() {
        v.err(
            "spec",
            "at least one of http, tcp or tls routes must be given",
        );
    }
    export_to(v, "spec.exportTo", &s.export_to);
    for (i, r) in s.http.iter().enumerate() {
        http_route(v, &format!("spec.http[{i}]"), r);
    }
    for (i, r) in s.tls.iter().enumerate() {
        let p = format!("spec.tls[{i}]");
        if r.matches.is_empty() {
            v.err(format!("{p}.match"), "a TLS route needs at least one match");
        }
        for (j, m) in r.matches.iter().enumerate() {
            let mp = format!("{p}.match[{j}]");
            if m.sni_hosts.is_empty() {
                v.err(
                    format!("{mp}.sniHosts"),
                    "a TLS match needs at least one SNI host",
                );
            }
            for (k, h) in m.sni_hosts.iter().enumerate() {
                host(v, &format!("{mp}.sniHosts[{k}]"), h, true);
            }
            cidrs(
                v,
                &format!("{mp}.destinationSubnets"),
                &m.destination_subnets,
            );
            if let Some(n) = m.port {
                port(v, &format!("{mp}.port"), n);
            }
            for (k, g) in m.gateways.iter().enumerate() {
                gateway_ref(v, &format!("{mp}.gateways[{k}]"), g);
            }
        }
        l4_routes(v, &p, &r.route);
    }
    for (i, r) in s.tcp.iter().enumerate() {
        let p = format!("spec.tcp[{i}]");
        for (j, m) in r.matches.iter().enumerate() {
            let mp = format!("{p}.match[{j}]");
            cidrs(
                v,
                &format!("{mp}.destinationSubnets"),
                &m.destination_subnets,
            );
            if let Some(src) = &m.source_subnet {
                if let Some(e) = cidr_error(src) {
                    v.err(format!("{mp}.sourceSubnet"), e);
                }
            }
            if let Some(n) = m.port {
                port(v, &format!("{mp}.port"), n);
            }
            for (k, g) in m.gateways.iter().enumerate() {
                gateway_ref(v, &format!("{mp}.gateways[{k}]"), g);
            }
        }
        l4_routes(v, &p, &r.route);
    }
}

fn gateway_ref(v: &mut V, path: &str, g: &str) {
    if g == "mesh" {
        return;
    }
    match g.split_once('/') {
        Some((ns, name)) => {
            if !is_dns1123_label(ns) {
                v.err(
                    path,
                    format!("invalid namespace {ns:?} in gateway reference {g:?}"),
                );
            }
            if !is_dns1123_subdomain(name) {
                v.err(path, format!("invalid gateway name {name:?} in {g:?}"));
            }
        }
        None => {
            if !is_dns1123_subdomain(g) {
                v.err(
                    path,
                    format!(
                        "invalid gateway reference {g:?} (use `name`, `namespace/name` or `mesh`)"
                    ),
                );
            } else if g.contains('.') {
                v.warn(path, format!("gateway reference {g:?} uses the legacy name.namespace form; prefer namespace/name"));
            }
        }
    }
}

fn destination(v: &mut V, path: &str, d: &Destination) {
    if d.host == "*" {
        v.err(format!("{path}.host"), "destination host must not be `*`");
    } else {
        host(v, &format!("{path}.host"), &d.host, false);
    }
    if let Some(subset) = &d.subset {
        if !is_dns1123_label(subset) {
            v.err(
                format!("{path}.subset"),
                format!("subset name {subset:?} is not a valid DNS label"),
            );
        }
    }
    if let Some(n) = d.port.and_then(|p| p.number) {
        port(v, &format!("{path}.port.number"), n);
    }
}

/// Route weights: each 0..100, and when there is more than one destination they must sum
/// to 100.
fn weights(v: &mut V, path: &str, ws: impl Iterator<Item = Option<i32>> + Clone) {
    let n = ws.clone().count();
    let mut sum: i64 = 0;
    for (j, w) in ws.enumerate() {
        let w = w.unwrap_or(0);
        if !(0..=100).contains(&w) {
            v.err(format!("{path}.route[{j}].weight"), "must be 0..100");
        }
        sum += i64::from(w);
    }
    if n > 1 && sum != 100 {
        v.err(
            format!("{path}.route"),
            format!("weights must sum to 100 when a route has more than one destination (they sum to {sum})"),
        );
    }
}

fn l4_routes(v: &mut V, path: &str, routes: &[RouteDestination]) {
    if routes.is_empty() {
        v.err(
            format!("{path}.route"),
            "at least one route destination is required",
        );
    }
    for (j, r) in routes.iter().enumerate() {
        destination(v, &format!("{path}.route[{j}].destination"), &r.destination);
    }
    weights(v, path, routes.iter().map(|r| r.weight));
}

fn header_ops(v: &mut V, path: &str, h: Option<&Headers>) {
    let Some(h) = h else { return };
    for (which, ops) in [("request", &h.request), ("response", &h.response)] {
        let Some(ops) = ops else { continue };
        let p = format!("{path}.{which}");
        for name in ops
            .set
            .keys()
            .chain(ops.add.keys())
            .chain(ops.remove.iter())
        {
            if !is_header_name(name) {
                v.err(&p, format!("invalid header name {name:?}"));
            }
        }
    }
}

fn is_header_name(name: &str) -> bool {
    !name.is_empty()
        && name
            .bytes()
            .all(|c| c.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~:".contains(&c))
}

fn http_route(v: &mut V, p: &str, r: &HttpRoute) {
    let has_route = !r.route.is_empty();
    let pairs = [
        (has_route && r.redirect.is_some(), "route and redirect"),
        (
            has_route && r.direct_response.is_some(),
            "route and directResponse",
        ),
        (
            r.redirect.is_some() && r.direct_response.is_some(),
            "redirect and directResponse",
        ),
        (
            r.delegate.is_some()
                && (has_route || r.redirect.is_some() || r.direct_response.is_some()),
            "delegate and route/redirect/directResponse",
        ),
        (
            r.rewrite.is_some() && r.redirect.is_some(),
            "rewrite and redirect",
        ),
        (
            r.fault.is_some() && r.redirect.is_some(),
            "fault and redirect",
        ),
        (
            r.mirror.is_some() && !r.mirrors.is_empty(),
            "mirror and mirrors",
        ),
    ];
    for (bad, what) in pairs {
        if bad {
            v.err(p, format!("an HTTP route cannot have both {what}"));
        }
    }
    if !has_route && r.redirect.is_none() && r.direct_response.is_none() && r.delegate.is_none() {
        v.err(
            p,
            "an HTTP route needs one of route, redirect, directResponse or delegate",
        );
    }
    for (j, m) in r.matches.iter().enumerate() {
        http_match(v, &format!("{p}.match[{j}]"), m);
    }
    for (j, d) in r.route.iter().enumerate() {
        destination(v, &format!("{p}.route[{j}].destination"), &d.destination);
        header_ops(v, &format!("{p}.route[{j}].headers"), d.headers.as_ref());
    }
    weights(v, p, r.route.iter().map(|d| d.weight));
    header_ops(v, &format!("{p}.headers"), r.headers.as_ref());
    duration(v, &format!("{p}.timeout"), r.timeout.as_ref());
    if let Some(rd) = &r.redirect {
        let rp = format!("{p}.redirect");
        if rd.uri.is_none()
            && rd.authority.is_none()
            && rd.scheme.is_none()
            && rd.port.is_none()
            && rd.derive_port.is_none()
            && rd.prefix_rewrite.is_none()
        {
            v.err(&rp, "a redirect must set at least one of uri, prefixRewrite, authority, scheme, port or derivePort");
        }
        if rd.port.is_some() && rd.derive_port.is_some() {
            v.err(&rp, "only one of port or derivePort may be set");
        }
        if rd.uri.is_some() && rd.prefix_rewrite.is_some() {
            v.err(&rp, "only one of uri or prefixRewrite may be set");
        }
        if let Some(n) = rd.port {
            port(v, &format!("{rp}.port"), n);
        }
        if let Some(code) = rd.redirect_code {
            if !(300..=399).contains(&code) {
                v.err(
                    format!("{rp}.redirectCode"),
                    format!("{code} is not a redirect code (3xx)"),
                );
            }
        }
    }
    if let Some(dr) = &r.direct_response {
        let dp = format!("{p}.directResponse");
        if !(200..=599).contains(&dr.status) {
            v.err(
                format!("{dp}.status"),
                format!("status {} must be in 200..599", dr.status),
            );
        }
        if let Some(body) = &dr.body {
            if body.string.is_some() && body.bytes.is_some() {
                v.err(
                    format!("{dp}.body"),
                    "only one of string or bytes may be set",
                );
            }
            if let Some(b) = &body.bytes {
                if !is_base64(b) {
                    v.err(format!("{dp}.body.bytes"), "must be base64-encoded");
                }
            }
        }
    }
    if let Some(d) = &r.delegate {
        let dp = format!("{p}.delegate");
        match &d.name {
            Some(n) if is_dns1123_subdomain(n) => {}
            Some(n) => v.err(
                format!("{dp}.name"),
                format!("invalid VirtualService name {n:?}"),
            ),
            None => v.err(format!("{dp}.name"), "delegate needs a name"),
        }
        if let Some(ns) = &d.namespace {
            if !is_dns1123_label(ns) {
                v.err(
                    format!("{dp}.namespace"),
                    format!("invalid namespace {ns:?}"),
                );
            }
        }
    }
    if let Some(rw) = &r.rewrite {
        let rp = format!("{p}.rewrite");
        if rw.uri.is_some() && rw.uri_regex_rewrite.is_some() {
            v.err(&rp, "only one of uri or uriRegexRewrite may be set");
        }
        if let Some(rr) = &rw.uri_regex_rewrite {
            match &rr.pattern {
                Some(re) => regex(v, &format!("{rp}.uriRegexRewrite.match"), re),
                None => v.err(
                    format!("{rp}.uriRegexRewrite.match"),
                    "match regex is required",
                ),
            }
            if rr.rewrite.is_none() {
                v.err(
                    format!("{rp}.uriRegexRewrite.rewrite"),
                    "rewrite is required",
                );
            }
        }
    }
    if let Some(rt) = &r.retries {
        let rp = format!("{p}.retries");
        if let Some(a) = rt.attempts {
            if a < 0 {
                v.err(format!("{rp}.attempts"), "attempts cannot be negative");
            }
            if a == 0 && (rt.per_try_timeout.is_some() || rt.retry_on.is_some()) {
                v.warn(
                    &rp,
                    "retry settings are ignored when attempts is 0 (retries disabled)",
                );
            }
        }
        duration(
            v,
            &format!("{rp}.perTryTimeout"),
            rt.per_try_timeout.as_ref(),
        );
        duration(v, &format!("{rp}.backoff"), rt.backoff.as_ref());
        if let Some(on) = &rt.retry_on {
            for cond in on.split(',').map(str::trim) {
                if !is_retry_on(cond) {
                    v.err(
                        format!("{rp}.retryOn"),
                        format!("{cond:?} is not a valid retryOn condition"),
                    );
                }
            }
        }
    }
    if let Some(f) = &r.fault {
        let fp = format!("{p}.fault");
        if f.delay.is_none() && f.abort.is_none() {
            v.err(&fp, "fault injection needs an abort, a delay or both");
        }
        if let Some(d) = &f.delay {
            let dp = format!("{fp}.delay");
            if d.fixed_delay.is_some() && d.exponential_delay.is_some() {
                v.err(&dp, "only one of fixedDelay or exponentialDelay may be set");
            }
            if d.fixed_delay.is_none() && d.exponential_delay.is_none() {
                v.err(&dp, "a delay needs fixedDelay");
            }
            duration(v, &format!("{dp}.fixedDelay"), d.fixed_delay.as_ref());
            duration(
                v,
                &format!("{dp}.exponentialDelay"),
                d.exponential_delay.as_ref(),
            );
            percent(v, &format!("{dp}.percentage"), d.percentage.as_ref());
            if let Some(pc) = d.percent {
                if !(0..=100).contains(&pc) {
                    v.err(format!("{dp}.percent"), "must be 0..100");
                }
            }
        }
        if let Some(a) = &f.abort {
            let ap = format!("{fp}.abort");
            let kinds = usize::from(a.http_status.is_some())
                + usize::from(a.grpc_status.is_some())
                + usize::from(a.http2_error.is_some());
            if kinds > 1 {
                v.err(
                    &ap,
                    "only one of httpStatus, grpcStatus or http2Error may be set",
                );
            }
            if kinds == 0 {
                v.err(&ap, "an abort needs httpStatus or grpcStatus");
            }
            if let Some(st) = a.http_status {
                if !(200..=599).contains(&st) {
                    v.err(
                        format!("{ap}.httpStatus"),
                        format!("HTTP status {st} must be in 200..599"),
                    );
                }
            }
            if let Some(g) = &a.grpc_status {
                if !is_grpc_status(g) {
                    v.err(
                        format!("{ap}.grpcStatus"),
                        format!("{g:?} is not a gRPC status name (e.g. UNAVAILABLE)"),
                    );
                }
            }
            percent(v, &format!("{ap}.percentage"), a.percentage.as_ref());
        }
    }
    if let Some(m) = &r.mirror {
        destination(v, &format!("{p}.mirror"), m);
    }
    for (j, m) in r.mirrors.iter().enumerate() {
        destination(v, &format!("{p}.mirrors[{j}].destination"), &m.destination);
        percent(
            v,
            &format!("{p}.mirrors[{j}].percentage"),
            m.percentage.as_ref(),
        );
    }
    percent(
        v,
        &format!("{p}.mirrorPercentage"),
        r.mirror_percentage.as_ref(),
    );
    for (field, val) in [
        ("mirrorPercent", r.mirror_percent),
        ("mirror_percent", r.mirror_percent_snake),
    ] {
        if let Some(pc) = val {
            if pc > 100 {
                v.err(format!("{p}.{field}"), "must be 0..100");
            } else {
                v.warn(
                    format!("{p}.{field}"),
                    format!("{field} is deprecated; use mirrorPercentage"),
                );
            }
        }
    }
    if let Some(c) = &r.cors_policy {
        let cp = format!("{p}.corsPolicy");
        for (j, o) in c.allow_origins.iter().enumerate() {
            string_match(v, &format!("{cp}.allowOrigins[{j}]"), o, false);
        }
        duration(v, &format!("{cp}.maxAge"), c.max_age.as_ref());
        for (j, m) in c.allow_methods.iter().enumerate() {
            if !is_header_name(m) {
                v.err(
                    format!("{cp}.allowMethods[{j}]"),
                    format!("invalid method {m:?}"),
                );
            }
        }
    }
}

fn http_match(v: &mut V, p: &str, m: &HttpMatchRequest) {
    for (field, sm) in [
        ("uri", &m.uri),
        ("scheme", &m.scheme),
        ("method", &m.method),
        ("authority", &m.authority),
    ] {
        if let Some(sm) = sm {
            string_match(v, &format!("{p}.{field}"), sm, field == "uri");
        }
    }
    for (field, map) in [
        ("headers", &m.headers),
        ("queryParams", &m.query_params),
        ("withoutHeaders", &m.without_headers),
    ] {
        for (k, sm) in map {
            let kp = join_key(&format!("{p}.{field}"), k);
            if field != "queryParams"
                && !is_header_name(k)
                && !k.starts_with("@request.auth.claims")
            {
                v.err(&kp, format!("invalid header name {k:?}"));
            }
            string_match(v, &kp, sm, false);
        }
    }
    if let Some(n) = m.port {
        port(v, &format!("{p}.port"), n);
    }
    if let Some(ns) = &m.source_namespace {
        if !is_dns1123_label(ns) {
            v.err(
                format!("{p}.sourceNamespace"),
                format!("invalid namespace {ns:?}"),
            );
        }
    }
    selector_labels(v, &format!("{p}.sourceLabels"), &m.source_labels);
    for (k, g) in m.gateways.iter().enumerate() {
        gateway_ref(v, &format!("{p}.gateways[{k}]"), g);
    }
}

fn is_retry_on(cond: &str) -> bool {
    const ENVOY: [&str; 12] = [
        "5xx",
        "gateway-error",
        "reset",
        "reset-before-request",
        "connect-failure",
        "envoy-ratelimited",
        "retriable-4xx",
        "refused-stream",
        "retriable-status-codes",
        "retriable-headers",
        "http3-post-connect-failure",
        "retriable-status-code",
    ];
    const GRPC: [&str; 5] = [
        "cancelled",
        "deadline-exceeded",
        "internal",
        "resource-exhausted",
        "unavailable",
    ];
    ENVOY.contains(&cond)
        || GRPC.contains(&cond)
        || cond.parse::<u16>().is_ok_and(|c| (100..=599).contains(&c))
}

const GRPC_STATUSES: [&str; 17] = [
    "OK",
    "CANCELLED",
    "UNKNOWN",
    "INVALID_ARGUMENT",
    "DEADLINE_EXCEEDED",
    "NOT_FOUND",
    "ALREADY_EXISTS",
    "PERMISSION_DENIED",
    "RESOURCE_EXHAUSTED",
    "FAILED_PRECONDITION",
    "ABORTED",
    "OUT_OF_RANGE",
    "UNIMPLEMENTED",
    "INTERNAL",
    "UNAVAILABLE",
    "DATA_LOSS",
    "UNAUTHENTICATED",
];

fn is_grpc_status(s: &str) -> bool {
    GRPC_STATUSES.contains(&s) || s.parse::<u8>().is_ok_and(|n| n <= 16)
}

fn is_base64(s: &str) -> bool {
    let t = s.trim_end_matches('=');
    s.len().is_multiple_of(4)
        && s.len() - t.len() <= 2
        && t.bytes()
            .all(|c| c.is_ascii_alphanumeric() || c == b'+' || c == b'/')
}

// ---------------------------------------------------------------------------------------
// DestinationRule
// ---------------------------------------------------------------------------------------

fn destination_rule(v: &mut V, s: &DestinationRule) {
    if s.host.is_empty() {
        v.err("spec.host", "host is required");
    } else {
        host(v, "spec.host", &s.host, true);
    }
    let mut names = HashSet::new();
    for (i, sub) in s.subsets.iter().enumerate() {
        let p = format!("spec.subsets[{i}]");
        if sub.name.is_empty() {
            v.err(format!("{p}.name"), "subset name must not be empty");
        } else if !is_dns1123_label(&sub.name) {
            v.err(
                format!("{p}.name"),
                format!("subset name {:?} is not a valid DNS label", sub.name),
            );
        }
        if !names.insert(sub.name.as_str()) {
            v.err(
                format!("{p}.name"),
                format!("duplicate subset name {:?}", sub.name),
            );
        }
        labels(v, &format!("{p}.labels"), &sub.labels);
        if let Some(tp) = &sub.traffic_policy {
            traffic_policy(v, &format!("{p}.trafficPolicy"), tp);
        }
    }
    if let Some(tp) = &s.traffic_policy {
        traffic_policy(v, "spec.trafficPolicy", tp);
    }
    export_to(v, "spec.exportTo", &s.export_to);
    if let Some(sel) = &s.workload_selector {
        selector_labels(v, "spec.workloadSelector.matchLabels", &sel.match_labels);
        if s.export_to.len() > 1 || s.export_to.iter().any(|e| e != ".") {
            v.err("spec.exportTo", "a DestinationRule with a workloadSelector can only be exported to its own namespace (\".\")");
        }
    }
}

fn traffic_policy(v: &mut V, p: &str, tp: &TrafficPolicy) {
    if tp.load_balancer.is_none()
        && tp.connection_pool.is_none()
        && tp.outlier_detection.is_none()
        && tp.tls.is_none()
        && tp.port_level_settings.is_empty()
        && tp.tunnel.is_none()
        && tp.proxy_protocol.is_none()
        && tp.retry_budget.is_none()
    {
        v.err(p, "a traffic policy must have at least one field");
    }
    if tp.tunnel.is_some() && tp.proxy_protocol.is_some() {
        v.err(p, "tunnel and proxyProtocol must not be set together");
    }
    policy_parts(
        v,
        p,
        tp.load_balancer.as_ref(),
        tp.connection_pool.as_ref(),
        tp.outlier_detection.as_ref(),
        tp.tls.as_ref(),
    );
    let mut ports = HashSet::new();
    for (i, pl) in tp.port_level_settings.iter().enumerate() {
        let pp = format!("{p}.portLevelSettings[{i}]");
        match pl.port.and_then(|x| x.number) {
            Some(n) => {
                port(v, &format!("{pp}.port.number"), n);
                if !ports.insert(n) {
                    v.err(
                        format!("{pp}.port.number"),
                        format!("port {n} has more than one port-level setting"),
                    );
                }
            }
            None => v.err(
                format!("{pp}.port"),
                "a port-level setting needs port.number",
            ),
        }
        if pl.load_balancer.is_none()
            && pl.connection_pool.is_none()
            && pl.outlier_detection.is_none()
            && pl.tls.is_none()
        {
            v.err(
                &pp,
                "a port-level traffic policy must have at least one field",
            );
        }
        policy_parts(
            v,
            &pp,
            pl.load_balancer.as_ref(),
            pl.connection_pool.as_ref(),
            pl.outlier_detection.as_ref(),
            pl.tls.as_ref(),
        );
    }
    if let Some(t) = &tp.tunnel {
        if let Some(proto) = &t.protocol {
            if !matches!(proto.as_str(), "CONNECT" | "POST") {
                v.err(format!("{p}.tunnel.protocol"), "must be CONNECT or POST");
            }
        }
        host(v, &format!("{p}.tunnel.targetHost"), &t.target_host, false);
        port(v, &format!("{p}.tunnel.targetPort"), t.target_port);
    }
    if let Some(rb) = &tp.retry_budget {
        if let Some(pc) = rb.percent {
            if !(0.0..=100.0).contains(&pc) {
                v.err(format!("{p}.retryBudget.percent"), "must be 0..100");
            }
        }
        duration(
            v,
            &format!("{p}.retryBudget.budgetInterval"),
            rb.budget_interval.as_ref(),
        );
    }
}

fn policy_parts(
    v: &mut V,
    p: &str,
    lb: Option<&LoadBalancerSettings>,
    pool: Option<&ConnectionPoolSettings>,
    od: Option<&OutlierDetection>,
    tls: Option<&ClientTlsSettings>,
) {
    if let Some(lb) = lb {
        load_balancer(v, &format!("{p}.loadBalancer"), lb, od.is_some());
    }
    if let Some(pool) = pool {
        connection_pool(v, &format!("{p}.connectionPool"), pool);
    }
    if let Some(od) = od {
        outlier_detection(v, &format!("{p}.outlierDetection"), od);
    }
    if let Some(tls) = tls {
        client_tls(v, &format!("{p}.tls"), tls);
    }
}

fn load_balancer(v: &mut V, p: &str, lb: &LoadBalancerSettings, has_outlier: bool) {
    if lb.simple.is_some() && lb.consistent_hash.is_some() {
        v.err(p, "only one of simple or consistentHash may be set");
    }
    if let Some(ch) = &lb.consistent_hash {
        let cp = format!("{p}.consistentHash");
        let keys = usize::from(ch.http_header_name.is_some())
            + usize::from(ch.http_cookie.is_some())
            + usize::from(ch.use_source_ip == Some(true))
            + usize::from(ch.http_query_parameter_name.is_some());
        if keys > 1 {
            v.err(&cp, "only one of httpHeaderName, httpCookie, useSourceIp or httpQueryParameterName may be set");
        }
        if let Some(c) = &ch.http_cookie {
            if c.name.is_empty() {
                v.err(format!("{cp}.httpCookie.name"), "cookie name is required");
            }
        }
        if ch.ring_hash.is_some() && ch.maglev.is_some() {
            v.err(&cp, "only one of ringHash or maglev may be set");
        }
        if ch.minimum_ring_size.is_some() && (ch.ring_hash.is_some() || ch.maglev.is_some()) {
            v.err(
                &cp,
                "only one of minimumRingSize or ringHash/maglev may be set",
            );
        }
        if let Some(size) = ch.maglev.as_ref().and_then(|m| m.table_size) {
            if !is_prime(size) || size >= 5_000_011 {
                v.err(
                    format!("{cp}.maglev.tableSize"),
                    "must be a prime number below 5000011",
                );
            }
        }
    }
    if let Some(l) = &lb.locality_lb_setting {
        let lp = format!("{p}.localityLbSetting");
        if !l.distribute.is_empty() && !l.failover.is_empty() {
            v.err(&lp, "only one of distribute or failover may be set");
        }
        for (i, d) in l.distribute.iter().enumerate() {
            let sum: u64 = d.to.values().map(|w| u64::from(*w)).sum();
            for (k, w) in &d.to {
                if !(1..=100).contains(w) {
                    v.err(
                        join_key(&format!("{lp}.distribute[{i}].to"), k),
                        "locality weight must be 1..100",
                    );
                }
            }
            if sum != 100 {
                v.err(
                    format!("{lp}.distribute[{i}].to"),
                    format!("locality weights must sum to 100 (they sum to {sum})"),
                );
            }
        }
        for (i, f) in l.failover.iter().enumerate() {
            if f.from.is_some() && f.from == f.to {
                v.err(
                    format!("{lp}.failover[{i}]"),
                    "failover must go to a different region",
                );
            }
        }
        if (!l.failover.is_empty() || !l.failover_priority.is_empty()) && !has_outlier {
            v.warn(
                &lp,
                "locality failover only takes effect with an outlierDetection policy",
            );
        }
    }
    duration(
        v,
        &format!("{p}.warmupDurationSecs"),
        lb.warmup_duration_secs.as_ref(),
    );
    if let Some(w) = &lb.warmup {
        duration(v, &format!("{p}.warmup.duration"), Some(&w.duration));
        if let Some(mp) = w.minimum_percent {
            if !(0.0..=100.0).contains(&mp) {
                v.err(format!("{p}.warmup.minimumPercent"), "must be 0..100");
            }
        }
        if let Some(a) = w.aggression {
            if a < 1.0 {
                v.err(format!("{p}.warmup.aggression"), "must be at least 1");
            }
        }
    }
}

fn is_prime(n: u64) -> bool {
    if n < 2 {
        return false;
    }
    let mut i = 2;
    while i * i <= n {
        if n.is_multiple_of(i) {
            return false;
        }
        i += 1;
    }
    true
}

fn non_negative(v: &mut V, path: String, val: Option<i32>) {
    if let Some(x) = val {
        if x < 0 {
            v.err(path, "must not be negative");
        }
    }
}

fn connection_pool(v: &mut V, p: &str, pool: &ConnectionPoolSettings) {
    if pool.tcp.is_none() && pool.http.is_none() {
        v.err(p, "a connection pool must have at least one field");
    }
    if let Some(t) = &pool.tcp {
        non_negative(v, format!("{p}.tcp.maxConnections"), t.max_connections);
        duration(
            v,
            &format!("{p}.tcp.connectTimeout"),
            t.connect_timeout.as_ref(),
        );
        duration(
            v,
            &format!("{p}.tcp.maxConnectionDuration"),
            t.max_connection_duration.as_ref(),
        );
        duration(v, &format!("{p}.tcp.idleTimeout"), t.idle_timeout.as_ref());
        if let Some(k) = &t.tcp_keepalive {
            duration(v, &format!("{p}.tcp.tcpKeepalive.time"), k.time.as_ref());
            duration(
                v,
                &format!("{p}.tcp.tcpKeepalive.interval"),
                k.interval.as_ref(),
            );
        }
    }
    if let Some(h) = &pool.http {
        let hp = format!("{p}.http");
        non_negative(
            v,
            format!("{hp}.http1MaxPendingRequests"),
            h.http1_max_pending_requests,
        );
        non_negative(v, format!("{hp}.http2MaxRequests"), h.http2_max_requests);
        non_negative(
            v,
            format!("{hp}.maxRequestsPerConnection"),
            h.max_requests_per_connection,
        );
        non_negative(v, format!("{hp}.maxRetries"), h.max_retries);
        non_negative(
            v,
            format!("{hp}.maxConcurrentStreams"),
            h.max_concurrent_streams,
        );
        duration(v, &format!("{hp}.idleTimeout"), h.idle_timeout.as_ref());
        if let Some(k) = &h.http2_keep_alive {
            duration(
                v,
                &format!("{hp}.http2KeepAlive.interval"),
                k.interval.as_ref(),
            );
            duration(
                v,
                &format!("{hp}.http2KeepAlive.timeout"),
                k.timeout.as_ref(),
            );
        }
        if h.use_client_protocol == Some(true)
            && h.h2_upgrade_policy == Some(H2UpgradePolicy::Upgrade)
        {
            v.err(
                &hp,
                "useClientProtocol must not be true when h2UpgradePolicy is UPGRADE",
            );
        }
    }
}

fn outlier_detection(v: &mut V, p: &str, od: &OutlierDetection) {
    for (field, val) in [
        ("maxEjectionPercent", od.max_ejection_percent),
        ("minHealthPercent", od.min_health_percent),
    ] {
        if let Some(x) = val {
            if !(0..=100).contains(&x) {
                v.err(format!("{p}.{field}"), "must be 0..100");
            }
        }
    }
    non_negative(v, format!("{p}.consecutiveErrors"), od.consecutive_errors);
    if od.consecutive_errors.is_some() {
        v.warn(
            format!("{p}.consecutiveErrors"),
            "consecutiveErrors is deprecated; use consecutive5xxErrors",
        );
    }
    duration(v, &format!("{p}.interval"), od.interval.as_ref());
    duration(
        v,
        &format!("{p}.baseEjectionTime"),
        od.base_ejection_time.as_ref(),
    );
    if od.consecutive_local_origin_failures.is_some()
        && od.split_external_local_origin_errors != Some(true)
    {
        v.err(
            format!("{p}.consecutiveLocalOriginFailures"),
            "consecutiveLocalOriginFailures needs splitExternalLocalOriginErrors: true",
        );
    }
    for (i, c) in od.outlier_detection_http_error_codes.iter().enumerate() {
        if !(100..=599).contains(c) {
            v.err(
                format!("{p}.outlierDetectionHttpErrorCodes[{i}]"),
                "must be an HTTP status code",
            );
        }
    }
}

fn client_tls(v: &mut V, p: &str, tls: &ClientTlsSettings) {
    let mode = tls.mode.unwrap_or(ClientTlsMode::Disable);
    let has_files = tls.client_certificate.is_some()
        || tls.private_key.is_some()
        || tls.ca_certificates.is_some();
    match mode {
        ClientTlsMode::Mutual => {
            if tls.credential_name.is_none()
                && (tls.client_certificate.is_none() || tls.private_key.is_none())
            {
                v.err(
                    p,
                    "MUTUAL TLS needs clientCertificate and privateKey (or credentialName)",
                );
            }
        }
        ClientTlsMode::IstioMutual | ClientTlsMode::Disable => {
            if has_files || tls.credential_name.is_some() {
                v.err(
                    p,
                    format!("{mode:?} TLS must not set certificates, keys or credentialName")
                        .replace("IstioMutual", "ISTIO_MUTUAL")
                        .replace("Disable", "DISABLE"),
                );
            }
        }
        ClientTlsMode::Simple => {}
    }
    if tls.credential_name.is_some() && has_files {
        v.err(p, "credentialName cannot be combined with clientCertificate, privateKey or caCertificates");
    }
    if let Some(sni) = &tls.sni {
        host(v, &format!("{p}.sni"), sni, false);
    }
}

// ---------------------------------------------------------------------------------------
// Gateway
// ---------------------------------------------------------------------------------------

fn gateway(v: &mut V, s: &Gateway, name: &str) {
    if name.contains('.') {
        v.err("metadata.name", format!("gateway name {name:?} must not contain dots (VirtualServices could not tell it from name.namespace)"));
    }
    if s.servers.is_empty() {
        v.err("spec.servers", "a gateway must have at least one server");
    }
    selector_labels(v, "spec.selector", &s.selector);
    let mut port_names = HashSet::new();
    for (i, srv) in s.servers.iter().enumerate() {
        let p = format!("spec.servers[{i}]");
        port(v, &format!("{p}.port.number"), srv.port.number);
        if srv.port.name.is_empty() {
            v.err(format!("{p}.port.name"), "port name must be set");
        } else if !port_names.insert(srv.port.name.as_str()) {
            v.err(
                format!("{p}.port.name"),
                format!("port names must be unique: duplicate {:?}", srv.port.name),
            );
        }
        if srv.port.target_port.is_some() {
            v.warn(
                format!("{p}.port.targetPort"),
                "targetPort has no effect on gateways",
            );
        }
        if srv.hosts.is_empty() {
            v.err(format!("{p}.hosts"), "a server needs at least one host");
        }
        for (j, h) in srv.hosts.iter().enumerate() {
            gateway_host(v, &format!("{p}.hosts[{j}]"), h);
        }
        let proto = srv.port.protocol;
        match &srv.tls {
            None if proto.is_tls() => {
                v.err(
                    format!("{p}.tls"),
                    format!("a {proto} server needs TLS settings"),
                );
            }
            None => {}
            Some(tls) => server_tls(v, &format!("{p}.tls"), tls, proto),
        }
    }
}

/// A gateway host: `[namespace/]dnsName`, where the namespace may be `*` or `.` and the
/// DNS name must be a FQDN or a wildcard.
fn gateway_host(v: &mut V, p: &str, h: &str) {
    let (ns, name) = match h.split_once('/') {
        Some((ns, name)) => (Some(ns), name),
        None => (None, h),
    };
    if let Some(ns) = ns {
        if !(ns == "*" || ns == "." || is_dns1123_label(ns)) {
            v.err(p, format!("invalid namespace {ns:?} in gateway host {h:?}"));
        }
    }
    if name.is_empty() {
        v.err(p, "host must not be empty");
        return;
    }
    if name != "*" && !name.contains('.') && name.parse::<IpAddr>().is_err() {
        v.err(p, format!("short name {name:?} is not allowed in a gateway host; use a fully qualified name or a wildcard"));
        return;
    }
    host(v, p, name, true);
}

fn server_tls(v: &mut V, p: &str, tls: &ServerTlsSettings, proto: crate::common::Protocol) {
    let https_redirect_only = tls.https_redirect == Some(true)
        && tls.mode.is_none()
        && tls.credential_name.is_none()
        && tls.server_certificate.is_none();
    if !proto.is_tls() && !https_redirect_only {
        v.err(
            p,
            format!("a {proto} server must not have TLS settings (only httpsRedirect)"),
        );
        return;
    }
    let sources = usize::from(tls.credential_name.is_some())
        + usize::from(!tls.credential_names.is_empty())
        + usize::from(tls.server_certificate.is_some() || tls.private_key.is_some())
        + usize::from(!tls.tls_certificates.is_empty());
    if sources > 1 {
        v.err(p, "only one of credentialName, credentialNames, serverCertificate/privateKey or tlsCertificates may be set");
    }
    let mode = tls.mode.unwrap_or(ServerTlsMode::Passthrough);
    match mode {
        ServerTlsMode::Simple | ServerTlsMode::Mutual | ServerTlsMode::OptionalMutual => {
            if sources == 0 {
                v.err(p, format!("{} TLS needs a certificate: set credentialName (or serverCertificate and privateKey)", mode_name(mode)));
            }
            if tls.server_certificate.is_some() != tls.private_key.is_some() {
                v.err(p, "serverCertificate and privateKey must be set together");
            }
            if mode != ServerTlsMode::Simple
                && tls.credential_name.is_none()
                && tls.credential_names.is_empty()
                && tls.ca_certificates.is_none()
                && tls.ca_cert_credential_name.is_none()
            {
                v.err(
                    p,
                    format!(
                        "{} TLS needs caCertificates to verify clients",
                        mode_name(mode)
                    ),
                );
            }
        }
        ServerTlsMode::IstioMutual => {
            if sources > 0 || tls.ca_certificates.is_some() {
                v.err(
                    p,
                    "ISTIO_MUTUAL TLS must not set certificates, keys or credentialName",
                );
            }
        }
        ServerTlsMode::Passthrough | ServerTlsMode::AutoPassthrough => {
            if sources > 0 {
                v.warn(
                    p,
                    format!(
                        "{} TLS does not use certificates; they are ignored",
                        mode_name(mode)
                    ),
                );
            }
        }
    }
    if tls.ca_crl.is_some() && tls.credential_name.is_some() {
        v.err(
            format!("{p}.caCrl"),
            "caCrl is not supported with credentialName",
        );
    }
    if let (Some(min), Some(max)) = (tls.min_protocol_version, tls.max_protocol_version) {
        if tls_rank(min) > tls_rank(max) && max != TlsProtocolVersion::TlsAuto {
            v.err(p, "minProtocolVersion is above maxProtocolVersion");
        }
    }
}

fn tls_rank(v: TlsProtocolVersion) -> u8 {
    match v {
        TlsProtocolVersion::TlsAuto => 0,
        TlsProtocolVersion::Tlsv1_0 => 1,
        TlsProtocolVersion::Tlsv1_1 => 2,
        TlsProtocolVersion::Tlsv1_2 => 3,
        TlsProtocolVersion::Tlsv1_3 => 4,
    }
}

fn mode_name(m: ServerTlsMode) -> &'static str {
    match m {
        ServerTlsMode::Passthrough => "PASSTHROUGH",
        ServerTlsMode::Simple => "SIMPLE",
        ServerTlsMode::Mutual => "MUTUAL",
        ServerTlsMode::AutoPassthrough => "AUTO_PASSTHROUGH",
        ServerTlsMode::IstioMutual => "ISTIO_MUTUAL",
        ServerTlsMode::OptionalMutual => "OPTIONAL_MUTUAL",
    }
}

// ---------------------------------------------------------------------------------------
// ServiceEntry, WorkloadEntry, WorkloadGroup
// ---------------------------------------------------------------------------------------

fn service_entry(v: &mut V, s: &ServiceEntry) {
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
        workload_entry(v, &ep, e);
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

fn is_port_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() < 63
        && name.bytes().all(|c| c.is_ascii_alphanumeric() || c == b'-')
        && !name.starts_with('-')
        && !name.ends_with('-')
}

fn workload_entry(v: &mut V, p: &str, e: &WorkloadEntry) {
    let addr = e.address.as_deref().unwrap_or_default();
    if addr.is_empty() && e.network.is_none() && p == "spec" {
        v.err(format!("{p}.address"), "address is required (or network)");
    }
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

fn workload_group(v: &mut V, s: &WorkloadGroup) {
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

fn probe(v: &mut V, p: &str, pr: &ReadinessProbe) {
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

// ---------------------------------------------------------------------------------------
// Sidecar
// ---------------------------------------------------------------------------------------

fn sidecar(v: &mut V, s: &Sidecar) {
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

fn is_default_endpoint(ep: &str) -> bool {
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
fn sidecar_egress_host(v: &mut V, p: &str, h: &str) {
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

// ---------------------------------------------------------------------------------------
// Security
// ---------------------------------------------------------------------------------------

fn peer_authentication(v: &mut V, s: &PeerAuthentication) {
    match_labels(v, "spec.selector", s.selector.as_ref());
    let has_labels = s
        .selector
        .as_ref()
        .is_some_and(|sel| !sel.match_labels.is_empty());
    if !s.port_level_mtls.is_empty() && !has_labels {
        v.err("spec.portLevelMtls", "portLevelMtls requires a selector with labels (it cannot apply mesh- or namespace-wide)");
    }
    for n in s.port_level_mtls.keys() {
        port(v, &join_key("spec.portLevelMtls", &n.to_string()), *n);
    }
}

const CUSTOM_UNSUPPORTED_SOURCES: [&str; 4] = [
    "principals",
    "namespaces",
    "serviceAccounts",
    "requestPrincipals",
];

fn authorization_policy(v: &mut V, s: &AuthorizationPolicy) {
    target_refs(
        v,
        s.selector.is_some(),
        s.target_ref.as_ref(),
        &s.target_refs,
    );
    match_labels(v, "spec.selector", s.selector.as_ref());
    match (s.action, &s.provider) {
        (AuthorizationAction::Custom, None) => {
            v.err(
                "spec.provider",
                "a CUSTOM policy needs provider.name (the ext-authz provider)",
            );
        }
        (AuthorizationAction::Custom, Some(p))
            if p.name.as_deref().unwrap_or_default().is_empty() =>
        {
            v.err("spec.provider.name", "provider.name must not be empty");
        }
        (AuthorizationAction::Custom, Some(_)) => {}
        (action, Some(_)) => v.err(
            "spec.provider",
            format!(
                "provider may only be set with action CUSTOM (action is {})",
                action.as_str()
            ),
        ),
        _ => {}
    }
    if s.rules.is_empty() {
        match s.action {
            AuthorizationAction::Deny
            | AuthorizationAction::Custom
            | AuthorizationAction::Audit => v.err(
                "spec.rules",
                format!(
                    "a {} policy without rules matches nothing and is meaningless",
                    s.action.as_str()
                ),
            ),
            AuthorizationAction::Allow => {}
        }
    }
    for (i, rule) in s.rules.iter().enumerate() {
        let rp = format!("spec.rules[{i}]");
        for (j, from) in rule.from.iter().enumerate() {
            let fp = format!("{rp}.from[{j}].source");
            let Some(src) = &from.source else {
                v.err(fp, "source must not be empty");
                continue;
            };
            authz_source(v, &fp, src, s.action);
        }
        for (j, to) in rule.to.iter().enumerate() {
            let tp = format!("{rp}.to[{j}].operation");
            let Some(op) = &to.operation else {
                v.err(tp, "operation must not be empty");
                continue;
            };
            authz_operation(v, &tp, op);
        }
        for (j, c) in rule.when.iter().enumerate() {
            authz_condition(v, &format!("{rp}.when[{j}]"), c, s.action);
        }
    }
}

fn nonempty_values(v: &mut V, p: &str, field: &str, vals: &[String]) {
    for (k, val) in vals.iter().enumerate() {
        if val.is_empty() {
            v.err(format!("{p}.{field}[{k}]"), "must not be empty");
        }
    }
}

fn authz_source(v: &mut V, p: &str, s: &Source, action: AuthorizationAction) {
    let fields: [(&str, &[String]); 14] = [
        ("principals", &s.principals),
        ("notPrincipals", &s.not_principals),
        ("requestPrincipals", &s.request_principals),
        ("notRequestPrincipals", &s.not_request_principals),
        ("namespaces", &s.namespaces),
        ("notNamespaces", &s.not_namespaces),
        ("serviceAccounts", &s.service_accounts),
        ("notServiceAccounts", &s.not_service_accounts),
        ("ipBlocks", &s.ip_blocks),
        ("notIpBlocks", &s.not_ip_blocks),
        ("remoteIpBlocks", &s.remote_ip_blocks),
        ("notRemoteIpBlocks", &s.not_remote_ip_blocks),
        ("trustDomains", &s.trust_domains),
        ("notTrustDomains", &s.not_trust_domains),
    ];
    if fields.iter().all(|(_, vals)| vals.is_empty()) {
        v.err(p, "source must not be empty");
    }
    for (field, vals) in fields {
        nonempty_values(v, p, field, vals);
        if field.to_ascii_lowercase().contains("ipblocks") {
            cidrs(v, &format!("{p}.{field}"), vals);
        }
        if action == AuthorizationAction::Custom && !vals.is_empty() {
            let base = field.strip_prefix("not").map(|b| {
                let mut c = b.chars();
                c.next()
                    .map(|f| f.to_ascii_lowercase().to_string() + c.as_str())
                    .unwrap_or_default()
            });
            let base = base.as_deref().unwrap_or(field);
            if CUSTOM_UNSUPPORTED_SOURCES.contains(&base) {
                v.err(
                    format!("{p}.{field}"),
                    format!("{field} is not supported with action CUSTOM"),
                );
            }
        }
    }
    let has_sa = !s.service_accounts.is_empty() || !s.not_service_accounts.is_empty();
    let has_other = !s.principals.is_empty()
        || !s.not_principals.is_empty()
        || !s.namespaces.is_empty()
        || !s.not_namespaces.is_empty();
    if has_sa && has_other {
        v.err(
            p,
            "cannot set serviceAccounts with namespaces or principals",
        );
    }
}

fn authz_operation(v: &mut V, p: &str, op: &Operation) {
    let fields: [(&str, &[String]); 8] = [
        ("hosts", &op.hosts),
        ("notHosts", &op.not_hosts),
        ("ports", &op.ports),
        ("notPorts", &op.not_ports),
        ("methods", &op.methods),
        ("notMethods", &op.not_methods),
        ("paths", &op.paths),
        ("notPaths", &op.not_paths),
    ];
    if fields.iter().all(|(_, vals)| vals.is_empty()) {
        v.err(p, "operation must not be empty");
    }
    for (field, vals) in fields {
        nonempty_values(v, p, field, vals);
    }
    for (field, vals) in [("ports", &op.ports), ("notPorts", &op.not_ports)] {
        for (k, val) in vals.iter().enumerate() {
            match val.parse::<u32>() {
                Ok(n) => port(v, &format!("{p}.{field}[{k}]"), n),
                Err(_) => v.err(
                    format!("{p}.{field}[{k}]"),
                    format!("{val:?} is not a port number"),
                ),
            }
        }
    }
    for (field, vals) in [("paths", &op.paths), ("notPaths", &op.not_paths)] {
        for (k, val) in vals.iter().enumerate() {
            if let Some(e) = authz_path_error(val) {
                v.err(format!("{p}.{field}[{k}]"), e);
            }
        }
    }
}

/// Paths: exact, `prefix*`, `*suffix`, `*`, or Istio's `{*}`/`{**}` templates.
fn authz_path_error(path: &str) -> Option<String> {
    if path.contains('{') || path.contains('}') {
        for seg in path.split('/') {
            if (seg.contains('{') || seg.contains('}')) && !matches!(seg, "{*}" | "{**}") {
                return Some(format!(
                    "path template {path:?}: only whole segments {{*}} and {{**}} are supported"
                ));
            }
        }
        return None;
    }
    let stars = path.matches('*').count();
    if stars > 1 || (stars == 1 && !(path.starts_with('*') || path.ends_with('*'))) {
        return Some(format!(
            "path {path:?}: `*` may only be at the start or the end"
        ));
    }
    None
}

const WHEN_KEYS: [&str; 10] = [
    "source.ip",
    "remote.ip",
    "source.namespace",
    "source.principal",
    "source.serviceAccount",
    "request.auth.principal",
    "request.auth.audiences",
    "request.auth.presenter",
    "destination.ip",
    "destination.port",
];

fn authz_condition(v: &mut V, p: &str, c: &Condition, action: AuthorizationAction) {
    let key = c.key.as_str();
    if key.is_empty() {
        v.err(format!("{p}.key"), "key must not be empty");
        return;
    }
    if c.values.is_empty() && c.not_values.is_empty() {
        v.err(
            p,
            format!("at least one of values or notValues must be set for key {key:?}"),
        );
    }
    let known = WHEN_KEYS.contains(&key)
        || key == "connection.sni"
        || key.starts_with("experimental.envoy.filters.")
        || bracketed(key, "request.headers").is_some()
        || bracketed(key, "request.auth.claims").is_some();
    if !known {
        v.err(format!("{p}.key"), format!("unknown condition key {key:?}"));
        return;
    }
    if let Some(inner) =
        bracketed(key, "request.headers").or_else(|| bracketed(key, "request.auth.claims"))
    {
        if inner.is_empty() {
            v.err(
                format!("{p}.key"),
                format!("{key:?} needs a name inside the brackets"),
            );
        }
    }
    let all = c.values.iter().chain(c.not_values.iter());
    match key {
        "source.ip" | "remote.ip" | "destination.ip" => {
            for (k, val) in all.enumerate() {
                if let Some(e) = cidr_error(val) {
                    v.err(format!("{p}.values[{k}]"), e);
                }
            }
        }
        "destination.port" => {
            for (k, val) in all.enumerate() {
                if val.parse::<u16>().map_or(true, |n| n == 0) {
                    v.err(
                        format!("{p}.values[{k}]"),
                        format!("{val:?} is not a port number"),
                    );
                }
            }
        }
        _ => {}
    }
    if action == AuthorizationAction::Custom
        && (key.starts_with("source.namespace")
            || key.starts_with("source.principal")
            || key.starts_with("source.serviceAccount")
            || key.starts_with("request.auth."))
    {
        v.err(
            format!("{p}.key"),
            format!("{key} is not supported with action CUSTOM"),
        );
    }
}

/// `prefix[inner]` → inner.
fn bracketed<'a>(key: &'a str, prefix: &str) -> Option<&'a str> {
    key.strip_prefix(prefix)?
        .strip_prefix('[')?
        .strip_suffix(']')
}

fn request_authentication(v: &mut V, s: &RequestAuthentication) {
    target_refs(
        v,
        s.selector.is_some(),
        s.target_ref.as_ref(),
        &s.target_refs,
    );
    match_labels(v, "spec.selector", s.selector.as_ref());
    for (i, r) in s.jwt_rules.iter().enumerate() {
        let p = format!("spec.jwtRules[{i}]");
        let uri_fields = [("jwksUri", &r.jwks_uri), ("jwks_uri", &r.jwks_uri_snake)];
        let set =
            uri_fields.iter().filter(|(_, u)| u.is_some()).count() + usize::from(r.jwks.is_some());
        if set > 1 {
            v.err(&p, "only one of jwks or jwksUri can be set");
        }
        if r.issuer.as_deref().unwrap_or_default().is_empty()
            && r.jwks_uri().unwrap_or_default().is_empty()
        {
            v.err(format!("{p}.issuer"), "issuer or jwksUri must be set");
        }
        for (field, uri) in uri_fields {
            if let Some(u) = uri {
                if !(u.starts_with("https://") || u.starts_with("http://"))
                    || u.len() <= "https://".len()
                {
                    v.err(
                        format!("{p}.{field}"),
                        format!("{u:?} must be an http:// or https:// URL"),
                    );
                }
            }
        }
        if let Some(j) = &r.jwks {
            match serde_json::from_str::<serde_json::Value>(j) {
                Ok(val) if val.get("keys").is_some_and(serde_json::Value::is_array) => {}
                Ok(_) => v.err(
                    format!("{p}.jwks"),
                    "jwks must be a JSON Web Key Set (an object with a `keys` array)",
                ),
                Err(e) => v.err(format!("{p}.jwks"), format!("jwks is not valid JSON: {e}")),
            }
        }
        nonempty_values(v, &p, "audiences", &r.audiences);
        nonempty_values(v, &p, "fromParams", &r.from_params);
        nonempty_values(v, &p, "fromCookies", &r.from_cookies);
        for (j, h) in r.from_headers.iter().enumerate() {
            if !is_header_name(&h.name) {
                v.err(
                    format!("{p}.fromHeaders[{j}].name"),
                    format!("invalid header name {:?}", h.name),
                );
            }
        }
        for (j, c) in r.output_claim_to_headers.iter().enumerate() {
            let cp = format!("{p}.outputClaimToHeaders[{j}]");
            if !is_header_name(&c.header) {
                v.err(
                    format!("{cp}.header"),
                    format!("invalid header name {:?}", c.header),
                );
            }
            if c.claim.is_empty() {
                v.err(format!("{cp}.claim"), "claim must not be empty");
            }
        }
        if let Some(h) = &r.output_payload_to_header {
            if !is_header_name(h) {
                v.err(
                    format!("{p}.outputPayloadToHeader"),
                    format!("invalid header name {h:?}"),
                );
            }
        }
        duration(v, &format!("{p}.timeout"), r.timeout.as_ref());
    }
}

// ---------------------------------------------------------------------------------------
// Telemetry
// ---------------------------------------------------------------------------------------

fn telemetry(v: &mut V, s: &Telemetry) {
    target_refs(
        v,
        s.selector.is_some(),
        s.target_ref.as_ref(),
        &s.target_refs,
    );
    match_labels(v, "spec.selector", s.selector.as_ref());
    for (i, t) in s.tracing.iter().enumerate() {
        let p = format!("spec.tracing[{i}]");
        if let Some(pc) = t.random_sampling_percentage {
            if !(0.0..=100.0).contains(&pc) {
                v.err(
                    format!("{p}.randomSamplingPercentage"),
                    format!("{pc} must be in 0..100"),
                );
            }
        }
        for (name, tag) in &t.custom_tags {
            let tp = join_key(&format!("{p}.customTags"), name);
            let kinds = usize::from(tag.literal.is_some())
                + usize::from(tag.environment.is_some())
                + usize::from(tag.header.is_some())
                + usize::from(tag.formatter.is_some());
            if kinds != 1 {
                v.err(
                    tp,
                    "a custom tag needs exactly one of literal, environment, header or formatter",
                );
            }
        }
    }
    for (i, m) in s.metrics.iter().enumerate() {
        let p = format!("spec.metrics[{i}]");
        duration(
            v,
            &format!("{p}.reportingInterval"),
            m.reporting_interval.as_ref(),
        );
        for (j, o) in m.overrides.iter().enumerate() {
            let op = format!("{p}.overrides[{j}]");
            if let Some(sel) = &o.selector {
                if sel.metric.is_some() && sel.custom_metric.is_some() {
                    v.err(
                        format!("{op}.match"),
                        "only one of metric or customMetric may be set",
                    );
                }
            }
            for (tag, ov) in &o.tag_overrides {
                let tp = join_key(&format!("{op}.tagOverrides"), tag);
                match ov.operation {
                    TagOperation::Upsert if ov.value.as_deref().unwrap_or_default().is_empty() => {
                        v.err(tp, "value must be set when operation is UPSERT");
                    }
                    TagOperation::Remove if ov.value.is_some() => {
                        v.err(tp, "value must not be set when operation is REMOVE");
                    }
                    _ => {}
                }
            }
        }
    }
}

// ---------------------------------------------------------------------------------------
// Kubernetes Service, Trellis Workload
// ---------------------------------------------------------------------------------------

fn service(v: &mut V, s: &ServiceSpec) {
    labels(v, "spec.selector", &s.selector);
    let mut names = HashSet::new();
    for (i, p) in s.ports.iter().enumerate() {
        let pp = format!("spec.ports[{i}]");
        port(v, &format!("{pp}.port"), p.port);
        if let Some(crate::common::IntOrString::Int(t)) = &p.target_port {
            if !(1..=65535).contains(t) {
                v.err(
                    format!("{pp}.targetPort"),
                    format!("port {t} must be in 1..65535"),
                );
            }
        }
        if let Some(proto) = &p.protocol {
            if !matches!(proto.as_str(), "TCP" | "UDP" | "SCTP") {
                v.err(
                    format!("{pp}.protocol"),
                    format!("{proto:?} must be TCP, UDP or SCTP"),
                );
            }
        }
        match &p.name {
            Some(n) if !names.insert(n.as_str()) => {
                v.err(format!("{pp}.name"), format!("duplicate port name {n:?}"));
            }
            Some(_) => {}
            None if s.ports.len() > 1 => {
                v.err(
                    format!("{pp}.name"),
                    "ports must be named when a Service has more than one",
                );
            }
            None => {}
        }
    }
}

fn workload(v: &mut V, s: &WorkloadSpec) {
    if s.command.is_empty() || s.command[0].is_empty() {
        v.err("spec.command", "command must name the program to run");
    }
    if let Some(sa) = &s.service_account {
        if !is_dns1123_subdomain(sa) {
            v.err(
                "spec.serviceAccount",
                format!("invalid service account name {sa:?}"),
            );
        }
    }
    let mut ports = BTreeMap::new();
    for (i, p) in s.ports.iter().enumerate() {
        let pp = format!("spec.ports[{i}]");
        port(v, &format!("{pp}.port"), p.port);
        if let Some(prev) = ports.insert(p.port, i) {
            v.err(
                format!("{pp}.port"),
                format!("port {} is already declared by ports[{prev}]", p.port),
            );
        }
        if let Some(n) = &p.name {
            if !is_port_name(n) {
                v.err(format!("{pp}.name"), format!("invalid port name {n:?}"));
            }
        }
    }
    for (i, e) in s.env.iter().enumerate() {
        if e.name.is_empty() || e.name.contains('=') || e.name.contains('\0') {
            v.err(
                format!("spec.env[{i}].name"),
                format!("invalid environment variable name {:?}", e.name),
            );
        }
    }
    if let Some(pr) = &s.readiness_probe {
        probe(v, "spec.readinessProbe", pr);
    }
}
