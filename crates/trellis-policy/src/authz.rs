//! AuthorizationPolicy evaluation, with Istio's semantics: CUSTOM, then DENY, then ALLOW
//! (AUDIT only reports). A request is denied when a DENY rule matches. When ALLOW
//! policies apply, it is denied unless one of their rules matches. CUSTOM is fail-closed:
//! without an external authorizer, a request a CUSTOM rule matches is denied.
//!
//! Within a rule, `from`, `to` and `when` must all match. A list of sources (operations)
//! matches when one of them does. Within a source (operation), every field given must
//! match one of its values, and no `not` value may match. An empty rule (`{}`) matches
//! every request. A policy without rules matches none, so an ALLOW policy without rules
//! allows nothing.
//!
//! On a TCP connection, HTTP-only fields (methods, paths, hosts, request principals,
//! request headers and JWT claims) cannot be known. A rule that uses them never matches in
//! an ALLOW policy. In a DENY policy those fields are left out, so the rule matches more
//! (Istio's conservative reading).

use std::net::IpAddr;

/// What a request (or a TCP connection) offers to be judged on.
#[derive(Debug, Clone, Default)]
pub struct Request<'a> {
    /// The peer's SPIFFE id without `spiffe://` (`cluster.local/ns/web/sa/web`), when it
    /// came over mutual TLS.
    pub principal: Option<&'a str>,
    /// The connection's source address.
    pub source_ip: Option<IpAddr>,
    /// The original client's address (Istio's remote IP; the source address here).
    pub remote_ip: Option<IpAddr>,
    pub destination_ip: Option<IpAddr>,
    pub destination_port: Option<u16>,
    pub sni: Option<&'a str>,
    /// HTTP attributes; `None` on a TCP connection.
    pub http: Option<Http<'a>>,
    /// The request's JWT, when RequestAuthentication validated one.
    pub jwt: Option<&'a crate::jwt::Claims>,
}

/// The HTTP part of a request.
#[derive(Debug, Clone, Default)]
pub struct Http<'a> {
    pub method: &'a str,
    /// The path without its query.
    pub path: &'a str,
    pub host: &'a str,
    pub headers: Option<&'a http::HeaderMap>,
    /// The JWT's principal (`iss/sub`), when RequestAuthentication validated one.
    pub request_principal: Option<&'a str>,
}

/// The decision, and what made it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    Allow,
    /// Denied by `policy` ("namespace/name"). `rule` is the index of the rule that matched,
    /// or `None` when no ALLOW policy matched (then `policy` names the ALLOW policies).
    Deny {
        policy: String,
        rule: Option<usize>,
        action: Action,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    Allow,
    Deny,
    Audit,
    Custom,
}

impl Action {
    pub fn as_str(self) -> &'static str {
        match self {
            Action::Allow => "ALLOW",
            Action::Deny => "DENY",
            Action::Audit => "AUDIT",
            Action::Custom => "CUSTOM",
        }
    }
}

/// Istio's string matching: exact, `*` (any non-empty value), `prefix*`, `*suffix`.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Pattern {
    Any,
    Exact(String),
    Prefix(String),
    Suffix(String),
}

impl Pattern {
    fn new(s: &str, fold: bool) -> Pattern {
        let s = if fold {
            s.to_ascii_lowercase()
        } else {
            s.to_string()
        };
        if s == "*" {
            Pattern::Any
        } else if let Some(p) = s.strip_suffix('*') {
            Pattern::Prefix(p.to_string())
        } else if let Some(p) = s.strip_prefix('*') {
            Pattern::Suffix(p.to_string())
        } else {
            Pattern::Exact(s)
        }
    }

    fn matches(&self, v: &str) -> bool {
        match self {
            Pattern::Any => !v.is_empty(),
            Pattern::Exact(e) => v == e,
            Pattern::Prefix(p) => v.starts_with(p.as_str()),
            Pattern::Suffix(p) => v.ends_with(p.as_str()),
        }
    }
}

/// An IP block: an address or a CIDR.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Cidr {
    net: IpAddr,
    bits: u8,
}

impl Cidr {
    fn parse(s: &str) -> Result<Cidr, String> {
        let (addr, bits) = match s.split_once('/') {
            Some((a, b)) => (a, Some(b)),
            None => (s, None),
        };
        let net: IpAddr = addr
            .trim()
            .parse()
            .map_err(|_| format!("{s:?} is not an IP address or CIDR"))?;
        let max = if net.is_ipv4() { 32 } else { 128 };
        let bits = match bits {
            None => max,
            Some(b) => b
                .trim()
                .parse::<u8>()
                .ok()
                .filter(|b| *b <= max)
                .ok_or_else(|| format!("{s:?}: bad prefix length"))?,
        };
        Ok(Cidr { net, bits })
    }

