//! The control plane with identities on: a proxy must show a bootstrap token, may only
//! announce the namespace and service account the token proves, and gets a certificate for
//! exactly that identity from `CreateCertificate` over gRPC.

mod common;

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body::Body;
use tokio::net::TcpListener;
use trellis_api::{LoadOptions, parse_text};
use trellis_control::ConfigStore;
use trellis_control::ads::Auth;
use trellis_control::server::{ControlPlane, Debounce};
use trellis_identity::{Ca, Tokens};
use trellis_proxy::{Config, LoadEnv, ProxyHandle, ProxyOptions};
use trellis_xds::ads::{
    Announce, CREATE_CERTIFICATE_PATH, Deframer, IstioCertificateRequest, IstioCertificateResponse,
    frame,
};

fn announce(ns: &str, sa: &str) -> Announce {
    Announce {
        name: "web-0".into(),
        namespace: ns.into(),
        service_account: sa.into(),
        addresses: vec!["127.0.0.1".into()],
        ..Default::default()
    }
}

async fn follower(xds: SocketAddr, a: Announce, token: Option<String>) -> ProxyHandle {
    let p = trellis_proxy::start(Config::empty(), ProxyOptions::default())
        .await
        .expect("proxy");
    tokio::spawn(trellis_proxy::xds::follow_with_token(
        xds,
        a,
        token,
        Arc::clone(&p.shared),
        LoadEnv::default(),
    ));
    p
}

async fn got_snapshot(p: &ProxyHandle, within: Duration) -> bool {
    let deadline = Instant::now() + within;
    while Instant::now() < deadline {
        if !p.config().version.is_empty() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    false
}

/// A unary gRPC call over HTTP/2 cleartext: the response message, or the grpc-status.
async fn create_certificate(
    addr: SocketAddr,
    token: &str,
    csr: &str,
    seconds: i64,
) -> Result<IstioCertificateResponse, String> {
    let stream = tokio::net::TcpStream::connect(addr)
        .await
        .map_err(|e| e.to_string())?;
    let (mut sender, conn) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(stream),
    )
    .await
    .map_err(|e| e.to_string())?;
    tokio::spawn(conn);
    let body = http_body_util::Full::new(Bytes::from(frame(&IstioCertificateRequest {
        csr: csr.to_string(),
        validity_duration: seconds,
        metadata: None,
    })));
    let req = http::Request::post(format!("http://{addr}{CREATE_CERTIFICATE_PATH}"))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .header("authorization", format!("Bearer {token}"))
        .body(body)
        .map_err(|e| e.to_string())?;
    let mut body = sender
        .send_request(req)
        .await
        .map_err(|e| e.to_string())?
        .into_body();
    let mut deframer = Deframer::default();
    let mut message = None;
    while let Some(f) = std::future::poll_fn(|cx| Pin::new(&mut body).poll_frame(cx)).await {
        let f = f.map_err(|e| e.to_string())?;
        match f.into_data() {
            Ok(d) => {
                deframer.push(&d);
                if let Some(m) = deframer
                    .next_message::<IstioCertificateResponse>()
                    .map_err(|e| e.to_string())?
                {
                    message = Some(m);
                }
            }
            Err(f) => {
                if let Some(t) = f.trailers_ref() {
                    let status = t
                        .get("grpc-status")
                        .and_then(|v| v.to_str().ok())
                        .unwrap_or("");
                    if status != "0" {
                        let msg = t
                            .get("grpc-message")
                            .and_then(|v| v.to_str().ok())
                            .unwrap_or("");
                        return Err(format!("grpc-status {status}: {msg}"));
                    }
                }
            }
        }
    }
    message.ok_or_else(|| "no response message".to_string())
}

