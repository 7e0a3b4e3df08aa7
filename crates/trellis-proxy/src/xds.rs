//! The proxy's side of Delta ADS: one stream to the control plane, announcing the
//! instance this proxy runs beside, applying each snapshot it receives (ACK) or refusing
//! it with the reason (NACK), and reconnecting with exponential backoff and jitter when
//! the stream breaks. While disconnected the proxy keeps serving its last good snapshot;
//! on reconnect it says which version it has.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderValue, Method, Request};
use http_body::{Body, Frame};
use hyper::client::conn::http2;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::sync::mpsc;
use trellis_xds::ads::{
    Announce, DELTA_ADS_PATH, Deframer, DeltaDiscoveryRequest, DeltaDiscoveryResponse,
    SNAPSHOT_TYPE_URL, Status, frame, snapshot_of,
};

use crate::config::{Config, LoadEnv};
use crate::proxy::Shared;
use crate::stats::Stats;

struct ChannelBody(mpsc::Receiver<Bytes>);

impl Body for ChannelBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        self.0.poll_recv(cx).map(|b| b.map(|b| Ok(Frame::data(b))))
    }
}

/// Follows the control plane at `addr` until the runtime stops.
pub async fn follow(addr: SocketAddr, announce: Announce, shared: Arc<Shared>, env: LoadEnv) {
    follow_with_token(addr, announce, None, shared, env).await;
}

/// As [`follow`], presenting a bootstrap token (`authorization: Bearer`).
pub async fn follow_with_token(
    addr: SocketAddr,
    announce: Announce,
    token: Option<String>,
    shared: Arc<Shared>,
    env: LoadEnv,
) {
    follow_inner(addr, announce, move || Ok(token.clone()), shared, env).await;
}

/// As [`follow`], reading the bootstrap token from `path` before every connection (a
/// renewed token is picked up without a restart).
pub async fn follow_with_token_file(
    addr: SocketAddr,
    announce: Announce,
    path: std::path::PathBuf,
    shared: Arc<Shared>,
    env: LoadEnv,
) {
    let read = move || {
        std::fs::read_to_string(&path)
            .map(|t| Some(t.trim().to_string()))
            .map_err(|e| format!("reading the token {}: {e}", path.display()))
    };
    follow_inner(addr, announce, read, shared, env).await;
}

async fn follow_inner(
    addr: SocketAddr,
    announce: Announce,
    token: impl Fn() -> Result<Option<String>, String>,
    shared: Arc<Shared>,
    env: LoadEnv,
) {
    let mut backoff = Duration::from_millis(100);
    loop {
        let result = match token() {
            Ok(t) => session(addr, &announce, t.as_deref(), &shared, &env).await,
            Err(e) => Err(e),
        };
        match result {
            Ok(()) => {
                tracing::info!("control plane {addr} closed the stream; reconnecting");
                backoff = Duration::from_millis(100);
            }
            Err(e) => {
                tracing::warn!("control plane {addr}: {e}; reconnecting in about {backoff:?}")
            }
        }
        // Full jitter over [backoff/2, backoff], doubling up to 5 s.
        let jitter = crate::http::random_u64() % (backoff.as_millis() as u64 / 2 + 1);
        tokio::time::sleep(backoff / 2 + Duration::from_millis(jitter)).await;
        backoff = (backoff * 2).min(Duration::from_secs(5));
    }
}