    fn contains(&self, ip: IpAddr) -> bool {
        let ip = match (self.net, ip) {
            (IpAddr::V4(_), IpAddr::V6(v6)) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
            _ => ip,
        };
        match (self.net, ip) {
            (IpAddr::V4(n), IpAddr::V4(a)) => {
                let mask = u32::MAX.checked_shl(32 - u32::from(self.bits)).unwrap_or(0);
                u32::from(n) & mask == u32::from(a) & mask
            }
            (IpAddr::V6(n), IpAddr::V6(a)) => {
                let mask = u128::MAX
                    .checked_shl(128 - u32::from(self.bits))
                    .unwrap_or(0);
                u128::from(n) & mask == u128::from(a) & mask
            }
            _ => false,
        }
    }
}

/// A field's values and `not` values.
#[derive(Debug, Clone)]
struct Field<T> {
    any: Vec<T>,
    none: Vec<T>,
}

impl<T> Default for Field<T> {
    fn default() -> Self {
        Field {
            any: Vec::new(),
            none: Vec::new(),
        }
    }
}

impl<T> Field<T> {
    fn is_empty(&self) -> bool {
        self.any.is_empty() && self.none.is_empty()
    }

    /// `value` None: the attribute is absent (matches no value; a `not` list then holds).
    fn check(&self, value: Option<&dyn Fn(&T) -> bool>) -> bool {
        if self.is_empty() {
            return true;
        }
        match value {
            None => self.any.is_empty(),
            Some(f) => (self.any.is_empty() || self.any.iter().any(f)) && !self.none.iter().any(f),
        }
    }
}

fn patterns(any: &[String], none: &[String], fold: bool) -> Field<Pattern> {
    Field {
        any: any.iter().map(|s| Pattern::new(s, fold)).collect(),
        none: none.iter().map(|s| Pattern::new(s, fold)).collect(),
    }
}

fn cidrs(any: &[String], none: &[String]) -> Result<Field<Cidr>, String> {
    Ok(Field {
        any: any
            .iter()
            .map(|s| Cidr::parse(s))
            .collect::<Result<_, _>>()?,
        none: none
            .iter()
            .map(|s| Cidr::parse(s))
            .collect::<Result<_, _>>()?,
    })
}

fn ports(any: &[String], none: &[String]) -> Result<Field<u16>, String> {
    let p = |s: &String| {
        s.parse::<u16>()
            .map_err(|_| format!("port {s:?} is not a number"))
    };
    Ok(Field {
        any: any.iter().map(p).collect::<Result<_, _>>()?,
        none: none.iter().map(p).collect::<Result<_, _>>()?,
    })
}

/// A source, compiled.
#[derive(Debug, Clone, Default)]
pub struct Source {
    principals: Field<Pattern>,
    request_principals: Field<Pattern>,
    namespaces: Field<Pattern>,
    service_accounts: Field<Pattern>,
    ip_blocks: Field<Cidr>,
    remote_ip_blocks: Field<Cidr>,
    trust_domains: Field<Pattern>,
}

/// An operation, compiled.
#[derive(Debug, Clone, Default)]
pub struct Operation {
    hosts: Field<Pattern>,
    ports: Field<u16>,
    methods: Field<Pattern>,
    paths: Field<Pattern>,
}

/// A `when` condition, compiled.
#[derive(Debug, Clone)]
enum Condition {
    Header(http::HeaderName, Field<Pattern>),
    SourceIp(Field<Cidr>),
    RemoteIp(Field<Cidr>),
    SourceNamespace(Field<Pattern>),
    SourcePrincipal(Field<Pattern>),
    RequestPrincipal(Field<Pattern>),
    /// `request.auth.audiences`, `request.auth.presenter`, `request.auth.claims[a][b]`.
    Audiences(Field<Pattern>),
    Presenter(Field<Pattern>),
    Claim(Vec<String>, Field<Pattern>),
    DestinationIp(Field<Cidr>),
    DestinationPort(Field<u16>),
    Sni(Field<Pattern>),
    /// A key Trellis cannot evaluate (`experimental.envoy.filters.*`): read
    /// conservatively, so that it never widens access. In an ALLOW policy its rule never
    /// matches; in a DENY policy the condition counts as met.
    Unsupported(String),
}

impl Condition {
    fn http_only(&self) -> bool {
        matches!(
            self,
            Condition::Header(..)
                | Condition::RequestPrincipal(_)
                | Condition::Audiences(_)
                | Condition::Presenter(_)
                | Condition::Claim(..)
        )
    }
}

/// A rule, compiled.
#[derive(Debug, Clone, Default)]
pub struct Rule {
    from: Vec<Source>,
    to: Vec<Operation>,
    when: Vec<Condition>,
}

/// A policy, compiled.
#[derive(Debug, Clone)]
pub struct Policy {
    pub name: String,
    pub action: Action,
    rules: Vec<Rule>,
}

