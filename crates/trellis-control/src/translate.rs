//! Translation of Istio routing configuration into the proxy snapshot's routes.
//!
//! This is the pure part of the control plane's per-proxy translation: a VirtualService's
//! `http[]`, `tcp[]` and `tls[]` become the snapshot's route lists, each destination a
//! cluster named as Istio names them (`outbound|<port>|<subset>|<fqdn>`). Choosing which
//! VirtualServices and DestinationRules apply to a proxy (merging, exportTo, Sidecar scope)
//! is the registry's job and arrives with the control plane.

use trellis_api::common::Protocol;
use trellis_api::common::{Percent, StringMatch};
use trellis_api::host;
use trellis_api::networking::{
    Destination, Gateway, HeaderOperations, HttpMatchRequest, HttpRoute, L4MatchAttributes,
    Location, Resolution, RouteDestination, ServerTlsMode, ServiceEntry, TlsMatchAttributes,
    VirtualService,
};
use trellis_xds::snapshot as wire;

/// Why a VirtualService does not translate.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{path}: {reason}")]
pub struct TranslateError {
    pub path: String,
    pub reason: String,
}

fn err(path: impl Into<String>, reason: impl Into<String>) -> TranslateError {
    TranslateError {
        path: path.into(),
        reason: reason.into(),
    }
}

/// Istio's cluster name for a destination.
pub fn cluster_name(port: u16, subset: Option<&str>, fqdn: &str) -> String {
    format!("outbound|{port}|{}|{fqdn}", subset.unwrap_or(""))
}

/// The cluster a destination names, from a VirtualService in `namespace` routing traffic
/// that arrived on `port` (the destination's own port wins).
pub fn destination_cluster(
    d: &Destination,
    namespace: &str,
    port: u16,
    path: &str,
) -> Result<String, TranslateError> {
    let p = match d.port.and_then(|p| p.number) {
        Some(n) => {
            u16::try_from(n).map_err(|_| err(format!("{path}.port"), "port out of range"))?
        }
        None => port,
    };
    Ok(cluster_name(
        p,
        d.subset.as_deref(),
        &host::fqdn(&d.host, namespace),
    ))
}

fn string_match(m: &StringMatch) -> wire::StringMatch {
    wire::StringMatch {
        exact: m.exact.clone(),
        prefix: m.prefix.clone(),
        regex: m.regex.clone(),
    }
}

fn pct(p: Option<&Percent>, legacy: Option<i32>) -> Option<f64> {
    p.map(|p| p.value).or(legacy.map(f64::from))
}

fn duration(d: Option<&trellis_api::common::Duration>) -> Option<prost_types::Duration> {
    d.map(|d| wire::from_std(d.0))
}

fn header_ops(h: Option<&HeaderOperations>) -> Option<wire::HeaderOps> {
    h.map(|h| wire::HeaderOps {
        set: h.set.clone(),
        add: h.add.clone(),
        remove: h.remove.clone(),
    })
}

fn http_match(m: &HttpMatchRequest) -> wire::HttpMatch {
    let map = |m: &std::collections::BTreeMap<String, StringMatch>| {
        m.iter()
            .map(|(k, v)| (k.clone(), string_match(v)))
            .collect()
    };
    wire::HttpMatch {
        name: m.name.clone(),
        uri: m.uri.as_ref().map(string_match),
        scheme: m.scheme.as_ref().map(string_match),
        method: m.method.as_ref().map(string_match),
        authority: m.authority.as_ref().map(string_match),
        headers: map(&m.headers),
        without_headers: map(&m.without_headers),
        query_params: map(&m.query_params),
        port: m.port,
        source_labels: m.source_labels.clone(),
        source_namespace: m.source_namespace.clone(),
        ignore_uri_case: m.ignore_uri_case.unwrap_or(false),
    }
}

