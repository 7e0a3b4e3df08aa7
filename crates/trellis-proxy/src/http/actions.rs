//! What a route does besides forwarding: local answers (direct responses, redirects,
//! CORS preflights, injected faults), rewrites, mirrors, retry decisions, consistent-hash
//! keys.

use super::*;

/// The ring hash of a request under `key`, when the request has the key.
pub(super) fn request_hash(
    key: &crate::config::HashKey,
    ds: Downstream,
    req: &Request<ReqBody>,
) -> Option<u64> {
    use crate::config::{HashKey, stable_hash};
    match key {
        HashKey::Header(h) => req.headers().get(h).map(|v| stable_hash(v.as_bytes())),
        HashKey::SourceIp => Some(match ds.peer.ip() {
            IpAddr::V4(a) => stable_hash(&a.octets()),
            IpAddr::V6(a) => stable_hash(&a.octets()),
        }),
        HashKey::Query(name) => req.uri().query().and_then(|q| {
            q.split('&').find_map(|kv| {
                let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
                (k == name).then(|| stable_hash(v.as_bytes()))
            })
        }),
        HashKey::Cookie { name, .. } => req
            .headers()
            .get_all(header::COOKIE)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(';'))
            .find_map(|c| {
                let (k, v) = c.trim().split_once('=')?;
                (k == name).then(|| stable_hash(v.as_bytes()))
            }),
    }
}

/// Answers a CORS preflight (OPTIONS with Origin and Access-Control-Request-Method) from
/// an allowed origin; anything else goes on to the app.
pub(super) fn cors_preflight(
    cors: &crate::config::Cors,
    req: &Request<ReqBody>,
) -> Option<Response<ProxyBody>> {
    if req.method() != Method::OPTIONS
        || !req
            .headers()
            .contains_key(header::ACCESS_CONTROL_REQUEST_METHOD)
    {
        return None;
    }
    let origin = req.headers().get(header::ORIGIN)?;
    if !cors.allows(origin.to_str().ok()?) {
        return None;
    }
    let mut r = Response::new(ProxyBody::empty());
    let h = r.headers_mut();
    h.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, origin.clone());
    if let Some(v) = &cors.allow_methods {
        h.insert(header::ACCESS_CONTROL_ALLOW_METHODS, v.clone());
    }
    if let Some(v) = &cors.allow_headers {
        h.insert(header::ACCESS_CONTROL_ALLOW_HEADERS, v.clone());
    }
    if let Some(v) = &cors.max_age {
        h.insert(header::ACCESS_CONTROL_MAX_AGE, v.clone());
    }
    if cors.allow_credentials {
        h.insert(
            header::ACCESS_CONTROL_ALLOW_CREDENTIALS,
            HeaderValue::from_static("true"),
        );
    }
    Some(r)
}

/// A route that answers by itself: a direct response or a redirect.
pub(super) fn local_action(
    action: &crate::config::LocalAction,
    req: &Request<ReqBody>,
) -> Response<ProxyBody> {
    match action {
        crate::config::LocalAction::Direct { status, body } => {
            let mut r = Response::new(ProxyBody::text(body.clone()));
            *r.status_mut() = StatusCode::from_u16(*status).unwrap_or(StatusCode::OK);
            r.headers_mut()
                .insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
            r
        }
        crate::config::LocalAction::Redirect {
            code,
            uri,
            authority,
            scheme,
            port,
        } => {
            let req_authority = req
                .uri()
                .authority()
                .map(|a| a.as_str().to_string())
                .or_else(|| {
                    req.headers()
                        .get(header::HOST)
                        .and_then(|h| h.to_str().ok())
                        .map(str::to_string)
                })
                .unwrap_or_default();
            let mut host = authority.clone().unwrap_or(req_authority);
            if let Some(p) = port {
                let bare = match host.rsplit_once(':') {
                    Some((h, maybe_port)) if maybe_port.bytes().all(|c| c.is_ascii_digit()) => {
                        h.to_string()
                    }
                    _ => host.clone(),
                };
                host = format!("{bare}:{p}");
            }
            let scheme = scheme
                .as_deref()
                .or(req.uri().scheme_str())
                .unwrap_or("http");
            let path = uri.clone().unwrap_or_else(|| {
                req.uri()
                    .path_and_query()
                    .map_or("/".to_string(), |p| p.to_string())
            });
            let location = format!("{scheme}://{host}{path}");
            let mut r = Response::new(ProxyBody::empty());
            *r.status_mut() = StatusCode::from_u16(*code).unwrap_or(StatusCode::MOVED_PERMANENTLY);
            match HeaderValue::from_str(&location) {
                Ok(v) => {
                    r.headers_mut().insert(header::LOCATION, v);
                    r
                }
                Err(_) => local_reply(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "DPE",
                    "redirect target is not a valid header".to_string(),
                ),
            }
        }
    }
}