/// The wire shape of a policy, borrowed (the proxy's snapshot types, or a CLI's).
#[derive(Debug, Clone, Default)]
pub struct PolicySpec<'a> {
    pub name: &'a str,
    pub rules: Vec<RuleSpec<'a>>,
}

#[derive(Debug, Clone, Default)]
pub struct RuleSpec<'a> {
    pub from: Vec<SourceSpec<'a>>,
    pub to: Vec<OperationSpec<'a>>,
    pub when: Vec<(&'a str, &'a [String], &'a [String])>,
}

/// Each field as `(values, not values)`.
#[derive(Debug, Clone, Copy, Default)]
pub struct SourceSpec<'a> {
    pub principals: (&'a [String], &'a [String]),
    pub request_principals: (&'a [String], &'a [String]),
    pub namespaces: (&'a [String], &'a [String]),
    pub service_accounts: (&'a [String], &'a [String]),
    pub ip_blocks: (&'a [String], &'a [String]),
    pub remote_ip_blocks: (&'a [String], &'a [String]),
    pub trust_domains: (&'a [String], &'a [String]),
}

#[derive(Debug, Clone, Copy, Default)]
pub struct OperationSpec<'a> {
    pub hosts: (&'a [String], &'a [String]),
    pub ports: (&'a [String], &'a [String]),
    pub methods: (&'a [String], &'a [String]),
    pub paths: (&'a [String], &'a [String]),
}

impl Policy {
    /// Compiles a policy; a bad value (an IP block, a port, an unsupported condition key)
    /// is an error naming where it is.
    pub fn compile(spec: &PolicySpec<'_>, action: Action) -> Result<Policy, String> {
        let mut rules = Vec::with_capacity(spec.rules.len());
        for (i, r) in spec.rules.iter().enumerate() {
            let at = |what: &str, e: String| format!("rules[{i}].{what}: {e}");
            let mut from = Vec::new();
            for (j, s) in r.from.iter().enumerate() {
                let p = |f: (&[String], &[String])| patterns(f.0, f.1, false);
                from.push(Source {
                    principals: p(s.principals),
                    request_principals: p(s.request_principals),
                    namespaces: p(s.namespaces),
                    service_accounts: p(s.service_accounts),
                    ip_blocks: cidrs(s.ip_blocks.0, s.ip_blocks.1)
                        .map_err(|e| at(&format!("from[{j}].ipBlocks"), e))?,
                    remote_ip_blocks: cidrs(s.remote_ip_blocks.0, s.remote_ip_blocks.1)
                        .map_err(|e| at(&format!("from[{j}].remoteIpBlocks"), e))?,
                    trust_domains: p(s.trust_domains),
                });
            }
            let mut to = Vec::new();
            for (j, o) in r.to.iter().enumerate() {
                to.push(Operation {
                    hosts: patterns(o.hosts.0, o.hosts.1, true),
                    ports: ports(o.ports.0, o.ports.1)
                        .map_err(|e| at(&format!("to[{j}].ports"), e))?,
                    methods: patterns(o.methods.0, o.methods.1, false),
                    paths: patterns(o.paths.0, o.paths.1, false),
                });
            }
            let mut when = Vec::new();
            for (j, (key, values, not_values)) in r.when.iter().enumerate() {
                let c =
                    condition(key, values, not_values).map_err(|e| at(&format!("when[{j}]"), e))?;
                when.push(c);
            }
            rules.push(Rule { from, to, when });
        }
        Ok(Policy {
            name: spec.name.to_string(),
            action,
            rules,
        })
    }
}

fn condition(key: &str, values: &[String], not_values: &[String]) -> Result<Condition, String> {
    let p = || patterns(values, not_values, false);
    if let Some(h) = key
        .strip_prefix("request.headers[")
        .and_then(|k| k.strip_suffix(']'))
    {
        let name = http::HeaderName::from_bytes(h.as_bytes())
            .map_err(|_| format!("{key:?}: not a header name"))?;
        return Ok(Condition::Header(name, p()));
    }
    if let Some(inner) = key
        .strip_prefix("request.auth.claims[")
        .and_then(|k| k.strip_suffix(']'))
    {
        // `a][b` for nested claims.
        let path: Vec<String> = inner.split("][").map(str::to_string).collect();
        if path.iter().any(String::is_empty) {
            return Err(format!("{key:?}: empty claim name"));
        }
        return Ok(Condition::Claim(path, p()));
    }
    Ok(match key {
        "source.ip" => Condition::SourceIp(cidrs(values, not_values)?),
        "remote.ip" => Condition::RemoteIp(cidrs(values, not_values)?),
        "source.namespace" => Condition::SourceNamespace(p()),
        "source.principal" => Condition::SourcePrincipal(p()),
        "request.auth.principal" => Condition::RequestPrincipal(p()),
        "request.auth.audiences" => Condition::Audiences(p()),
        "request.auth.presenter" => Condition::Presenter(p()),
        "destination.ip" => Condition::DestinationIp(cidrs(values, not_values)?),
        "destination.port" => Condition::DestinationPort(ports(values, not_values)?),
        "connection.sni" => Condition::Sni(p()),
        k if k.starts_with("experimental.envoy.filters.") => Condition::Unsupported(k.to_string()),
        k => return Err(format!("unknown condition key {k:?}")),
    })
}