/// Translates one HTTP rule.
pub fn http_route(
    r: &HttpRoute,
    index: usize,
    namespace: &str,
    port: u16,
) -> Result<wire::HttpRoute, TranslateError> {
    let path = format!("spec.http[{index}]");
    let mut clusters = weighted_clusters(
        r.route.iter().map(|d| (&d.destination, d.weight)),
        namespace,
        port,
        &path,
    )?;
    // Several destinations: each keeps its own header operations (one destination's
    // join the route's below).
    if r.route.len() > 1 {
        for (wc, d) in clusters.iter_mut().zip(&r.route) {
            let h = d.headers.as_ref();
            wc.request_headers = header_ops(h.and_then(|h| h.request.as_ref()));
            wc.response_headers = header_ops(h.and_then(|h| h.response.as_ref()));
        }
    }
    let mut mirrors = Vec::new();
    if let Some(m) = &r.mirror {
        mirrors.push(wire::Mirror {
            cluster: destination_cluster(m, namespace, port, &format!("{path}.mirror"))?,
            percentage: pct(
                r.mirror_percentage.as_ref(),
                r.mirror_percent
                    .or(r.mirror_percent_snake)
                    .map(|p| p as i32),
            ),
        });
    }
    for (j, m) in r.mirrors.iter().enumerate() {
        mirrors.push(wire::Mirror {
            cluster: destination_cluster(
                &m.destination,
                namespace,
                port,
                &format!("{path}.mirrors[{j}]"),
            )?,
            percentage: m.percentage.map(|p| p.value),
        });
    }
    // Route-level header operations, plus the destination's when there is only one (with
    // several, each destination carries its own, above).
    let mut request_headers = header_ops(r.headers.as_ref().and_then(|h| h.request.as_ref()));
    let mut response_headers = header_ops(r.headers.as_ref().and_then(|h| h.response.as_ref()));
    if let [d] = r.route.as_slice() {
        let h = d.headers.as_ref();
        merge_header_ops(&mut request_headers, h.and_then(|h| h.request.as_ref()));
        merge_header_ops(&mut response_headers, h.and_then(|h| h.response.as_ref()));
    }
    Ok(wire::HttpRoute {
        name: r.name.clone().unwrap_or_else(|| format!("#{index}")),
        matches: r.matches.iter().map(http_match).collect(),
        clusters,
        timeout: duration(r.timeout.as_ref()),
        fault: r.fault.as_ref().map(|f| wire::Fault {
            delay: f.delay.as_ref().map(|d| wire::FaultDelay {
                fixed_delay: duration(d.fixed_delay.as_ref().or(d.exponential_delay.as_ref())),
                percentage: pct(d.percentage.as_ref(), d.percent),
            }),
            abort: f.abort.as_ref().map(|a| wire::FaultAbort {
                http_status: a.http_status.and_then(|s| u32::try_from(s).ok()),
                grpc_status: a.grpc_status.clone(),
                percentage: pct(a.percentage.as_ref(), None),
            }),
        }),
        direct_response: r.direct_response.as_ref().map(|d| wire::DirectResponse {
            status: d.status,
            body: d.body.as_ref().and_then(|b| b.string.clone()),
        }),
        redirect: r.redirect.as_ref().map(|rd| wire::Redirect {
            uri: rd.uri.clone(),
            authority: rd.authority.clone(),
            scheme: rd.scheme.clone(),
            port: rd.port,
            redirect_code: rd.redirect_code,
        }),
        rewrite: r.rewrite.as_ref().map(|rw| wire::Rewrite {
            uri: rw.uri.clone(),
            authority: rw.authority.clone(),
            uri_regex: rw
                .uri_regex_rewrite
                .as_ref()
                .and_then(|x| x.pattern.clone()),
            uri_regex_replacement: rw
                .uri_regex_rewrite
                .as_ref()
                .and_then(|x| x.rewrite.clone()),
        }),
        request_headers,
        response_headers,
        retries: r.retries.as_ref().map(|rt| wire::RetryPolicy {
            attempts: u32::try_from(rt.attempts.unwrap_or(0)).unwrap_or(0),
            per_try_timeout: duration(rt.per_try_timeout.as_ref()),
            retry_on: rt.retry_on.clone(),
            backoff: duration(rt.backoff.as_ref()),
        }),
        mirrors,
        rate_limit: None,
        cors: r.cors_policy.as_ref().map(|c| wire::CorsPolicy {
            allow_origins: c
                .allow_origins
                .iter()
                .map(string_match)
                .chain(c.allow_origin.iter().map(|o| wire::StringMatch {
                    exact: Some(o.clone()),
                    ..Default::default()
                }))
                .collect(),
            allow_methods: c.allow_methods.clone(),
            allow_headers: c.allow_headers.clone(),
            expose_headers: c.expose_headers.clone(),
            max_age: duration(c.max_age.as_ref()),
            allow_credentials: c.allow_credentials,
        }),
    })
}

fn merge_header_ops(base: &mut Option<wire::HeaderOps>, extra: Option<&HeaderOperations>) {
    if let Some(extra) = header_ops(extra) {
        let base = base.get_or_insert_with(Default::default);
        base.set.extend(extra.set);
        base.add.extend(extra.add);
        base.remove.extend(extra.remove);
    }
}

/// The weighted clusters of a rule's `route[]` (HTTP, TCP and TLS alike).
fn weighted_clusters<'a>(
    routes: impl Iterator<Item = (&'a Destination, Option<i32>)>,
    namespace: &str,
    port: u16,
    path: &str,
) -> Result<Vec<wire::WeightedCluster>, TranslateError> {
    routes
        .enumerate()
        .map(|(j, (d, weight))| {
            Ok(wire::WeightedCluster {
                cluster: destination_cluster(
                    d,
                    namespace,
                    port,
                    &format!("{path}.route[{j}].destination"),
                )?,
                weight: u32::try_from(weight.unwrap_or(0)).unwrap_or(0),
                ..Default::default()
            })
        })
        .collect()
}

fn l4_clusters(
    routes: &[RouteDestination],
    namespace: &str,
    port: u16,
    path: &str,
) -> Result<Vec<wire::WeightedCluster>, TranslateError> {
    weighted_clusters(
        routes.iter().map(|d| (&d.destination, d.weight)),
        namespace,
        port,
        path,
    )
}

fn l4_match(m: &L4MatchAttributes) -> wire::L4Match {
    wire::L4Match {
        destination_subnets: m.destination_subnets.clone(),
        port: m.port,
        source_labels: m.source_labels.clone(),
        source_namespace: m.source_namespace.clone(),
        sni_hosts: Vec::new(),
    }
}

fn tls_match(m: &TlsMatchAttributes) -> wire::L4Match {
    wire::L4Match {
        destination_subnets: m.destination_subnets.clone(),
        port: m.port,
        source_labels: m.source_labels.clone(),
        source_namespace: m.source_namespace.clone(),
        sni_hosts: m.sni_hosts.clone(),
    }
}

/// The routes a VirtualService in `namespace` gives traffic arriving on `port`.
#[derive(Debug, Clone, Default)]
pub struct PortRoutes {
    pub http: Vec<wire::HttpRoute>,
    pub tcp: Vec<wire::L4Route>,
    pub tls: Vec<wire::L4Route>,
}

