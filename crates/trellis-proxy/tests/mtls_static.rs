//! Two `trellis-proxy` binaries in static mode, each with a workload certificate from files
//! (`--workload-cert`, as `trellis cert` writes them) and the mesh's root in the snapshot:
//! curl through the pair reaches the app over mutual TLS; curl straight to the STRICT
//! inbound proxy is refused; a client that expects another identity refuses the peer; an
//! AuthorizationPolicy denial is answered 403 and logged with the policy and rule.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

mod common;

use trellis_identity::{Ca, Tokens};
use trellis_testkit::HttpServer;

const BIN: &str = env!("CARGO_BIN_EXE_trellis-proxy");

struct Running(Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    l.local_addr().expect("addr").port()
}

fn wait_port(port: u16) {
    for _ in 0..100 {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("port {port} did not open");
}

/// A certificate for ns/sa from `ca`, written to `dir`.
fn certify(ca: &Ca, tokens: &Tokens, ns: &str, sa: &str, dir: &Path) {
    let (chain, key) = common::workload_certificate(ca, tokens, ns, sa);
    trellis_identity::write_workload_files(dir, &chain, &key, &[ca.root_pem().to_string()])
        .expect("files");
}

fn proxy(config: &Path, listen: &[&str], certs: &Path, log: &Path) -> Running {
    Running(
        Command::new(BIN)
            .arg("--config")
            .arg(config)
            .args(listen)
            .arg("--workload-cert")
            .arg(certs)
            .args(["--admin", "off", "--readiness", "off"])
            .args(["--log-level", "info", "--log-format", "json"])
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(log).expect("log file"))
            .spawn()
            .expect("proxy starts"),
    )
}

