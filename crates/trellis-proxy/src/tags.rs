//! Telemetry `tagOverrides`: labels of Istio's metrics removed, changed or added.
//!
//! A Telemetry resource's metric overrides may `REMOVE` a standard label from a metric,
//! or `UPSERT` a label whose value is an expression of the request's attributes (Istio
//! takes CEL; Trellis takes the forms people write: one attribute such as `request.host`
//! or `request.headers['x-user-tier']`, a quoted literal, and `string(…)` around
//! either). The plan is compiled once per snapshot ([`Tags::compile`]); a request
//! evaluates each distinct expression once, and the values travel with its record to the
//! series it counts in. Removals cost nothing per request: they apply when the metrics
//! are rendered, where series that become alike are summed.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex, OnceLock};

use http::{HeaderMap, HeaderName};

/// The longest value an upserted label keeps (longer ones are cut at a character).
const MAX_VALUE: usize = 256;

/// An attribute a tag's value can name.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Attr {
    /// `request.host`: the authority.
    Host,
    /// `request.method`.
    Method,
    /// `request.path`: path and query.
    Path,
    /// `request.url_path`: the path without its query.
    UrlPath,
    /// `request.scheme`.
    Scheme,
    /// `request.protocol`: `HTTP/1.1`, `HTTP/2`…
    Protocol,
    /// `request.headers['name']` (and `request.useragent`, `request.id`).
    Header(HeaderName),
    /// `response.code`.
    Code,
    /// `response.headers['name']`.
    ResponseHeader(HeaderName),
    /// `source.address`: the downstream peer's address.
    SourceAddress,
    /// `source.port`.
    SourcePort,
    /// `destination.port`: the port the request or connection was for.
    DestinationPort,
    /// `connection.mtls`: whether the downstream connection was mutual TLS.
    Mtls,
    /// `xds.cluster_name`: the cluster that answered.
    Cluster,
}

impl Attr {
    /// Known only once the response is there.
    fn of_response(&self) -> bool {
        matches!(self, Attr::Code | Attr::ResponseHeader(_) | Attr::Cluster)
    }
}

/// A tag's value.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Expr {
    Literal(String),
    Attr(Attr),
}

/// Parses a tag value expression.
pub fn parse(expr: &str) -> Result<Expr, String> {
    let mut e = expr.trim();
    // `string(x)`: the value is always a string here.
    while let Some(inner) = e.strip_prefix("string(").and_then(|r| r.strip_suffix(')')) {
        e = inner.trim();
    }
    for q in ['\'', '"'] {
        if let Some(lit) = e.strip_prefix(q).and_then(|r| r.strip_suffix(q)) {
            if lit.contains(q) {
                return Err(format!("{expr:?}: one quoted literal, nothing around it"));
            }
            return Ok(Expr::Literal(lit.to_string()));
        }
    }
    let header = |rest: &str| -> Result<HeaderName, String> {
        let name = rest
            .strip_prefix('[')
            .and_then(|r| r.strip_suffix(']'))
            .map(str::trim)
            .and_then(|r| {
                r.strip_prefix('\'')
                    .and_then(|r| r.strip_suffix('\''))
                    .or_else(|| r.strip_prefix('"').and_then(|r| r.strip_suffix('"')))
            })
            .ok_or_else(|| format!("{expr:?}: a header is named in quotes: headers['x-name']"))?;
        HeaderName::from_bytes(name.to_ascii_lowercase().as_bytes())
            .map_err(|_| format!("{expr:?}: {name:?} is not a header name"))
    };
    if let Some(rest) = e.strip_prefix("request.headers") {
        return Ok(Expr::Attr(Attr::Header(header(rest.trim())?)));
    }
    if let Some(rest) = e.strip_prefix("response.headers") {
        return Ok(Expr::Attr(Attr::ResponseHeader(header(rest.trim())?)));
    }
    Ok(Expr::Attr(match e {
        "request.host" => Attr::Host,
        "request.method" => Attr::Method,
        "request.path" => Attr::Path,
        "request.url_path" => Attr::UrlPath,
        "request.scheme" => Attr::Scheme,
        "request.protocol" => Attr::Protocol,
        "request.useragent" => Attr::Header(http::header::USER_AGENT),
        "request.id" => Attr::Header(crate::http::X_REQUEST_ID),
        "response.code" => Attr::Code,
        "source.address" => Attr::SourceAddress,
        "source.port" => Attr::SourcePort,
        "destination.port" => Attr::DestinationPort,
        "connection.mtls" => Attr::Mtls,
        "xds.cluster_name" => Attr::Cluster,
        _ => {
            return Err(format!(
                "{expr:?} is not supported: a tag's value is a quoted literal, request.host, request.method, request.path, request.url_path, request.scheme, request.protocol, request.useragent, request.id, request.headers['…'], response.code, response.headers['…'], source.address, source.port, destination.port, connection.mtls or xds.cluster_name"
            ));
        }
    }))
}

