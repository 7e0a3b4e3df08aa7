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
use rustls::pki_types::ServerName;
use tokio::sync::mpsc;
use trellis_xds::ads::{
    Announce, DELTA_ADS_PATH, Deframer, DeltaDiscoveryRequest, DeltaDiscoveryResponse,
    SNAPSHOT_TYPE_URL, Status, frame,
};

use trellis_xds::delta::Held;

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

/// Where the control plane is, and how to reach it: cleartext, or TLS verified against
/// the mesh's trust bundle and a name in the control plane's certificate.
#[derive(Clone)]
pub struct Endpoint {
    pub addr: SocketAddr,
    tls: Option<(Arc<rustls::ClientConfig>, ServerName<'static>)>,
    /// The roots the endpoint was made with (`--xds-root`).
    roots: Option<Arc<rustls::RootCertStore>>,
}

impl std::fmt::Debug for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Endpoint")
            .field("addr", &self.addr)
            .field("tls", &self.tls.as_ref().map(|(_, n)| n))
            .finish()
    }
}

impl From<SocketAddr> for Endpoint {
    fn from(addr: SocketAddr) -> Endpoint {
        Endpoint {
            addr,
            tls: None,
            roots: None,
        }
    }
}

impl Endpoint {
    /// TLS to `addr`: the control plane's certificate must chain to a root of `roots_pem`
    /// and name `server_name` (a DNS name or an IP address).
    pub fn tls(addr: SocketAddr, roots_pem: &str, server_name: &str) -> Result<Endpoint, String> {
        let roots = trellis_identity::tls::roots(roots_pem).map_err(|e| e.to_string())?;
        let config = trellis_identity::tls::client_config_with(roots.clone(), &[b"h2"])
            .map_err(|e| e.to_string())?;
        let name = ServerName::try_from(server_name.to_string())
            .map_err(|_| format!("{server_name:?} is not a DNS name or an IP address"))?;
        Ok(Endpoint {
            addr,
            tls: Some((Arc::new(config), name)),
            roots: Some(Arc::new(roots)),
        })
    }

    /// The same endpoint, also trusting the mesh's current trust bundle (from the last
    /// snapshot): after a root rotation the proxy still reaches a control plane whose
    /// certificate comes from the new root, though `--xds-root` names only the old one.
    fn trusting(&self, bundle: Option<&rustls::RootCertStore>) -> Endpoint {
        let (Some((_, name)), Some(base), Some(bundle)) = (&self.tls, &self.roots, bundle) else {
            return self.clone();
        };
        let mut roots = (**base).clone();
        roots.roots.extend(bundle.roots.iter().cloned());
        match trellis_identity::tls::client_config_with(roots, &[b"h2"]) {
            Ok(config) => Endpoint {
                addr: self.addr,
                tls: Some((Arc::new(config), name.clone())),
                roots: self.roots.clone(),
            },
            Err(e) => {
                tracing::warn!("the mesh's trust bundle: {e}; using --xds-root alone");
                self.clone()
            }
        }
    }

    /// [`Endpoint::trusting`] the bundle of `shared`'s snapshot.
    pub fn trusting_snapshot(&self, shared: &Shared) -> Endpoint {
        self.trusting(shared.config.load().trust_roots.as_deref())
    }

    pub fn is_tls(&self) -> bool {
        self.tls.is_some()
    }

    /// A new HTTP/2 connection; its driver runs on a task of its own.
    async fn connect(&self) -> Result<http2::SendRequest<ChannelBody>, String> {
        let stream = crate::sockets::connect(self.addr, Duration::from_secs(5))
            .await
            .map_err(|e| e.to_string())?;
        let Some((config, name)) = &self.tls else {
            return handshake(stream).await;
        };
        let connector = tokio_rustls::TlsConnector::from(Arc::clone(config));
        let tls = tokio::time::timeout(
            Duration::from_secs(10),
            connector.connect(name.clone(), stream),
        )
        .await
        .map_err(|_| "no TLS handshake within 10 s".to_string())?
        .map_err(|e| format!("TLS: {e}"))?;
        if tls.get_ref().1.alpn_protocol() != Some(b"h2") {
            return Err("TLS: the server did not agree on HTTP/2 (ALPN h2)".into());
        }
        handshake(tls).await
    }
}

