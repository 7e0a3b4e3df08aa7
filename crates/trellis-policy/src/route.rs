//! HTTP route matching with Istio's VirtualService semantics.
//!
//! - Rules (`http[]`) are tried in order; the first rule with a matching `match` entry wins.
//!   A rule without `match` matches everything.
//! - The entries of a rule's `match` list are alternatives (OR); the conditions inside one
//!   entry must all hold (AND).
//! - String matches are `exact`, `prefix` or `regex` (RE2 syntax, matched against the whole
//!   value, linear time: a hostile pattern cannot stall the proxy); an empty match on a
//!   header means "present". `ignoreUriCase` makes uri exact/prefix matches case-insensitive.
//! - `withoutHeaders` fails the entry when the header matches.
//! - The destination is chosen by weight.
//!
//! Tables are compiled once per snapshot; matching allocates nothing.

use std::collections::BTreeMap;

use trellis_api::common::StringMatch;
use trellis_api::networking::{HttpMatchRequest, HttpRoute};

/// Longest compiled regex program accepted (bytes); keeps memory bounded per snapshot.
const REGEX_SIZE_LIMIT: usize = 1 << 20;

/// Why a route does not compile.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{path}: {reason}")]
pub struct RouteError {
    /// Field path within the VirtualService spec, e.g. `http[2].match[0].uri.regex`.
    pub path: String,
    pub reason: String,
}

fn err(path: impl Into<String>, reason: impl Into<String>) -> RouteError {
    RouteError {
        path: path.into(),
        reason: reason.into(),
    }
}

/// A compiled string match.
#[derive(Debug, Clone)]
pub enum StrMatch {
    Exact(String),
    Prefix(String),
    /// Anchored at both ends.
    Regex(regex::Regex),
    /// Matches any value (the value must be present).
    Present,
}

impl StrMatch {
    /// Compiles an Istio `StringMatch`; `lowercase` folds exact/prefix for `ignoreUriCase`.
    pub fn compile(m: &StringMatch, lowercase: bool, path: &str) -> Result<StrMatch, RouteError> {
        let fold = |s: &str| {
            if lowercase {
                s.to_ascii_lowercase()
            } else {
                s.to_string()
            }
        };
        Ok(match (&m.exact, &m.prefix, &m.regex) {
            (Some(e), None, None) => StrMatch::Exact(fold(e)),
            (None, Some(p), None) => StrMatch::Prefix(fold(p)),
            (None, None, Some(r)) => StrMatch::Regex(
                regex::RegexBuilder::new(&format!("^(?:{r})$"))
                    .size_limit(REGEX_SIZE_LIMIT)
                    .build()
                    .map_err(|e| {
                        err(format!("{path}.regex"), format!("invalid regex {r:?}: {e}"))
                    })?,
            ),
            (None, None, None) => StrMatch::Present,
            _ => return Err(err(path, "only one of exact, prefix or regex may be set")),
        })
    }

    pub fn matches(&self, value: &str) -> bool {
        match self {
            StrMatch::Exact(e) => value == e,
            StrMatch::Prefix(p) => value.starts_with(p.as_str()),
            StrMatch::Regex(r) => r.is_match(value),
            StrMatch::Present => true,
        }
    }

    /// Case-insensitive for exact and prefix (the pattern is already lowercase).
    fn matches_ignore_case(&self, value: &str) -> bool {
        match self {
            StrMatch::Exact(e) => value.eq_ignore_ascii_case(e),
            StrMatch::Prefix(p) => value
                .get(..p.len())
                .is_some_and(|head| head.eq_ignore_ascii_case(p)),
            _ => self.matches(value),
        }
    }
}

