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

mod destination_rule;
mod gateway;
mod kube;
mod security;
mod service_entry;
mod sidecar;
mod telemetry;
mod virtual_service;

use crate::security::*;
use crate::telemetry::{TagOperation, Telemetry};
use crate::workload::WorkloadSpec;
use destination_rule::*;
use gateway::*;
use kube::*;
use security::*;
use service_entry::*;
use sidecar::*;
use telemetry::*;
use virtual_service::*;

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
        Spec::WorkloadEntry(s) => addressed_workload_entry(&mut v, "spec", s),
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