/// A principal's parts (trust domain, namespace, service account), worked out once per
/// request.
type Id<'a> = Option<(&'a str, &'a str, &'a str)>;

/// `cluster.local/ns/web/sa/web` → (`cluster.local`, `web`, `web`).
fn parts(principal: &str) -> Option<(&str, &str, &str)> {
    let mut it = principal.split('/');
    match (
        it.next(),
        it.next(),
        it.next(),
        it.next(),
        it.next(),
        it.next(),
    ) {
        (Some(td), Some("ns"), Some(ns), Some("sa"), Some(sa), None) => Some((td, ns, sa)),
        _ => None,
    }
}

fn str_field(f: &Field<Pattern>, v: Option<&str>) -> bool {
    match v {
        Some(v) => f.check(Some(&|p: &Pattern| p.matches(v))),
        None => f.check(None),
    }
}

/// A field against an attribute with several values (a claim array, audiences): one value
/// must match, none may match a `not` value.
fn values_field(f: &Field<Pattern>, v: Option<Vec<String>>) -> bool {
    match v.filter(|v| !v.is_empty()) {
        None => f.check(None),
        Some(vals) => {
            (f.any.is_empty() || vals.iter().any(|v| f.any.iter().any(|p| p.matches(v))))
                && !vals.iter().any(|v| f.none.iter().any(|p| p.matches(v)))
        }
    }
}

fn ip_field(f: &Field<Cidr>, v: Option<IpAddr>) -> bool {
    match v {
        Some(ip) => f.check(Some(&|c: &Cidr| c.contains(ip))),
        None => f.check(None),
    }
}

fn port_field(f: &Field<u16>, v: Option<u16>) -> bool {
    match v {
        Some(p) => f.check(Some(&|x: &u16| *x == p)),
        None => f.check(None),
    }
}

/// How HTTP-only fields count on a TCP connection.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Tcp {
    /// ALLOW: a rule that needs them never matches.
    NeverMatch,
    /// DENY: they are left out.
    Ignore,
}

impl Source {
    fn http_only(&self) -> bool {
        !self.request_principals.is_empty()
    }

    fn matches(&self, r: &Request<'_>, id: Id<'_>) -> bool {
        str_field(&self.principals, r.principal)
            && (r.http.is_none()
                || str_field(
                    &self.request_principals,
                    r.http.as_ref().and_then(|h| h.request_principal),
                ))
            && str_field(&self.namespaces, id.map(|(_, ns, _)| ns))
            && (self.service_accounts.is_empty()
                || str_field(
                    &self.service_accounts,
                    id.map(|(_, ns, sa)| format!("{ns}/{sa}")).as_deref(),
                ))
            && ip_field(&self.ip_blocks, r.source_ip)
            && ip_field(&self.remote_ip_blocks, r.remote_ip)
            && str_field(&self.trust_domains, id.map(|(td, _, _)| td))
    }
}

impl Operation {
    fn http_only(&self) -> bool {
        !self.hosts.is_empty() || !self.methods.is_empty() || !self.paths.is_empty()
    }

    fn matches(&self, r: &Request<'_>) -> bool {
        if !port_field(&self.ports, r.destination_port) {
            return false;
        }
        let Some(h) = &r.http else {
            return true; // TCP: the HTTP fields were dealt with by the caller
        };
        let host_ok = self.hosts.is_empty() || {
            let host = h.host.to_ascii_lowercase();
            // A host with a port matches its name too (Istio's hosts compare without port).
            let bare = host.rsplit_once(':').map_or(host.as_str(), |(n, _)| n);
            str_field(&self.hosts, Some(&host)) || str_field(&self.hosts, Some(bare))
        };
        host_ok && str_field(&self.methods, Some(h.method)) && str_field(&self.paths, Some(h.path))
    }
}

impl Condition {
    fn matches(&self, r: &Request<'_>, id: Id<'_>) -> bool {
        match self {
            Condition::Header(name, f) => {
                let v = r
                    .http
                    .as_ref()
                    .and_then(|h| h.headers)
                    .and_then(|h| h.get(name))
                    .and_then(|v| v.to_str().ok());
                str_field(f, v)
            }
            Condition::SourceIp(f) => ip_field(f, r.source_ip),
            Condition::RemoteIp(f) => ip_field(f, r.remote_ip),
            Condition::SourceNamespace(f) => str_field(f, id.map(|(_, ns, _)| ns)),
            Condition::SourcePrincipal(f) => str_field(f, r.principal),
            Condition::RequestPrincipal(f) => {
                str_field(f, r.http.as_ref().and_then(|h| h.request_principal))
            }
            Condition::Audiences(f) => values_field(f, r.jwt.map(|c| c.audiences.clone())),
            Condition::Presenter(f) => str_field(f, r.jwt.and_then(|c| c.presenter.as_deref())),
            Condition::Claim(path, f) => {
                let path: Vec<&str> = path.iter().map(String::as_str).collect();
                values_field(f, r.jwt.map(|c| c.claim(&path)))
            }
            Condition::DestinationIp(f) => ip_field(f, r.destination_ip),
            Condition::DestinationPort(f) => port_field(f, r.destination_port),
            Condition::Sni(f) => str_field(f, r.sni),
            Condition::Unsupported(_) => false, // (see Rule::matches)
        }
    }
}