/// What a request looks like to the matcher.
pub trait Request {
    fn method(&self) -> &str;
    fn scheme(&self) -> &str;
    fn authority(&self) -> &str;
    /// The path without the query string.
    fn path(&self) -> &str;
    /// The raw query string, without `?`.
    fn query(&self) -> Option<&str>;
    /// A request header by lowercase name (first value).
    fn header(&self, name: &str) -> Option<&str>;
    /// The destination port the request arrived on.
    fn port(&self) -> Option<u16>;
    /// Labels of the calling workload.
    fn source_labels(&self) -> &BTreeMap<String, String>;
    fn source_namespace(&self) -> &str;
    /// The gateway this proxy is (`mesh` for sidecars).
    fn gateway(&self) -> &str;
}

/// One compiled `match` entry.
#[derive(Debug, Clone)]
pub struct Match {
    pub name: Option<String>,
    uri: Option<StrMatch>,
    ignore_uri_case: bool,
    scheme: Option<StrMatch>,
    method: Option<StrMatch>,
    authority: Option<StrMatch>,
    headers: Vec<(String, StrMatch)>,
    without_headers: Vec<(String, StrMatch)>,
    query_params: Vec<(String, StrMatch)>,
    port: Option<u16>,
    source_labels: Vec<(String, String)>,
    source_namespace: Option<String>,
    gateways: Vec<String>,
}

impl Match {
    /// Compiles one Istio `HTTPMatchRequest`; `path` prefixes error paths.
    pub fn compile(m: &HttpMatchRequest, path: &str) -> Result<Match, RouteError> {
        let ignore = m.ignore_uri_case.unwrap_or(false);
        let one = |sm: &Option<StringMatch>, field: &str, fold: bool| {
            sm.as_ref()
                .map(|s| StrMatch::compile(s, fold, &format!("{path}.{field}")))
                .transpose()
        };
        let map = |ms: &BTreeMap<String, StringMatch>, field: &str, lower_keys: bool| {
            ms.iter()
                .map(|(k, v)| {
                    let key = if lower_keys {
                        k.to_ascii_lowercase()
                    } else {
                        k.clone()
                    };
                    StrMatch::compile(v, false, &format!("{path}.{field}.{k}")).map(|m| (key, m))
                })
                .collect::<Result<Vec<_>, _>>()
        };
        let port = m
            .port
            .map(|p| {
                u16::try_from(p).map_err(|_| err(format!("{path}.port"), "port must be 1..65535"))
            })
            .transpose()?;
        Ok(Match {
            name: m.name.clone(),
            uri: one(&m.uri, "uri", ignore)?,
            ignore_uri_case: ignore,
            scheme: one(&m.scheme, "scheme", false)?,
            method: one(&m.method, "method", false)?,
            authority: one(&m.authority, "authority", false)?,
            headers: map(&m.headers, "headers", true)?,
            without_headers: map(&m.without_headers, "withoutHeaders", true)?,
            query_params: map(&m.query_params, "queryParams", false)?,
            port,
            source_labels: m
                .source_labels
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
            source_namespace: m.source_namespace.clone(),
            gateways: m.gateways.clone(),
        })
    }

    /// The uri prefix this entry matched on, when it is a prefix match (a `rewrite.uri`
    /// then replaces just that prefix, as in Istio).
    pub fn uri_prefix(&self) -> Option<&str> {
        match &self.uri {
            Some(StrMatch::Prefix(p)) => Some(p),
            _ => None,
        }
    }