fn csr(san: &str) -> String {
    let key = rcgen::KeyPair::generate().expect("key");
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("params");
    params.subject_alt_names = vec![rcgen::SanType::URI(
        san.to_string().try_into().expect("ia5"),
    )];
    params
        .serialize_request(&key)
        .expect("csr")
        .pem()
        .expect("pem")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_gate_the_stream_and_the_certificates() {
    let data = tempfile::tempdir().expect("tempdir");
    let auth = Arc::new(Auth {
        ca: Ca::load_or_create(data.path(), "cluster.local").expect("ca"),
        tokens: Tokens::load_or_create(data.path()).expect("tokens"),
    });
    let store = Arc::new(ConfigStore::new());
    for p in parse_text(
        "apiVersion: v1\nkind: Service\nmetadata: {name: reviews, namespace: shop}\nspec:\n  selector: {app: reviews}\n  ports: [{name: http, port: 9080}]\n---\napiVersion: trellis.dev/v1alpha1\nkind: Workload\nmetadata: {name: web, namespace: web, labels: {app: web}}\nspec:\n  serviceAccount: web\n  command: [sleep, \"1\"]\n---\napiVersion: trellis.dev/v1alpha1\nkind: Workload\nmetadata: {name: intruder, namespace: web, labels: {app: reviews}}\nspec:\n  serviceAccount: intruder\n  command: [sleep, \"1\"]\n",
        "svc.yaml",
        &LoadOptions::default(),
    ) {
        store.apply(p.resource().cloned().expect("parses"));
    }
    let cp = ControlPlane::new(Arc::clone(&store), Debounce::default());
    tokio::spawn(Arc::clone(&cp).run());
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(trellis_control::ads::serve_with(
        listener,
        Arc::clone(&cp),
        Some(Arc::clone(&auth)),
        None,
    ));

    // An undeclared workload, or a declared one under another service account: refused.
    let t = auth.tokens.issue("web", "web", Duration::from_secs(60));
    let mut undeclared = announce("web", "web");
    undeclared.name = "ghost-0".into();
    let ghost = follower(addr, undeclared, Some(t.clone())).await;
    let mut wrong_sa = announce("web", "web");
    wrong_sa.name = "intruder-0".into();
    let intruder = follower(addr, wrong_sa, Some(t)).await;
    // No token: no snapshot. A token for another identity than the one announced: none.
    let anonymous = follower(addr, announce("web", "web"), None).await;
    let other = auth.tokens.issue("web", "admin", Duration::from_secs(60));
    let impostor = follower(addr, announce("web", "web"), Some(other)).await;
    // The right token: served.
    let token = auth.tokens.issue("web", "web", Duration::from_secs(60));
    let good = follower(addr, announce("web", "web"), Some(token.clone())).await;
    assert!(
        got_snapshot(&good, Duration::from_secs(5)).await,
        "the proxy with its token is served"
    );
    assert!(
        !got_snapshot(&anonymous, Duration::from_millis(300)).await,
        "no token, no snapshot"
    );
    assert!(
        !got_snapshot(&impostor, Duration::from_millis(100)).await,
        "a token for another identity"
    );
    assert!(
        !got_snapshot(&ghost, Duration::from_millis(100)).await,
        "an undeclared workload"
    );
    assert!(
        !got_snapshot(&intruder, Duration::from_millis(100)).await,
        "a workload of another account"
    );
    assert_eq!(cp.status().len(), 1, "{:#?}", cp.status());

    // A certificate for the token's identity; none for another.
    let chain = create_certificate(
        addr,
        &token,
        &csr("spiffe://cluster.local/ns/web/sa/web"),
        3600,
    )
    .await
    .expect("certificate")
    .cert_chain;
    assert_eq!(chain.len(), 2);
    assert_eq!(chain[1], auth.ca.root_pem());
    let e = create_certificate(
        addr,
        &token,
        &csr("spiffe://cluster.local/ns/shop/sa/reviews"),
        3600,
    )
    .await
    .expect_err("another identity");
    assert!(
        e.contains("grpc-status 7") && e.contains("ns/shop/sa/reviews"),
        "{e}"
    );
    let forged = Tokens::load_or_create(tempfile::tempdir().expect("tempdir").path())
        .expect("tokens")
        .issue("web", "web", Duration::from_secs(60));
    let e = create_certificate(
        addr,
        &forged,
        &csr("spiffe://cluster.local/ns/web/sa/web"),
        3600,
    )
    .await
    .expect_err("forged token");
    assert!(e.contains("grpc-status 16"), "{e}");
}

async fn eventually(what: &str, within: Duration, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + within;
    while Instant::now() < deadline {
        if f() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("{what}: not within {within:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_tls_proxies_get_their_config_and_a_certificate_renewed_at_half_life() {
    use trellis_proxy::xds::{Endpoint, Token};
    let data = tempfile::tempdir().expect("tempdir");
    let (addr, cp, _, server) =
        common::tls_control_plane(WEB_WORKLOAD, data.path(), data.path(), None).await;
    // The same CA and token key, read from the control plane's directory.
    let auth = Auth {
        ca: Ca::load_or_create(data.path(), "cluster.local").expect("ca"),
        tokens: Tokens::load_or_create(data.path()).expect("tokens"),
    };
    let token = auth.tokens.issue("web", "web", Duration::from_secs(60));
    let start = |ep: Endpoint| {
        let token = Token::Fixed(token.clone());
        async move {
            let p = trellis_proxy::start(Config::empty(), ProxyOptions::default())
                .await
                .expect("proxy");
            tokio::spawn(trellis_proxy::xds::follow_with(
                ep,
                announce("web", "web"),
                token,
                Arc::clone(&p.shared),
                LoadEnv::default(),
            ));
            p
        }
    };
    let root = auth.ca.root_pem();
    let good = start(Endpoint::tls(addr, root, "trellis-control").expect("endpoint")).await;
    let by_ip = start(Endpoint::tls(addr, root, "127.0.0.1").expect("endpoint")).await;
    // Another mesh's root, a name the certificate does not have, or cleartext: nothing.
    let other = Ca::load_or_create(
        tempfile::tempdir().expect("tempdir").path(),
        "cluster.local",
    )
    .expect("other ca");
    let foreign =
        start(Endpoint::tls(addr, other.root_pem(), "trellis-control").expect("ep")).await;
    let misnamed = start(Endpoint::tls(addr, root, "istiod.example").expect("endpoint")).await;
    let cleartext = start(Endpoint::from(addr)).await;
    assert!(
        got_snapshot(&good, Duration::from_secs(5)).await,
        "over TLS"
    );
    assert!(
        got_snapshot(&by_ip, Duration::from_secs(5)).await,
        "by address"
    );
    for (p, what) in [
        (&foreign, "another root"),
        (&misnamed, "another name"),
        (&cleartext, "cleartext"),
    ] {
        assert!(
            !got_snapshot(p, Duration::from_millis(200)).await,
            "{what} must get no configuration"
        );
    }

    // The certificate: for the instance's SPIFFE id, from the mesh CA, renewed at half of
    // its 4 s life.
    let ep = Endpoint::tls(addr, root, "trellis-control").expect("endpoint");
    let id = trellis_identity::Identity {
        trust_domain: "cluster.local".into(),
        namespace: "web".into(),
        service_account: "web".into(),
    };
    tokio::spawn(trellis_proxy::identity::maintain(
        ep,
        Token::Fixed(token.clone()),
        trellis_proxy::identity::CertRequest {
            identity: id,
            instance: "web-0".into(),
            ttl: Duration::from_secs(4),
        },
        Arc::clone(&good.shared),
    ));
    let creds = Arc::clone(&good.shared.credentials);
    eventually("a first certificate", Duration::from_secs(5), || {
        creds.current().is_some()
    })
    .await;
    let first = creds.current().expect("certificate");
    assert_eq!(
        first.spiffe.as_deref(),
        Some("spiffe://cluster.local/ns/web/sa/web")
    );
    assert_eq!(
        first.not_after.duration_since(first.not_before).ok(),
        Some(Duration::from_secs(4))
    );
    assert_eq!(
        first.key.cert.last().map(|c| c.as_ref().to_vec()),
        <rustls::pki_types::CertificateDer as rustls::pki_types::pem::PemObject>::from_pem_slice(
            root.as_bytes()
        )
        .ok()
        .map(|c| c.as_ref().to_vec()),
        "the chain ends at the mesh root"
    );
    eventually("a renewal at half-life", Duration::from_secs(4), || {
        creds.current().is_some_and(|c| c.serial != first.serial)
    })
    .await;
    let renewed = creds.current().expect("certificate");
    // The control plane's status shows when the instance's certificate expires.
    eventually("the expiry in the status", Duration::from_secs(2), || {
        cp.status()
            .iter()
            .any(|s| s.instance == "web-0" && s.certificate_expiry >= Some(first.not_after))
    })
    .await;
    assert!(renewed.not_before >= first.renew_at() - Duration::from_secs(1));
    let stats = &good.shared.stats;
    assert!(stats.certificates_issued_total.load(Ordering::Relaxed) >= 2);

    // The control plane goes away: renewals fail, and the certificate in hand stays.
    for t in server {
        t.abort();
    }
    let failures = || stats.certificate_failures_total.load(Ordering::Relaxed);
    eventually("a failed renewal", Duration::from_secs(4), || {
        failures() > 0
    })
    .await;
    let held = creds.current().expect("still a certificate");
    assert!(
        held.serial == renewed.serial || held.not_before > renewed.not_before,
        "never replaced by nothing"
    );
}

const WEB_WORKLOAD: &str = "apiVersion: trellis.dev/v1alpha1\nkind: Workload\nmetadata: {name: web, namespace: web, labels: {app: web}}\nspec:\n  serviceAccount: web\n  command: [sleep, \"1\"]\n";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_root_reaches_the_proxies_before_it_signs_and_they_follow_the_rotation() {
    use trellis_proxy::xds::{Endpoint, Token};
    let (old_dir, new_dir) = (
        tempfile::tempdir().expect("dir"),
        tempfile::tempdir().expect("dir"),
    );
    let old_root = Ca::load_or_create(old_dir.path(), "cluster.local")
        .expect("old")
        .root_pem()
        .to_string();
    let new_root = Ca::load_or_create(new_dir.path(), "cluster.local")
        .expect("new")
        .root_pem()
        .to_string();
    let token = Tokens::load_or_create(old_dir.path())
        .expect("tokens")
        .issue("web", "web", Duration::from_secs(600));
    let (addr, _, _, old_cp) =
        common::tls_control_plane(WEB_WORKLOAD, old_dir.path(), old_dir.path(), None).await;

    // The proxy knows the old root only (its --xds-root).
    let follow = |ep: Endpoint| {
        let token = Token::Fixed(token.clone());
        async move {
            let p = trellis_proxy::start(Config::empty(), ProxyOptions::default())
                .await
                .expect("proxy");
            tokio::spawn(trellis_proxy::xds::follow_with(
                ep,
                announce("web", "web"),
                token,
                Arc::clone(&p.shared),
                LoadEnv::default(),
            ));
            p
        }
    };
    let ep = Endpoint::tls(addr, &old_root, "trellis-control").expect("endpoint");
    let proxy = follow(ep.clone()).await;
    let roots = |p: &ProxyHandle| p.config().raw().trust_roots;
    eventually("the bundle: the old root", Duration::from_secs(5), || {
        roots(&proxy) == [old_root.clone()]
    })
    .await;
    assert_eq!(
        proxy.config().trust_roots.as_ref().map(|r| r.len()),
        Some(1)
    );

    // Step 1: the new root joins the bundle, before it signs anything.
    std::fs::write(old_dir.path().join("extra-roots.pem"), &new_root).expect("write");
    eventually("the bundle: both roots", Duration::from_secs(5), || {
        roots(&proxy) == [old_root.clone(), new_root.clone()]
    })
    .await;

    // Step 2: the control plane comes back signing with the new root, trusting the old
    // one still. The proxy reconnects: it trusts the new root from the bundle it was sent.
    for t in old_cp {
        t.abort();
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    std::fs::write(new_dir.path().join("extra-roots.pem"), &old_root).expect("write");
    let (_, new_cp, _, _tasks) =
        common::tls_control_plane(WEB_WORKLOAD, new_dir.path(), old_dir.path(), Some(addr)).await;
    eventually("the proxy reconnects", Duration::from_secs(10), || {
        new_cp
            .status()
            .iter()
            .any(|s| s.acked.is_some() && s.acked == s.sent.as_ref().map(|(v, _)| v.clone()))
    })
    .await;
    assert_eq!(roots(&proxy), [new_root.clone(), old_root.clone()]);
    // Its workload certificate now comes from the new root.
    let cert = trellis_proxy::identity::request(
        &ep.trusting_snapshot(&proxy.shared),
        Some(&token),
        &trellis_proxy::identity::CertRequest {
            identity: trellis_identity::Identity {
                trust_domain: "cluster.local".into(),
                namespace: "web".into(),
                service_account: "web".into(),
            },
            instance: "web-0".into(),
            ttl: Duration::from_secs(60),
        },
    )
    .await
    .expect("certificate from the new CA");
    let new_der =
        <rustls::pki_types::CertificateDer as rustls::pki_types::pem::PemObject>::from_pem_slice(
            new_root.as_bytes(),
        )
        .expect("der");
    assert_eq!(
        cert.key.cert.last().map(|c| c.as_ref()),
        Some(new_der.as_ref())
    );

    // A proxy that never received the bundle knows only the old root: refused.
    let newcomer = follow(ep).await;
    assert!(
        !got_snapshot(&newcomer, Duration::from_millis(500)).await,
        "the old root alone does not vouch for the new control plane"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vm_registers_under_its_workload_group_and_leaves_with_its_proxy() {
    let data = tempfile::tempdir().expect("tempdir");
    let auth = Arc::new(Auth {
        ca: Ca::load_or_create(data.path(), "cluster.local").expect("ca"),
        tokens: Tokens::load_or_create(data.path()).expect("tokens"),
    });
    let store = Arc::new(ConfigStore::new());
    for p in parse_text(
        r#"
apiVersion: v1
kind: Service
metadata: {name: legacy, namespace: vms}
spec:
  selector: {app: legacy}
  ports: [{name: http, port: 8080}]
---
apiVersion: networking.istio.io/v1
kind: WorkloadGroup
metadata: {name: legacy, namespace: vms}
spec:
  metadata:
    labels: {app: legacy, version: v1}
  template:
    serviceAccount: legacy-vm
    ports: {http: 8080}
---
apiVersion: trellis.dev/v1alpha1
kind: Workload
metadata: {name: web, namespace: vms, labels: {app: web}}
spec:
  serviceAccount: web
  command: [sleep, "1"]
"#,
        "vms.yaml",
        &LoadOptions::default(),
    ) {
        store.apply(p.resource().cloned().expect("parses"));
    }
    let cp = ControlPlane::with_grace(
        Arc::clone(&store),
        Debounce {
            quiet: Duration::from_millis(20),
            max: Duration::from_millis(100),
        },
        Duration::from_millis(200),
    );
    tokio::spawn(Arc::clone(&cp).run());
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(trellis_control::ads::serve_with(
        listener,
        Arc::clone(&cp),
        Some(Arc::clone(&auth)),
        None,
    ));
    // A client of the service, to see its endpoints.
    let web = follower(
        addr,
        announce("vms", "web"),
        Some(auth.tokens.issue("vms", "web", Duration::from_secs(60))),
    )
    .await;
    assert!(got_snapshot(&web, Duration::from_secs(5)).await);
    let endpoints = |p: &ProxyHandle| -> Vec<String> {
        let mut e: Vec<String> = p
            .config()
            .targets
            .iter()
            .filter(|t| t.hostname == "legacy.vms.svc.cluster.local")
            .flat_map(|t| t.cluster.endpoints.iter().map(|e| e.addr.to_string()))
            .collect();
        e.sort();
        e.dedup();
        e
    };
    assert!(endpoints(&web).is_empty());

    let vm = |name: &str, group: &str| Announce {
        name: name.into(),
        namespace: "vms".into(),
        // Whatever the proxy says, the group's template decides.
        service_account: "nobody".into(),
        labels: [("app".to_string(), "web".to_string())]
            .into_iter()
            .collect(),
        addresses: vec!["10.9.0.7".into()],
        ports: vec![(Some("http".into()), 9999)],
        workload_group: Some(group.into()),
        ..Default::default()
    };
    // A token for another service account than the group's, and a group that does not
    // exist: refused.
    let wrong = follower(
        addr,
        vm("vm-1", "legacy"),
        Some(auth.tokens.issue("vms", "web", Duration::from_secs(60))),
    )
    .await;
    let nogroup = follower(
        addr,
        vm("vm-2", "nope"),
        Some(
            auth.tokens
                .issue("vms", "legacy-vm", Duration::from_secs(60)),
        ),
    )
    .await;
    assert!(!got_snapshot(&wrong, Duration::from_millis(300)).await);
    assert!(!got_snapshot(&nogroup, Duration::from_millis(100)).await);
    assert!(endpoints(&web).is_empty());

    // The VM with a token for the group's account: registered, with the group's labels
    // and ports (app: legacy, port 8080), and it gets its own snapshot.
    let good = trellis_proxy::start(Config::empty(), ProxyOptions::default())
        .await
        .expect("proxy");
    let following = tokio::spawn(trellis_proxy::xds::follow_with_token(
        addr,
        vm("vm-3", "legacy"),
        Some(
            auth.tokens
                .issue("vms", "legacy-vm", Duration::from_secs(60)),
        ),
        Arc::clone(&good.shared),
        LoadEnv::default(),
    ));
    assert!(got_snapshot(&good, Duration::from_secs(5)).await);
    eventually(
        "the VM is an endpoint of legacy",
        Duration::from_secs(5),
        || endpoints(&web) == ["10.9.0.7:8080"],
    )
    .await;
    // Its workload (for telemetry) is the group, on both sides.
    let workloads: Vec<String> = web
        .config()
        .targets
        .iter()
        .filter(|t| t.hostname == "legacy.vms.svc.cluster.local")
        .flat_map(|t| t.cluster.endpoints.iter().map(|e| e.meta.workload.clone()))
        .collect();
    assert!(workloads.iter().all(|w| w == "legacy") && !workloads.is_empty());
    assert_eq!(good.config().own_meta.workload, "legacy");
    // The other side: web-0's workload is its declared Workload, web.
    assert_eq!(web.config().own_meta.workload, "web");
    let st = cp.status();
    let s = st
        .iter()
        .find(|s| s.instance == "vm-3")
        .expect("vm-3 in proxy-status");
    assert_eq!(s.identity, "spiffe://cluster.local/ns/vms/sa/legacy-vm");
    assert!(
        !st.iter()
            .any(|s| s.instance == "vm-1" || s.instance == "vm-2")
    );

    // The VM's proxy goes away: after the grace period, so does the endpoint.
    following.abort();
    eventually(
        "the VM is no longer an endpoint",
        Duration::from_secs(5),
        || endpoints(&web).is_empty(),
    )
    .await;
}