/// Translates a whole VirtualService for one service port.
pub fn virtual_service(
    vs: &VirtualService,
    namespace: &str,
    port: u16,
) -> Result<PortRoutes, TranslateError> {
    virtual_service_delegating(vs, namespace, port, &|_, _| None)
}

/// As [`virtual_service`], with `delegate` rules resolved through `lookup`.
pub fn virtual_service_delegating(
    vs: &VirtualService,
    namespace: &str,
    port: u16,
    lookup: DelegateLookup<'_>,
) -> Result<PortRoutes, TranslateError> {
    let http = http_routes_delegating(vs, namespace, port, MESH, lookup)?;
    let (tcp, tls) = l4_routes_for(vs, namespace, port, MESH)?;
    Ok(PortRoutes { http, tcp, tls })
}

/// Whether one match entry with these `gateways` applies to `gateway` (empty: the
/// VirtualService's own gateways decide).
fn match_applies(gateways: &[String], vs: &VirtualService, namespace: &str, gateway: &str) -> bool {
    if gateways.is_empty() {
        applies_to(vs, namespace, gateway)
    } else {
        gateways
            .iter()
            .any(|g| gateway_ref(g, namespace) == gateway)
    }
}

/// A VirtualService's `tcp[]` and `tls[]` rules as `gateway` sees them (match entries
/// naming other gateways left out, as for HTTP).
pub fn l4_routes_for(
    vs: &VirtualService,
    namespace: &str,
    port: u16,
    gateway: &str,
) -> Result<(Vec<wire::L4Route>, Vec<wire::L4Route>), TranslateError> {
    let applies = |g: &[String]| match_applies(g, vs, namespace, gateway);
    let tcp = l4_rules(
        vs.tcp.iter().map(|r| (&r.matches[..], &r.route[..])),
        "tcp",
        |m: &L4MatchAttributes| applies(&m.gateways),
        l4_match,
        namespace,
        port,
    )?;
    let tls = l4_rules(
        vs.tls.iter().map(|r| (&r.matches[..], &r.route[..])),
        "tls",
        |m: &TlsMatchAttributes| applies(&m.gateways),
        tls_match,
        namespace,
        port,
    )?;
    Ok((tcp, tls))
}

/// The `tcp[]` or `tls[]` rules (`field`) whose match entries `keep` leaves any of (a rule
/// without matches always stays).
fn l4_rules<'a, M: 'a>(
    rules: impl Iterator<Item = (&'a [M], &'a [RouteDestination])>,
    field: &str,
    keep: impl Fn(&M) -> bool,
    convert: impl Fn(&M) -> wire::L4Match,
    namespace: &str,
    port: u16,
) -> Result<Vec<wire::L4Route>, TranslateError> {
    let mut out = Vec::new();
    for (i, (matches, route)) in rules.enumerate() {
        let kept: Vec<&M> = matches.iter().filter(|m| keep(m)).collect();
        if !matches.is_empty() && kept.is_empty() {
            continue;
        }
        out.push(wire::L4Route {
            name: format!("#{i}"),
            matches: kept.into_iter().map(&convert).collect(),
            clusters: l4_clusters(route, namespace, port, &format!("spec.{field}[{i}]"))?,
        });
    }
    Ok(out)
}

/// The reserved gateway name of sidecars.
pub const MESH: &str = "mesh";

/// A gateway reference as "namespace/name" (`name` alone is in `namespace`; `mesh` stays).
pub fn gateway_ref(g: &str, namespace: &str) -> String {
    if g == MESH || g.contains('/') {
        g.to_string()
    } else {
        format!("{namespace}/{g}")
    }
}

/// Whether a VirtualService in `namespace` applies to `gateway` (`mesh` or
/// "namespace/name"); no `gateways` means the mesh only, as in Istio.
pub fn applies_to(vs: &VirtualService, namespace: &str, gateway: &str) -> bool {
    if vs.gateways.is_empty() {
        return gateway == MESH;
    }
    vs.gateways
        .iter()
        .any(|g| gateway_ref(g, namespace) == gateway)
}

/// Finds the VirtualService a `delegate` names (`name`, `namespace`).
pub type DelegateLookup<'a> = &'a dyn Fn(&str, &str) -> Option<&'a VirtualService>;

/// A VirtualService's HTTP rules as `gateway` sees them: a match that names other gateways
/// is left out, and a rule all of whose matches are left out goes with them. A rule with
/// `delegate` fails to translate (use [`http_routes_delegating`]).
pub fn http_routes_for(
    vs: &VirtualService,
    namespace: &str,
    port: u16,
    gateway: &str,
) -> Result<Vec<wire::HttpRoute>, TranslateError> {
    http_routes_delegating(vs, namespace, port, gateway, &|_, _| None)
}

/// As [`http_routes_for`], with `delegate` rules replaced by the delegate VirtualService's
/// rules (found with `lookup`), each of its matches combined with the delegating rule's:
/// conditions on different fields add up, a delegate's condition on the same field must
/// lie within the root's (a longer prefix of the same path, the same exact value), and a
/// combination that cannot hold is dropped, as Istio does. Delegation is one level deep.
pub fn http_routes_delegating(
    vs: &VirtualService,
    namespace: &str,
    port: u16,
    gateway: &str,
    lookup: DelegateLookup<'_>,
) -> Result<Vec<wire::HttpRoute>, TranslateError> {
    effective_http_rules(vs, namespace, gateway, lookup)?
        .iter()
        .map(|e| http_route(&e.rule, e.index, &e.namespace, port))
        .collect()
}

