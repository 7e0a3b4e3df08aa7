//! Mutual TLS between two proxies with certificates from the real CA: the control plane
//! (over TLS) gives both their configuration and the trust bundle, each proxy keeps a
//! workload certificate, and requests from web-0 to reviews travel as HTTP/2 over mTLS,
//! the app seeing who called in `x-forwarded-client-cert`.

mod common;

use std::net::SocketAddr;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use trellis_proxy::identity::CertRequest;
use trellis_proxy::xds::{Endpoint, Token};
use trellis_proxy::{Config, LoadEnv, ProxyHandle, ProxyOptions};
use trellis_testkit::HttpServer;
use trellis_testkit::WsMessage;
use trellis_testkit::http_client::{HttpClient, HttpResponse};
use trellis_testkit::tcp::{TcpEchoServer, tcp_echo_half_close};
use trellis_testkit::ws::{WsEchoServer, ws_echo};
use trellis_xds::ads::Announce;

const MESH: &str = r#"
apiVersion: trellis.dev/v1alpha1
kind: Workload
metadata: {name: reviews-v1, namespace: shop, labels: {app: reviews, version: v1}}
spec: {serviceAccount: reviews, command: [sleep, "1"]}
---
apiVersion: trellis.dev/v1alpha1
kind: Workload
metadata: {name: web-0, namespace: web, labels: {app: web}}
spec: {serviceAccount: web, command: [sleep, "1"]}
---
apiVersion: v1
kind: Service
metadata: {name: reviews, namespace: shop}
spec:
  selector: {app: reviews}
  ports: [{name: http, port: 9080, targetPort: http}]
---
apiVersion: v1
kind: Service
metadata: {name: echo, namespace: shop}
spec:
  selector: {app: reviews}
  ports: [{name: tcp-echo, port: 9000, targetPort: tcp}]
---
apiVersion: v1
kind: Service
metadata: {name: ws, namespace: shop}
spec:
  selector: {app: reviews}
  ports: [{name: http-ws, port: 8080, targetPort: ws}]
"#;

const WEB_ID: &str = "spiffe://cluster.local/ns/web/sa/web";
const REVIEWS_ID: &str = "spiffe://cluster.local/ns/shop/sa/reviews";

struct Mesh {
    web: ProxyHandle,
    reviews: ProxyHandle,
    /// Where reviews' inbound proxy listens for HTTP and for TCP (the endpoints web's
    /// proxy sends to).
    inbound: SocketAddr,
    inbound_tcp: SocketAddr,
    store: Arc<trellis_control::ConfigStore>,
    _app: HttpServer,
    _echo: TcpEchoServer,
    _ws: WsEchoServer,
    xds: Endpoint,
    token: String,
    _data: tempfile::TempDir,
    _tasks: Vec<tokio::task::JoinHandle<()>>,
}

/// A proxy following the control plane and keeping a certificate of `ttl`.
async fn proxy(
    xds: &Endpoint,
    token: &str,
    announce: Announce,
    opts: ProxyOptions,
    ttl: Duration,
) -> ProxyHandle {
    let p = trellis_proxy::start(Config::empty(), opts)
        .await
        .expect("proxy");
    let identity = trellis_identity::Identity {
        trust_domain: "cluster.local".into(),
        namespace: announce.namespace.clone(),
        service_account: announce.service_account.clone(),
    };
    tokio::spawn(trellis_proxy::identity::maintain(
        xds.clone(),
        Token::Fixed(token.to_string()),
        CertRequest {
            identity,
            instance: announce.name.clone(),
            ttl,
        },
        Arc::clone(&p.shared),
    ));
    tokio::spawn(trellis_proxy::xds::follow_with(
        xds.clone(),
        announce,
        Token::Fixed(token.to_string()),
        Arc::clone(&p.shared),
        LoadEnv::default(),
    ));
    p
}

