//! The admin server (15000, localhost by default) and the public endpoints: readiness
//! (15021) and, with `--stats`, Prometheus (Istio's 15020).
//!
//! The public listeners answer `/healthz/ready` (and `/ready`, `/healthz`) and
//! `/stats/prometheus` only: the rest (the configuration, log levels, `/quitquitquit`)
//! is for the admin port, which listens on localhost, so that no other workload can
//! read the proxy's configuration or stop it.
//!
//! | Path | |
//! |---|---|
//! | `GET /ready`, `GET /healthz` | 200 when serving (503 while draining) |
//! | `GET /healthz/ready` | the readiness probe (also on 15021) |
//! | `GET /config_dump` | the snapshot in use, as JSON (secrets redacted) |
//! | `GET /clusters` | endpoints with health and counters, as JSON |
//! | `GET /stats/prometheus` | proxy counters, Prometheus text format |
//! | `POST /logging?level=debug` | log filter (tracing `EnvFilter` syntax) |
//! | `POST /quitquitquit` | drain and exit |

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use serde_json::json;
use tokio::net::TcpListener;
use tokio::sync::Notify;

use crate::proxy::Shared;

/// Changes the log filter; returns an error message for a bad filter.
pub type SetLogLevel = Box<dyn Fn(&str) -> Result<(), String> + Send + Sync>;

/// What the admin endpoints act on.
pub struct AdminContext {
    pub shared: Arc<Shared>,
    pub set_log_level: Option<SetLogLevel>,
    /// Notified by `/quitquitquit`.
    pub quit: Arc<Notify>,
    /// False while draining: readiness then fails so no new traffic is sent here.
    pub ready: Arc<AtomicBool>,
}

impl std::fmt::Debug for AdminContext {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AdminContext").finish_non_exhaustive()
    }
}

/// Serves admin requests on `listener` until the task is dropped.
pub async fn serve(listener: TcpListener, ctx: Arc<AdminContext>) {
    serve_scoped(listener, ctx, false).await;
}

/// Serves the public endpoints (readiness and Prometheus) on `listener`.
pub async fn serve_public(listener: TcpListener, ctx: Arc<AdminContext>) {
    serve_scoped(listener, ctx, true).await;
}

async fn serve_scoped(listener: TcpListener, ctx: Arc<AdminContext>, public: bool) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            continue;
        };
        let ctx = Arc::clone(&ctx);
        tokio::spawn(async move {
            let svc = service_fn(move |req| {
                let ctx = Arc::clone(&ctx);
                async move {
                    let public_path = matches!(
                        req.uri().path(),
                        "/ready" | "/healthz" | "/healthz/ready" | "/stats/prometheus"
                    );
                    Ok::<_, Infallible>(if public && !public_path {
                        reply(
                            StatusCode::NOT_FOUND,
                            "text/plain",
                            "/healthz/ready /stats/prometheus (the rest is on the admin port)\n",
                        )
                    } else {
                        route(&ctx, req)
                    })
                }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(std::time::Duration::from_secs(10))
                .serve_connection(TokioIo::new(stream), svc)
                .await;
        });
    }
}

fn reply(
    status: StatusCode,
    content_type: &'static str,
    body: impl Into<Bytes>,
) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(body.into()));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static(content_type),
    );
    r
}

fn json_reply(v: &serde_json::Value) -> Response<Full<Bytes>> {
    let text = serde_json::to_string_pretty(v).unwrap_or_default();
    reply(StatusCode::OK, "application/json", text)
}