/// What becomes of one label of a metric.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum Change {
    Remove,
    /// Set to the value of `exprs[i]`.
    Upsert(usize),
}

/// One side's tag overrides (client or server), per metric.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Tags {
    /// Per metric, by the bit's position in [`crate::metrics::Enabled`]: label name →
    /// change, in the order first named.
    per_metric: [Vec<(String, Change)>; 8],
    exprs: Vec<Expr>,
}

static TAGS: OnceLock<Mutex<std::collections::HashMap<Tags, Arc<Tags>>>> = OnceLock::new();

/// The values of a request's upserted tags, in the order of [`Tags`]' expressions.
pub type Values = Arc<[Box<str>]>;

/// A request's values, those of the response still to come.
#[derive(Debug)]
pub struct Pending(Vec<Option<Box<str>>>);

/// What a value can be taken from, besides the request and response.
#[derive(Debug, Clone, Copy)]
pub struct Conn {
    pub peer: SocketAddr,
    pub port: u16,
    pub mtls: bool,
}

impl Tags {
    /// The plan of one side (`client`: outbound, reporter source) from the overrides in
    /// order (a later one wins). `None` when nothing changes. Expressions that cannot be
    /// parsed are left out and reported in `errors`.
    pub fn compile(
        overrides: &[trellis_xds::snapshot::MetricOverride],
        client: bool,
        errors: &mut Vec<String>,
    ) -> Option<Arc<Tags>> {
        let mut t = Tags {
            per_metric: Default::default(),
            exprs: Vec::new(),
        };
        for o in overrides {
            let applies = match o.mode.as_str() {
                "CLIENT" => client,
                "SERVER" => !client,
                _ => true,
            };
            if !applies || o.tag_overrides.is_empty() {
                continue;
            }
            let Some(bits) = crate::metrics::Enabled::bits_of(&o.metric) else {
                continue;
            };
            for (name, ov) in &o.tag_overrides {
                let change = if ov.remove {
                    Change::Remove
                } else {
                    let text = ov.value.as_deref().unwrap_or_default();
                    match parse(text) {
                        Ok(e) => Change::Upsert(
                            t.exprs.iter().position(|x| *x == e).unwrap_or_else(|| {
                                t.exprs.push(e);
                                t.exprs.len() - 1
                            }),
                        ),
                        Err(why) => {
                            errors.push(format!("tagOverrides.{name}: {why}"));
                            continue;
                        }
                    }
                };
                for (i, changes) in t.per_metric.iter_mut().enumerate() {
                    if bits & (1 << i) == 0 {
                        continue;
                    }
                    match changes.iter_mut().find(|(n, _)| n == name) {
                        Some(c) => c.1 = change.clone(),
                        None => changes.push((name.clone(), change.clone())),
                    }
                }
            }
        }
        if t.per_metric.iter().all(Vec::is_empty) {
            return None;
        }
        let mut set = TAGS
            .get_or_init(Mutex::default)
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        Some(Arc::clone(
            set.entry(t.clone()).or_insert_with(|| Arc::new(t)),
        ))
    }

    /// The values a request gives (those of its response come at [`Tags::finish`]).
    pub fn request<B>(&self, req: &http::Request<B>, conn: Conn) -> Pending {
        Pending(
            self.exprs
                .iter()
                .map(|e| match e {
                    Expr::Attr(a) if a.of_response() => None,
                    _ => Some(self.value(e, Some(req), Some(conn), None)),
                })
                .collect(),
        )
    }

