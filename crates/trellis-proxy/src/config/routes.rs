//! Routes: HTTP route tables and what a route does (timeouts, faults, retries, mirrors,
//! rewrites, headers, CORS, rate limits), TCP and TLS routes.

use super::*;

/// A compiled TCP or TLS route.
#[derive(Debug)]
pub struct L4Route {
    pub name: String,
    pub matches: Vec<L4Match>,
    pub destinations: Vec<Weighted<RouteDest>>,
    total_weight: u32,
}

/// Conditions on a connection (all must hold).
#[derive(Debug)]
pub struct L4Match {
    pub subnets: Vec<(IpAddr, u8)>,
    pub port: Option<u16>,
    pub source_labels: Vec<(String, String)>,
    pub source_namespace: Option<String>,
    /// Lowercase; `*.example.com` matches one or more labels in front.
    pub sni_hosts: Vec<String>,
}

/// What a connection looks like to TCP and TLS routes.
#[derive(Debug)]
pub struct L4Request<'a> {
    pub dst: Option<SocketAddr>,
    pub port: u16,
    pub sni: Option<&'a str>,
    pub source_labels: &'a std::collections::BTreeMap<String, String>,
    pub source_namespace: &'a str,
}

pub(super) fn in_subnet(ip: IpAddr, net: IpAddr, prefix: u8) -> bool {
    match (ip, net) {
        (IpAddr::V4(a), IpAddr::V4(b)) => {
            let mask = if prefix == 0 {
                0
            } else {
                u32::MAX << (32 - u32::from(prefix.min(32)))
            };
            u32::from(a) & mask == u32::from(b) & mask
        }
        (IpAddr::V6(a), IpAddr::V6(b)) => {
            let mask = if prefix == 0 {
                0
            } else {
                u128::MAX << (128 - u32::from(prefix.min(128)))
            };
            u128::from(a) & mask == u128::from(b) & mask
        }
        _ => false,
    }
}

pub(super) fn sni_matches(pattern: &str, sni: &str) -> bool {
    match pattern.strip_prefix('*') {
        Some(suffix) => sni.ends_with(suffix) && sni.len() > suffix.len(),
        None => pattern == sni,
    }
}

impl L4Match {
    pub fn matches(&self, req: &L4Request<'_>) -> bool {
        if !self.subnets.is_empty()
            && !req
                .dst
                .is_some_and(|d| self.subnets.iter().any(|(n, p)| in_subnet(d.ip(), *n, *p)))
        {
            return false;
        }
        if self.port.is_some_and(|p| p != req.port) {
            return false;
        }
        if !self
            .source_labels
            .iter()
            .all(|(k, v)| req.source_labels.get(k) == Some(v))
        {
            return false;
        }
        if self
            .source_namespace
            .as_deref()
            .is_some_and(|n| n != req.source_namespace)
        {
            return false;
        }
        if !self.sni_hosts.is_empty()
            && !req
                .sni
                .is_some_and(|sni| self.sni_hosts.iter().any(|h| sni_matches(h, sni)))
        {
            return false;
        }
        true
    }
}

/// The first route whose match entries (alternatives) hold, and its weighted pick.
pub fn pick_l4<'a>(
    routes: &'a [L4Route],
    req: &L4Request<'_>,
) -> Option<(&'a L4Route, &'a RouteDest)> {
    let route = routes
        .iter()
        .find(|r| r.matches.is_empty() || r.matches.iter().any(|m| m.matches(req)))?;
    let mut point = (crate::http::random_u64() % u64::from(route.total_weight.max(1))) as u32;
    for d in &route.destinations {
        if point < d.weight {
            return Some((route, &d.destination));
        }
        point -= d.weight;
    }
    route.destinations.last().map(|d| (route, &d.destination))
}

