//! RequestAuthentication in the inbound path: find a request's JWT where the rules say
//! (by default `Authorization: Bearer …` and the `access_token` query parameter), verify
//! it with its issuer's keys, and make its claims available to authorization. A request
//! without a token passes (authorization may then require one). A request with a token
//! that does not verify is refused with 401.

use http::{HeaderMap, HeaderName, HeaderValue};
use trellis_policy::jwt::{self, Claims, Jwks, JwtError};
use trellis_xds::snapshot as wire;

/// Where a token may be.
#[derive(Debug, Clone)]
enum Location {
    Header(HeaderName, String),
    Param(String),
    Cookie(String),
}

/// One jwtRule, compiled.
#[derive(Debug, Clone)]
pub struct JwtRule {
    pub policy: String,
    pub issuer: String,
    audiences: Vec<String>,
    /// Inline keys, or (with `jwks_uri`) none: the cache holds those.
    jwks: std::sync::Arc<Jwks>,
    jwks_uri: Option<String>,
    locations: Vec<Location>,
    forward_original_token: bool,
    output_payload_to_header: Option<HeaderName>,
    output_claim_to_headers: Vec<(HeaderName, Vec<String>)>,
    /// How long a request waits for this rule's JWKS to be fetched.
    timeout: std::time::Duration,
    space_delimited: std::sync::Arc<[String]>,
}

/// A workload's jwtRules.
#[derive(Debug, Clone, Default)]
pub struct JwtRules(Vec<JwtRule>);

fn header_name(what: &str, name: &str) -> Result<HeaderName, String> {
    HeaderName::from_bytes(name.as_bytes())
        .map_err(|_| format!("{what}: {name:?} is not a header name"))
}

impl JwtRules {
    /// Compiles the snapshot's rules (inline keys parsed here; `jwksUri` ones are fetched
    /// into the proxy's [`JwksCache`]).
    pub fn compile(rules: &[wire::JwtRule]) -> Result<JwtRules, String> {
        let mut out = Vec::with_capacity(rules.len());
        for (i, r) in rules.iter().enumerate() {
            let at = |e: String| format!("workload.jwtRules[{i}] ({}): {e}", r.policy);
            if r.issuer.is_empty() {
                return Err(at("no issuer".into()));
            }
            let (jwks, jwks_uri) = match (&r.jwks, &r.jwks_uri) {
                (Some(doc), _) => (Jwks::parse(doc).map_err(at)?, None),
                (None, Some(uri)) => (Jwks::default(), Some(uri.clone())),
                (None, None) => return Err(at("neither jwks nor jwksUri".into())),
            };
            let mut locations = Vec::new();
            for h in &r.from_headers {
                locations.push(Location::Header(
                    header_name("fromHeaders", &h.name).map_err(at)?,
                    h.prefix.clone().unwrap_or_default(),
                ));
            }
            locations.extend(r.from_params.iter().cloned().map(Location::Param));
            locations.extend(r.from_cookies.iter().cloned().map(Location::Cookie));
            if locations.is_empty() {
                locations.push(Location::Header(
                    http::header::AUTHORIZATION,
                    "Bearer ".to_string(),
                ));
                locations.push(Location::Param("access_token".into()));
            }
            let output_payload_to_header = r
                .output_payload_to_header
                .as_deref()
                .map(|h| header_name("outputPayloadToHeader", h))
                .transpose()
                .map_err(at)?;
            let mut output_claim_to_headers = Vec::new();
            for c in &r.output_claim_to_headers {
                let h = header_name("outputClaimToHeaders", &c.header).map_err(at)?;
                let path = c.claim.split('.').map(str::to_string).collect();
                output_claim_to_headers.push((h, path));
            }
            out.push(JwtRule {
                policy: r.policy.clone(),
                issuer: r.issuer.clone(),
                audiences: r.audiences.clone(),
                jwks: std::sync::Arc::new(jwks),
                jwks_uri,
                locations,
                forward_original_token: r.forward_original_token,
                output_payload_to_header,
                output_claim_to_headers,
                timeout: match &r.timeout {
                    None => JWKS_TIMEOUT,
                    Some(d) => std::time::Duration::try_from(*d)
                        .ok()
                        .filter(|d| !d.is_zero())
                        .ok_or_else(|| at("timeout must be a positive duration".into()))?,
                },
                space_delimited: r.space_delimited_claims.clone().into(),
            });
        }
        Ok(JwtRules(out))
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Authenticates a request: `Ok(None)` without a token, `Ok(Some(claims))` with a valid
    /// one (the token is then removed unless `forwardOriginalToken`, and the payload and
    /// claims are copied to headers as the rule says), `Err` with one that is not valid.
    pub async fn authenticate(
        &self,
        headers: &mut HeaderMap,
        query: Option<&str>,
        now: u64,
        cache: &JwksCache,
    ) -> Result<Option<Claims>, (JwtError, Option<&str>)> {
        let mut found = None;
        'rules: for r in &self.0 {
            for l in &r.locations {
                if let Some(t) = find(l, headers, query) {
                    found = Some((t, l.clone()));
                    break 'rules;
                }
            }
        }
        let Some((token, location)) = found else {
            return Ok(None);
        };
        let issuer = jwt::issuer(&token).map_err(|e| (e, None))?;
        let Some(rule) = self.0.iter().find(|r| r.issuer == issuer) else {
            return Err((JwtError::UnknownIssuer, None));
        };
        let keys = match &rule.jwks_uri {
            None => std::sync::Arc::clone(&rule.jwks),
            Some(uri) => match cache.get(uri) {
                Some(k) => k,
                None => cache
                    .refresh(uri, JWKS_MIN_REFETCH, rule.timeout)
                    .await
                    .unwrap_or_default(),
            },
        };
        let mut result = jwt::verify(&token, &keys, &rule.issuer, &rule.audiences, now);
        if let (Err(JwtError::UnknownKey(_)), Some(uri)) = (&result, &rule.jwks_uri) {
            // A key the cached set lacks: the issuer may have rotated. Fetch again (at
            // most every few seconds) and try once more.
            if let Some(keys) = cache.refresh(uri, JWKS_MIN_REFETCH, rule.timeout).await {
                result = jwt::verify(&token, &keys, &rule.issuer, &rule.audiences, now);
            }
        }
        let mut claims = result.map_err(|e| (e, Some(rule.policy.as_str())))?;
        claims.space_delimited = std::sync::Arc::clone(&rule.space_delimited);
        if !rule.forward_original_token {
            if let Location::Header(name, _) = &location {
                headers.remove(name);
            }
        }
        if let Some(h) = &rule.output_payload_to_header {
            if let Ok(v) = HeaderValue::from_str(&claims.payload_b64) {
                headers.insert(h.clone(), v);
            }
        }
        for (h, path) in &rule.output_claim_to_headers {
            let path: Vec<&str> = path.iter().map(String::as_str).collect();
            let values = claims.claim(&path);
            if let Ok(v) = HeaderValue::from_str(&values.join(",")) {
                if !values.is_empty() {
                    headers.insert(h.clone(), v);
                }
            }
        }
        Ok(Some(claims))
    }
}