impl Rule {
    fn matches(&self, r: &Request<'_>, id: Id<'_>, tcp: Tcp) -> bool {
        let is_tcp = r.http.is_none();
        let unsupported = |c: &Condition| matches!(c, Condition::Unsupported(_));
        if is_tcp && tcp == Tcp::NeverMatch {
            let http_only = self.from.iter().any(Source::http_only)
                || self.to.iter().any(Operation::http_only)
                || self.when.iter().any(Condition::http_only);
            if http_only {
                return false;
            }
        }
        (self.from.is_empty() || self.from.iter().any(|s| s.matches(r, id)))
            && (self.to.is_empty() || self.to.iter().any(|o| o.matches(r)))
            && self.when.iter().all(|c| {
                (is_tcp && c.http_only())
                    || (unsupported(c) && tcp == Tcp::Ignore)
                    || c.matches(r, id)
            })
    }
}

impl Policy {
    /// The condition keys of this policy that Trellis cannot evaluate (read
    /// conservatively; worth a warning).
    pub fn unsupported(&self) -> Vec<&str> {
        self.rules
            .iter()
            .flat_map(|r| r.when.iter())
            .filter_map(|c| match c {
                Condition::Unsupported(k) => Some(k.as_str()),
                _ => None,
            })
            .collect()
    }

    /// The index of the first rule that matches.
    fn first_match(&self, r: &Request<'_>, id: Id<'_>, tcp: Tcp) -> Option<usize> {
        self.rules.iter().position(|rule| rule.matches(r, id, tcp))
    }
}

/// A workload's policies, ready to judge requests (grouped by action, each group in the
/// order given).
#[derive(Debug, Clone, Default)]
pub struct Policies {
    custom: Vec<Policy>,
    deny: Vec<Policy>,
    allow: Vec<Policy>,
    audit: Vec<Policy>,
}

impl Policies {
    pub fn new(policies: Vec<Policy>) -> Policies {
        let mut out = Policies::default();
        for p in policies {
            match p.action {
                Action::Custom => out.custom.push(p),
                Action::Deny => out.deny.push(p),
                Action::Allow => out.allow.push(p),
                Action::Audit => out.audit.push(p),
            }
        }
        out
    }

    pub fn is_empty(&self) -> bool {
        self.custom.is_empty()
            && self.deny.is_empty()
            && self.allow.is_empty()
            && self.audit.is_empty()
    }

    /// The decision for `r`, and the AUDIT policies whose rules matched (to be logged).
    pub fn evaluate(&self, r: &Request<'_>) -> (Decision, Vec<&str>) {
        let id = r.principal.and_then(parts);
        let audited: Vec<&str> = self
            .audit
            .iter()
            .filter(|p| p.first_match(r, id, Tcp::NeverMatch).is_some())
            .map(|p| p.name.as_str())
            .collect();
        for group in [&self.custom, &self.deny] {
            for p in group {
                if let Some(rule) = p.first_match(r, id, Tcp::Ignore) {
                    let decision = Decision::Deny {
                        policy: p.name.clone(),
                        rule: Some(rule),
                        action: p.action,
                    };
                    return (decision, audited);
                }
            }
        }
        if self.allow.is_empty()
            || self
                .allow
                .iter()
                .any(|p| p.first_match(r, id, Tcp::NeverMatch).is_some())
        {
            return (Decision::Allow, audited);
        }
        let names: Vec<&str> = self.allow.iter().map(|p| p.name.as_str()).collect();
        let decision = Decision::Deny {
            policy: names.join(","),
            rule: None,
            action: Action::Allow,
        };
        (decision, audited)
    }
}