/// One stream; returns when it ends.
async fn session(
    addr: SocketAddr,
    announce: &Announce,
    token: Option<&str>,
    shared: &Arc<Shared>,
    env: &LoadEnv,
) -> Result<(), String> {
    let stream = crate::sockets::connect(addr, Duration::from_secs(5))
        .await
        .map_err(|e| e.to_string())?;
    let (mut sender, conn) = http2::Builder::new(TokioExecutor::new())
        .timer(TokioTimer::new())
        .keep_alive_interval(Duration::from_secs(15))
        .keep_alive_timeout(Duration::from_secs(10))
        .handshake(TokioIo::new(stream))
        .await
        .map_err(|e| e.to_string())?;
    tokio::spawn(async move {
        if let Err(e) = conn.await {
            tracing::debug!("xDS connection: {e}");
        }
    });
    let (tx, rx) = mpsc::channel::<Bytes>(8);
    let mut req = Request::new(ChannelBody(rx));
    *req.method_mut() = Method::POST;
    *req.uri_mut() = format!("http://{addr}{DELTA_ADS_PATH}")
        .parse()
        .map_err(|e| format!("{e}"))?;
    let h = req.headers_mut();
    h.insert(
        http::header::CONTENT_TYPE,
        HeaderValue::from_static("application/grpc"),
    );
    h.insert(http::header::TE, HeaderValue::from_static("trailers"));
    if let Some(t) = token {
        h.insert(
            http::header::AUTHORIZATION,
            HeaderValue::from_str(&format!("Bearer {t}")).map_err(|e| e.to_string())?,
        );
    }
    let current = shared.config.load();
    let first = DeltaDiscoveryRequest {
        node: Some(announce.to_node()),
        type_url: SNAPSHOT_TYPE_URL.to_string(),
        resource_names_subscribe: vec!["*".to_string()],
        initial_resource_versions: if current.version.is_empty() {
            Default::default()
        } else {
            [(announce.name.clone(), current.version.clone())]
                .into_iter()
                .collect()
        },
        ..Default::default()
    };
    drop(current);
    tx.send(Bytes::from(frame(&first)))
        .await
        .map_err(|_| "request stream closed".to_string())?;
    let resp = sender.send_request(req).await.map_err(|e| e.to_string())?;
    let mut body = resp.into_body();
    let mut deframer = Deframer::default();
    tracing::info!("connected to the control plane at {addr}");
    while let Some(f) = std::future::poll_fn(|cx| Pin::new(&mut body).poll_frame(cx)).await {
        let f = f.map_err(|e| e.to_string())?;
        let f = match f.into_data() {
            Ok(d) => {
                deframer.push(&d);
                continue_with(&mut deframer, shared, env, &tx).await?;
                continue;
            }
            Err(f) => f,
        };
        if let Some(t) = f.trailers_ref() {
            let status = t
                .get("grpc-status")
                .and_then(|v| v.to_str().ok())
                .unwrap_or("0");
            if status != "0" {
                let msg = t
                    .get("grpc-message")
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or("");
                return Err(format!("grpc-status {status}: {msg}"));
            }
        }
    }
    Ok(())
}

/// Applies every complete response, answering each with an ACK or a NACK.
async fn continue_with(
    deframer: &mut Deframer,
    shared: &Arc<Shared>,
    env: &LoadEnv,
    tx: &mpsc::Sender<Bytes>,
) -> Result<(), String> {
    while let Some(resp) = deframer
        .next_message::<DeltaDiscoveryResponse>()
        .map_err(|e| e.to_string())?
    {
        let mut error = None;
        for r in &resp.resources {
            let current = shared.config.load_full();
            // Converting may resolve DNS names and read certificate files: off this thread,
            // which also keeps the stream's keepalive answered.
            let result = match snapshot_of(r) {
                Err(e) => Err(e),
                Ok(raw) => {
                    let (prev, env) = (Arc::clone(&current), env.clone());
                    tokio::task::spawn_blocking(move || {
                        Config::from_wire_with(raw, Some(&prev), &env).map_err(|e| e.to_string())
                    })
                    .await
                    .unwrap_or_else(|e| Err(e.to_string()))
                }
            };
            match result {
                Ok(cfg) => shared.update(cfg),
                Err(e) => {
                    Stats::inc(&shared.stats.config_rejections_total);
                    tracing::error!(
                        "snapshot {:?} refused, keeping version {:?}: {e}",
                        r.version,
                        current.version
                    );
                    error = Some(e);
                }
            }
        }
        let answer = DeltaDiscoveryRequest {
            type_url: SNAPSHOT_TYPE_URL.to_string(),
            response_nonce: resp.nonce.clone(),
            error_detail: error.map(|message| Status { code: 3, message }),
            ..Default::default()
        };
        tx.send(Bytes::from(frame(&answer)))
            .await
            .map_err(|_| "request stream closed".to_string())?;
    }
    Ok(())
}