    /// All the values, once the response is known (`code` 0 and no headers: none came).
    pub fn finish(
        &self,
        pending: Pending,
        code: u16,
        headers: Option<&HeaderMap>,
        cluster: &str,
    ) -> Values {
        pending
            .0
            .into_iter()
            .zip(&self.exprs)
            .map(|(v, e)| {
                v.unwrap_or_else(|| {
                    let resp = Resp {
                        code,
                        headers,
                        cluster,
                    };
                    self.value::<()>(e, None, None, Some(&resp))
                })
            })
            .collect()
    }

    /// The values of a TCP connection (request and response attributes are `unknown`).
    pub fn connection(&self, conn: Conn, cluster: &str) -> Values {
        let resp = Resp {
            code: 0,
            headers: None,
            cluster,
        };
        self.exprs
            .iter()
            .map(|e| self.value::<()>(e, None, Some(conn), Some(&resp)))
            .collect()
    }

    fn value<B>(
        &self,
        e: &Expr,
        req: Option<&http::Request<B>>,
        conn: Option<Conn>,
        resp: Option<&Resp<'_>>,
    ) -> Box<str> {
        let a = match e {
            Expr::Literal(s) => return cut(s),
            Expr::Attr(a) => a,
        };
        let text: Option<std::borrow::Cow<'_, str>> = match a {
            Attr::Host => req.and_then(|r| crate::http::authority_of(r).map(Into::into)),
            Attr::Method => req.map(|r| r.method().as_str().into()),
            Attr::Path => req.map(|r| {
                r.uri()
                    .path_and_query()
                    .map_or(r.uri().path(), |p| p.as_str())
                    .into()
            }),
            Attr::UrlPath => req.map(|r| r.uri().path().into()),
            Attr::Scheme => req.map(|r| r.uri().scheme_str().unwrap_or("http").into()),
            Attr::Protocol => req.map(|r| crate::accesslog::protocol(r.version()).into()),
            Attr::Header(h) => req.and_then(|r| r.headers().get(h)?.to_str().ok().map(Into::into)),
            Attr::Code => resp
                .filter(|r| r.code != 0)
                .map(|r| r.code.to_string().into()),
            Attr::ResponseHeader(h) => resp
                .and_then(|r| r.headers?.get(h)?.to_str().ok())
                .map(Into::into),
            Attr::Cluster => resp
                .map(|r| r.cluster)
                .filter(|c| !c.is_empty())
                .map(Into::into),
            Attr::SourceAddress => conn.map(|c| c.peer.ip().to_string().into()),
            Attr::SourcePort => conn.map(|c| c.peer.port().to_string().into()),
            Attr::DestinationPort => conn.map(|c| c.port.to_string().into()),
            Attr::Mtls => conn.map(|c| if c.mtls { "true" } else { "false" }.into()),
        };
        text.as_deref().map_or_else(|| "unknown".into(), cut)
    }

    /// The labels of metric `index` (its bit's position), `standard` changed as the plan
    /// says, with the request's `values`.
    pub fn apply<'a>(
        &self,
        index: usize,
        standard: &mut Vec<(std::borrow::Cow<'a, str>, std::borrow::Cow<'a, str>)>,
        values: &'a [Box<str>],
    ) {
        let Some(changes) = self.per_metric.get(index) else {
            return;
        };
        for (name, change) in changes {
            let at = standard.iter().position(|(n, _)| n == name);
            match (change, at) {
                (Change::Remove, Some(i)) => {
                    standard.remove(i);
                }
                (Change::Remove, None) => {}
                (Change::Upsert(e), at) => {
                    let v = values.get(*e).map_or("unknown", |v| &**v);
                    match at {
                        Some(i) => standard[i].1 = v.into(),
                        None => standard.push((name.clone().into(), v.into())),
                    }
                }
            }
        }
    }

    /// Values for a series past the cardinality bound: every one `overflow`.
    pub fn overflow(&self) -> Values {
        self.exprs.iter().map(|_| "overflow".into()).collect()
    }
}

struct Resp<'a> {
    code: u16,
    headers: Option<&'a HeaderMap>,
    cluster: &'a str,
}

fn cut(s: &str) -> Box<str> {
    if s.len() <= MAX_VALUE {
        return s.into();
    }
    let mut end = MAX_VALUE;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    s[..end].into()
}