    /// Whether every condition of this entry holds for `req`.
    pub fn matches(&self, req: &dyn Request) -> bool {
        if let Some(u) = &self.uri {
            let ok = if self.ignore_uri_case {
                u.matches_ignore_case(req.path())
            } else {
                u.matches(req.path())
            };
            if !ok {
                return false;
            }
        }
        let field = |m: &Option<StrMatch>, v: &str| m.as_ref().is_none_or(|m| m.matches(v));
        if !field(&self.scheme, req.scheme())
            || !field(&self.method, req.method())
            || !field(&self.authority, req.authority())
        {
            return false;
        }
        if let Some(p) = self.port {
            if req.port() != Some(p) {
                return false;
            }
        }
        if !self
            .headers
            .iter()
            .all(|(name, m)| req.header(name).is_some_and(|v| m.matches(v)))
        {
            return false;
        }
        if self
            .without_headers
            .iter()
            .any(|(name, m)| req.header(name).is_some_and(|v| m.matches(v)))
        {
            return false;
        }
        if !self
            .query_params
            .iter()
            .all(|(key, m)| query_param(req.query(), key).is_some_and(|v| m.matches(v)))
        {
            return false;
        }
        if !self
            .source_labels
            .iter()
            .all(|(k, v)| req.source_labels().get(k) == Some(v))
        {
            return false;
        }
        if let Some(ns) = &self.source_namespace {
            if req.source_namespace() != ns {
                return false;
            }
        }
        if !self.gateways.is_empty() && !self.gateways.iter().any(|g| g == req.gateway()) {
            return false;
        }
        true
    }
}

/// The value of the first `key=value` pair named `key` (a bare `key` has the value "").
fn query_param<'a>(query: Option<&'a str>, key: &str) -> Option<&'a str> {
    query?.split('&').find_map(|pair| {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        (k == key).then_some(v)
    })
}

/// A destination with its weight.
#[derive(Debug, Clone)]
pub struct Weighted<D> {
    pub weight: u32,
    pub destination: D,
}

/// One compiled rule.
#[derive(Debug, Clone)]
pub struct Route<D> {
    /// The rule's `name`, or `#<index>` as Istio reports unnamed rules.
    pub name: String,
    pub index: usize,
    matches: Vec<Match>,
    pub destinations: Vec<Weighted<D>>,
    total_weight: u32,
}

impl<D> Route<D> {
    /// A rule from compiled matches and weighted destinations. A lone destination without
    /// a weight gets all the traffic; otherwise weights are relative.
    pub fn new(
        name: String,
        index: usize,
        matches: Vec<Match>,
        destinations: Vec<Weighted<D>>,
    ) -> Route<D> {
        let total_weight = destinations.iter().map(|w| w.weight).sum();
        Route {
            name,
            index,
            matches,
            destinations,
            total_weight,
        }
    }

    /// The destination for a roll in `0..u32::MAX` (callers pass a random number).
    pub fn pick(&self, roll: u32) -> Option<&D> {
        if self.total_weight == 0 {
            return self.destinations.first().map(|w| &w.destination);
        }
        let mut point = roll % self.total_weight;
        for w in &self.destinations {
            if point < w.weight {
                return Some(&w.destination);
            }
            point -= w.weight;
        }
        self.destinations.last().map(|w| &w.destination)
    }

    /// Whether the rule matches `req` (one of its entries holds, or it has none).
    pub fn matches(&self, req: &dyn Request) -> bool {
        self.matching_entry(req).is_some()
    }

    /// The first of this rule's match entries that holds (`None` inside `Some` when the
    /// rule has no match list and so matches everything).
    fn matching_entry(&self, req: &dyn Request) -> Option<Option<&Match>> {
        if self.matches.is_empty() {
            return Some(None);
        }
        self.matches.iter().find(|m| m.matches(req)).map(Some)
    }
}

/// The compiled `http[]` of a VirtualService (or of several, merged in order).
#[derive(Debug, Clone)]
pub struct RouteTable<D> {
    routes: Vec<Route<D>>,
    /// For long tables: which rules can match a given path, so that matching does not
    /// walk every rule.
    index: Option<UriIndex>,
}

/// Tables at least this long get a [`UriIndex`].
const INDEX_FROM: usize = 16;

/// Rules indexed by their literal uri conditions. A rule whose every match entry has a
/// case-sensitive exact or prefix uri is reachable only through its literals; any other
/// rule is always a candidate. Candidates are evaluated in table order, so first-match
/// semantics are unchanged.
#[derive(Debug, Clone, Default)]
struct UriIndex {
    exact: std::collections::HashMap<String, Vec<usize>>,
    prefix: std::collections::HashMap<String, Vec<usize>>,
    always: Vec<usize>,
}