/// Rewrites the path (the matched prefix, or all of it) and the authority.
pub(super) fn apply_rewrite(
    req: &mut Request<ReqBody>,
    rw: &crate::config::Rewrite,
    prefix: Option<&str>,
) {
    let path = req.uri().path();
    let new_path = if let Some(u) = &rw.uri {
        Some(match prefix {
            Some(p) if path.len() >= p.len() && path[..p.len()].eq_ignore_ascii_case(p) => {
                format!("{u}{}", &path[p.len()..])
            }
            _ => u.clone(),
        })
    } else {
        rw.uri_regex
            .as_ref()
            .map(|(re, rep)| re.replace_all(path, rep.as_str()).into_owned())
    };
    let mut parts = std::mem::take(req.uri_mut()).into_parts();
    if let Some(np) = new_path {
        let pq = match parts.path_and_query.as_ref().and_then(|p| p.query()) {
            Some(q) => format!("{np}?{q}"),
            None => np,
        };
        if let Ok(pq) = http::uri::PathAndQuery::try_from(pq) {
            parts.path_and_query = Some(pq);
        }
    }
    if let Some(a) = &rw.authority {
        if parts.authority.is_some() {
            if let Ok(auth) = http::uri::Authority::try_from(a.as_bytes()) {
                parts.authority = Some(auth);
            }
        }
        req.headers_mut().insert(header::HOST, a.clone());
    }
    if let Ok(u) = Uri::from_parts(parts) {
        *req.uri_mut() = u;
    }
}

/// True for `percentage` percent of calls.
pub(super) fn roll(percentage: f64) -> bool {
    percentage >= 100.0 || (random_u64() % 1_000_000) as f64 / 10_000.0 < percentage
}

/// Injected delay and abort (flags DI, FI), then the request itself.
pub(super) async fn with_faults(
    shared: &Arc<Shared>,
    cfg: &crate::config::Config,
    ds: Downstream,
    target: &crate::config::Target,
    cluster: &Arc<crate::config::Cluster>,
    policy: &crate::config::RoutePolicy,
    req: Request<ReqBody>,
) -> Response<ProxyBody> {
    if let Some((delay, pct)) = policy.delay {
        if roll(pct) {
            Box::pin(tokio::time::sleep(delay)).await;
        }
    }
    if let Some(abort) = policy.abort {
        if roll(abort.percentage) {
            return match abort.kind {
                crate::config::AbortKind::Http(code) => local_reply(
                    StatusCode::from_u16(code).unwrap_or(StatusCode::SERVICE_UNAVAILABLE),
                    "FI",
                    "fault filter abort".to_string(),
                ),
                crate::config::AbortKind::Grpc(code) => {
                    let mut r = local_reply(StatusCode::OK, "FI", String::new());
                    let h = r.headers_mut();
                    h.insert(
                        header::CONTENT_TYPE,
                        HeaderValue::from_static("application/grpc"),
                    );
                    h.insert("grpc-status", HeaderValue::from(u16::from(code)));
                    h.insert(
                        "grpc-message",
                        HeaderValue::from_static("fault filter abort"),
                    );
                    *r.body_mut() = ProxyBody::empty();
                    r
                }
            };
        }
    }
    let retry = policy.retry.as_ref().unwrap_or(&shared.default_retry);
    to_cluster(
        shared,
        cfg,
        ds,
        target,
        cluster,
        retry,
        &policy.mirrors,
        req,
    )
    .await
}

/// Most mirrored requests in flight at once: mirroring has its own budget and never
/// queues behind, slows or fails the primary request.
pub(super) const MAX_MIRRORS_IN_FLIGHT: usize = 256;