pub(super) fn compile_l4(
    resource: &str,
    what: &str,
    routes: &[wire::L4Route],
    clusters: &HashMap<&str, Arc<Cluster>>,
) -> Result<Vec<L4Route>, ConfigError> {
    let mut out = Vec::with_capacity(routes.len());
    for (i, r) in routes.iter().enumerate() {
        let path = format!("{what}[{i}]");
        if r.clusters.is_empty() {
            return Err(bad(
                resource,
                format!("{path}: a route needs at least one cluster"),
            ));
        }
        let mut matches = Vec::with_capacity(r.matches.len());
        for (j, m) in r.matches.iter().enumerate() {
            let mut subnets = Vec::with_capacity(m.destination_subnets.len());
            for c in &m.destination_subnets {
                let (addr, prefix) = c.split_once('/').unwrap_or((c, ""));
                let ip: IpAddr = addr.parse().map_err(|_| {
                    bad(resource, format!("{path}.match[{j}]: {c:?} is not a CIDR"))
                })?;
                let max = if ip.is_ipv4() { 32 } else { 128 };
                let prefix = if prefix.is_empty() {
                    max
                } else {
                    prefix
                        .parse::<u8>()
                        .ok()
                        .filter(|p| *p <= max)
                        .ok_or_else(|| {
                            bad(resource, format!("{path}.match[{j}]: {c:?} is not a CIDR"))
                        })?
                };
                subnets.push((ip, prefix));
            }
            let port = m
                .port
                .map(|p| port_u16(&format!("{resource} {path}.match[{j}]"), p))
                .transpose()?;
            matches.push(L4Match {
                subnets,
                port,
                source_labels: m
                    .source_labels
                    .iter()
                    .map(|(k, v)| (k.clone(), v.clone()))
                    .collect(),
                source_namespace: m.source_namespace.clone(),
                sni_hosts: m.sni_hosts.iter().map(|h| h.to_ascii_lowercase()).collect(),
            });
        }
        let lone = r.clusters.len() == 1;
        let destinations: Vec<Weighted<RouteDest>> = r
            .clusters
            .iter()
            .map(|w| Weighted {
                weight: if lone && w.weight == 0 { 1 } else { w.weight },
                destination: RouteDest {
                    name: w.cluster.clone(),
                    cluster: clusters.get(w.cluster.as_str()).cloned(),
                    request_headers: None,
                    response_headers: None,
                },
            })
            .collect();
        let total_weight = destinations.iter().map(|d| d.weight).sum();
        out.push(L4Route {
            name: if r.name.is_empty() {
                format!("#{i}")
            } else {
                r.name.clone()
            },
            matches,
            destinations,
            total_weight,
        });
    }
    Ok(out)
}

/// What a route does besides choosing a cluster.
#[derive(Debug, Clone, Default)]
pub struct RoutePolicy {
    /// Bounds the whole request, injected delay included.
    pub timeout: Option<Duration>,
    /// Delay and the share of requests (0..100) it applies to.
    pub delay: Option<(Duration, f64)>,
    pub abort: Option<Abort>,
    /// Answer without an upstream.
    pub action: Option<LocalAction>,
    pub rewrite: Option<Rewrite>,
    pub request_headers: Option<HeaderOps>,
    pub response_headers: Option<HeaderOps>,
    /// `None`: Istio's default policy.
    pub retry: Option<RetryPolicy>,
    pub mirrors: Vec<Mirror>,
    pub rate_limit: Option<Arc<crate::ratelimit::TokenBucket>>,
    pub cors: Option<Cors>,
    /// Requests this rule matched (kept across snapshot swaps for the same service, port
    /// and rule name).
    pub requests: Arc<AtomicU64>,
}

/// A compiled CORS policy.
#[derive(Debug, Clone)]
pub struct Cors {
    pub origins: Vec<trellis_policy::route::StrMatch>,
    pub allow_methods: Option<http::HeaderValue>,
    pub allow_headers: Option<http::HeaderValue>,
    pub expose_headers: Option<http::HeaderValue>,
    pub max_age: Option<http::HeaderValue>,
    pub allow_credentials: bool,
}

impl Cors {
    pub fn allows(&self, origin: &str) -> bool {
        self.origins.iter().any(|m| m.matches(origin))
    }
}