/// From Istio's resource (for the CLI and tests; the proxy compiles its snapshot's form).
pub fn compile_api(
    name: &str,
    p: &trellis_api::security::AuthorizationPolicy,
) -> Result<Policy, String> {
    use trellis_api::security::AuthorizationAction as A;
    let action = match p.action {
        A::Allow => Action::Allow,
        A::Deny => Action::Deny,
        A::Audit => Action::Audit,
        A::Custom => Action::Custom,
    };
    let spec = PolicySpec {
        name,
        rules: p
            .rules
            .iter()
            .map(|r| RuleSpec {
                from: r
                    .from
                    .iter()
                    .filter_map(|f| f.source.as_ref())
                    .map(|s| SourceSpec {
                        principals: (&s.principals, &s.not_principals),
                        request_principals: (&s.request_principals, &s.not_request_principals),
                        namespaces: (&s.namespaces, &s.not_namespaces),
                        service_accounts: (&s.service_accounts, &s.not_service_accounts),
                        ip_blocks: (&s.ip_blocks, &s.not_ip_blocks),
                        remote_ip_blocks: (&s.remote_ip_blocks, &s.not_remote_ip_blocks),
                        trust_domains: (&s.trust_domains, &s.not_trust_domains),
                    })
                    .collect(),
                to: r
                    .to
                    .iter()
                    .filter_map(|t| t.operation.as_ref())
                    .map(|o| OperationSpec {
                        hosts: (&o.hosts, &o.not_hosts),
                        ports: (&o.ports, &o.not_ports),
                        methods: (&o.methods, &o.not_methods),
                        paths: (&o.paths, &o.not_paths),
                    })
                    .collect(),
                when: r
                    .when
                    .iter()
                    .map(|c| (c.key.as_str(), &c.values[..], &c.not_values[..]))
                    .collect(),
            })
            .collect(),
    };
    Policy::compile(&spec, action)
}

#[cfg(test)]
mod tests {
    use super::*;
    use trellis_api::{LoadOptions, Spec, parse_text};

    /// Policies from Istio YAML, in document order.
    fn policies(yaml: &str) -> Policies {
        let mut out = Vec::new();
        for p in parse_text(yaml, "authz.yaml", &LoadOptions::default()) {
            let r = p
                .resource()
                .cloned()
                .unwrap_or_else(|| panic!("{:?}", p.diagnostics));
            let Spec::AuthorizationPolicy(a) = &r.spec else {
                panic!("not a policy")
            };
            let name = format!("{}/{}", r.namespace(), r.name());
            out.push(compile_api(&name, a).expect("compiles"));
        }
        Policies::new(out)
    }