/// Sends a copy of a request to the mirror's cluster without waiting for it.
pub(super) fn mirror(
    shared: &Arc<Shared>,
    m: &crate::config::Mirror,
    parts: &http::request::Parts,
    body: Option<bytes::Bytes>,
) {
    let Some(cluster) = m.cluster.clone() else {
        Stats::inc(&shared.stats.mirror_skipped_total);
        return;
    };
    if shared.mirrors_in_flight.fetch_add(1, Ordering::Relaxed) >= MAX_MIRRORS_IN_FLIGHT {
        shared.mirrors_in_flight.fetch_sub(1, Ordering::Relaxed);
        Stats::inc(&shared.stats.mirror_skipped_total);
        return;
    }
    let mut req = clone_parts(parts);
    // Istio's convention: the mirror sees the host with a "-shadow" suffix.
    let host = req
        .headers
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .map(str::to_string)
        .or_else(|| parts.uri.authority().map(|a| a.to_string()));
    if let Some(host) = host {
        let shadow = match host.rsplit_once(':') {
            Some((h, p)) if p.bytes().all(|c| c.is_ascii_digit()) => format!("{h}-shadow:{p}"),
            _ => format!("{host}-shadow"),
        };
        if let Ok(v) = HeaderValue::from_str(&shadow) {
            req.headers.insert(header::HOST, v);
            if parts.uri.authority().is_some() {
                let mut p = std::mem::take(&mut req.uri).into_parts();
                p.authority = http::uri::Authority::try_from(shadow.as_str()).ok();
                if let Ok(u) = Uri::from_parts(p) {
                    req.uri = u;
                }
            }
        }
    }
    Stats::inc(&shared.stats.mirror_requests_total);
    let shared = Arc::clone(shared);
    tokio::spawn(async move {
        if let Some(ep) = cluster.pick() {
            let version = req.version;
            let cfg = shared.config.load_full();
            let mesh = shared.mesh_tls(&cfg);
            let up = Upstream::endpoint(ep, &cluster, version == Version::HTTP_2, false, mesh);
            match forward_once(&shared, &mut req, version, ReqBody::Buffered(body), &up).await {
                // Read the answer to the end so that the connection can be reused.
                Ok(resp) => {
                    let _ = http_body_util::BodyExt::collect(resp.into_body()).await;
                }
                Err(e) => tracing::debug!("mirror to {}: {e}", cluster.name),
            }
        }
        shared.mirrors_in_flight.fetch_sub(1, Ordering::Relaxed);
    });
}

/// 503 UO: the cluster's connection-pool limits are reached.
pub(super) fn overflow(cluster: &crate::config::Cluster) -> Response<ProxyBody> {
    tracing::info!(flags = "UO", cluster = %cluster.name, "connection pool limits reached");
    local_reply(
        StatusCode::SERVICE_UNAVAILABLE,
        "UO",
        "upstream connect error or disconnect/reset before headers. reset reason: overflow"
            .to_string(),
    )
}

/// Whether a response calls for another try under `on`.
pub(super) fn retriable_response(on: &RetryOn, resp: &Response<ProxyBody>) -> bool {
    let s = resp.status().as_u16();
    if (on.five_xx && s >= 500)
        || (on.gateway_error && matches!(s, 502..=504))
        || (on.retriable_4xx && s == 409)
        || on.status_codes.contains(&s)
    {
        return true;
    }
    !on.grpc.is_empty()
        && resp
            .headers()
            .get("grpc-status")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u8>().ok())
            .is_some_and(|c| on.grpc.contains(&c))
}

/// Whether a failure calls for another try under `on`. A request that may have reached
/// the upstream is retried on a reset only when it is idempotent or the policy lists
/// `reset` itself.
pub(super) fn retriable_error(on: &RetryOn, e: &UpstreamError, method: &Method) -> bool {
    match e {
        UpstreamError::Connect { .. } => on.connect_failure || on.five_xx || on.gateway_error,
        UpstreamError::Request { .. } => {
            let idempotent = matches!(
                *method,
                Method::GET
                    | Method::HEAD
                    | Method::OPTIONS
                    | Method::PUT
                    | Method::DELETE
                    | Method::TRACE
            );
            on.reset || (idempotent && (on.five_xx || on.refused_stream))
        }
        UpstreamError::Timeout { .. } => on.five_xx || on.gateway_error,
    }
}
