//! The control plane's Delta ADS server: gRPC over HTTP/2, on TLS with a certificate from
//! the mesh CA (cleartext only for local experiments without identities). Each stream is one proxy: its first request announces the
//! instance it runs beside (`Node.metadata`), which joins the registry; responses carry its
//! snapshot whenever it changes; each following request ACKs or NACKs a response by nonce.
//! A stream that ends disconnects the proxy.

use std::convert::Infallible;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderValue, Request, Response, StatusCode};
use http_body::{Body, Frame};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use trellis_xds::ads::{
    Announce, CREATE_CERTIFICATE_PATH, DELTA_ADS_PATH, Deframer, DeltaDiscoveryRequest,
    DeltaDiscoveryResponse, INSTANCE_NAME_KEY, IstioCertificateRequest, IstioCertificateResponse,
    SNAPSHOT_TYPE_URL, frame,
};

use trellis_xds::delta::Holding;

use crate::registry::{Instance, InstancePort};
use crate::server::{ControlPlane, PUSH_SLOT_HOLD};

/// A response body fed by a channel (a gRPC server stream).
struct ChannelBody(mpsc::Receiver<Frame<Bytes>>);

impl Body for ChannelBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        self.0.poll_recv(cx).map(|f| f.map(Ok))
    }
}

fn instance(a: Announce) -> Instance {
    Instance {
        workload: a.name.clone(),
        name: a.name,
        namespace: a.namespace,
        labels: a.labels,
        service_account: a.service_account,
        addresses: a
            .addresses
            .iter()
            .filter_map(|s| s.parse::<IpAddr>().ok())
            .collect(),
        ports: a
            .ports
            .into_iter()
            .map(|(name, port)| InstancePort {
                name,
                port,
                protocol: None,
            })
            .collect(),
        locality: a.locality,
        entry: false,
    }
}

fn grpc_trailers(code: u32, message: &str) -> Frame<Bytes> {
    let mut t = http::HeaderMap::new();
    t.insert("grpc-status", HeaderValue::from(code));
    if let Ok(v) = HeaderValue::from_str(message) {
        if !message.is_empty() {
            t.insert("grpc-message", v);
        }
    }
    Frame::trailers(t)
}

/// The mesh's identities, when the control plane checks them: every stream and
/// certificate request must carry a bootstrap token (`authorization: Bearer …`), and a
/// proxy may only announce the namespace and service account its token proves.
pub struct Auth {
    pub ca: trellis_identity::Ca,
    pub tokens: trellis_identity::Tokens,
}

impl std::fmt::Debug for Auth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Auth").finish_non_exhaustive()
    }
}

/// Serves Delta ADS on `listener` in cleartext until this future is dropped (which closes
/// every connection it accepted). No tokens are asked for.
pub async fn serve(listener: TcpListener, cp: Arc<ControlPlane>) {
    serve_with(listener, cp, None, None).await;
}

/// As [`serve`]; with `auth`, tokens are checked and the CA's `CreateCertificate` is served;
/// with `tls`, every connection is TLS (ALPN `h2`) and a failed handshake is logged and
/// closed.
pub async fn serve_with(
    listener: TcpListener,
    cp: Arc<ControlPlane>,
    auth: Option<Arc<Auth>>,
    tls: Option<Arc<rustls::ServerConfig>>,
) {
    let acceptor = tls.map(tokio_rustls::TlsAcceptor::from);
    let mut conns = tokio::task::JoinSet::new();
    loop {
        while conns.try_join_next().is_some() {}
        let (stream, peer) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!("xDS accept failed: {e}");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                continue;
            }
        };
        let cp = Arc::clone(&cp);
        let auth = auth.clone();
        let acceptor = acceptor.clone();
        conns.spawn(async move {
            let Some(acceptor) = acceptor else {
                return serve_connection(stream, peer, cp, auth).await;
            };
            let handshake =
                tokio::time::timeout(std::time::Duration::from_secs(10), acceptor.accept(stream));
            match handshake.await {
                Ok(Ok(tls)) => serve_connection(tls, peer, cp, auth).await,
                Ok(Err(e)) => tracing::warn!("xDS TLS handshake from {peer} failed: {e}"),
                Err(_) => tracing::warn!("xDS TLS handshake from {peer}: no handshake in 10 s"),
            }
        });
    }
}