    fn req<'a>(
        principal: Option<&'a str>,
        method: &'a str,
        path: &'a str,
        headers: Option<&'a http::HeaderMap>,
    ) -> Request<'a> {
        Request {
            principal,
            source_ip: Some("10.1.2.3".parse().expect("ip")),
            remote_ip: Some("10.1.2.3".parse().expect("ip")),
            destination_ip: Some("10.0.0.9".parse().expect("ip")),
            destination_port: Some(9080),
            sni: None,
            http: Some(Http {
                method,
                path,
                host: "reviews.shop.svc.cluster.local:9080",
                headers,
                request_principal: None,
            }),
            jwt: None,
        }
    }

    const SLEEP: &str = "cluster.local/ns/foo/sa/sleep";
    const OTHER: &str = "cluster.local/ns/bar/sa/other";

    fn allowed(p: &Policies, r: &Request<'_>) -> bool {
        p.evaluate(r).0 == Decision::Allow
    }

    #[test]
    fn no_policy_allows_allow_nothing_denies_and_allow_all_allows() {
        let r = req(None, "GET", "/", None);
        assert!(allowed(&Policies::default(), &r));
        let nothing = policies(
            "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: allow-nothing, namespace: shop}\nspec:\n  action: ALLOW\n",
        );
        assert_eq!(
            nothing.evaluate(&r).0,
            Decision::Deny {
                policy: "shop/allow-nothing".into(),
                rule: None,
                action: Action::Allow
            }
        );
        let all = policies(
            "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: allow-all, namespace: shop}\nspec:\n  rules: [{}]\n",
        );
        assert!(allowed(&all, &r));
        // A DENY policy without rules denies nothing (the loader refuses one as
        // meaningless; the engine is safe with it anyway).
        let api = trellis_api::security::AuthorizationPolicy {
            action: trellis_api::security::AuthorizationAction::Deny,
            ..Default::default()
        };
        let deny_none = Policies::new(vec![compile_api("shop/d", &api).expect("compiles")]);
        assert!(allowed(&deny_none, &r));
    }

    #[test]
    fn allow_by_principal_and_method() {
        // Istio's "allow GET from the sleep service account" example.
        let p = policies(
            "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: httpbin, namespace: foo}\nspec:\n  action: ALLOW\n  rules:\n  - from:\n    - source:\n        principals: [\"cluster.local/ns/foo/sa/sleep\"]\n    to:\n    - operation:\n        methods: [GET]\n",
        );
        assert!(allowed(&p, &req(Some(SLEEP), "GET", "/info", None)));
        assert!(!allowed(&p, &req(Some(SLEEP), "POST", "/info", None)));
        assert!(!allowed(&p, &req(Some(OTHER), "GET", "/info", None)));
        assert!(
            !allowed(&p, &req(None, "GET", "/info", None)),
            "plaintext: no principal"
        );
    }

    #[test]
    fn deny_by_path_with_a_not_paths_exception() {
        let p = policies(
            "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: deny-admin, namespace: foo}\nspec:\n  action: DENY\n  rules:\n  - to:\n    - operation:\n        paths: [\"/admin/*\"]\n        notPaths: [\"/admin/health\"]\n",
        );
        let (d, _) = p.evaluate(&req(Some(SLEEP), "GET", "/admin/users", None));
        assert_eq!(
            d,
            Decision::Deny {
                policy: "foo/deny-admin".into(),
                rule: Some(0),
                action: Action::Deny
            }
        );
        assert!(allowed(&p, &req(Some(SLEEP), "GET", "/admin/health", None)));
        assert!(allowed(&p, &req(Some(SLEEP), "GET", "/public", None)));
    }

    #[test]
    fn deny_beats_allow_and_namespaces_come_from_the_principal() {
        let p = policies(
            "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: allow-foo, namespace: shop}\nspec:\n  rules:\n  - from: [{source: {namespaces: [foo, bar]}}]\n---\napiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: deny-bar-post, namespace: shop}\nspec:\n  action: DENY\n  rules:\n  - from: [{source: {notNamespaces: [foo]}}]\n    to: [{operation: {methods: [POST]}}]\n",
        );
        assert!(allowed(&p, &req(Some(SLEEP), "POST", "/", None)));
        assert!(allowed(&p, &req(Some(OTHER), "GET", "/", None)));
        let (d, _) = p.evaluate(&req(Some(OTHER), "POST", "/", None));
        assert!(matches!(d, Decision::Deny { ref policy, .. } if policy == "shop/deny-bar-post"));
        assert!(!allowed(&p, &req(None, "GET", "/", None)));
    }

    #[test]
    fn ip_blocks_headers_ports_hosts_and_wildcards() {
        let p = policies(
            "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: p, namespace: shop}\nspec:\n  rules:\n  - from: [{source: {ipBlocks: [\"10.1.0.0/16\"], notIpBlocks: [\"10.1.9.9\"]}}]\n    to: [{operation: {hosts: [\"*.shop.svc.cluster.local\"], ports: [\"9080\"], paths: [\"*/info\", \"/api/*\"]}}]\n    when:\n    - key: request.headers[x-version]\n      values: [\"v*\"]\n      notValues: [v0]\n",
        );
        let mut h = http::HeaderMap::new();
        h.insert("x-version", http::HeaderValue::from_static("v2"));
        assert!(allowed(&p, &req(None, "GET", "/a/info", Some(&h))));
        assert!(allowed(&p, &req(None, "GET", "/api/x", Some(&h))));
        assert!(!allowed(&p, &req(None, "GET", "/other", Some(&h))), "path");
        assert!(
            !allowed(&p, &req(None, "GET", "/a/info", None)),
            "no header"
        );
        let mut v0 = http::HeaderMap::new();
        v0.insert("x-version", http::HeaderValue::from_static("v0"));
        assert!(
            !allowed(&p, &req(None, "GET", "/a/info", Some(&v0))),
            "notValues"
        );
        let mut r = req(None, "GET", "/a/info", Some(&h));
        r.source_ip = Some("10.1.9.9".parse().expect("ip"));
        assert!(!allowed(&p, &r), "notIpBlocks");
        r.source_ip = Some("10.2.0.1".parse().expect("ip"));
        assert!(!allowed(&p, &r), "outside the block");
        let mut r = req(None, "GET", "/a/info", Some(&h));
        r.destination_port = Some(9090);
        assert!(!allowed(&p, &r), "port");
    }

    #[test]
    fn l7_fields_on_tcp_never_match_in_allow_and_are_ignored_in_deny() {
        let allow = policies(
            "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: a, namespace: shop}\nspec:\n  rules:\n  - from: [{source: {principals: [\"cluster.local/ns/foo/sa/sleep\"]}}]\n    to: [{operation: {methods: [GET]}}]\n",
        );
        let mut tcp = req(Some(SLEEP), "", "", None);
        tcp.http = None;
        assert!(
            !allowed(&allow, &tcp),
            "ALLOW with methods: never matches TCP"
        );
        let deny = policies(
            "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: d, namespace: shop}\nspec:\n  action: DENY\n  rules:\n  - from: [{source: {principals: [\"cluster.local/ns/foo/sa/sleep\"]}}]\n    to: [{operation: {methods: [POST]}}]\n",
        );
        assert!(
            !allowed(&deny, &tcp),
            "DENY with methods: the methods are left out on TCP"
        );
        let mut other = tcp.clone();
        other.principal = Some(OTHER);
        assert!(allowed(&deny, &other));
    }

    #[test]
    fn custom_fails_closed_and_audit_only_reports() {
        let p = policies(
            "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: ext, namespace: shop}\nspec:\n  action: CUSTOM\n  provider: {name: opa}\n  rules:\n  - to: [{operation: {paths: [\"/secure/*\"]}}]\n---\napiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: audit, namespace: shop}\nspec:\n  action: AUDIT\n  rules: [{}]\n",
        );
        let (d, audited) = p.evaluate(&req(Some(SLEEP), "GET", "/secure/x", None));
        assert!(matches!(
            d,
            Decision::Deny {
                action: Action::Custom,
                ..
            }
        ));
        assert_eq!(audited, ["shop/audit"]);
        assert!(allowed(&p, &req(Some(SLEEP), "GET", "/open", None)));
    }

    #[test]
    fn envoy_specific_conditions_never_widen_access() {
        use trellis_api::security::AuthorizationAction as A;
        let rule = |action| {
            let mut api = trellis_api::security::AuthorizationPolicy {
                action,
                ..Default::default()
            };
            api.rules.push(trellis_api::security::Rule {
                when: vec![trellis_api::security::Condition {
                    key: "experimental.envoy.filters.network.mysql_proxy[db.table]".into(),
                    values: vec!["[update]".into()],
                    not_values: vec![],
                }],
                ..Default::default()
            });
            compile_api("shop/p", &api).expect("compiles")
        };
        let r = req(Some(SLEEP), "GET", "/", None);
        let allow = rule(A::Allow);
        assert_eq!(
            allow.unsupported(),
            ["experimental.envoy.filters.network.mysql_proxy[db.table]"]
        );
        assert!(
            !allowed(&Policies::new(vec![allow]), &r),
            "ALLOW: never matches"
        );
        assert!(
            !allowed(&Policies::new(vec![rule(A::Deny)]), &r),
            "DENY: counts as met"
        );
    }

    #[test]
    fn bad_values_are_refused_with_their_place() {
        let mut api = trellis_api::security::AuthorizationPolicy::default();
        api.rules.push(trellis_api::security::Rule {
            when: vec![trellis_api::security::Condition {
                key: "source.ip".into(),
                values: vec!["10.0.0.0/40".into()],
                not_values: vec![],
            }],
            ..Default::default()
        });
        let e = compile_api("shop/p", &api).expect_err("bad CIDR");
        assert!(
            e.starts_with("rules[0].when[0]") && e.contains("prefix length"),
            "{e}"
        );
        assert!(Cidr::parse("10.0.0.0/33").is_err());
        assert!(
            Cidr::parse("::1/128")
                .expect("v6")
                .contains("::1".parse().expect("ip"))
        );
        assert!(
            Cidr::parse("10.0.0.0/8")
                .expect("v4")
                .contains("::ffff:10.1.2.3".parse().expect("ip"))
        );
    }
}

