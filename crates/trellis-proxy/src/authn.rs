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
    jwks: Jwks,
    locations: Vec<Location>,
    forward_original_token: bool,
    output_payload_to_header: Option<HeaderName>,
    output_claim_to_headers: Vec<(HeaderName, Vec<String>)>,
}

/// A workload's jwtRules.
#[derive(Debug, Clone, Default)]
pub struct JwtRules(Vec<JwtRule>);

fn header_name(what: &str, name: &str) -> Result<HeaderName, String> {
    HeaderName::from_bytes(name.as_bytes())
        .map_err(|_| format!("{what}: {name:?} is not a header name"))
}

impl JwtRules {
    /// Compiles the snapshot's rules. `jwksUri` is not fetched yet: a rule with only a URI
    /// has no keys, so its tokens are refused (never accepted unchecked).
    pub fn compile(rules: &[wire::JwtRule]) -> Result<JwtRules, String> {
        let mut out = Vec::with_capacity(rules.len());
        for (i, r) in rules.iter().enumerate() {
            let at = |e: String| format!("workload.jwtRules[{i}] ({}): {e}", r.policy);
            if r.issuer.is_empty() {
                return Err(at("no issuer".into()));
            }
            let jwks = match (&r.jwks, &r.jwks_uri) {
                (Some(doc), _) => Jwks::parse(doc).map_err(at)?,
                (None, Some(uri)) => {
                    tracing::warn!(policy = %r.policy, issuer = %r.issuer, "jwksUri {uri} is not fetched yet: tokens of this issuer are refused (401); give the keys inline (jwks)");
                    Jwks::default()
                }
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
                jwks,
                locations,
                forward_original_token: r.forward_original_token,
                output_payload_to_header,
                output_claim_to_headers,
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
    pub fn authenticate(
        &self,
        headers: &mut HeaderMap,
        query: Option<&str>,
        now: u64,
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
        let claims = jwt::verify(&token, &rule.jwks, &rule.issuer, &rule.audiences, now)
            .map_err(|e| (e, Some(rule.policy.as_str())))?;
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