async fn handshake<S>(stream: S) -> Result<http2::SendRequest<ChannelBody>, String>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (sender, conn) = http2::Builder::new(TokioExecutor::new())
        .timer(TokioTimer::new())
        .keep_alive_interval(Duration::from_secs(15))
        .keep_alive_timeout(Duration::from_secs(10))
        .handshake(TokioIo::new(stream))
        .await
        .map_err(|e| error_chain(&e))?;
    tokio::spawn(async move {
        if let Err(e) = conn.await {
            tracing::debug!("xDS connection: {e}");
        }
    });
    Ok(sender)
}

/// An error and its sources, for a log line that says what happened
/// ("connection error: frame with invalid size").
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(src) = cur {
        s.push_str(": ");
        s.push_str(&src.to_string());
        cur = src.source();
    }
    s
}

/// The bootstrap token a proxy shows the control plane.
#[derive(Debug, Clone, Default)]
pub enum Token {
    #[default]
    None,
    Fixed(String),
    /// Read before every connection, so a renewed token is picked up without a restart.
    File(std::path::PathBuf),
}

impl Token {
    pub fn read(&self) -> Result<Option<String>, String> {
        match self {
            Token::None => Ok(None),
            Token::Fixed(t) => Ok(Some(t.clone())),
            Token::File(path) => std::fs::read_to_string(path)
                .map(|t| Some(t.trim().to_string()))
                .map_err(|e| format!("reading the token {}: {e}", path.display())),
        }
    }
}

/// A gRPC request on `path` with the token: its head, and the channel its body is fed from.
fn grpc_request(
    ep: &Endpoint,
    path: &str,
    token: Option<&str>,
) -> Result<(Request<ChannelBody>, mpsc::Sender<Bytes>), String> {
    let (tx, rx) = mpsc::channel::<Bytes>(8);
    let mut req = Request::new(ChannelBody(rx));
    *req.method_mut() = Method::POST;
    let scheme = if ep.is_tls() { "https" } else { "http" };
    *req.uri_mut() = format!("{scheme}://{}{path}", ep.addr)
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
    Ok((req, tx))
}

/// The error a gRPC response's trailers carry, if any.
fn grpc_error(trailers: &http::HeaderMap) -> Option<String> {
    let status = trailers
        .get("grpc-status")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("0");
    if status == "0" {
        return None;
    }
    let msg = trailers
        .get("grpc-message")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    Some(format!("grpc-status {status}: {msg}"))
}

/// A unary gRPC call on a connection of its own (certificate requests: rare).
pub async fn unary<Req: prost::Message, Resp: prost::Message + Default>(
    ep: &Endpoint,
    path: &str,
    token: Option<&str>,
    message: &Req,
) -> Result<Resp, String> {
    let mut sender = ep.connect().await?;
    let (req, tx) = grpc_request(ep, path, token)?;
    tx.send(Bytes::from(frame(message)))
        .await
        .map_err(|_| "request stream closed".to_string())?;
    drop(tx);
    let call = async {
        let resp = sender.send_request(req).await.map_err(|e| e.to_string())?;
        if let Some(e) = grpc_error(resp.headers()) {
            return Err(e);
        }
        let mut body = resp.into_body();
        let mut deframer = Deframer::default();
        let mut message = None;
        while let Some(f) = std::future::poll_fn(|cx| Pin::new(&mut body).poll_frame(cx)).await {
            match f.map_err(|e| e.to_string())?.into_data() {
                Ok(d) => {
                    deframer.push(&d);
                    if let Some(m) = deframer.next_message::<Resp>().map_err(|e| e.to_string())? {
                        message = Some(m);
                    }
                }
                Err(f) => {
                    if let Some(e) = f.trailers_ref().and_then(grpc_error) {
                        return Err(e);
                    }
                }
            }
        }
        message.ok_or_else(|| "no response message".to_string())
    };
    tokio::time::timeout(Duration::from_secs(30), call)
        .await
        .map_err(|_| "no answer within 30 s".to_string())?
}

/// Follows the control plane at `ep` until the runtime stops.
pub async fn follow(
    ep: impl Into<Endpoint>,
    announce: Announce,
    shared: Arc<Shared>,
    env: LoadEnv,
) {
    follow_with(ep, announce, Token::None, shared, env).await;
}

/// As [`follow`], presenting a bootstrap token (`authorization: Bearer`).
pub async fn follow_with_token(
    ep: impl Into<Endpoint>,
    announce: Announce,
    token: Option<String>,
    shared: Arc<Shared>,
    env: LoadEnv,
) {
    let token = token.map_or(Token::None, Token::Fixed);
    follow_with(ep, announce, token, shared, env).await;
}