async fn serve_connection<S>(
    stream: S,
    peer: std::net::SocketAddr,
    cp: Arc<ControlPlane>,
    auth: Option<Arc<Auth>>,
) where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let service = service_fn(move |req| handle(Arc::clone(&cp), auth.clone(), req));
    // Keepalive pings: a proxy that vanished without closing its connection ends its
    // stream (and leaves the registry) within about 30 s.
    let conn = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
        .timer(hyper_util::rt::TokioTimer::new())
        .keep_alive_interval(std::time::Duration::from_secs(20))
        .keep_alive_timeout(std::time::Duration::from_secs(10))
        .serve_connection(TokioIo::new(stream), service);
    if let Err(e) = conn.await {
        tracing::debug!("xDS connection from {peer}: {e}");
    }
}

/// The control plane's own TLS certificate, from the mesh CA for `dns_names` and `ips`,
/// and the task that renews it at half-life (a renewal that fails is retried every
/// minute; the current certificate stays until then). Connections made before a renewal
/// keep their certificate.
pub fn serving_credentials(
    auth: Arc<Auth>,
    dns_names: Vec<String>,
    ips: Vec<IpAddr>,
) -> Result<
    (
        Arc<trellis_identity::tls::Credentials>,
        impl std::future::Future<Output = ()>,
    ),
    trellis_identity::CaError,
> {
    let ttl = trellis_identity::MAX_TTL;
    let first = auth.ca.serving_certificate(&dns_names, &ips, ttl)?;
    let creds = Arc::new(trellis_identity::tls::Credentials::new(first));
    let held = Arc::clone(&creds);
    let renew = async move {
        loop {
            let at = held
                .current()
                .map_or(std::time::SystemTime::now(), |c| c.renew_at());
            let wait = at
                .duration_since(std::time::SystemTime::now())
                .unwrap_or_default();
            tokio::time::sleep(wait).await;
            match auth.ca.serving_certificate(&dns_names, &ips, ttl) {
                Ok(c) => {
                    tracing::info!("control plane certificate renewed (serial {})", c.serial);
                    held.set(c);
                }
                Err(e) => {
                    tracing::error!("renewing the control plane's certificate: {e}");
                    tokio::time::sleep(std::time::Duration::from_secs(60)).await;
                }
            }
        }
    };
    Ok((creds, renew))
}

/// Sends the CA's trust bundle ([`trellis_identity::Ca::trust_roots`]) to every proxy, and
/// again whenever it changes (`extra-roots.pem` is read every `every`). A file that does
/// not parse is logged once, and the bundle already sent stays.
pub async fn publish_trust_roots(
    auth: Arc<Auth>,
    cp: Arc<ControlPlane>,
    every: std::time::Duration,
) {
    let mut last_error = None;
    loop {
        match auth.ca.trust_roots() {
            Ok(roots) => {
                let n = roots.len();
                if cp.set_trust_roots(roots) {
                    tracing::info!("trust bundle: the CA's root and {} more", n - 1);
                }
                last_error = None;
            }
            Err(e) => {
                let e = e.to_string();
                if last_error.as_ref() != Some(&e) {
                    tracing::error!("trust bundle unchanged: {e}");
                    last_error = Some(e);
                }
            }
        }
        tokio::time::sleep(every).await;
    }
}