fn find(l: &Location, headers: &HeaderMap, query: Option<&str>) -> Option<String> {
    match l {
        Location::Header(name, prefix) => {
            let v = headers.get(name)?.to_str().ok()?;
            let t = if prefix.is_empty() {
                v
            } else if v.len() >= prefix.len() && v[..prefix.len()].eq_ignore_ascii_case(prefix) {
                &v[prefix.len()..]
            } else {
                return None;
            };
            Some(t.trim().to_string()).filter(|t| !t.is_empty())
        }
        Location::Param(p) => query?.split('&').find_map(|kv| {
            let (k, v) = kv.split_once('=')?;
            (k == p && !v.is_empty()).then(|| v.to_string())
        }),
        Location::Cookie(c) => headers
            .get_all(http::header::COOKIE)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(';'))
            .find_map(|kv| {
                let (k, v) = kv.trim().split_once('=')?;
                (k == c && !v.is_empty()).then(|| v.to_string())
            }),
    }
}

/// JWKS fetched from `jwksUri`s: the last good document of each URI, refreshed every
/// [`JWKS_REFRESH`], and at once (at most every [`JWKS_MIN_REFETCH`]) when a token names a
/// key the cached set lacks. A fetch that fails keeps the keys already held.
#[derive(Debug, Default)]
pub struct JwksCache {
    entries: std::sync::Mutex<std::collections::HashMap<String, Entry>>,
}

#[derive(Debug, Clone)]
struct Entry {
    jwks: std::sync::Arc<Jwks>,
    fetched: std::time::Instant,
    tried: std::time::Instant,
}

/// How often a JWKS is fetched again (Istio's default).
pub const JWKS_REFRESH: std::time::Duration = std::time::Duration::from_secs(20 * 60);
/// The least time between two fetches of one URI (a token with an unknown key cannot make
/// the proxy hammer the issuer).
pub const JWKS_MIN_REFETCH: std::time::Duration = std::time::Duration::from_secs(1);
/// After a failed fetch, the periodic refresh tries again this much later (a token with an
/// unknown key may still make it try sooner, at most every [`JWKS_MIN_REFETCH`]).
pub const JWKS_RETRY: std::time::Duration = std::time::Duration::from_secs(30);
/// How long a fetch may take.
pub const JWKS_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