/// curl's status code and the x-forwarded-client-cert the app saw (echoed back).
fn curl(url: &str) -> (String, Option<String>) {
    let out = Command::new("curl")
        .args(["-sS", "--max-time", "5", "-D", "-", "-o", "/dev/null"])
        .args(["-H", "Host: app", url])
        .output()
        .expect("curl runs");
    let head = String::from_utf8_lossy(&out.stdout).into_owned();
    let status = head
        .lines()
        .next()
        .and_then(|l| l.split(' ').nth(1))
        .unwrap_or("000")
        .to_string();
    let xfcc = head.lines().find_map(|l| {
        l.strip_prefix("x-echo-h-x-forwarded-client-cert: ")
            .map(|v| v.trim().to_string())
    });
    (status, xfcc)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_binaries_speak_mtls_with_certificates_from_files() {
    let dir = tempfile::tempdir().expect("tempdir");
    let ca = Ca::load_or_create(&dir.path().join("ca"), "cluster.local").expect("ca");
    let tokens = Tokens::load_or_create(&dir.path().join("ca")).expect("tokens");
    let (web, reviews) = (dir.path().join("web"), dir.path().join("reviews"));
    certify(&ca, &tokens, "web", "web", &web);
    certify(&ca, &tokens, "shop", "reviews", &reviews);
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(reviews.join("key.pem"))
        .expect("key")
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600, "the key is readable by its owner only");

    let app = HttpServer::start().await.expect("app");
    let (inbound, outbound, wrong) = (free_port(), free_port(), free_port());
    // A client whose certificate comes from another CA (it trusts the mesh's root, so it
    // would accept the server; the server must refuse it).
    let stranger_port = free_port();
    let other_ca_dir = dir.path().join("other-ca");
    let other_ca = Ca::load_or_create(&other_ca_dir, "cluster.local").expect("other ca");
    let other_tokens = Tokens::load_or_create(&other_ca_dir).expect("tokens");
    let stranger = dir.path().join("stranger");
    certify(&other_ca, &other_tokens, "web", "web", &stranger);
    let root = serde_json::to_string(ca.root_pem()).expect("json");
    let in_yaml = dir.path().join("in.yaml");
    std::fs::write(
        &in_yaml,
        format!(
            "version: t\nworkload:\n  name: reviews\n  namespace: shop\n  serviceAccount: reviews\n  inboundPorts: [{{port: {}, name: http}}]\n  mtls: STRICT\n  authorization:\n  - name: shop/no-admin\n    action: DENY\n    rules:\n    - to: [{{paths: [\"/admin/*\"]}}]\n    - to: [{{paths: [\"/status/*\"]}}]\ntrustRoots: [{root}]\n",
            app.addr.port()
        ),
    )
    .expect("write");
    let out_yaml = |file: &str, identity: &str| {
        let path = dir.path().join(file);
        std::fs::write(
            &path,
            format!(
                "version: t\nservices:\n- hostname: app.shop.svc.cluster.local\n  ports: [{{port: 80, name: http, cluster: app}}]\nclusters:\n- name: app\n  endpoints: [{{address: \"127.0.0.1:{inbound}\", proxied: true, identity: \"{identity}\"}}]\ntrustRoots: [{root}]\n"
            ),
        )
        .expect("write");
        path
    };
    let good = out_yaml("out.yaml", "spiffe://cluster.local/ns/shop/sa/reviews");
    let bad = out_yaml("wrong.yaml", "spiffe://cluster.local/ns/shop/sa/ratings");
    let in_listen = format!("127.0.0.1:{inbound}={}", app.addr.port());
    let in_log = dir.path().join("inbound.log");
    let mut in_proxy = proxy(
        &in_yaml,
        &["--inbound-listen", &in_listen],
        &reviews,
        &in_log,
    );
    let out_listen = format!("127.0.0.1:{outbound}=app.shop:80");
    let _out = proxy(
        &good,
        &["--outbound-listen", &out_listen],
        &web,
        &dir.path().join("out.log"),
    );
    let wrong_listen = format!("127.0.0.1:{wrong}=app.shop:80");
    let _wrong = proxy(
        &bad,
        &["--outbound-listen", &wrong_listen],
        &web,
        &dir.path().join("w.log"),
    );
    let stranger_listen = format!("127.0.0.1:{stranger_port}=app.shop:80");
    let _stranger = proxy(
        &good,
        &["--outbound-listen", &stranger_listen],
        &stranger,
        &dir.path().join("s.log"),
    );
    for p in [inbound, outbound, wrong, stranger_port] {
        wait_port(p);
    }
    let curl = |url: String| tokio::task::spawn_blocking(move || curl(&url));

    let (status, xfcc) = curl(format!("http://127.0.0.1:{outbound}/echo"))
        .await
        .expect("curl");
    assert_eq!(status, "200");
    assert_eq!(
        xfcc.as_deref(),
        Some(
            "By=spiffe://cluster.local/ns/shop/sa/reviews;URI=spiffe://cluster.local/ns/web/sa/web"
        )
    );
    // Plaintext straight to the STRICT inbound proxy: no HTTP response at all.
    let (status, _) = curl(format!("http://127.0.0.1:{inbound}/echo"))
        .await
        .expect("curl");
    assert_eq!(status, "000");
    // A client expecting ratings refuses reviews' certificate: 503, upstream failure.
    let (status, _) = curl(format!("http://127.0.0.1:{wrong}/echo"))
        .await
        .expect("curl");
    assert_eq!(status, "503");
    // A client certificate from another CA: the inbound proxy refuses the handshake.
    let (status, _) = curl(format!("http://127.0.0.1:{stranger_port}/echo"))
        .await
        .expect("curl");
    assert_eq!(status, "503");
    // The snapshot's DENY policy: its second rule matches; 403, and a log line that names
    // the policy and the rule.
    let (status, _) = curl(format!("http://127.0.0.1:{outbound}/status/201"))
        .await
        .expect("curl");
    assert_eq!(status, "403");
    let _ = in_proxy.0.kill();
    let _ = in_proxy.0.wait();
    let log = std::fs::read_to_string(&in_log).expect("log");
    // The other CA's client was refused by the inbound proxy itself, and said why.
    assert!(
        log.lines()
            .any(|l| l.contains("mTLS handshake from") && l.contains("failed")),
        "{log}"
    );
    let line = log
        .lines()
        .find(|l| l.contains("RBAC: access denied"))
        .unwrap_or_else(|| panic!("no denial logged:\n{log}"));
    let v: serde_json::Value = serde_json::from_str(line).expect("json log line");
    assert_eq!(v["fields"]["policy"], "shop/no-admin", "{line}");
    assert_eq!(v["fields"]["rule"], 1, "{line}");
    assert_eq!(v["fields"]["action"], "DENY", "{line}");
    assert_eq!(
        v["fields"]["principal"], "cluster.local/ns/web/sa/web",
        "{line}"
    );
}