impl UriIndex {
    fn build<D>(routes: &[Route<D>]) -> UriIndex {
        let mut idx = UriIndex::default();
        for (i, r) in routes.iter().enumerate() {
            let literals: Option<Vec<(bool, &str)>> = if r.matches.is_empty() {
                None
            } else {
                r.matches
                    .iter()
                    .map(|m| match (&m.uri, m.ignore_uri_case) {
                        (Some(StrMatch::Exact(e)), false) => Some((true, e.as_str())),
                        (Some(StrMatch::Prefix(p)), false) => Some((false, p.as_str())),
                        _ => None,
                    })
                    .collect()
            };
            match literals {
                None => idx.always.push(i),
                Some(lits) => {
                    for (exact, lit) in lits {
                        let map = if exact {
                            &mut idx.exact
                        } else {
                            &mut idx.prefix
                        };
                        let list = map.entry(lit.to_string()).or_default();
                        if list.last() != Some(&i) {
                            list.push(i);
                        }
                    }
                }
            }
        }
        idx
    }

    /// Rules that may match `path`, in table order.
    fn candidates(&self, path: &str) -> Vec<usize> {
        let mut c = self.always.clone();
        if let Some(l) = self.exact.get(path) {
            c.extend_from_slice(l);
        }
        for (k, _) in path
            .char_indices()
            .chain(std::iter::once((path.len(), ' ')))
        {
            if let Some(l) = self.prefix.get(&path[..k]) {
                c.extend_from_slice(l);
            }
        }
        c.sort_unstable();
        c.dedup();
        c
    }
}

/// The outcome of matching: the rule and the match entry that selected it.
#[derive(Debug)]
pub struct Matched<'a, D> {
    pub route: &'a Route<D>,
    pub entry: Option<&'a Match>,
}

impl<D> RouteTable<D> {
    /// A table of rules, tried in order.
    pub fn new(routes: Vec<Route<D>>) -> RouteTable<D> {
        let index = (routes.len() >= INDEX_FROM).then(|| UriIndex::build(&routes));
        RouteTable { routes, index }
    }

    /// Compiles HTTP rules; `destination` turns each route destination (the API's type) into
    /// whatever the caller routes to (a cluster, say), failing with a reason.
    pub fn compile<F>(http: &[HttpRoute], mut destination: F) -> Result<RouteTable<D>, RouteError>
    where
        F: FnMut(&trellis_api::networking::Destination, &str) -> Result<D, RouteError>,
    {
        let mut routes = Vec::with_capacity(http.len());
        for (i, r) in http.iter().enumerate() {
            let path = format!("http[{i}]");
            let matches = r
                .matches
                .iter()
                .enumerate()
                .map(|(j, m)| Match::compile(m, &format!("{path}.match[{j}]")))
                .collect::<Result<Vec<_>, _>>()?;
            let mut destinations = Vec::with_capacity(r.route.len());
            for (j, d) in r.route.iter().enumerate() {
                let dpath = format!("{path}.route[{j}]");
                let weight = match (d.weight, r.route.len()) {
                    (None, 1) => 100,
                    (None, _) => 0,
                    (Some(w), _) => u32::try_from(w).map_err(|_| {
                        err(format!("{dpath}.weight"), "weight must not be negative")
                    })?,
                };
                destinations.push(Weighted {
                    weight,
                    destination: destination(&d.destination, &format!("{dpath}.destination"))?,
                });
            }
            routes.push(Route::new(
                r.name.clone().unwrap_or_else(|| format!("#{i}")),
                i,
                matches,
                destinations,
            ));
        }
        Ok(RouteTable::new(routes))
    }