/// The token of a request (`authorization: Bearer …`), checked: the namespace and
/// service account it proves.
fn token_identity(auth: &Auth, req: &Request<Incoming>) -> Result<(String, String), String> {
    let token = req
        .headers()
        .get(http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .ok_or("no bootstrap token (authorization: Bearer)")?;
    auth.tokens
        .verify(token, std::time::SystemTime::now())
        .map_err(|e| format!("bootstrap token refused: {e}"))
}

async fn handle(
    cp: Arc<ControlPlane>,
    auth: Option<Arc<Auth>>,
    req: Request<Incoming>,
) -> Result<Response<ChannelBody>, Infallible> {
    let (tx, rx) = mpsc::channel(8);
    let mut resp = Response::new(ChannelBody(rx));
    resp.headers_mut().insert(
        http::header::CONTENT_TYPE,
        HeaderValue::from_static("application/grpc"),
    );
    let proven = match &auth {
        None => None,
        Some(a) => match token_identity(a, &req) {
            Ok(id) => Some(id),
            Err(e) => {
                tracing::warn!("{}: {e}", req.uri().path());
                let _ = tx.try_send(grpc_trailers(16, &e));
                return Ok(resp);
            }
        },
    };
    match (req.uri().path(), &auth) {
        (DELTA_ADS_PATH, _) => {
            tokio::spawn(stream(cp, proven, req.into_body(), tx));
        }
        (CREATE_CERTIFICATE_PATH, Some(a)) => {
            tokio::spawn(create_certificate(cp, Arc::clone(a), req, tx));
        }
        _ => {
            let _ = tx.try_send(grpc_trailers(12, "unknown method"));
        }
    }
    *resp.status_mut() = StatusCode::OK;
    Ok(resp)
}

/// Reads from `body` until `deframer` yields a whole message; `None` when the body ends
/// first.
async fn first_message<M: prost::Message + Default>(
    body: &mut Incoming,
    deframer: &mut Deframer,
) -> Result<Option<M>, trellis_xds::ads::FrameError> {
    loop {
        if let Some(m) = deframer.next_message::<M>()? {
            return Ok(Some(m));
        }
        match std::future::poll_fn(|cx| Pin::new(&mut *body).poll_frame(cx)).await {
            Some(Ok(f)) => {
                if let Ok(d) = f.into_data() {
                    deframer.push(&d);
                }
            }
            _ => return Ok(None),
        }
    }
}

/// Istio's `CreateCertificate` (unary).
async fn create_certificate(
    cp: Arc<ControlPlane>,
    auth: Arc<Auth>,
    req: Request<Incoming>,
    tx: mpsc::Sender<Frame<Bytes>>,
) {
    let token = req
        .headers()
        .get(http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or("")
        .to_string();
    let mut body = req.into_body();
    let request =
        match first_message::<IstioCertificateRequest>(&mut body, &mut Deframer::default()).await {
            Ok(Some(r)) => r,
            Ok(None) => {
                let _ = tx.send(grpc_trailers(3, "no request")).await;
                return;
            }
            Err(e) => {
                let _ = tx.send(grpc_trailers(3, &e.to_string())).await;
                return;
            }
        };
    let ttl = match u64::try_from(request.validity_duration) {
        Ok(0) | Err(_) => trellis_identity::DEFAULT_TTL,
        Ok(s) => std::time::Duration::from_secs(s),
    };
    match auth
        .ca
        .create_certificate(&auth.tokens, &token, &request.csr, ttl)
    {
        Ok(cert_chain) => {
            // The instance the proxy says it is (Istio's agents send their pod's name):
            // only for `trellis proxy-status`; the identity is what the token proved.
            let instance = request
                .metadata
                .as_ref()
                .and_then(|m| m.fields.get(INSTANCE_NAME_KEY))
                .and_then(|v| match &v.kind {
                    Some(prost_types::value::Kind::StringValue(s)) => Some(s.as_str()),
                    _ => None,
                });
            if let (Some(not_after), Ok((ns, _))) = (
                cert_chain
                    .first()
                    .and_then(|c| trellis_identity::not_after(c)),
                auth.tokens.verify(&token, std::time::SystemTime::now()),
            ) {
                cp.certificate_issued(&ns, instance, not_after);
            }
            let resp = IstioCertificateResponse { cert_chain };
            let _ = tx.send(Frame::data(Bytes::from(frame(&resp)))).await;
            let _ = tx.send(grpc_trailers(0, "")).await;
        }
        Err(e) => {
            tracing::warn!("certificate refused: {e}");
            let _ = tx.send(grpc_trailers(7, &e.to_string())).await;
        }
    }
}

/// A response sent and not yet answered: what the proxy holds if it ACKs it.
struct Pending {
    /// The push slot it holds, until the answer or the deadline.
    slot: Option<(tokio::sync::OwnedSemaphorePermit, tokio::time::Instant)>,
    nonce: String,
    version: String,
    /// What the proxy holds once it applied it.
    holds: Holding,
}

async fn sleep_until_opt(at: Option<tokio::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

async fn slot_deadline(pending: &Option<Pending>) {
    match pending.as_ref().and_then(|p| p.slot.as_ref()) {
        Some((_, at)) => tokio::time::sleep_until(*at).await,
        None => std::future::pending().await,
    }
}

/// One proxy's stream.
async fn stream(
    cp: Arc<ControlPlane>,
    proven: Option<(String, String)>,
    mut body: Incoming,
    tx: mpsc::Sender<Frame<Bytes>>,
) {
    let mut deframer = Deframer::default();
    // The first request: who this is.
    let first = match tokio::time::timeout(
        std::time::Duration::from_secs(10),
        first_message::<DeltaDiscoveryRequest>(&mut body, &mut deframer),
    )
    .await
    {
        Ok(Ok(Some(r))) => r,
        Ok(Ok(None)) => return,
        Ok(Err(e)) => {
            let _ = tx.send(grpc_trailers(3, &e.to_string())).await;
            return;
        }
        Err(_) => {
            let _ = tx.send(grpc_trailers(4, "no request within 10 s")).await;
            return;
        }
    };
    let Some(announce) = first.node.as_ref().and_then(Announce::from_node) else {
        let _ = tx
            .send(grpc_trailers(
                3,
                "the first request must name the instance (node metadata NAME and NAMESPACE)",
            ))
            .await;
        return;
    };
    let mut announce = announce;
    // A token for another namespace learns nothing about this one (not even which
    // WorkloadGroups it has).
    if let Some((ns, sa)) = &proven {
        if *ns != announce.namespace {
            let why = format!(
                "the token proves {ns}/{sa}; the proxy announced namespace {}",
                announce.namespace
            );
            tracing::warn!("{why}");
            let _ = tx.send(grpc_trailers(7, &why)).await;
            return;
        }
    }
    let instance_group = announce.workload_group.clone();
    // A VM's proxy registering under a WorkloadGroup: who it is comes from the group
    // (its labels decide which services it serves), never from what the proxy says.
    let registered = if let Some(group) = announce.workload_group.clone() {
        let Some(t) = cp.workload_group(&announce.namespace, &group) else {
            let why = format!(
                "no WorkloadGroup {}/{group} in the configuration",
                announce.namespace
            );
            tracing::warn!("{why}");
            let _ = tx.send(grpc_trailers(5, &why)).await;
            return;
        };
        announce.labels = t.labels;
        announce.service_account = t.service_account;
        if !t.ports.is_empty() {
            announce.ports = t.ports.into_iter().map(|(n, p)| (Some(n), p)).collect();
        }
        if t.locality.is_some() {
            announce.locality = t.locality;
        }
        true
    } else {
        false
    };
    if let Some((ns, sa)) = &proven {
        if *ns != announce.namespace || *sa != announce.service_account {
            let why = match &instance_group {
                Some(g) => format!(
                    "the token proves {ns}/{sa}; WorkloadGroup {}/{g} runs as {}",
                    announce.namespace, announce.service_account
                ),
                None => format!(
                    "the token proves {ns}/{sa}; the proxy announced {}/{}",
                    announce.namespace, announce.service_account
                ),
            };
            tracing::warn!("{why}");
            let _ = tx.send(grpc_trailers(7, &why)).await;
            return;
        }
        // Labels decide which services an instance serves: they come from the declared
        // Workload (or the WorkloadGroup), which must run under the token's service
        // account, never from what the proxy says.
        match cp.declared_workload(ns, &announce.name) {
            _ if registered => {}
            Some((labels, workload_sa, _)) if workload_sa == *sa => announce.labels = labels,
            Some((_, workload_sa, _)) => {
                let why = format!(
                    "workload {ns}/{} runs as {workload_sa}, not {sa}",
                    announce.name
                );
                tracing::warn!("{why}");
                let _ = tx.send(grpc_trailers(7, &why)).await;
                return;
            }
            None => {
                let why = format!("no Workload {ns}/{} in the configuration", announce.name);
                tracing::warn!("{why}");
                let _ = tx.send(grpc_trailers(7, &why)).await;
                return;
            }
        }
    }
    let name = format!("{}.{}", announce.name, announce.namespace);
    tracing::info!(proxy = %name, "proxy connected");
    // The workload (Istio's `*_workload` metric labels): the WorkloadGroup, or the
    // declared Workload the instance is a replica of, else the instance itself.
    let declared = cp
        .declared_workload(&announce.namespace, &announce.name)
        .map(|(_, _, w)| w);
    let mut instance = instance(announce);
    if let Some(w) = instance_group.or(declared) {
        instance.workload = w;
    }
    let mut session = cp.connect(instance);
    // What the proxy holds (name → version): what it said it had, then each response it
    // ACKed. One response is in flight at a time; the next is the difference between the
    // latest snapshot and what the proxy holds once it answered, so a refused response
    // is simply sent again, with whatever changed since, at the next push.
    let mut held = Holding::Listed(first.initial_resource_versions);
    let mut pending: Option<Pending> = None;
    let mut nonce = 0u64;
    // After a NACK, the same difference is sent again after a backoff (1 s doubling to
    // 60 s): a refusal may have been passing (a name that did not resolve, a file not
    // yet written), and no change may come to send it again.
    let mut retry_at: Option<tokio::time::Instant> = None;
    let mut backoff = Duration::from_secs(1);
    loop {
        tokio::select! {
            _ = sleep_until_opt(retry_at), if pending.is_none() && retry_at.is_some() => {
                retry_at = None;
                session.snapshots.mark_changed();
            }
            changed = session.snapshots.changed(), if pending.is_none() => {
                if changed.is_err() {
                    break;
                }
                if session.snapshots.borrow().is_none() {
                    session.snapshots.borrow_and_update();
                    continue;
                }
                // Wait for a push slot first (the latest snapshot is taken once it is ours).
                let slot = cp.push_slot().await;
                let snap = session.snapshots.borrow_and_update().clone();
                let Some(snap) = snap else { continue };
                nonce += 1;
                let own = snap.proxy_part();
                let (resources, removed) = held.diff(&snap.parts, &own);
                let resp = DeltaDiscoveryResponse {
                    system_version_info: snap.version.clone(),
                    resources,
                    type_url: SNAPSHOT_TYPE_URL.to_string(),
                    nonce: nonce.to_string(),
                    removed_resources: removed,
                };
                let bytes = Bytes::from(frame(&resp));
                cp.resources_sent(&resp.resources);
                pending = Some(Pending {
                    slot: slot.map(|s| (s, tokio::time::Instant::now() + PUSH_SLOT_HOLD)),
                    nonce: resp.nonce,
                    version: snap.version.clone(),
                    holds: Holding::Parts { shared: Arc::clone(&snap.parts), own: own.version },
                });
                if tx.send(Frame::data(bytes)).await.is_err() {
                    break;
                }
            }
            // A proxy slow to answer gives its slot back (its push stays in flight).
            _ = slot_deadline(&pending), if pending.as_ref().is_some_and(|p| p.slot.is_some()) => {
                if let Some(p) = pending.as_mut() {
                    p.slot = None;
                }
            }
            f = std::future::poll_fn(|cx| Pin::new(&mut body).poll_frame(cx)) => {
                let Some(Ok(f)) = f else { break };
                let Ok(d) = f.into_data() else { continue };
                deframer.push(&d);
                loop {
                    match deframer.next_message::<DeltaDiscoveryRequest>() {
                        Ok(Some(r)) => {
                            let answered = pending.take_if(|p| p.nonce == r.response_nonce);
                            match (answered, r.error_detail) {
                                (Some(p), Some(e)) => {
                                    cp.nack(session.id, &p.version, &e.message);
                                    retry_at = Some(tokio::time::Instant::now() + backoff);
                                    backoff = (backoff * 2).min(Duration::from_secs(60));
                                }
                                (Some(p), None) => {
                                    held = p.holds;
                                    cp.ack(session.id, &p.version);
                                    retry_at = None;
                                    backoff = Duration::from_secs(1);
                                }
                                // An answer to no response of ours, or no answer at all.
                                (None, _) => {}
                            }
                        }
                        Ok(None) => break,
                        Err(e) => {
                            tracing::warn!(proxy = %name, "{e}");
                            cp.disconnect(session.id);
                            let _ = tx.send(grpc_trailers(3, &e.to_string())).await;
                            return;
                        }
                    }
                }
            }
        }
    }
    tracing::info!(proxy = %name, "proxy disconnected");
    cp.disconnect(session.id);
    let _ = tx.send(grpc_trailers(0, "")).await;
}