fn route(ctx: &AdminContext, req: Request<Incoming>) -> Response<Full<Bytes>> {
    let cfg = ctx.shared.config.load_full();
    // Ready once serving with a configuration (with --xds, the control plane's first
    // snapshot), and until draining starts.
    let ready = ctx.ready.load(Ordering::Relaxed) && ctx.shared.is_configured();
    match (req.method(), req.uri().path()) {
        (&Method::GET, "/ready" | "/healthz" | "/healthz/ready") => {
            if ready {
                reply(StatusCode::OK, "text/plain", "LIVE\n")
            } else if !ctx.shared.is_configured() {
                reply(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "text/plain",
                    "NOT READY: waiting for the control plane's first configuration\n",
                )
            } else {
                reply(StatusCode::SERVICE_UNAVAILABLE, "text/plain", "DRAINING\n")
            }
        }
        (&Method::GET, "/config_dump") => json_reply(&json!({
            "version": cfg.version,
            "snapshot": cfg.raw().to_json(),
            "certificates": certificates(&ctx.shared),
        })),
        (&Method::GET, "/clusters") => {
            let (idle, h2) = ctx.shared.pools.snapshot();
            let clusters: Vec<_> = cfg
                .clusters
                .iter()
                .map(|c| {
                    json!({
                        "name": &*c.name,
                        "endpoints": c.endpoints.iter().map(|e| json!({
                            "address": e.addr.to_string(),
                            "healthy": e.healthy,
                            "proxied": e.proxied,
                            "identity": e.identity,
                            "locality": e.locality,
                            "requests": e.stats.requests.load(Ordering::Relaxed),
                            "errors": e.stats.errors.load(Ordering::Relaxed),
                            "connectFailures": e.stats.connect_failures.load(Ordering::Relaxed),
                            "active": e.stats.active.load(Ordering::Relaxed),
                            "idleHttp1Connections": idle.get(&e.addr).copied().unwrap_or(0),
                            "http2Connected": h2.contains(&e.addr),
                        })).collect::<Vec<_>>(),
                    })
                })
                .collect();
            json_reply(&json!({ "clusters": clusters }))
        }
        (&Method::GET, "/stats/prometheus" | "/stats") => {
            let mut text = ctx
                .shared
                .stats
                .render(&cfg, ctx.shared.credentials.current().as_deref());
            ctx.shared.istio.render(&mut text);
            reply(StatusCode::OK, "text/plain; version=0.0.4", text)
        }
        (&Method::POST, "/logging") => {
            let level = req.uri().query().and_then(|q| {
                q.split('&')
                    .find_map(|kv| kv.strip_prefix("level="))
                    .map(str::to_string)
            });
            match (level, &ctx.set_log_level) {
                (None, _) => reply(
                    StatusCode::BAD_REQUEST,
                    "text/plain",
                    "usage: POST /logging?level=info,trellis_proxy=debug\n",
                ),
                (Some(_), None) => reply(
                    StatusCode::NOT_IMPLEMENTED,
                    "text/plain",
                    "log level cannot be changed in this process\n",
                ),
                (Some(l), Some(set)) => match set(&l) {
                    Ok(()) => reply(StatusCode::OK, "text/plain", format!("log level: {l}\n")),
                    Err(e) => reply(StatusCode::BAD_REQUEST, "text/plain", format!("{e}\n")),
                },
            }
        }
        (&Method::POST, "/quitquitquit") => {
            ctx.ready.store(false, Ordering::Relaxed);
            ctx.quit.notify_waiters();
            ctx.quit.notify_one();
            reply(StatusCode::OK, "text/plain", "draining\n")
        }
        (_, "/logging" | "/quitquitquit") => {
            reply(StatusCode::METHOD_NOT_ALLOWED, "text/plain", "use POST\n")
        }
        _ => reply(
            StatusCode::NOT_FOUND,
            "text/plain",
            "admin: /ready /healthz /healthz/ready /config_dump /clusters /stats/prometheus POST /logging?level= POST /quitquitquit\n",
        ),
    }
}

/// The workload certificate in use, as an operator wants to see it: never the key.
fn certificates(shared: &Shared) -> serde_json::Value {
    let unix = |t: std::time::SystemTime| {
        t.duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs())
    };
    match shared.credentials.current() {
        None => json!([]),
        Some(c) => json!([{
            "identity": c.spiffe,
            "serial": c.serial,
            "notBefore": unix(c.not_before),
            "notAfter": unix(c.not_after),
            "renewAt": unix(c.renew_at()),
            "chainLength": c.key.cert.len(),
        }]),
    }
}