/// One HTTP rule as a gateway (or the mesh) sees it, still in Istio's terms.
#[derive(Debug, Clone)]
pub struct EffectiveRule {
    pub rule: HttpRoute,
    /// Its index in the VirtualService that holds it.
    pub index: usize,
    /// Where its destinations' short names resolve (the delegate's namespace for a
    /// delegated rule).
    pub namespace: String,
    /// `namespace/name` of the delegate VirtualService it came from, if any.
    pub delegate: Option<String>,
}

/// The HTTP rules of `vs` that apply to `gateway`, delegates resolved and merged:
/// what [`http_routes_delegating`] translates, and what `trellis explain` matches against.
pub fn effective_http_rules(
    vs: &VirtualService,
    namespace: &str,
    gateway: &str,
    lookup: DelegateLookup<'_>,
) -> Result<Vec<EffectiveRule>, TranslateError> {
    let mut out = Vec::with_capacity(vs.http.len());
    for (i, r) in vs.http.iter().enumerate() {
        let kept: Vec<HttpMatchRequest> = if r.matches.iter().all(|m| m.gateways.is_empty()) {
            r.matches.clone()
        } else {
            let kept: Vec<HttpMatchRequest> = r
                .matches
                .iter()
                .filter(|m| match_applies(&m.gateways, vs, namespace, gateway))
                .cloned()
                .collect();
            if kept.is_empty() {
                continue;
            }
            kept
        };
        let Some(d) = &r.delegate else {
            let mut rule = r.clone();
            rule.matches = kept;
            out.push(EffectiveRule {
                rule,
                index: i,
                namespace: namespace.to_string(),
                delegate: None,
            });
            continue;
        };
        let path = format!("spec.http[{i}].delegate");
        let name = d.name.as_deref().unwrap_or_default();
        let ns = d.namespace.as_deref().unwrap_or(namespace);
        let Some(target) = lookup(name, ns) else {
            return Err(err(
                path,
                format!("VirtualService {ns}/{name} is not found"),
            ));
        };
        for (j, dr) in target.http.iter().enumerate() {
            if dr.delegate.is_some() {
                return Err(err(
                    format!("{path}: VirtualService {ns}/{name} spec.http[{j}]"),
                    "a delegate cannot delegate again",
                ));
            }
            let matches: Vec<HttpMatchRequest> = match (kept.is_empty(), dr.matches.is_empty()) {
                (true, _) => dr.matches.clone(),
                (false, true) => kept.clone(),
                (false, false) => kept
                    .iter()
                    .flat_map(|root| dr.matches.iter().filter_map(move |m| merge_match(root, m)))
                    .collect(),
            };
            if matches.is_empty() && !(kept.is_empty() && dr.matches.is_empty()) {
                continue; // every combination conflicts
            }
            let mut rule = dr.clone();
            rule.matches = matches;
            if rule.name.is_none() {
                rule.name = Some(format!(
                    "{}/{j}",
                    r.name.clone().unwrap_or_else(|| format!("#{i}"))
                ));
            }
            // The delegate's destinations are in its own namespace.
            out.push(EffectiveRule {
                rule,
                index: j,
                namespace: ns.to_string(),
                delegate: Some(format!("{ns}/{name}")),
            });
        }
    }
    Ok(out)
}

/// `inner` within `outer` (a delegate's condition under the root's), or `None` when the
/// two cannot both hold.
fn narrower(outer: &StringMatch, inner: &StringMatch) -> Option<StringMatch> {
    let ok = match (
        (&outer.exact, &outer.prefix, &outer.regex),
        (&inner.exact, &inner.prefix, &inner.regex),
    ) {
        ((Some(a), _, _), (Some(b), _, _)) => a == b,
        ((_, Some(p), _), (Some(b), _, _)) | ((_, Some(p), _), (_, Some(b), _)) => {
            b.starts_with(p.as_str())
        }
        ((_, _, Some(a)), (_, _, Some(b))) => a == b,
        // Presence only on the outer side: any inner condition is narrower.
        ((None, None, None), _) => true,
        _ => false,
    };
    ok.then(|| inner.clone())
}

fn merge_opt(
    outer: &Option<StringMatch>,
    inner: &Option<StringMatch>,
) -> Result<Option<StringMatch>, ()> {
    match (outer, inner) {
        (Some(o), Some(i)) => narrower(o, i).map(Some).ok_or(()),
        (o, None) => Ok(o.clone()),
        (None, i) => Ok(i.clone()),
    }
}

fn merge_map<V: Clone + PartialEq>(
    outer: &std::collections::BTreeMap<String, V>,
    inner: &std::collections::BTreeMap<String, V>,
) -> Result<std::collections::BTreeMap<String, V>, ()> {
    let mut out = outer.clone();
    for (k, v) in inner {
        match out.get(k) {
            Some(existing) if existing != v => return Err(()),
            _ => {
                out.insert(k.clone(), v.clone());
            }
        }
    }
    Ok(out)
}

/// A delegate route's match combined with the root route's, Istio's way.
fn merge_match(root: &HttpMatchRequest, d: &HttpMatchRequest) -> Option<HttpMatchRequest> {
    let mut m = d.clone();
    m.uri = merge_opt(&root.uri, &d.uri).ok()?;
    m.scheme = merge_opt(&root.scheme, &d.scheme).ok()?;
    m.method = merge_opt(&root.method, &d.method).ok()?;
    m.authority = merge_opt(&root.authority, &d.authority).ok()?;
    m.headers = merge_map(&root.headers, &d.headers).ok()?;
    m.without_headers = merge_map(&root.without_headers, &d.without_headers).ok()?;
    m.query_params = merge_map(&root.query_params, &d.query_params).ok()?;
    m.source_labels = merge_map(&root.source_labels, &d.source_labels).ok()?;
    m.port = match (root.port, d.port) {
        (Some(a), Some(b)) if a != b => return None,
        (a, b) => b.or(a),
    };
    m.source_namespace = match (&root.source_namespace, &d.source_namespace) {
        (Some(a), Some(b)) if a != b => return None,
        (a, b) => b.clone().or_else(|| a.clone()),
    };
    m.gateways = root.gateways.clone();
    m.ignore_uri_case =
        Some(root.ignore_uri_case.unwrap_or(false) || d.ignore_uri_case.unwrap_or(false));
    m.name = d.name.clone().or_else(|| root.name.clone());
    Some(m)
}