/// As [`follow`], presenting `token` (read again before every connection).
pub async fn follow_with(
    ep: impl Into<Endpoint>,
    announce: Announce,
    token: Token,
    shared: Arc<Shared>,
    env: LoadEnv,
) {
    let ep = ep.into();
    let addr = ep.addr;
    let mut backoff = Duration::from_millis(100);
    // The resources the running snapshot was made of: kept across reconnects, so that
    // the control plane sends only what changed meanwhile.
    let mut held = Held::default();
    loop {
        let ep = ep.trusting_snapshot(&shared);
        let result = match token.read() {
            Ok(t) => session(&ep, &announce, t.as_deref(), &shared, &env, &mut held).await,
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
    ep: &Endpoint,
    announce: &Announce,
    token: Option<&str>,
    shared: &Arc<Shared>,
    env: &LoadEnv,
    held: &mut Held,
) -> Result<(), String> {
    let mut sender = ep.connect().await?;
    let (req, tx) = grpc_request(ep, DELTA_ADS_PATH, token)?;
    let first = DeltaDiscoveryRequest {
        node: Some(announce.to_node()),
        type_url: SNAPSHOT_TYPE_URL.to_string(),
        resource_names_subscribe: vec!["*".to_string()],
        initial_resource_versions: held.versions(),
        ..Default::default()
    };
    tx.send(Bytes::from(frame(&first)))
        .await
        .map_err(|_| "request stream closed".to_string())?;
    let resp = sender.send_request(req).await.map_err(|e| {
        let mut why = error_chain(&e);
        if !ep.is_tls() {
            why.push_str(" (this proxy speaks cleartext to the control plane: if it serves TLS, as `trellis control-plane` does, give --xds-root)");
        }
        why
    })?;
    let mut body = resp.into_body();
    let mut deframer = Deframer::default();
    tracing::info!("connected to the control plane at {}", ep.addr);
    while let Some(f) = std::future::poll_fn(|cx| Pin::new(&mut body).poll_frame(cx)).await {
        let f = f.map_err(|e| e.to_string())?;
        let f = match f.into_data() {
            Ok(d) => {
                deframer.push(&d);
                continue_with(&mut deframer, shared, env, &tx, held).await?;
                continue;
            }
            Err(f) => f,
        };
        if let Some(e) = f.trailers_ref().and_then(grpc_error) {
            return Err(e);
        }
    }
    Ok(())
}

/// Applies every complete response, answering each with an ACK or a NACK. A response
/// is applied whole (its resources with those held make the new snapshot) or not at all.
async fn continue_with(
    deframer: &mut Deframer,
    shared: &Arc<Shared>,
    env: &LoadEnv,
    tx: &mpsc::Sender<Bytes>,
    held: &mut Held,
) -> Result<(), String> {
    while let Some(resp) = deframer
        .next_message::<DeltaDiscoveryResponse>()
        .map_err(|e| e.to_string())?
    {
        let current = shared.config.load_full();
        let result = match held.apply(&resp) {
            Err(e) => Err(e),
            // Nothing changed (a reconnect to a control plane with the same
            // configuration): the running snapshot stays as it is.
            Ok((next, _))
                if resp.resources.is_empty()
                    && resp.removed_resources.is_empty()
                    && !held.is_empty() =>
            {
                Ok(Some(next))
            }
            Ok((next, raw)) => {
                // Converting may resolve DNS names and read certificate files: off this
                // thread, which also keeps the stream's keepalive answered.
                let (prev, env) = (Arc::clone(&current), env.clone());
                tokio::task::spawn_blocking(move || {
                    Config::from_wire_with(raw, Some(&prev), &env).map_err(|e| e.to_string())
                })
                .await
                .unwrap_or_else(|e| Err(e.to_string()))
                .map(|cfg| {
                    shared.update(cfg);
                    Some(next)
                })
            }
        };
        let error = match result {
            Ok(next) => {
                if let Some(next) = next {
                    *held = next;
                }
                None
            }
            Err(e) => {
                Stats::inc(&shared.stats.config_rejections_total);
                tracing::error!(
                    "snapshot {:?} refused, keeping version {:?}: {e}",
                    resp.system_version_info,
                    current.version
                );
                Some(e)
            }
        };
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