    /// The first rule that matches `req` (Istio's first-match semantics).
    pub fn first_match(&self, req: &dyn Request) -> Option<Matched<'_, D>> {
        fn matched<'t, D>(route: &'t Route<D>, req: &dyn Request) -> Option<Matched<'t, D>> {
            route
                .matching_entry(req)
                .map(|entry| Matched { route, entry })
        }
        match &self.index {
            None => self.routes.iter().find_map(|r| matched(r, req)),
            Some(idx) => idx
                .candidates(req.path())
                .into_iter()
                .filter_map(|i| self.routes.get(i))
                .find_map(|r| matched(r, req)),
        }
    }

    pub fn routes(&self) -> &[Route<D>] {
        &self.routes
    }
}

/// A simple owned request, for tests and for `trellis explain`.
#[derive(Debug, Clone, Default)]
pub struct SimpleRequest {
    pub method: String,
    pub scheme: String,
    pub authority: String,
    pub path: String,
    pub query: Option<String>,
    pub headers: BTreeMap<String, String>,
    pub port: Option<u16>,
    pub source_labels: BTreeMap<String, String>,
    pub source_namespace: String,
    pub gateway: String,
}

impl SimpleRequest {
    /// `GET http://authority/path?query` from the mesh gateway, with lowercase header names.
    pub fn get(authority: &str, path_and_query: &str) -> SimpleRequest {
        let (path, query) = match path_and_query.split_once('?') {
            Some((p, q)) => (p.to_string(), Some(q.to_string())),
            None => (path_and_query.to_string(), None),
        };
        SimpleRequest {
            method: "GET".into(),
            scheme: "http".into(),
            authority: authority.into(),
            path,
            query,
            gateway: "mesh".into(),
            ..SimpleRequest::default()
        }
    }

    pub fn header(mut self, name: &str, value: &str) -> SimpleRequest {
        self.headers
            .insert(name.to_ascii_lowercase(), value.to_string());
        self
    }
}

impl Request for SimpleRequest {
    fn method(&self) -> &str {
        &self.method
    }
    fn scheme(&self) -> &str {
        &self.scheme
    }
    fn authority(&self) -> &str {
        &self.authority
    }
    fn path(&self) -> &str {
        &self.path
    }
    fn query(&self) -> Option<&str> {
        self.query.as_deref()
    }
    fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).map(String::as_str)
    }
    fn port(&self) -> Option<u16> {
        self.port
    }
    fn source_labels(&self) -> &BTreeMap<String, String> {
        &self.source_labels
    }
    fn source_namespace(&self) -> &str {
        &self.source_namespace
    }
    fn gateway(&self) -> &str {
        &self.gateway
    }
}

/// An HTTP request as the proxy holds it, plus what the proxy knows about the caller.
#[derive(Debug)]
pub struct HttpRequestView<'a, B> {
    pub req: &'a http::Request<B>,
    pub port: Option<u16>,
    pub source_labels: &'a BTreeMap<String, String>,
    pub source_namespace: &'a str,
    pub gateway: &'a str,
}

impl<B> Request for HttpRequestView<'_, B> {
    fn method(&self) -> &str {
        self.req.method().as_str()
    }
    fn scheme(&self) -> &str {
        self.req.uri().scheme_str().unwrap_or("http")
    }
    fn authority(&self) -> &str {
        self.req
            .uri()
            .authority()
            .map(|a| a.as_str())
            .or_else(|| {
                self.req
                    .headers()
                    .get(http::header::HOST)
                    .and_then(|h| h.to_str().ok())
            })
            .unwrap_or("")
    }
    fn path(&self) -> &str {
        self.req.uri().path()
    }
    fn query(&self) -> Option<&str> {
        self.req.uri().query()
    }
    fn header(&self, name: &str) -> Option<&str> {
        self.req.headers().get(name).and_then(|v| v.to_str().ok())
    }
    fn port(&self) -> Option<u16> {
        self.port
    }
    fn source_labels(&self) -> &BTreeMap<String, String> {
        self.source_labels
    }
    fn source_namespace(&self) -> &str {
        self.source_namespace
    }
    fn gateway(&self) -> &str {
        self.gateway
    }
}