/// Both proxies, with certificates of `ttl`, once web-0 knows reviews' endpoint and both
/// hold a certificate.
async fn mesh(ttl: Duration) -> Mesh {
    let data = tempfile::tempdir().expect("tempdir");
    let (addr, _cp, store, tasks) =
        common::tls_control_plane(MESH, data.path(), data.path(), None).await;
    let root = std::fs::read_to_string(data.path().join("ca-cert.pem")).expect("root");
    let xds = Endpoint::tls(addr, &root, "trellis-control").expect("endpoint");
    let tokens = trellis_identity::Tokens::load_or_create(data.path()).expect("tokens");
    // The app listens on 127.0.0.1:P; reviews' inbound proxy on 127.0.0.2:P, the address
    // its instance announces, so the endpoint web-0 is sent is the inbound proxy.
    let app = HttpServer::start().await.expect("app");
    let port = app.addr.port();
    let inbound: SocketAddr = format!("127.0.0.2:{port}").parse().expect("addr");
    let echo = TcpEchoServer::start().await.expect("echo");
    let tcp_port = echo.addr.port();
    let inbound_tcp: SocketAddr = format!("127.0.0.2:{tcp_port}").parse().expect("addr");
    let ws = WsEchoServer::start().await.expect("ws");
    let ws_port = ws.addr.port();
    let inbound_ws: SocketAddr = format!("127.0.0.2:{ws_port}").parse().expect("addr");
    let reviews = proxy(
        &xds,
        &tokens.issue("shop", "reviews", Duration::from_secs(600)),
        Announce {
            name: "reviews-v1".into(),
            namespace: "shop".into(),
            service_account: "reviews".into(),
            addresses: vec!["127.0.0.2".into()],
            ports: vec![
                (Some("http".to_string()), port),
                (Some("tcp".to_string()), tcp_port),
                (Some("ws".to_string()), ws_port),
            ],
            ..Default::default()
        },
        ProxyOptions {
            inbound_listen: vec![
                (inbound, port),
                (inbound_tcp, tcp_port),
                (inbound_ws, ws_port),
            ],
            ..ProxyOptions::default()
        },
        ttl,
    )
    .await;
    let token = tokens.issue("web", "web", Duration::from_secs(600));
    let web = proxy(
        &xds,
        &token,
        Announce {
            name: "web-0".into(),
            namespace: "web".into(),
            service_account: "web".into(),
            addresses: vec!["127.0.0.1".into()],
            ..Default::default()
        },
        ProxyOptions {
            outbound_listen: vec![
                (
                    "127.0.0.1:0".parse().expect("addr"),
                    "reviews.shop".into(),
                    9080,
                ),
                (
                    "127.0.0.1:0".parse().expect("addr"),
                    "echo.shop".into(),
                    9000,
                ),
                ("127.0.0.1:0".parse().expect("addr"), "ws.shop".into(), 8080),
            ],
            ..ProxyOptions::default()
        },
        ttl,
    )
    .await;
    let ready = common::eventually(Duration::from_secs(10), || {
        web.shared.credentials.is_set()
            && reviews.shared.credentials.is_set()
            && reviews.config().trust_roots.is_some()
            && web
                .config()
                .clusters
                .iter()
                .any(|c| c.endpoints.iter().any(|e| e.addr == inbound))
    })
    .await;
    assert!(ready, "proxies configured and certified");
    Mesh {
        web,
        reviews,
        inbound,
        inbound_tcp,
        store,
        _app: app,
        _echo: echo,
        _ws: ws,
        xds,
        token,
        _data: data,
        _tasks: tasks,
    }
}

/// `GET /echo` on a new HTTP/1.1 connection to `to`, with `headers`.
async fn echo(to: SocketAddr, headers: &[(&str, &str)]) -> Result<HttpResponse, String> {
    let mut c = HttpClient::http1(to).await.map_err(|e| e.to_string())?;
    let mut req = c.request(http::Method::GET, "reviews.shop:9080", "/echo");
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let req = req
        .body(http_body_util::Empty::<bytes::Bytes>::new())
        .map_err(|e| e.to_string())?;
    c.send(req).await.map_err(|e| e.to_string())
}