impl JwksCache {
    fn lock(&self) -> std::sync::MutexGuard<'_, std::collections::HashMap<String, Entry>> {
        self.entries
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    pub fn get(&self, uri: &str) -> Option<std::sync::Arc<Jwks>> {
        self.lock().get(uri).map(|e| std::sync::Arc::clone(&e.jwks))
    }

    /// Fetches `uri` (waiting at most `timeout`) unless it was tried within `min_gap`; the
    /// keys held afterwards.
    pub async fn refresh(
        &self,
        uri: &str,
        min_gap: std::time::Duration,
        timeout: std::time::Duration,
    ) -> Option<std::sync::Arc<Jwks>> {
        let now = std::time::Instant::now();
        {
            let mut map = self.lock();
            if let Some(e) = map.get_mut(uri) {
                if now.duration_since(e.tried) < min_gap {
                    return Some(std::sync::Arc::clone(&e.jwks));
                }
                e.tried = now;
            }
        }
        match fetch(uri, timeout).await {
            Ok(jwks) => {
                let jwks = std::sync::Arc::new(jwks);
                tracing::info!(uri, keys = jwks.keys.len(), "JWKS fetched");
                self.lock().insert(
                    uri.to_string(),
                    Entry {
                        jwks: std::sync::Arc::clone(&jwks),
                        fetched: now,
                        tried: now,
                    },
                );
                Some(jwks)
            }
            Err(e) => {
                tracing::warn!(uri, "JWKS fetch failed, the keys held stay: {e}");
                let mut map = self.lock();
                // Remember the try (an empty set until one succeeds), and come back to it
                // in JWKS_RETRY rather than at every turn of the refresh loop.
                let retry_at = now
                    .checked_sub(JWKS_REFRESH.saturating_sub(JWKS_RETRY))
                    .unwrap_or(now);
                let entry = map.entry(uri.to_string()).or_insert_with(|| Entry {
                    jwks: std::sync::Arc::new(Jwks::default()),
                    fetched: retry_at,
                    tried: now,
                });
                entry.tried = now;
                entry.fetched = retry_at;
                Some(std::sync::Arc::clone(&entry.jwks))
            }
        }
    }

    /// URIs due for their periodic refresh, among `wanted`.
    fn due(&self, wanted: &[(String, std::time::Duration)]) -> Vec<(String, std::time::Duration)> {
        let map = self.lock();
        wanted
            .iter()
            .filter(|(u, _)| {
                map.get(u)
                    .is_none_or(|e| e.fetched.elapsed() >= JWKS_REFRESH)
            })
            .cloned()
            .collect()
    }
}

impl JwtRules {
    /// The JWKS URIs of rules without inline keys, with the longest fetch timeout of
    /// the rules that name each.
    pub fn jwks_uris(&self) -> Vec<(String, std::time::Duration)> {
        let mut v: Vec<(String, std::time::Duration)> = self
            .0
            .iter()
            .filter_map(|r| Some((r.jwks_uri.clone()?, r.timeout)))
            .collect();
        v.sort_by(|a, b| a.0.cmp(&b.0).then(b.1.cmp(&a.1)));
        v.dedup_by(|a, b| a.0 == b.0);
        v
    }
}

/// Keeps the JWKS of the current snapshot's rules fetched, until the runtime stops.
pub async fn keep_jwks_fresh(shared: std::sync::Arc<crate::proxy::Shared>) {
    loop {
        let uris = shared.config.load().jwt.jwks_uris();
        for (uri, timeout) in shared.jwks.due(&uris) {
            shared.jwks.refresh(&uri, JWKS_MIN_REFETCH, timeout).await;
        }
        tokio::time::sleep(std::time::Duration::from_secs(2)).await;
    }
}

/// GETs a JWKS document over HTTP or HTTPS (the system's roots), within `timeout` (the
/// rule's, [`JWKS_TIMEOUT`] by default).
pub async fn fetch(uri: &str, timeout: std::time::Duration) -> Result<Jwks, String> {
    tokio::time::timeout(timeout, fetch_inner(uri))
        .await
        .map_err(|_| format!("no answer within {timeout:?}"))?
}