#[cfg(test)]
mod tests {
    use super::*;
    use trellis_xds::snapshot::{MetricOverride, TagOverride};

    fn upsert(v: &str) -> TagOverride {
        TagOverride {
            remove: false,
            value: Some(v.into()),
        }
    }

    #[test]
    fn expressions_take_the_forms_people_write() {
        assert_eq!(
            parse("request.headers['X-Tier']"),
            Ok(Expr::Attr(Attr::Header(HeaderName::from_static("x-tier"))))
        );
        assert_eq!(
            parse("string(destination.port)"),
            Ok(Expr::Attr(Attr::DestinationPort))
        );
        assert_eq!(parse("'blue'"), Ok(Expr::Literal("blue".into())));
        assert_eq!(parse("\"blue\""), Ok(Expr::Literal("blue".into())));
        assert!(parse("request.headers[x]").is_err());
        assert!(parse("'a' + 'b'").is_err());
        let e = parse("upstream_peer.labels['app'].value").unwrap_err();
        assert!(e.contains("not supported"), "{e}");
    }

    #[test]
    fn a_later_override_wins_and_values_come_from_request_and_response() {
        let overrides = vec![
            MetricOverride {
                metric: "ALL_METRICS".into(),
                mode: "CLIENT_AND_SERVER".into(),
                tag_overrides: [
                    (
                        "request_protocol".to_string(),
                        TagOverride {
                            remove: true,
                            value: None,
                        },
                    ),
                    ("tier".to_string(), upsert("request.headers['x-tier']")),
                ]
                .into(),
                ..Default::default()
            },
            MetricOverride {
                metric: "REQUEST_COUNT".into(),
                mode: "SERVER".into(),
                tag_overrides: [
                    ("request_protocol".to_string(), upsert("request.method")),
                    ("code".to_string(), upsert("response.code")),
                    ("bad".to_string(), upsert("request.nope")),
                ]
                .into(),
                ..Default::default()
            },
        ];
        let mut errors = Vec::new();
        let server = Tags::compile(&overrides, false, &mut errors).unwrap();
        assert_eq!(errors.len(), 1, "{errors:?}");
        assert!(errors[0].starts_with("tagOverrides.bad: "), "{errors:?}");
        let client = Tags::compile(&overrides, true, &mut Vec::new()).unwrap();
        assert!(Arc::ptr_eq(
            &client,
            &Tags::compile(&overrides, true, &mut Vec::new()).unwrap()
        ));
        let req = http::Request::builder()
            .method("POST")
            .header("x-tier", "gold")
            .body(())
            .unwrap();
        let conn = Conn {
            peer: "10.0.0.1:4000".parse().unwrap(),
            port: 9080,
            mtls: true,
        };
        let values = server.finish(server.request(&req, conn), 503, None, "c");
        let std = |v: &'static str| {
            vec![
                ("reporter".into(), "destination".into()),
                ("request_protocol".into(), v.into()),
            ]
        };
        // REQUEST_COUNT (bit 0) on the server: the method replaces the protocol, the
        // tier and code are added.
        let mut l = std("http");
        server.apply(0, &mut l, &values);
        let l: Vec<(String, String)> = l.into_iter().map(|(a, b)| (a.into(), b.into())).collect();
        assert_eq!(
            l,
            [
                ("reporter", "destination"),
                ("request_protocol", "POST"),
                ("tier", "gold"),
                ("code", "503")
            ]
            .map(|(a, b)| (a.to_string(), b.to_string()))
        );
        // REQUEST_DURATION (bit 1): the protocol removed, the tier added.
        let mut l = std("http");
        server.apply(1, &mut l, &values);
        assert_eq!(l.len(), 2);
        assert_eq!((&*l[1].0, &*l[1].1), ("tier", "gold"));
        // The client: only the first override; a missing header is `unknown`.
        let bare = http::Request::new(());
        let values = client.finish(client.request(&bare, conn), 200, None, "");
        let mut l = std("http");
        client.apply(0, &mut l, &values);
        assert_eq!((&*l[1].0, &*l[1].1), ("tier", "unknown"));
        // Nothing to change: no plan.
        assert!(Tags::compile(&[], true, &mut Vec::new()).is_none());
        // Long values are cut.
        assert_eq!(cut(&"é".repeat(200)).len(), 256);
    }
}