fn xfcc(r: &HttpResponse) -> Option<String> {
    r.header("x-echo-h-x-forwarded-client-cert")
        .map(str::to_string)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxies_talk_mutual_tls_and_the_app_learns_the_callers_identity() {
    let m = mesh(Duration::from_secs(3600)).await;
    // Through web-0's proxy: mTLS to reviews' proxy, which tells the app who called
    // (a value the client sent itself is replaced, never passed on).
    let r = echo(
        m.web.outbound_addrs[0],
        &[(
            "x-forwarded-client-cert",
            "By=me;URI=spiffe://evil/ns/x/sa/admin",
        )],
    )
    .await
    .expect("response");
    assert_eq!(r.status, 200);
    assert_eq!(
        xfcc(&r).as_deref(),
        Some(format!("By={REVIEWS_ID};URI={WEB_ID}").as_str())
    );
    let stats = &m.reviews.shared.stats;
    assert_eq!(
        stats.inbound_mtls_connections_total.load(Ordering::Relaxed),
        1
    );

    // Plaintext straight to the inbound proxy (PERMISSIVE takes it): no identity, and a
    // forged header is dropped.
    let r = echo(
        m.inbound,
        &[(
            "x-forwarded-client-cert",
            "By=me;URI=spiffe://evil/ns/x/sa/admin",
        )],
    )
    .await
    .expect("response");
    assert_eq!(r.status, 200);
    assert_eq!(xfcc(&r), None);

    // A real TLS client offering the mesh's protocol without a client certificate: the
    // handshake fails, and nothing reaches the app.
    let before = stats.tls_handshake_errors_total.load(Ordering::Relaxed);
    let out = Command::new("openssl")
        .args(["s_client", "-connect", &m.inbound.to_string()])
        .args(["-alpn", "trellis-h2", "-tls1_3", "-brief"])
        .stdin(std::process::Stdio::null())
        .output()
        .expect("openssl runs");
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        said.contains("alert") || said.contains("error"),
        "the handshake must fail: {said}"
    );
    assert!(
        common::eventually(Duration::from_secs(2), || {
            stats.tls_handshake_errors_total.load(Ordering::Relaxed) > before
        })
        .await,
        "the refusal is counted"
    );
    assert_eq!(
        stats.inbound_mtls_connections_total.load(Ordering::Relaxed),
        1
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificates_rotate_under_load_without_a_failed_request() {
    // Certificates of 3 s, renewed every 1.5 s; 4.5 s of steady traffic.
    let m = mesh(Duration::from_secs(3)).await;
    let serial = |p: &ProxyHandle| p.shared.credentials.current().map(|c| c.serial.clone());
    let (web_first, reviews_first) = (serial(&m.web), serial(&m.reviews));
    let (mut ok, mut failed) = (0u32, Vec::new());
    let end = Instant::now() + Duration::from_millis(4500);
    for _ in 0..2000 {
        if Instant::now() >= end {
            break;
        }
        match echo(m.web.outbound_addrs[0], &[]).await {
            Ok(r) if r.status == 200 && xfcc(&r).is_some() => ok += 1,
            Ok(r) => failed.push(format!("{} {:?}", r.status, xfcc(&r))),
            Err(e) => failed.push(e.to_string()),
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert!(
        failed.is_empty(),
        "{} failed: {:?}",
        failed.len(),
        &failed[..failed.len().min(5)]
    );
    assert!(ok > 100, "only {ok} requests");
    let issued = |p: &ProxyHandle| {
        p.shared
            .stats
            .certificates_issued_total
            .load(Ordering::Relaxed)
    };
    assert!(
        issued(&m.web) >= 3 && issued(&m.reviews) >= 3,
        "two renewals each at least"
    );
    assert_ne!(serial(&m.web), web_first);
    assert_ne!(serial(&m.reviews), reviews_first);

    // A new client proxy, new handshakes: reviews' first certificate has expired, and the
    // renewed one is what it presents.
    let newcomer = proxy(
        &m.xds,
        &m.token,
        Announce {
            name: "web-0".into(),
            namespace: "web".into(),
            service_account: "web".into(),
            addresses: vec!["127.0.0.1".into()],
            ..Default::default()
        },
        ProxyOptions {
            outbound_listen: vec![(
                "127.0.0.1:0".parse().expect("addr"),
                "reviews.shop".into(),
                9080,
            )],
            ..ProxyOptions::default()
        },
        Duration::from_secs(3),
    )
    .await;
    assert!(
        common::eventually(Duration::from_secs(10), || {
            newcomer.shared.credentials.is_set()
                && newcomer
                    .config()
                    .clusters
                    .iter()
                    .any(|c| c.endpoints.iter().any(|e| e.addr == m.inbound))
        })
        .await
    );
    let r = echo(newcomer.outbound_addrs[0], &[])
        .await
        .expect("response");
    assert_eq!(
        xfcc(&r).as_deref(),
        Some(format!("By={REVIEWS_ID};URI={WEB_ID}").as_str())
    );
}

/// Echoes `data` through `to` (half-closing), or fails; bounded by 5 s.
async fn tcp_echo(to: SocketAddr, data: &[u8]) -> Result<Vec<u8>, String> {
    tokio::time::timeout(Duration::from_secs(5), tcp_echo_half_close(to, data))
        .await
        .map_err(|_| "no end within 5 s".to_string())?
        .map_err(|e| e.to_string())
}

fn apply(store: &trellis_control::ConfigStore, yaml: &str) {
    for r in common::parse(yaml) {
        store.apply(r);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn peer_authentication_strict_refuses_plaintext_and_disable_turns_mtls_off() {
    use trellis_xds::snapshot::PeerMtls;
    let m = mesh(Duration::from_secs(3600)).await;
    let stats = &m.reviews.shared.stats;
    let mtls = || stats.inbound_mtls_connections_total.load(Ordering::Relaxed);
    // TCP goes over mTLS between the proxies too, with half-close passed on.
    let echoed = tcp_echo(m.web.outbound_addrs[1], b"over mtls")
        .await
        .expect("echo");
    assert_eq!(echoed, b"over mtls");
    assert_eq!(mtls(), 1, "the TCP connection came over mTLS");

    // STRICT for the namespace.
    apply(
        &m.store,
        "apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata: {name: default, namespace: shop}\nspec:\n  mtls: {mode: STRICT}\n",
    );
    assert!(
        common::eventually(Duration::from_secs(5), || {
            m.reviews.config().inbound_mtls == PeerMtls::Strict
        })
        .await
    );
    // Plaintext, from curl or raw TCP: refused and counted; nothing reaches the app.
    let out = Command::new("curl")
        .args([
            "-sS",
            "--max-time",
            "5",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
        ])
        .arg(format!("http://{}/echo", m.inbound))
        .output()
        .expect("curl runs");
    assert!(!out.status.success(), "curl must fail: {out:?}");
    assert_eq!(String::from_utf8_lossy(&out.stdout), "000");
    assert!(
        tcp_echo(m.inbound_tcp, b"plain")
            .await
            .unwrap_or_default()
            .is_empty()
    );
    assert!(
        common::eventually(Duration::from_secs(2), || {
            stats
                .inbound_plaintext_refused_total
                .load(Ordering::Relaxed)
                >= 2
        })
        .await
    );
    // Through web-0's proxy: mTLS, for HTTP and TCP alike.
    let r = echo(m.web.outbound_addrs[0], &[]).await.expect("response");
    assert_eq!(r.status, 200);
    assert_eq!(
        xfcc(&r).as_deref(),
        Some(format!("By={REVIEWS_ID};URI={WEB_ID}").as_str())
    );
    let echoed = tcp_echo(m.web.outbound_addrs[1], b"strict")
        .await
        .expect("echo");
    assert_eq!(echoed, b"strict");
    // A WebSocket upgrade (HTTP/1.1 between the proxies) goes over mTLS as well.
    let msgs = vec![WsMessage::text("one"), WsMessage::binary(vec![1u8, 2, 3])];
    let echoed = ws_echo(m.web.outbound_addrs[2], "ws.shop:8080", msgs.clone())
        .await
        .expect("websocket echo");
    assert_eq!(echoed, msgs);
    // So does HTTP/1.1 kept as the client sent it (DestinationRule DO_NOT_UPGRADE).
    apply(
        &m.store,
        "apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {name: reviews, namespace: shop}\nspec:\n  host: reviews\n  trafficPolicy: {connectionPool: {http: {h2UpgradePolicy: DO_NOT_UPGRADE}}}\n",
    );
    assert!(
        common::eventually(Duration::from_secs(5), || {
            m.web
                .config()
                .clusters
                .iter()
                .any(|c| c.name.contains("reviews") && c.keep_client_protocol)
        })
        .await
    );
    let r = echo(m.web.outbound_addrs[0], &[]).await.expect("response");
    assert_eq!(r.status, 200);
    assert_eq!(r.header("x-echo-version"), Some("HTTP/1.1"));
    assert_eq!(
        xfcc(&r).as_deref(),
        Some(format!("By={REVIEWS_ID};URI={WEB_ID}").as_str())
    );

    // DISABLE for reviews' workload (beats the namespace's STRICT): web-0's proxy is told
    // to send plaintext, and does.
    apply(
        &m.store,
        "apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata: {name: reviews, namespace: shop}\nspec:\n  selector: {matchLabels: {app: reviews}}\n  mtls: {mode: DISABLE}\n",
    );
    assert!(
        common::eventually(Duration::from_secs(5), || {
            m.reviews.config().inbound_mtls == PeerMtls::Disable
                && m.web.config().clusters.iter().any(|c| {
                    c.endpoints
                        .iter()
                        .any(|e| e.addr == m.inbound && e.plaintext)
                })
        })
        .await
    );
    let before = mtls();
    let r = echo(m.web.outbound_addrs[0], &[]).await.expect("response");
    assert_eq!(r.status, 200);
    assert_eq!(xfcc(&r), None, "plaintext: no peer identity");
    let echoed = tcp_echo(m.web.outbound_addrs[1], b"plain")
        .await
        .expect("echo");
    assert_eq!(echoed, b"plain");
    assert_eq!(mtls(), before, "no new mTLS connection");
    // And plaintext from anyone is taken again.
    assert_eq!(echo(m.inbound, &[]).await.expect("response").status, 200);
}

/// Waits (at most 5 s) until `p` holds `n` AuthorizationPolicies.
async fn holds_policies(p: &ProxyHandle, n: usize) {
    let holds = common::eventually(Duration::from_secs(5), || {
        p.config()
            .workload
            .as_ref()
            .is_some_and(|w| w.authorization.len() == n)
    })
    .await;
    assert!(holds, "{n} policies expected");
}

/// `method path` through web-0's proxy on a new connection: the status and body.
async fn call(m: &Mesh, method: http::Method, path: &str) -> (u16, String) {
    let mut c = HttpClient::http1(m.web.outbound_addrs[0])
        .await
        .expect("connect");
    let req = c
        .request(method, "reviews.shop:9080", path)
        .body(http_body_util::Empty::<bytes::Bytes>::new())
        .expect("request");
    let r = c.send(req).await.expect("response");
    (
        r.status.as_u16(),
        String::from_utf8_lossy(&r.body).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn authorization_policies_decide_who_may_call_what() {
    let m = mesh(Duration::from_secs(3600)).await;
    let denials = || {
        m.reviews
            .shared
            .stats
            .authorization_denials_total
            .load(Ordering::Relaxed)
    };
    // ALLOW GET from web's service account (Istio's "allow by principal" example).
    apply(
        &m.store,
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: reviews-viewer, namespace: shop}\nspec:\n  selector: {matchLabels: {app: reviews}}\n  action: ALLOW\n  rules:\n  - from: [{source: {principals: [\"cluster.local/ns/web/sa/web\"]}}]\n    to: [{operation: {methods: [GET]}}]\n",
    );
    assert!(
        common::eventually(Duration::from_secs(5), || !m
            .reviews
            .config()
            .authz
            .is_empty())
        .await
    );
    assert_eq!(call(&m, http::Method::GET, "/echo").await.0, 200);
    let (status, body) = call(&m, http::Method::POST, "/echo").await;
    assert_eq!((status, body.trim()), (403, "RBAC: access denied"));
    // Plaintext has no principal: denied.
    assert_eq!(echo(m.inbound, &[]).await.expect("response").status, 403);
    assert_eq!(denials(), 2);
    // The ALLOW rule names methods: on a TCP connection it can never match, so the TCP
    // port is closed to everyone, as in Istio...
    assert!(
        tcp_echo(m.web.outbound_addrs[1], b"tcp")
            .await
            .unwrap_or_default()
            .is_empty()
    );
    assert_eq!(denials(), 3);
    let by_policy = m.reviews.shared.stats.render(&m.reviews.config(), None);
    assert!(
        by_policy.contains(
            "trellis_proxy_authorization_denials_by_policy_total{policy=\"shop/reviews-viewer\"} 3"
        ),
        "{by_policy}"
    );
    // ...until a rule for it allows web by principal alone.
    apply(
        &m.store,
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: echo-tcp, namespace: shop}\nspec:\n  selector: {matchLabels: {app: reviews}}\n  rules:\n  - from: [{source: {namespaces: [web]}}]\n    to: [{operation: {ports: [\"{TCP}\"]}}]\n".replace("{TCP}", &m.inbound_tcp.port().to_string()).as_str(),
    );
    holds_policies(&m.reviews, 2).await;
    assert_eq!(
        tcp_echo(m.web.outbound_addrs[1], b"tcp")
            .await
            .expect("echo"),
        b"tcp"
    );

    // DENY a path prefix with an exception (deny beats allow).
    apply(
        &m.store,
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: no-errors, namespace: shop}\nspec:\n  action: DENY\n  rules:\n  - to: [{operation: {paths: [\"/status/*\"], notPaths: [\"/status/200\"]}}]\n",
    );
    holds_policies(&m.reviews, 3).await;
    assert_eq!(call(&m, http::Method::GET, "/status/500").await.0, 403);
    assert_eq!(call(&m, http::Method::GET, "/status/200").await.0, 200);
    // A policy elsewhere (another namespace, not the root) does not apply here.
    apply(
        &m.store,
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: deny-all, namespace: web}\nspec:\n  action: DENY\n  rules: [{}]\n",
    );
    // (It reached web-0, whose namespace it is; reviews still has its three.)
    holds_policies(&m.web, 1).await;
    holds_policies(&m.reviews, 3).await;
    assert_eq!(call(&m, http::Method::GET, "/echo").await.0, 200);

    // destination.ip is the address the request was sent to (reviews' 127.0.0.2).
    apply(
        &m.store,
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: by-destination, namespace: shop}\nspec:\n  action: DENY\n  rules:\n  - to: [{operation: {paths: [/bytes/7]}}]\n    when: [{key: destination.ip, values: [127.0.0.2/32]}]\n  - to: [{operation: {paths: [/bytes/8]}}]\n    when: [{key: destination.ip, values: [10.9.9.9]}]\n",
    );
    holds_policies(&m.reviews, 4).await;
    assert_eq!(call(&m, http::Method::GET, "/bytes/7").await.0, 403);
    assert_eq!(call(&m, http::Method::GET, "/bytes/8").await.0, 200);
}

/// An ES256 key for JWTs, made here: its JWK and a signer.
struct JwtKey(ring::signature::EcdsaKeyPair, &'static str);

impl JwtKey {
    fn new() -> JwtKey {
        JwtKey::with_kid("k1")
    }

    fn with_kid(kid: &'static str) -> JwtKey {
        let rng = ring::rand::SystemRandom::new();
        let alg = &ring::signature::ECDSA_P256_SHA256_FIXED_SIGNING;
        let pkcs8 = ring::signature::EcdsaKeyPair::generate_pkcs8(alg, &rng).expect("key");
        let key = ring::signature::EcdsaKeyPair::from_pkcs8(alg, pkcs8.as_ref(), &rng);
        JwtKey(key.expect("key"), kid)
    }

    fn jwks(&self) -> String {
        use ring::signature::KeyPair;
        let p = self.0.public_key().as_ref();
        let b = trellis_policy::jwt::b64url_encode;
        serde_json::json!({"keys": [{"kty": "EC", "crv": "P-256", "kid": self.1,
            "x": b(&p[1..33]), "y": b(&p[33..65])}]})
        .to_string()
    }

    fn token(&self, claims: serde_json::Value) -> String {
        let b = trellis_policy::jwt::b64url_encode;
        let header = serde_json::json!({"alg": "ES256", "kid": self.1});
        let signing = format!(
            "{}.{}",
            b(header.to_string().as_bytes()),
            b(claims.to_string().as_bytes())
        );
        let sig = self
            .0
            .sign(&ring::rand::SystemRandom::new(), signing.as_bytes())
            .expect("sign");
        format!("{signing}.{}", b(sig.as_ref()))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_authentication_checks_jwts_and_authorization_reads_their_claims() {
    let m = mesh(Duration::from_secs(3600)).await;
    let key = JwtKey::new();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_secs();
    let claims = |sub: &str, groups: &[&str], exp: u64| {
        serde_json::json!({"iss": "https://issuer.example", "sub": sub, "aud": "shop",
            "exp": exp, "groups": groups})
    };
    apply(
        &m.store,
        &format!(
            "apiVersion: security.istio.io/v1\nkind: RequestAuthentication\nmetadata: {{name: jwt, namespace: shop}}\nspec:\n  selector: {{matchLabels: {{app: reviews}}}}\n  jwtRules:\n  - issuer: https://issuer.example\n    audiences: [shop]\n    jwks: {}\n    outputPayloadToHeader: x-jwt-payload\n    outputClaimToHeaders: [{{header: x-jwt-sub, claim: sub}}]\n    spaceDelimitedClaims: [roles]\n    timeout: 2s\n---\napiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {{name: admins-only, namespace: shop}}\nspec:\n  selector: {{matchLabels: {{app: reviews}}}}\n  rules:\n  - from: [{{source: {{requestPrincipals: [\"https://issuer.example/*\"]}}}}]\n    when: [{{key: \"request.auth.claims[groups]\", values: [admins]}}]\n  - from: [{{source: {{requestPrincipals: [\"https://issuer.example/*\"]}}}}]\n    when: [{{key: \"request.auth.claims[roles]\", values: [auditor]}}]\n",
            serde_json::to_string(&key.jwks()).expect("json")
        ),
    );
    assert!(
        common::eventually(Duration::from_secs(5), || {
            !m.reviews.config().jwt.is_empty() && !m.reviews.config().authz.is_empty()
        })
        .await
    );
    let bearer = |t: &str| format!("Bearer {t}");
    let good = key.token(claims("alice", &["dev", "admins"], now + 600));
    // A valid token with the claim: allowed; the app gets the claims, not the token.
    let r = echo(
        m.web.outbound_addrs[0],
        &[("authorization", &bearer(&good))],
    )
    .await
    .expect("response");
    assert_eq!(r.status, 200);
    assert_eq!(r.header("x-echo-h-x-jwt-sub"), Some("alice"));
    // The payload, as the token carried it (base64url JSON).
    let payload = r.header("x-echo-h-x-jwt-payload").expect("payload header");
    let payload = trellis_policy::jwt::b64url_decode(payload).expect("base64url");
    let payload: serde_json::Value = serde_json::from_slice(&payload).expect("json");
    assert_eq!(payload["sub"], "alice");
    assert_eq!(payload["groups"][1], "admins");
    assert_eq!(
        r.header("x-echo-h-authorization"),
        None,
        "the token is not forwarded"
    );
    // No token: not authenticated, and the ALLOW policy needs a request principal (403).
    assert_eq!(
        echo(m.web.outbound_addrs[0], &[])
            .await
            .expect("response")
            .status,
        403
    );
    // A valid token without the claim: 403.
    let dev = key.token(claims("bob", &["dev"], now + 600));
    let r = echo(m.web.outbound_addrs[0], &[("authorization", &bearer(&dev))])
        .await
        .expect("response");
    assert_eq!(r.status, 403);
    // `roles` is space-delimited (spaceDelimitedClaims): one of its words is enough.
    let mut auditor = claims("carol", &["dev"], now + 600);
    auditor["roles"] = "viewer auditor".into();
    let r = echo(
        m.web.outbound_addrs[0],
        &[("authorization", &bearer(&key.token(auditor)))],
    )
    .await
    .expect("response");
    assert_eq!(r.status, 200);
    // Expired, signed by another key, malformed, or for another audience: 401.
    let expired = key.token(claims("alice", &["admins"], now - 3600));
    let forged = JwtKey::new().token(claims("alice", &["admins"], now + 600));
    let mut other_aud = claims("alice", &["admins"], now + 600);
    other_aud["aud"] = "billing".into();
    let other_aud = key.token(other_aud);
    for (token, what) in [
        (expired.as_str(), "Jwt is expired"),
        (forged.as_str(), "Jwt verification fails"),
        ("not.a.jwt", "Jwt is not in the form"),
        (other_aud.as_str(), "Audiences in Jwt are not allowed"),
    ] {
        let r = echo(
            m.web.outbound_addrs[0],
            &[("authorization", &bearer(token))],
        )
        .await
        .expect("response");
        assert_eq!(r.status, 401, "{what}");
        let body = String::from_utf8_lossy(&r.body).into_owned();
        assert!(body.contains(what), "{what}: {body}");
        assert!(r.header("www-authenticate").is_some());
    }
    assert!(
        m.reviews
            .shared
            .stats
            .jwt_rejections_total
            .load(Ordering::Relaxed)
            >= 4
    );
    // The token in the access_token query parameter (Istio's default places).
    let mut c = HttpClient::http1(m.web.outbound_addrs[0])
        .await
        .expect("connect");
    let req = c
        .request(
            http::Method::GET,
            "reviews.shop:9080",
            &format!("/echo?access_token={good}"),
        )
        .body(http_body_util::Empty::<bytes::Bytes>::new())
        .expect("request");
    let r = c.send(req).await.expect("response");
    assert_eq!(r.status, 200);
    assert_eq!(r.header("x-echo-h-x-jwt-sub"), Some("alice"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jwks_are_fetched_from_their_uri_refetched_for_a_new_key_and_kept_when_it_fails() {
    let m = mesh(Duration::from_secs(3600)).await;
    // The issuer's JWKS, served by a real web server (python3 -m http.server).
    let web_root = tempfile::tempdir().expect("tempdir");
    let first = JwtKey::with_kid("k1");
    std::fs::write(web_root.path().join("jwks.json"), first.jwks()).expect("write");
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port();
    let mut server = Command::new("python3")
        .args([
            "-m",
            "http.server",
            &port.to_string(),
            "--bind",
            "127.0.0.1",
            "--directory",
        ])
        .arg(web_root.path())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("python3 runs");
    assert!(
        common::eventually(Duration::from_secs(10), || {
            std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
        })
        .await
    );
    apply(
        &m.store,
        &format!(
            "apiVersion: security.istio.io/v1\nkind: RequestAuthentication\nmetadata: {{name: jwt, namespace: shop}}\nspec:\n  jwtRules:\n  - issuer: https://issuer.example\n    jwksUri: http://127.0.0.1:{port}/jwks.json\n    outputClaimToHeaders: [{{header: x-jwt-sub, claim: sub}}]\n"
        ),
    );
    assert!(
        common::eventually(Duration::from_secs(5), || !m
            .reviews
            .config()
            .jwt
            .is_empty())
        .await
    );
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_secs();
    let claims =
        serde_json::json!({"iss": "https://issuer.example", "sub": "alice", "exp": now + 600});
    let out = m.web.outbound_addrs[0];
    let status = |key: &JwtKey| {
        let token = format!("Bearer {}", key.token(claims.clone()));
        async move {
            let r = echo(out, &[("authorization", &token)])
                .await
                .expect("response");
            (
                r.status.as_u16(),
                r.header("x-echo-h-x-jwt-sub").map(str::to_string),
            )
        }
    };
    assert_eq!(status(&first).await, (200, Some("alice".to_string())));
    // The issuer rotates its key: a token with the new kid makes the proxy fetch again.
    let second = JwtKey::with_kid("k2");
    std::fs::write(web_root.path().join("jwks.json"), second.jwks()).expect("write");
    tokio::time::sleep(Duration::from_millis(1100)).await; // past the least refetch gap
    assert_eq!(status(&second).await, (200, Some("alice".to_string())));
    // The issuer goes away: the keys held stay in use; an unknown key is refused.
    let _ = server.kill();
    let _ = server.wait();
    tokio::time::sleep(Duration::from_millis(1100)).await;
    assert_eq!(status(&second).await.0, 200);
    assert_eq!(status(&JwtKey::with_kid("k3")).await.0, 401);
    assert_eq!(
        status(&second).await.0,
        200,
        "the failed fetch kept the keys"
    );
}