/// One Gateway to translate: its namespace, name and spec.
#[derive(Debug, Clone, Copy)]
pub struct GatewayRef<'a> {
    pub namespace: &'a str,
    pub name: &'a str,
    pub gateway: &'a Gateway,
}

/// One VirtualService that may bind to it.
#[derive(Debug, Clone, Copy)]
pub struct VirtualServiceRef<'a> {
    pub namespace: &'a str,
    pub name: &'a str,
    pub vs: &'a VirtualService,
}

/// A Gateway server host: the namespace it admits VirtualServices from (`None`: any) and
/// the host name.
fn server_host<'a>(h: &'a str, gateway_ns: &str) -> (Option<String>, &'a str) {
    match h.split_once('/') {
        Some(("*", host)) => (None, host),
        Some((".", host)) => (Some(gateway_ns.to_string()), host),
        Some((ns, host)) => (Some(ns.to_string()), host),
        None => (None, h),
    }
}

/// The more specific of two host patterns when they overlap (`*` ⊇ `*.a.com` ⊇ `b.a.com`),
/// else `None`.
fn host_intersection(a: &str, b: &str) -> Option<String> {
    let covers = |wide: &str, narrow: &str| {
        wide == "*"
            || wide == narrow
            || wide
                .strip_prefix('*')
                .is_some_and(|suffix| narrow.len() > suffix.len() && narrow.ends_with(suffix))
    };
    if covers(a, b) {
        Some(b.to_string())
    } else if covers(b, a) {
        Some(a.to_string())
    } else {
        None
    }
}