pub(super) fn cors(resource: &str, path: &str, c: &wire::CorsPolicy) -> Result<Cors, ConfigError> {
    let list = |field: &str, v: &[String]| -> Result<Option<http::HeaderValue>, ConfigError> {
        if v.is_empty() {
            return Ok(None);
        }
        http::HeaderValue::from_str(&v.join(","))
            .map(Some)
            .map_err(|_| {
                bad(
                    resource,
                    format!("{path}.cors.{field}: invalid header value"),
                )
            })
    };
    let mut origins = Vec::with_capacity(c.allow_origins.len());
    for (i, o) in c.allow_origins.iter().enumerate() {
        let api = trellis_api::common::StringMatch {
            exact: o.exact.clone(),
            prefix: o.prefix.clone(),
            regex: o.regex.clone(),
        };
        origins.push(
            trellis_policy::route::StrMatch::compile(
                &api,
                false,
                &format!("{path}.cors.allowOrigins[{i}]"),
            )
            .map_err(|e| bad(resource, e.to_string()))?,
        );
    }
    let max_age = c
        .max_age
        .as_ref()
        .map(|d| duration(resource, Some(d), Duration::ZERO))
        .transpose()?
        .map(|d| http::HeaderValue::from(d.as_secs()));
    Ok(Cors {
        origins,
        allow_methods: list("allowMethods", &c.allow_methods)?,
        allow_headers: list("allowHeaders", &c.allow_headers)?,
        expose_headers: list("exposeHeaders", &c.expose_headers)?,
        max_age,
        allow_credentials: c.allow_credentials.unwrap_or(false),
    })
}

/// A token bucket from the snapshot, checked once per snapshot.
pub(super) fn rate_limit(
    resource: &str,
    path: &str,
    rl: Option<&wire::RateLimit>,
) -> Result<Option<Arc<crate::ratelimit::TokenBucket>>, ConfigError> {
    let Some(rl) = rl else { return Ok(None) };
    if rl.max_tokens == 0 || rl.tokens_per_fill == 0 {
        return Err(bad(
            resource,
            format!("{path}.rateLimit: maxTokens and tokensPerFill must be at least 1"),
        ));
    }
    let interval = duration(resource, rl.fill_interval.as_ref(), Duration::ZERO)?;
    if interval < Duration::from_millis(1) {
        return Err(bad(
            resource,
            format!("{path}.rateLimit.fillInterval must be at least 1ms"),
        ));
    }
    Ok(Some(Arc::new(crate::ratelimit::TokenBucket::new(
        rl.max_tokens,
        rl.tokens_per_fill,
        interval,
    ))))
}

/// Where copies of requests go.
#[derive(Debug, Clone)]
pub struct Mirror {
    /// `None` when the snapshot does not define the cluster (nothing is sent).
    pub cluster: Option<Arc<Cluster>>,
    /// Share of requests (0..100).
    pub percentage: f64,
}

/// Largest request body buffered so that a retry can send it again; larger (or
/// unknown-length, streaming) bodies go out once.
pub const MAX_RETRY_BODY: u64 = 64 * 1024;

/// When and how often a request is tried again.
#[derive(Debug, Clone, PartialEq)]
pub struct RetryPolicy {
    /// Retries after the first try (0: none).
    pub attempts: u32,
    pub per_try_timeout: Option<Duration>,
    pub backoff: Duration,
    pub on: RetryOn,
}

/// Istio's `retryOn` conditions.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RetryOn {
    pub five_xx: bool,
    pub gateway_error: bool,
    pub reset: bool,
    pub connect_failure: bool,
    pub retriable_4xx: bool,
    pub refused_stream: bool,
    pub status_codes: Vec<u16>,
    /// gRPC status codes (cancelled 1, deadline-exceeded 4, resource-exhausted 8,
    /// internal 13, unavailable 14).
    pub grpc: Vec<u8>,
}

impl RetryPolicy {
    /// Istio's default for HTTP routes: 2 retries on connect-failure, refused-stream,
    /// unavailable, cancelled and retriable-status-codes 503.
    pub fn istio_default() -> RetryPolicy {
        RetryPolicy {
            attempts: 2,
            per_try_timeout: None,
            backoff: Duration::from_millis(25),
            on: RetryOn {
                connect_failure: true,
                refused_stream: true,
                status_codes: vec![503],
                grpc: vec![14, 1],
                ..RetryOn::default()
            },
        }
    }

    /// Parses Istio's `retryOn` list.
    pub fn parse_retry_on(s: &str) -> Result<RetryOn, String> {
        let mut on = RetryOn::default();
        for cond in s.split(',').map(str::trim).filter(|c| !c.is_empty()) {
            match cond {
                "5xx" => on.five_xx = true,
                "gateway-error" => on.gateway_error = true,
                "reset" | "reset-before-request" => on.reset = true,
                "connect-failure" => on.connect_failure = true,
                "retriable-4xx" => on.retriable_4xx = true,
                "refused-stream" => on.refused_stream = true,
                "retriable-status-codes" => {}
                "cancelled" => on.grpc.push(1),
                "deadline-exceeded" => on.grpc.push(4),
                "resource-exhausted" => on.grpc.push(8),
                "internal" => on.grpc.push(13),
                "unavailable" => on.grpc.push(14),
                other => match other.parse::<u16>() {
                    Ok(code) if (100..=599).contains(&code) => on.status_codes.push(code),
                    _ => return Err(format!("{other:?} is not a retryOn condition")),
                },
            }
        }
        Ok(on)
    }
}
#[derive(Debug, Clone)]
pub enum LocalAction {
    Direct {
        status: u16,
        body: bytes::Bytes,
    },
    Redirect {
        code: u16,
        uri: Option<String>,
        authority: Option<String>,
        scheme: Option<String>,
        port: Option<u16>,
    },
}