async fn fetch_inner(uri: &str) -> Result<Jwks, String> {
    use http_body_util::BodyExt;
    let parsed: http::Uri = uri.parse().map_err(|e| format!("{uri:?}: {e}"))?;
    let tls = match parsed.scheme_str() {
        Some("https") => true,
        Some("http") => false,
        _ => return Err(format!("{uri:?}: not an http or https URI")),
    };
    let host = parsed.host().ok_or("no host")?.to_string();
    let port = parsed.port_u16().unwrap_or(if tls { 443 } else { 80 });
    let addr = tokio::net::lookup_host((host.trim_matches(['[', ']']), port))
        .await
        .map_err(|e| format!("resolving {host}: {e}"))?
        .next()
        .ok_or_else(|| format!("{host} resolves to nothing"))?;
    let stream = crate::sockets::connect(addr, JWKS_TIMEOUT)
        .await
        .map_err(|e| format!("connecting to {addr}: {e}"))?;
    let path = parsed
        .path_and_query()
        .map_or("/", |p| p.as_str())
        .to_string();
    let req = http::Request::get(path)
        .header(
            http::header::HOST,
            parsed.authority().map_or(host.as_str(), |a| a.as_str()),
        )
        .header(http::header::ACCEPT, "application/json")
        .body(http_body_util::Empty::<bytes::Bytes>::new())
        .map_err(|e| e.to_string())?;
    let resp = if tls {
        let roots = std::fs::read_to_string("/etc/ssl/certs/ca-certificates.crt")
            .map_err(|e| format!("the system's CA bundle: {e}"))?;
        let config = trellis_identity::tls::client_config(&roots, &[b"http/1.1"])
            .map_err(|e| e.to_string())?;
        let name = rustls::pki_types::ServerName::try_from(host.clone())
            .map_err(|_| format!("{host:?} is not a server name"))?;
        let stream = tokio_rustls::TlsConnector::from(std::sync::Arc::new(config))
            .connect(name, stream)
            .await
            .map_err(|e| format!("TLS to {host}: {e}"))?;
        send(stream, req).await?
    } else {
        send(stream, req).await?
    };
    if !resp.status().is_success() {
        return Err(format!("{uri}: HTTP {}", resp.status()));
    }
    let body = http_body_util::Limited::new(resp.into_body(), 1 << 20)
        .collect()
        .await
        .map_err(|e| format!("reading the JWKS: {e}"))?
        .to_bytes();
    let text = std::str::from_utf8(&body).map_err(|_| "the JWKS is not UTF-8")?;
    Jwks::parse(text)
}

async fn send<S>(
    stream: S,
    req: http::Request<http_body_util::Empty<bytes::Bytes>>,
) -> Result<http::Response<hyper::body::Incoming>, String>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .map_err(|e| e.to_string())?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    sender.send_request(req).await.map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule(uri: &str, timeout: Option<prost_types::Duration>) -> wire::JwtRule {
        wire::JwtRule {
            policy: "shop/jwt".into(),
            issuer: "https://slow.example".into(),
            jwks_uri: Some(uri.into()),
            timeout,
            ..Default::default()
        }
    }

    #[tokio::test]
    async fn a_request_waits_for_the_jwks_no_longer_than_the_rules_timeout() {
        // A JWKS server that accepts and never answers.
        let silent = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let uri = format!("http://{}/jwks", silent.local_addr().expect("addr"));
        let held = tokio::spawn(async move {
            let mut conns = Vec::new();
            while let Ok((s, _)) = silent.accept().await {
                conns.push(s);
            }
        });
        let rules = JwtRules::compile(&[rule(
            &uri,
            Some(prost_types::Duration {
                seconds: 0,
                nanos: 300_000_000,
            }),
        )])
        .expect("compiles");
        assert_eq!(
            rules.jwks_uris(),
            [(uri.clone(), std::time::Duration::from_millis(300))]
        );
        let token = format!(
            "{}.{}.c2ln",
            jwt::b64url_encode(br#"{"alg":"ES256","kid":"k1"}"#),
            jwt::b64url_encode(br#"{"iss":"https://slow.example","sub":"a"}"#)
        );
        let mut headers = HeaderMap::new();
        headers.insert(
            http::header::AUTHORIZATION,
            HeaderValue::from_str(&format!("Bearer {token}")).expect("header"),
        );
        let started = std::time::Instant::now();
        let result = rules
            .authenticate(&mut headers, None, 1, &JwksCache::default())
            .await;
        let waited = started.elapsed();
        assert!(result.is_err(), "no keys, no valid token");
        assert!(
            waited >= std::time::Duration::from_millis(250)
                && waited < std::time::Duration::from_secs(3),
            "waited {waited:?}"
        );
        held.abort();

        // A zero timeout is refused with the rule named; none means the default.
        let e = JwtRules::compile(&[rule(&uri, Some(prost_types::Duration::default()))])
            .expect_err("zero");
        assert!(e.contains("shop/jwt") && e.contains("timeout"), "{e}");
        let rules = JwtRules::compile(&[rule(&uri, None)]).expect("compiles");
        assert_eq!(rules.jwks_uris(), [(uri, JWKS_TIMEOUT)]);
    }
}