#[cfg(test)]
mod jwt_condition_tests {
    use super::*;

    #[test]
    fn request_principals_and_claims_come_from_the_validated_jwt() {
        let yaml = "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: admins, namespace: shop}\nspec:\n  rules:\n  - from: [{source: {requestPrincipals: [\"https://issuer.example/*\"]}}]\n    when:\n    - {key: \"request.auth.claims[groups]\", values: [admins]}\n    - {key: \"request.auth.claims[nested][level]\", values: [\"3\"]}\n    - {key: request.auth.audiences, values: [shop]}\n    - {key: request.auth.presenter, notValues: [evil-app]}\n";
        let parsed = trellis_api::parse_text(yaml, "a.yaml", &trellis_api::LoadOptions::default());
        let r = parsed[0].resource().cloned().expect("parses");
        let trellis_api::Spec::AuthorizationPolicy(a) = &r.spec else {
            panic!("policy")
        };
        let p = Policies::new(vec![compile_api("shop/admins", a).expect("compiles")]);
        let claims = |groups: &[&str], azp: &str| crate::jwt::Claims {
            issuer: "https://issuer.example".into(),
            subject: "alice".into(),
            audiences: vec!["shop".into()],
            presenter: Some(azp.into()),
            payload: serde_json::json!({"groups": groups, "nested": {"level": 3}}),
            payload_b64: String::new(),
            space_delimited: std::sync::Arc::from(Vec::new()),
        };
        let judge = |c: Option<&crate::jwt::Claims>| {
            let principal = c.map(crate::jwt::Claims::principal);
            let r = Request {
                http: Some(Http {
                    method: "GET",
                    path: "/",
                    host: "shop",
                    headers: None,
                    request_principal: principal.as_deref(),
                }),
                jwt: c,
                ..Request::default()
            };
            p.evaluate(&r).0 == Decision::Allow
        };
        assert!(judge(Some(&claims(&["dev", "admins"], "web-app"))));
        assert!(!judge(Some(&claims(&["dev"], "web-app"))), "not an admin");
        assert!(!judge(Some(&claims(&["admins"], "evil-app"))), "presenter");
        assert!(!judge(None), "no token");
    }
}