/// Changes to the request before it goes upstream.
#[derive(Debug, Clone)]
pub struct Rewrite {
    pub uri: Option<String>,
    pub authority: Option<http::HeaderValue>,
    pub uri_regex: Option<(regex::Regex, String)>,
}

/// Header changes, validated once per snapshot.
#[derive(Debug, Clone, Default)]
pub struct HeaderOps {
    pub set: Vec<(http::HeaderName, http::HeaderValue)>,
    pub add: Vec<(http::HeaderName, http::HeaderValue)>,
    pub remove: Vec<http::HeaderName>,
}

impl HeaderOps {
    pub fn apply(&self, h: &mut http::HeaderMap) {
        for n in &self.remove {
            h.remove(n);
        }
        for (n, v) in &self.set {
            h.insert(n.clone(), v.clone());
        }
        for (n, v) in &self.add {
            h.append(n.clone(), v.clone());
        }
    }
}

pub(super) fn header_ops(
    resource: &str,
    path: &str,
    ops: &wire::HeaderOps,
) -> Result<HeaderOps, ConfigError> {
    let name = |n: &str| {
        http::HeaderName::from_bytes(n.as_bytes())
            .map_err(|_| bad(resource, format!("{path}: invalid header name {n:?}")))
    };
    let value = |v: &str| {
        http::HeaderValue::from_str(v)
            .map_err(|_| bad(resource, format!("{path}: invalid header value {v:?}")))
    };
    Ok(HeaderOps {
        set: ops
            .set
            .iter()
            .map(|(n, v)| Ok((name(n)?, value(v)?)))
            .collect::<Result<_, ConfigError>>()?,
        add: ops
            .add
            .iter()
            .map(|(n, v)| Ok((name(n)?, value(v)?)))
            .collect::<Result<_, ConfigError>>()?,
        remove: ops
            .remove
            .iter()
            .map(|n| name(n))
            .collect::<Result<_, _>>()?,
    })
}