/// Translates Gateways (the ones a gateway proxy's labels select) and the VirtualServices
/// bound to them into the snapshot's gateway ports. Servers on the same port are merged
/// onto one listener. A server Trellis cannot serve yet (TLS passthrough, TCP) is left
/// out and reported, the rest still translates.
pub fn gateway_ports(
    gateways: &[GatewayRef<'_>],
    virtual_services: &[VirtualServiceRef<'_>],
) -> (Vec<wire::GatewayPort>, Vec<TranslateError>) {
    let lookup = |name: &str, ns: &str| {
        virtual_services
            .iter()
            .find(|v| v.name == name && v.namespace == ns)
            .map(|v| v.vs)
    };
    let mut ports: Vec<wire::GatewayPort> = Vec::new();
    let mut problems = Vec::new();
    for g in gateways {
        let gw_name = format!("{}/{}", g.namespace, g.name);
        for (j, server) in g.gateway.servers.iter().enumerate() {
            let path = format!("Gateway {gw_name}: spec.servers[{j}]");
            let Ok(port) = u16::try_from(server.port.number) else {
                problems.push(err(format!("{path}.port.number"), "port out of range"));
                continue;
            };
            let tls_mode = server.tls.as_ref().and_then(|t| t.mode);
            let protocol = match server.port.protocol {
                Protocol::Http | Protocol::Http2 | Protocol::Grpc => wire::Protocol::Http,
                Protocol::Https | Protocol::Tls if tls_mode == Some(ServerTlsMode::Passthrough) => {
                    wire::Protocol::Tls
                }
                Protocol::Tcp | Protocol::Mongo | Protocol::Mysql | Protocol::Redis => {
                    wire::Protocol::Tcp
                }
                Protocol::Https
                    if matches!(
                        tls_mode,
                        Some(
                            ServerTlsMode::Simple
                                | ServerTlsMode::Mutual
                                | ServerTlsMode::OptionalMutual
                        )
                    ) =>
                {
                    wire::Protocol::Https
                }
                other => {
                    problems.push(err(
                        &path,
                        format!(
                            "protocol {} with TLS mode {} is not served by Trellis gateways yet (HTTP; HTTPS with SIMPLE, MUTUAL or OPTIONAL_MUTUAL; HTTPS or TLS with PASSTHROUGH; TCP are); the server is left out",
                            other.as_str(),
                            tls_mode.map_or("unset", tls_mode_name)
                        ),
                    ));
                    continue;
                }
            };
            let hosts: Vec<(Option<String>, &str)> = server
                .hosts
                .iter()
                .map(|h| server_host(h, g.namespace))
                .collect();
            let mut virtual_hosts = Vec::new();
            for v in virtual_services {
                if !applies_to(v.vs, v.namespace, &gw_name) {
                    continue;
                }
                let mut domains: Vec<String> = Vec::new();
                for vh in &v.vs.hosts {
                    for (ns, sh) in &hosts {
                        if ns.as_deref().is_some_and(|ns| ns != v.namespace) {
                            continue;
                        }
                        if let Some(d) = host_intersection(vh, sh) {
                            if !domains.contains(&d) {
                                domains.push(d);
                            }
                        }
                    }
                }
                if domains.is_empty() {
                    continue;
                }
                let routes = http_routes_delegating(v.vs, v.namespace, port, &gw_name, &lookup)
                    .and_then(|h| {
                        l4_routes_for(v.vs, v.namespace, port, &gw_name).map(|(t, s)| (h, t, s))
                    });
                match routes {
                    Ok((http_routes, tcp_routes, tls_routes)) => {
                        // A server carries only the routes of its protocol.
                        let (http_routes, tcp_routes, tls_routes) = match protocol {
                            wire::Protocol::Tcp => (Vec::new(), tcp_routes, Vec::new()),
                            wire::Protocol::Tls => (Vec::new(), Vec::new(), tls_routes),
                            _ => (http_routes, Vec::new(), Vec::new()),
                        };
                        // Nothing for this server: no virtual host that would shadow
                        // another VirtualService's for the same host.
                        if http_routes.is_empty() && tcp_routes.is_empty() && tls_routes.is_empty()
                        {
                            continue;
                        }
                        virtual_hosts.push(wire::VirtualHost {
                            name: format!("{}/{}", v.namespace, v.name),
                            domains,
                            http_routes,
                            tcp_routes,
                            tls_routes,
                        });
                    }
                    Err(e) => problems.push(err(
                        format!("VirtualService {}/{}: {}", v.namespace, v.name, e.path),
                        e.reason,
                    )),
                }
            }
            let tls = server.tls.as_ref().map(|t| wire::ServerTls {
                mode: match t.mode {
                    Some(ServerTlsMode::Mutual) => wire::ServerTlsMode::Mutual,
                    Some(ServerTlsMode::OptionalMutual) => wire::ServerTlsMode::OptionalMutual,
                    Some(ServerTlsMode::Passthrough) => wire::ServerTlsMode::Passthrough,
                    Some(ServerTlsMode::AutoPassthrough) => wire::ServerTlsMode::AutoPassthrough,
                    Some(ServerTlsMode::IstioMutual) => wire::ServerTlsMode::IstioMutual,
                    Some(ServerTlsMode::Simple) | None => wire::ServerTlsMode::Simple,
                } as i32,
                https_redirect: t.https_redirect.unwrap_or(false),
                credential_name: t.credential_name.clone(),
                server_certificate: t.server_certificate.clone(),
                private_key: t.private_key.clone(),
                ca_certificates: t.ca_certificates.clone(),
            });
            let out = wire::GatewayServer {
                gateway: gw_name.clone(),
                name: server.name.clone(),
                protocol: protocol as i32,
                hosts: hosts.iter().map(|(_, h)| h.to_string()).collect(),
                tls,
                virtual_hosts,
            };
            match ports.iter_mut().find(|p| p.port == u32::from(port)) {
                Some(p) => {
                    let family = |proto: i32| match wire::Protocol::try_from(proto) {
                        Ok(wire::Protocol::Https | wire::Protocol::Tls) => "TLS",
                        Ok(wire::Protocol::Tcp) => "TCP",
                        _ => "HTTP",
                    };
                    let existing = p.servers.first().map(|s| family(s.protocol));
                    if existing.is_some_and(|e| e != family(out.protocol)) {
                        problems.push(err(
                            &path,
                            format!(
                                "port {port} already serves {} from another server; the server is left out",
                                existing.unwrap_or_default()
                            ),
                        ));
                        continue;
                    }
                    p.servers.push(out);
                }
                None => ports.push(wire::GatewayPort {
                    port: u32::from(port),
                    bind: server.bind.clone(),
                    servers: vec![out],
                }),
            }
        }
    }
    ports.sort_by_key(|p| p.port);
    (ports, problems)
}

fn tls_mode_name(m: ServerTlsMode) -> &'static str {
    match m {
        ServerTlsMode::Passthrough => "PASSTHROUGH",
        ServerTlsMode::Simple => "SIMPLE",
        ServerTlsMode::Mutual => "MUTUAL",
        ServerTlsMode::AutoPassthrough => "AUTO_PASSTHROUGH",
        ServerTlsMode::IstioMutual => "ISTIO_MUTUAL",
        ServerTlsMode::OptionalMutual => "OPTIONAL_MUTUAL",
    }
}

/// A ServiceEntry's services and clusters, one per host and port, named as Istio names
/// them (`outbound|443||api.example.com`):
///
/// - `STATIC`: the entry's `endpoints` (their address, the port named like the entry's
///   port, else `targetPort`, else the port itself); none: an empty cluster (503 UH);
/// - `DNS` and `DNS_ROUND_ROBIN`: the endpoints' addresses, or the host itself, resolved
///   by the proxy (STRICT_DNS);
/// - `NONE`: no endpoints, connections go where the app sent them (ORIGINAL_DST).
///
/// `MESH_INTERNAL` endpoints are taken to have a Trellis proxy in front of them.
pub fn service_entry(
    se: &ServiceEntry,
    namespace: &str,
    name: &str,
) -> Result<(Vec<wire::Service>, Vec<wire::Cluster>), TranslateError> {
    let path = format!("ServiceEntry {namespace}/{name}");
    let resolution = se.resolution.unwrap_or(Resolution::None);
    let discovery = match resolution {
        Resolution::Static => wire::Discovery::Static,
        Resolution::Dns | Resolution::DnsRoundRobin => wire::Discovery::StrictDns,
        Resolution::None => wire::Discovery::OriginalDst,
        Resolution::DynamicDns => {
            return Err(err(
                format!("{path}: spec.resolution"),
                "DYNAMIC_DNS is not supported by Trellis yet",
            ));
        }
    };
    let proxied = matches!(se.location, Some(Location::MeshInternal));
    // Only plain IPs become service addresses (a CIDR cannot be a listener address).
    let addresses: Vec<String> = se
        .addresses
        .iter()
        .filter(|a| a.parse::<std::net::IpAddr>().is_ok())
        .cloned()
        .collect();
    let mut services = Vec::new();
    let mut clusters = Vec::new();
    for host in &se.hosts {
        if host.starts_with('*') && discovery != wire::Discovery::OriginalDst {
            return Err(err(
                format!("{path}: spec.hosts"),
                format!("wildcard host {host:?} needs resolution NONE"),
            ));
        }
        let mut ports = Vec::new();
        for (j, p) in se.ports.iter().enumerate() {
            let number = u16::try_from(p.number)
                .map_err(|_| err(format!("{path}: spec.ports[{j}].number"), "out of range"))?;
            let target = p.target_port.unwrap_or(p.number);
            let cluster = cluster_name(number, None, host);
            let endpoints = match discovery {
                wire::Discovery::OriginalDst => Vec::new(),
                // STATIC without endpoints (a workloadSelector's WorkloadEntries are the
                // registry's job): no endpoints yet, 503 UH, as Istio warns (IST0133).
                wire::Discovery::Static if se.endpoints.is_empty() => Vec::new(),
                _ if se.endpoints.is_empty() => {
                    vec![wire::Endpoint {
                        address: format!("{host}:{target}"),
                        proxied,
                        ..Default::default()
                    }]
                }
                _ => se
                    .endpoints
                    .iter()
                    .filter_map(|e| {
                        let addr = e.address.as_deref()?;
                        let port = e.ports.get(&p.name).copied().unwrap_or(target);
                        let address = match addr.parse::<std::net::IpAddr>() {
                            Ok(std::net::IpAddr::V6(v6)) => format!("[{v6}]:{port}"),
                            _ => format!("{addr}:{port}"),
                        };
                        Some(wire::Endpoint {
                            address,
                            proxied,
                            labels: e.labels.clone(),
                            locality: e.locality.clone(),
                            weight: e.weight,
                            ..Default::default()
                        })
                    })
                    .collect(),
            };
            clusters.push(wire::Cluster {
                name: cluster.clone(),
                endpoints,
                discovery: discovery as i32,
                ..Default::default()
            });
            ports.push(wire::ServicePort {
                port: u32::from(number),
                name: Some(p.name.clone()),
                protocol: p.protocol.map(|pr| wire::Protocol::from_api(pr) as i32),
                cluster,
                ..Default::default()
            });
        }
        services.push(wire::Service {
            hostname: host.clone(),
            addresses: addresses.clone(),
            ports,
        });
    }
    Ok((services, clusters))
}

#[cfg(test)]
mod tests {
    use super::*;
    use trellis_api::{LoadOptions, Spec, parse_text};

    fn vs(yaml: &str) -> VirtualService {
        let parsed = parse_text(yaml, "vs.yaml", &LoadOptions::default());
        match parsed[0].resource().map(|r| &r.spec) {
            Some(Spec::VirtualService(v)) => v.clone(),
            _ => panic!("{:?}", parsed[0].diagnostics),
        }
    }

    #[test]
    fn every_http_feature_is_carried_over() {
        let v = vs(r#"
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: ratings, namespace: shop}
spec:
  hosts: [ratings]
  http:
  - name: faulty
    match: [{uri: {prefix: /v1}, headers: {x-a: {}}, ignoreUriCase: true}]
    fault:
      delay: {fixedDelay: 7s, percentage: {value: 10}}
      abort: {httpStatus: 500, percentage: {value: 1}}
    timeout: 2s
    retries: {attempts: 3, perTryTimeout: 500ms, retryOn: "5xx"}
    rewrite: {uri: /v2, authority: ratings.internal}
    headers:
      request: {set: {x-b: "1"}}
    mirror: {host: ratings-canary, subset: v9}
    mirrorPercentage: {value: 25}
    corsPolicy: {allowOrigins: [{exact: "https://a"}], allowOrigin: ["https://b"], maxAge: 1h}
    route:
    - destination: {host: ratings, subset: v1, port: {number: 9080}}
      weight: 90
      headers: {response: {remove: [x-c]}}
    - destination: {host: ratings.other.svc.cluster.local}
      weight: 10
  - redirect: {uri: /moved, redirectCode: 302}
  tcp:
  - match: [{port: 3306, destinationSubnets: [10.0.0.0/8]}]
    route: [{destination: {host: db}}]
  tls:
  - match: [{sniHosts: [ratings.example.com]}]
    route: [{destination: {host: ratings, port: {number: 443}}}]
"#);
        let r = virtual_service(&v, "shop", 8080).expect("translates");
        let h = &r.http[0];
        assert_eq!(h.name, "faulty");
        assert!(h.matches[0].ignore_uri_case);
        assert_eq!(
            h.matches[0].uri.as_ref().and_then(|u| u.prefix.as_deref()),
            Some("/v1")
        );
        assert!(h.matches[0].headers.contains_key("x-a"));
        let clusters: Vec<(&str, u32)> = h
            .clusters
            .iter()
            .map(|c| (c.cluster.as_str(), c.weight))
            .collect();
        assert_eq!(
            clusters,
            [
                ("outbound|9080|v1|ratings.shop.svc.cluster.local", 90),
                ("outbound|8080||ratings.other.svc.cluster.local", 10)
            ]
        );
        let f = h.fault.as_ref().expect("fault");
        assert_eq!(f.delay.as_ref().and_then(|d| d.percentage), Some(10.0));
        assert_eq!(f.abort.as_ref().and_then(|a| a.http_status), Some(500));
        assert_eq!(
            h.timeout.as_ref().and_then(wire::to_std),
            Some(std::time::Duration::from_secs(2))
        );
        let rt = h.retries.as_ref().expect("retries");
        assert_eq!((rt.attempts, rt.retry_on.as_deref()), (3, Some("5xx")));
        assert_eq!(
            h.rewrite.as_ref().and_then(|w| w.uri.as_deref()),
            Some("/v2")
        );
        assert_eq!(
            h.request_headers.as_ref().map(|o| o.set["x-b"].as_str()),
            Some("1")
        );
        assert_eq!(
            h.mirrors[0].cluster,
            "outbound|8080|v9|ratings-canary.shop.svc.cluster.local"
        );
        assert_eq!(h.mirrors[0].percentage, Some(25.0));
        let cors = h.cors.as_ref().expect("cors");
        assert_eq!(
            cors.allow_origins.len(),
            2,
            "allowOrigins and the deprecated allowOrigin"
        );
        assert!(
            h.response_headers.is_none(),
            "destination headers only merge for a single destination"
        );
        assert_eq!(r.http[1].name, "#1");
        assert_eq!(
            r.http[1].redirect.as_ref().and_then(|x| x.redirect_code),
            Some(302)
        );
        assert_eq!(
            r.tcp[0].clusters[0].cluster,
            "outbound|8080||db.shop.svc.cluster.local"
        );
        assert_eq!(r.tcp[0].matches[0].destination_subnets, ["10.0.0.0/8"]);
        assert_eq!(r.tls[0].matches[0].sni_hosts, ["ratings.example.com"]);
        assert_eq!(
            r.tls[0].clusters[0].cluster,
            "outbound|443||ratings.shop.svc.cluster.local"
        );
    }

    #[test]
    fn a_single_destinations_headers_join_the_routes() {
        let v = vs(r#"
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: ratings, namespace: shop}
spec:
  hosts: [ratings]
  http:
  - headers: {request: {set: {x-route: "1"}}}
    route:
    - destination: {host: ratings}
      headers:
        request: {add: {x-dest: "2"}}
        response: {remove: [x-secret]}
"#);
        let r = virtual_service(&v, "shop", 8080).expect("translates");
        let h = &r.http[0];
        let req = h.request_headers.as_ref().expect("request headers");
        assert_eq!(req.set["x-route"], "1");
        assert_eq!(req.add["x-dest"], "2");
        assert_eq!(
            h.response_headers.as_ref().map(|o| o.remove.clone()),
            Some(vec!["x-secret".to_string()])
        );
        // Several destinations: each keeps its own.
        let v = vs(r#"
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: ratings, namespace: shop}
spec:
  hosts: [ratings]
  http:
  - route:
    - destination: {host: ratings, subset: v1}
      weight: 50
      headers: {request: {set: {x-dest: v1}}}
    - destination: {host: ratings, subset: v2}
      weight: 50
      headers: {response: {add: {x-from: v2}}}
"#);
        let r = virtual_service(&v, "shop", 8080).expect("translates");
        let cs = &r.http[0].clusters;
        assert_eq!(
            cs[0]
                .request_headers
                .as_ref()
                .map(|o| o.set["x-dest"].clone()),
            Some("v1".to_string())
        );
        assert!(cs[0].response_headers.is_none());
        assert_eq!(
            cs[1]
                .response_headers
                .as_ref()
                .map(|o| o.add["x-from"].clone()),
            Some("v2".to_string())
        );
        assert!(r.http[0].request_headers.is_none());
    }

    #[test]
    fn delegate_rules_merge_into_the_root() {
        let root = vs(r#"
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: root, namespace: edge}
spec:
  hosts: [shop.example.com]
  http:
  - name: product
    match: [{uri: {prefix: /productpage}, headers: {end-user: {exact: jason}}}]
    delegate: {name: productpage, namespace: team}
  - name: rest
    route: [{destination: {host: web}}]
"#);
        let delegate = vs(r#"
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: productpage, namespace: team}
spec:
  http:
  - name: v1
    match: [{uri: {prefix: /productpage/v1}}, {uri: {prefix: /elsewhere}}]
    route: [{destination: {host: productpage, subset: v1}}]
  - route: [{destination: {host: productpage, subset: v2}}]
"#);
        let lookup =
            |name: &str, ns: &str| (name == "productpage" && ns == "team").then_some(&delegate);
        let routes =
            http_routes_delegating(&root, "edge", 9080, MESH, &lookup).expect("translates");
        let names: Vec<&str> = routes.iter().map(|r| r.name.as_str()).collect();
        assert_eq!(names, ["v1", "product/1", "rest"]);
        // /elsewhere is not under /productpage: that combination is dropped; the root's
        // header condition joins the delegate's uri.
        assert_eq!(routes[0].matches.len(), 1);
        let m = &routes[0].matches[0];
        assert_eq!(
            m.uri.as_ref().and_then(|u| u.prefix.as_deref()),
            Some("/productpage/v1")
        );
        assert!(m.headers.contains_key("end-user"));
        // A delegate rule without match takes the root's; its hosts are in its namespace.
        assert_eq!(
            routes[1].matches[0]
                .uri
                .as_ref()
                .and_then(|u| u.prefix.as_deref()),
            Some("/productpage")
        );
        assert_eq!(
            routes[1].clusters[0].cluster,
            "outbound|9080|v2|productpage.team.svc.cluster.local"
        );
        assert_eq!(
            routes[2].clusters[0].cluster,
            "outbound|9080||web.edge.svc.cluster.local"
        );
        // A missing delegate is an error naming it.
        let e =
            http_routes_delegating(&root, "edge", 9080, MESH, &|_, _| None).expect_err("missing");
        assert_eq!(
            e.to_string(),
            "spec.http[0].delegate: VirtualService team/productpage is not found"
        );
    }
}
