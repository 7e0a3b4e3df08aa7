//! The control plane's debug and monitoring HTTP endpoint (Istio's 15014):
//! `GET /debug/proxy-status` (every connected proxy as JSON, what `trellis proxy-status`
//! shows) and `GET /metrics` (Prometheus text).

use std::convert::Infallible;
use std::sync::Arc;
use std::time::UNIX_EPOCH;

use bytes::Bytes;
use http::{HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

use crate::server::ControlPlane;

/// The proxies' status as JSON.
pub fn status_json(cp: &ControlPlane) -> serde_json::Value {
    let list: Vec<serde_json::Value> = cp
        .status()
        .into_iter()
        .map(|s| {
            serde_json::json!({
                "id": s.id,
                "instance": s.instance,
                "namespace": s.namespace,
                "identity": s.identity,
                "sentVersion": s.sent.as_ref().map(|(v, _)| v.clone()),
                "sentAtUnix": s.sent.as_ref().and_then(|(_, t)| t.duration_since(UNIX_EPOCH).ok()).map(|d| d.as_secs()),
                "ackedVersion": s.acked,
                "nackedVersion": s.nacked.as_ref().map(|(v, _)| v.clone()),
                "nackError": s.nacked.as_ref().map(|(_, e)| e.clone()),
                "certificateExpiryUnix": s.certificate_expiry.and_then(|t| t.duration_since(UNIX_EPOCH).ok()).map(|d| d.as_secs()),
            })
        })
        .collect();
    serde_json::Value::Array(list)
}

fn reply(status: StatusCode, ctype: &'static str, body: String) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    r.headers_mut()
        .insert(http::header::CONTENT_TYPE, HeaderValue::from_static(ctype));
    r
}

async fn handle(
    cp: Arc<ControlPlane>,
    req: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    Ok(match (req.method(), req.uri().path()) {
        (&Method::GET, "/debug/proxy-status") => reply(
            StatusCode::OK,
            "application/json",
            status_json(&cp).to_string(),
        ),
        (&Method::GET, "/debug/config_dump") => {
            // ?proxy=<instance>.<namespace>
            let proxy = req.uri().query().and_then(|q| {
                q.split('&')
                    .find_map(|kv| kv.strip_prefix("proxy="))
                    .map(str::to_string)
            });
            let found = proxy
                .as_deref()
                .and_then(|p| p.rsplit_once('.'))
                .and_then(|(name, ns)| cp.last_snapshot(name, ns));
            match (proxy, found) {
                (Some(_), Some(snap)) => reply(
                    StatusCode::OK,
                    "application/json",
                    snap.to_json().to_string(),
                ),
                (Some(p), None) => reply(
                    StatusCode::NOT_FOUND,
                    "text/plain",
                    format!("no connected proxy {p:?} (trellis proxy-status lists them)\n"),
                ),
                (None, _) => reply(
                    StatusCode::BAD_REQUEST,
                    "text/plain",
                    "give ?proxy=<instance>.<namespace>\n".to_string(),
                ),
            }
        }
        (&Method::GET, "/metrics") => {
            let st = cp.status();
            let nacking = st.iter().filter(|s| {
                s.nacked
                    .as_ref()
                    .is_some_and(|(v, _)| Some(v) == s.sent.as_ref().map(|(sv, _)| sv))
            });
            let mut text = format!(
                "# HELP trellis_control_connected_proxies Proxies connected now.\n# TYPE trellis_control_connected_proxies gauge\ntrellis_control_connected_proxies {}\n# HELP trellis_control_pushes_total Snapshots sent.\n# TYPE trellis_control_pushes_total counter\ntrellis_control_pushes_total {}\n# HELP trellis_control_nacking_proxies Proxies that refused the latest snapshot sent to them.\n# TYPE trellis_control_nacking_proxies gauge\ntrellis_control_nacking_proxies {}\n# HELP trellis_control_certificates_issued_total Workload certificates the CA signed.\n# TYPE trellis_control_certificates_issued_total counter\ntrellis_control_certificates_issued_total {}\n# HELP trellis_control_pushes_in_flight Pushes sent and not yet answered (bounded by --push-concurrency).\n# TYPE trellis_control_pushes_in_flight gauge\ntrellis_control_pushes_in_flight {}\n",
                st.len(),
                cp.pushes(),
                nacking.count(),
                cp.certificates_issued(),
                cp.pushes_in_flight(),
            );
            text.push_str("# HELP trellis_control_resources_sent_total Resources sent to proxies, by type (proxy parts, services, clusters): only those that changed.\n# TYPE trellis_control_resources_sent_total counter\n");
            for (kind, n) in cp.resources_sent_by_type() {
                text.push_str(&format!(
                    "trellis_control_resources_sent_total{{type=\"{kind}\"}} {n}\n"
                ));
            }
            cp.push_seconds.render(
                "trellis_control_push_seconds",
                "Time to translate a configuration change for every connected proxy and hand each its snapshot.",
                &mut text,
            );
            cp.convergence_seconds.render(
                "trellis_control_proxy_convergence_seconds",
                "Time from sending a proxy a snapshot to its acknowledgement of that snapshot.",
                &mut text,
            );
            cp.config_convergence_seconds.render(
                "trellis_control_config_convergence_seconds",
                "Time from a configuration change (the first of a debounced burst) to each affected proxy's acknowledgement of it.",
                &mut text,
            );
            cp.translation_seconds.render(
                "trellis_control_translation_seconds",
                "Time spent translating the configuration for every connected proxy, per push.",
                &mut text,
            );
            reply(StatusCode::OK, "text/plain; version=0.0.4", text)
        }
        _ => reply(
            StatusCode::NOT_FOUND,
            "text/plain",
            "not found\n".to_string(),
        ),
    })
}

/// Serves the debug endpoint on `listener` until this future is dropped.
pub async fn serve(listener: TcpListener, cp: Arc<ControlPlane>) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            continue;
        };
        let cp = Arc::clone(&cp);
        tokio::spawn(async move {
            let service = service_fn(move |req| handle(Arc::clone(&cp), req));
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}