/// An injected failure.
#[derive(Debug, Clone, Copy)]
pub struct Abort {
    pub kind: AbortKind,
    /// Share of requests (0..100).
    pub percentage: f64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AbortKind {
    Http(u16),
    /// A gRPC status code: answered as a trailers-only gRPC response.
    Grpc(u8),
}

pub(super) const GRPC_CODES: [&str; 17] = [
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

pub(super) fn route_policy(
    resource: &str,
    path: &str,
    r: &wire::HttpRoute,
    clusters: &HashMap<&str, Arc<Cluster>>,
) -> Result<RoutePolicy, ConfigError> {
    let pct = |field: &str, p: Option<f64>| match p {
        None => Ok(100.0),
        Some(p) if (0.0..=100.0).contains(&p) => Ok(p),
        Some(p) => Err(bad(
            resource,
            format!("{path}.{field}: percentage {p} must be in 0..100"),
        )),
    };
    let timeout = r
        .timeout
        .as_ref()
        .map(|d| duration(resource, Some(d), Duration::ZERO))
        .transpose()?;
    let mut policy = RoutePolicy {
        timeout,
        ..RoutePolicy::default()
    };
    if let Some(d) = &r.direct_response {
        let status = u16::try_from(d.status)
            .ok()
            .filter(|s| (200..=599).contains(s))
            .ok_or_else(|| {
                bad(
                    resource,
                    format!(
                        "{path}.directResponse.status: {} must be in 200..599",
                        d.status
                    ),
                )
            })?;
        policy.action = Some(LocalAction::Direct {
            status,
            body: bytes::Bytes::from(d.body.clone().unwrap_or_default()),
        });
    }
    if let Some(rd) = &r.redirect {
        if policy.action.is_some() {
            return Err(bad(
                resource,
                format!("{path}: only one of directResponse or redirect"),
            ));
        }
        let code = rd.redirect_code.unwrap_or(301);
        if !(300..=399).contains(&code) {
            return Err(bad(
                resource,
                format!("{path}.redirect.redirectCode: {code} is not a redirect code"),
            ));
        }
        let port = rd
            .port
            .map(|p| {
                u16::try_from(p).ok().filter(|p| *p > 0).ok_or_else(|| {
                    bad(
                        resource,
                        format!("{path}.redirect.port: {p} must be in 1..65535"),
                    )
                })
            })
            .transpose()?;
        policy.action = Some(LocalAction::Redirect {
            code: code as u16,
            uri: rd.uri.clone(),
            authority: rd.authority.clone(),
            scheme: rd.scheme.clone(),
            port,
        });
    }
    if let Some(rw) = &r.rewrite {
        let authority = rw
            .authority
            .as_deref()
            .map(|a| {
                http::HeaderValue::from_str(a)
                    .map_err(|_| bad(resource, format!("{path}.rewrite.authority: invalid {a:?}")))
            })
            .transpose()?;
        let uri_regex = match (&rw.uri_regex, &rw.uri_regex_replacement) {
            (None, None) => None,
            (Some(re), Some(rep)) => Some((
                regex::RegexBuilder::new(re)
                    .size_limit(1 << 20)
                    .build()
                    .map_err(|e| bad(resource, format!("{path}.rewrite.uriRegex: {e}")))?,
                rep.clone(),
            )),
            _ => {
                return Err(bad(
                    resource,
                    format!("{path}.rewrite: uriRegex and uriRegexReplacement go together"),
                ));
            }
        };
        if rw.uri.is_some() && uri_regex.is_some() {
            return Err(bad(
                resource,
                format!("{path}.rewrite: only one of uri or uriRegex"),
            ));
        }
        policy.rewrite = Some(Rewrite {
            uri: rw.uri.clone(),
            authority,
            uri_regex,
        });
    }
    policy.rate_limit = rate_limit(resource, path, r.rate_limit.as_ref())?;
    policy.cors = r
        .cors
        .as_ref()
        .map(|c| cors(resource, path, c))
        .transpose()?;
    for (i, m) in r.mirrors.iter().enumerate() {
        policy.mirrors.push(Mirror {
            cluster: clusters.get(m.cluster.as_str()).cloned(),
            percentage: pct(&format!("mirrors[{i}].percentage"), m.percentage)?,
        });
    }
    if let Some(rp) = &r.retries {
        let on = match rp.retry_on.as_deref() {
            None => RetryPolicy::istio_default().on,
            Some(s) => RetryPolicy::parse_retry_on(s)
                .map_err(|e| bad(resource, format!("{path}.retries.retryOn: {e}")))?,
        };
        policy.retry = Some(RetryPolicy {
            attempts: rp.attempts,
            per_try_timeout: rp
                .per_try_timeout
                .as_ref()
                .map(|d| duration(resource, Some(d), Duration::ZERO))
                .transpose()?,
            backoff: duration(resource, rp.backoff.as_ref(), Duration::from_millis(25))?,
            on,
        });
    }
    if let Some(h) = &r.request_headers {
        policy.request_headers = Some(header_ops(resource, &format!("{path}.requestHeaders"), h)?);
    }
    if let Some(h) = &r.response_headers {
        policy.response_headers =
            Some(header_ops(resource, &format!("{path}.responseHeaders"), h)?);
    }
    if let Some(f) = &r.fault {
        if let Some(d) = &f.delay {
            let Some(fixed) = &d.fixed_delay else {
                return Err(bad(
                    resource,
                    format!("{path}.fault.delay: fixedDelay is required"),
                ));
            };
            let fixed = duration(resource, Some(fixed), Duration::ZERO)?;
            policy.delay = Some((fixed, pct("fault.delay.percentage", d.percentage)?));
        }
        if let Some(a) = &f.abort {
            let kind = match (a.http_status, &a.grpc_status) {
                (Some(s), None) if (200..=599).contains(&s) => AbortKind::Http(s as u16),
                (Some(s), None) => {
                    return Err(bad(
                        resource,
                        format!("{path}.fault.abort.httpStatus: {s} must be in 200..599"),
                    ));
                }
                (None, Some(g)) => {
                    let code = GRPC_CODES
                        .iter()
                        .position(|c| c.eq_ignore_ascii_case(g))
                        .or_else(|| g.parse::<usize>().ok().filter(|n| *n < GRPC_CODES.len()));
                    match code {
                        Some(c) => AbortKind::Grpc(c as u8),
                        None => {
                            return Err(bad(
                                resource,
                                format!(
                                    "{path}.fault.abort.grpcStatus: {g:?} is not a gRPC status"
                                ),
                            ));
                        }
                    }
                }
                _ => {
                    return Err(bad(
                        resource,
                        format!("{path}.fault.abort: exactly one of httpStatus or grpcStatus"),
                    ));
                }
            };
            policy.abort = Some(Abort {
                kind,
                percentage: pct("fault.abort.percentage", a.percentage)?,
            });
        }
    }
    Ok(policy)
}

/// Where a route sends traffic: a cluster, or a name the snapshot does not define (the
/// request then gets 503 NR and a log line naming the route, as a route to a missing
/// subset does in Istio).
#[derive(Debug)]
pub struct RouteDest {
    pub name: String,
    pub cluster: Option<Arc<Cluster>>,
    /// The destination's own header operations (a VirtualService's
    /// `route[].headers`), applied after the route's.
    pub request_headers: Option<HeaderOps>,
    pub response_headers: Option<HeaderOps>,
}

/// Compiles a port's HTTP routes; a bad match (say, an invalid regex) refuses the
/// snapshot, a route to an undefined cluster does not (it answers 503 NR).
pub(super) fn compile_routes(
    resource: &str,
    port: u16,
    routes: &[wire::HttpRoute],
    clusters: &HashMap<&str, Arc<Cluster>>,
) -> Result<RouteTable<RouteDest>, ConfigError> {
    let sm = |m: &wire::StringMatch| trellis_api::common::StringMatch {
        exact: m.exact.clone(),
        prefix: m.prefix.clone(),
        regex: m.regex.clone(),
    };
    let map = |m: &std::collections::BTreeMap<String, wire::StringMatch>| {
        m.iter().map(|(k, v)| (k.clone(), sm(v))).collect()
    };
    let mut compiled = Vec::with_capacity(routes.len());
    for (i, r) in routes.iter().enumerate() {
        let path = format!("port {port} httpRoutes[{i}]");
        let mut matches = Vec::with_capacity(r.matches.len());
        for (j, m) in r.matches.iter().enumerate() {
            let api = HttpMatchRequest {
                name: m.name.clone(),
                uri: m.uri.as_ref().map(sm),
                scheme: m.scheme.as_ref().map(sm),
                method: m.method.as_ref().map(sm),
                authority: m.authority.as_ref().map(sm),
                headers: map(&m.headers),
                without_headers: map(&m.without_headers),
                query_params: map(&m.query_params),
                port: m.port,
                source_labels: m.source_labels.clone(),
                source_namespace: m.source_namespace.clone(),
                ignore_uri_case: Some(m.ignore_uri_case),
                ..HttpMatchRequest::default()
            };
            matches.push(
                Match::compile(&api, &format!("{path}.match[{j}]"))
                    .map_err(|e| bad(resource, e.to_string()))?,
            );
        }
        if r.clusters.is_empty() && r.direct_response.is_none() && r.redirect.is_none() {
            return Err(bad(
                resource,
                format!("{path}: a route needs clusters, a directResponse or a redirect"),
            ));
        }
        let lone = r.clusters.len() == 1;
        let mut destinations = Vec::with_capacity(r.clusters.len());
        for (j, w) in r.clusters.iter().enumerate() {
            let ops = |o: &Option<wire::HeaderOps>, which: &str| {
                o.as_ref()
                    .map(|o| header_ops(resource, &format!("{path}.clusters[{j}].{which}"), o))
                    .transpose()
            };
            destinations.push(Weighted {
                weight: if lone && w.weight == 0 { 1 } else { w.weight },
                destination: RouteDest {
                    name: w.cluster.clone(),
                    cluster: clusters.get(w.cluster.as_str()).cloned(),
                    request_headers: ops(&w.request_headers, "requestHeaders")?,
                    response_headers: ops(&w.response_headers, "responseHeaders")?,
                },
            });
        }
        let name = if r.name.is_empty() {
            format!("#{i}")
        } else {
            r.name.clone()
        };
        compiled.push(Route::new(name, i, matches, destinations));
    }
    Ok(RouteTable::new(compiled))
}
