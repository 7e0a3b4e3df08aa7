//! Gateway mode with real TLS clients (curl): a certificate per host chosen by SNI, mutual
//! TLS that refuses a client without a certificate from the configured CA, and the
//! `trellis-proxy --mode gateway` binary serving its snapshot's ports, or refusing to start
//! with the name of a certificate file it cannot read.

use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use trellis_proxy::{Config, LoadEnv, ProxyOptions};
use trellis_testkit::HttpServer;
use trellis_testkit::tls::TestCa;
use trellis_xds::snapshot::Snapshot;

const BIN: &str = env!("CARGO_BIN_EXE_trellis-proxy");

/// curl's status code (0 when the transfer failed) and its error output; `None` when curl
/// is not installed.
fn curl(args: &[&str]) -> Option<(u16, String)> {
    let out = match Command::new("curl")
        .args([
            "-sS",
            "-o",
            "/dev/null",
            "--max-time",
            "10",
            "-w",
            "%{http_code}",
        ])
        .args(args)
        .output()
    {
        Ok(o) => o,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return None,
        Err(e) => panic!("curl: {e}"),
    };
    Some((
        String::from_utf8_lossy(&out.stdout)
            .trim()
            .parse()
            .unwrap_or(0),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    ))
}

fn https(host: &str, addr: SocketAddr, ca: &Path, extra: &[&str]) -> Option<(u16, String)> {
    let resolve = format!("{host}:{}:127.0.0.1", addr.port());
    let url = format!("https://{host}:{}/bytes/4", addr.port());
    let ca = ca.to_str().expect("utf-8 path");
    let mut args = vec!["--cacert", ca, "--resolve", &resolve];
    args.extend_from_slice(extra);
    args.push(&url);
    curl(&args)
}

fn write(dir: &Path, name: &str, text: &str) -> String {
    let p = dir.join(name);
    std::fs::write(&p, text).expect("write");
    p.to_str().expect("utf-8 path").to_string()
}

/// A gateway port 443 with a MUTUAL server for a.example.com (certificate files named
/// directly) and a SIMPLE one for b.example.com (credentialName), both to `app`.
fn snapshot(dir: &Path, ca: &TestCa, app: SocketAddr, port: u16) -> String {
    let a = ca.server(&["a.example.com"]).expect("cert a");
    let cert = write(dir, "a.crt", &a.cert_pem);
    let key = write(dir, "a.key", &a.key_pem);
    let ca_file = write(dir, "clients-ca.crt", &ca.cert_pem);
    ca.write_credential(dir, "b-cert", &["b.example.com"])
        .expect("credential b");
    format!(
        r#"version: gw
clusters:
- name: app
  endpoints: [{{address: "{app}"}}]
gatewayPorts:
- port: {port}
  servers:
  - gateway: edge/gw
    protocol: HTTPS
    hosts: [a.example.com]
    tls: {{mode: MUTUAL, serverCertificate: "{cert}", privateKey: "{key}", caCertificates: "{ca_file}"}}
    virtualHosts:
    - name: edge/a
      domains: [a.example.com]
      httpRoutes: [{{name: a, clusters: [{{cluster: app}}]}}]
  - gateway: edge/gw
    protocol: HTTPS
    hosts: ["*.example.com"]
    tls: {{mode: SIMPLE, credentialName: b-cert}}
    virtualHosts:
    - name: edge/b
      domains: ["*.example.com"]
      httpRoutes: [{{name: b, clusters: [{{cluster: app}}]}}]
"#
    )
}

// curl runs as a blocking child process: the proxy needs a runtime thread of its own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificates_by_sni_and_mutual_tls() {
    let app = HttpServer::start().await.expect("app");
    let dir = tempfile::tempdir().expect("tempdir");
    let ca = TestCa::new("gateway test CA").expect("ca");
    let text = snapshot(dir.path(), &ca, app.addr, 443);
    let raw = Snapshot::from_text(&text, "gw.yaml").expect("parses");
    let env = LoadEnv {
        credentials_dir: dir.path().to_path_buf(),
        ..LoadEnv::default()
    };
    let proxy = trellis_proxy::start(
        Config::from_wire_with(raw, None, &env).expect("converts"),
        ProxyOptions {
            gateway_listen: vec![("127.0.0.1:0".parse().expect("addr"), 443)],
            ..ProxyOptions::default()
        },
    )
    .await
    .expect("gateway");
    let addr = proxy.inbound_addrs[0];
    let ca_file = ca.write_ca(&dir.path().join("trust")).expect("ca file");

    // b.example.com: SIMPLE, its own certificate (curl checks the name).
    let Some((code, err)) = https("b.example.com", addr, &ca_file, &[]) else {
        eprintln!("curl not installed: skipping");
        return;
    };
    assert_eq!(code, 200, "{err}");
    // a.example.com: MUTUAL. Without a client certificate the handshake fails...
    let (code, err) = https("a.example.com", addr, &ca_file, &[]).expect("curl");
    assert_eq!(code, 0, "no client certificate must fail: {err}");
    // ...with one from another CA too...
    let stranger = TestCa::new("someone else").expect("ca");
    let c = stranger.client("intruder").expect("client cert");
    let (cert, key) = (
        write(dir.path(), "intruder.crt", &c.cert_pem),
        write(dir.path(), "intruder.key", &c.key_pem),
    );
    let (code, err) = https(
        "a.example.com",
        addr,
        &ca_file,
        &["--cert", &cert, "--key", &key],
    )
    .expect("curl");
    assert_eq!(code, 0, "a certificate from another CA must fail: {err}");
    // ...and with one from the configured CA it goes through.
    let c = ca.client("shop-frontend").expect("client cert");
    let (cert, key) = (
        write(dir.path(), "client.crt", &c.cert_pem),
        write(dir.path(), "client.key", &c.key_pem),
    );
    let (code, err) = https(
        "a.example.com",
        addr,
        &ca_file,
        &["--cert", &cert, "--key", &key],
    )
    .expect("curl");
    assert_eq!(code, 200, "{err}");
    assert_eq!(app.stats().requests(), 2);
    // A handshake for b.example.com (no client certificate) cannot carry a request for
    // a.example.com (MUTUAL): 421 Misdirected Request.
    let (code, err) = https(
        "b.example.com",
        addr,
        &ca_file,
        &["-H", "Host: a.example.com"],
    )
    .expect("curl");
    assert_eq!(code, 421, "{err}");
    assert_eq!(app.stats().requests(), 2, "never reached the app");
    let failed = proxy
        .shared
        .stats
        .tls_handshake_errors_total
        .load(std::sync::atomic::Ordering::Relaxed);
    assert_eq!(failed, 2, "the two refused handshakes are counted");
}

struct Running(Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_binary_serves_its_gateway_ports_or_names_the_missing_file() {
    let app = HttpServer::start().await.expect("app");
    let dir = tempfile::tempdir().expect("tempdir");
    let ca = TestCa::new("gateway test CA").expect("ca");
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
        .port();
    let text = snapshot(dir.path(), &ca, app.addr, port).replace(
        "gatewayPorts:\n- port:",
        "gatewayPorts:\n- bind: 127.0.0.1\n  port:",
    );
    let snap = write(dir.path(), "gw.yaml", &text);
    let creds = dir.path().to_str().expect("utf-8 path");
    let common = [
        "--admin",
        "off",
        "--readiness",
        "off",
        "--log-level",
        "warn",
    ];

    // A credential directory without b-cert: the gateway refuses to start and says which
    // file is missing.
    let empty = tempfile::tempdir().expect("tempdir");
    let out = Command::new(BIN)
        .args(["--mode", "gateway", "--config", &snap, "--credentials-dir"])
        .arg(empty.path())
        .args(common)
        .output()
        .expect("runs");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("b-cert/tls.crt"), "{err}");
    assert!(err.contains("edge/gw"), "{err}");

    let child = Command::new(BIN)
        .args([
            "--mode",
            "gateway",
            "--config",
            &snap,
            "--credentials-dir",
            creds,
        ])
        .args(common)
        .stdout(Stdio::null())
        .spawn()
        .expect("starts");
    let _running = Running(child);
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().expect("addr");
    let ca_file = ca.write_ca(&dir.path().join("trust")).expect("ca file");
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if std::net::TcpStream::connect(addr).is_ok() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the gateway did not listen on {addr}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let Some((code, err)) = https("b.example.com", addr, &ca_file, &[]) else {
        eprintln!("curl not installed: skipping");
        return;
    };
    assert_eq!(code, 200, "{err}");
}

/// The gateway's own AuthorizationPolicies judge every connection: `connection.sni` on a
/// terminated HTTPS port, and `remoteIpBlocks` on a TCP port (the connection closed).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gateway_policies_see_the_sni_and_guard_tcp_ports() {
    let app = HttpServer::start().await.expect("app");
    let echo = trellis_testkit::TcpEchoServer::start().await.expect("echo");
    let dir = tempfile::tempdir().expect("tempdir");
    let ca = TestCa::new("gateway test CA").expect("ca");
    ca.write_credential(dir.path(), "wild", &["*.example.com"])
        .expect("credential");
    let text = format!(
        r#"version: gw
workload:
  name: ingress
  namespace: edge
  authorization:
  - name: edge/no-secret-sni
    action: DENY
    rules:
    - when: [{{key: connection.sni, values: ["secret.example.com"]}}]
  - name: edge/no-loopback-tcp
    action: DENY
    rules:
    - to: [{{ports: ["9000"]}}]
      from: [{{remoteIpBlocks: ["127.0.0.0/8"]}}]
clusters:
- name: app
  endpoints: [{{address: "{app}"}}]
- name: echo
  endpoints: [{{address: "{echo}"}}]
gatewayPorts:
- port: 443
  servers:
  - gateway: edge/gw
    protocol: HTTPS
    hosts: ["*.example.com"]
    tls: {{mode: SIMPLE, credentialName: wild}}
    virtualHosts:
    - name: edge/web
      domains: ["*.example.com"]
      httpRoutes: [{{name: web, clusters: [{{cluster: app}}]}}]
- port: 9000
  servers:
  - gateway: edge/gw
    protocol: TCP
    hosts: ["*"]
    virtualHosts:
    - name: edge/tcp
      domains: ["*"]
      tcpRoutes: [{{name: echo, clusters: [{{cluster: echo}}]}}]
"#,
        app = app.addr,
        echo = echo.addr
    );
    let raw = Snapshot::from_text(&text, "gw.yaml").expect("parses");
    let env = LoadEnv {
        credentials_dir: dir.path().to_path_buf(),
        ..LoadEnv::default()
    };
    let proxy = trellis_proxy::start(
        Config::from_wire_with(raw, None, &env).expect("converts"),
        ProxyOptions {
            gateway_listen: vec![
                ("127.0.0.1:0".parse().expect("addr"), 443),
                ("127.0.0.1:0".parse().expect("addr"), 9000),
            ],
            ..ProxyOptions::default()
        },
    )
    .await
    .expect("gateway");
    let (https_addr, tcp_addr) = (proxy.inbound_addrs[0], proxy.inbound_addrs[1]);
    let ca_file = ca.write_ca(&dir.path().join("trust")).expect("ca file");
    let Some((code, err)) = https("shop.example.com", https_addr, &ca_file, &[]) else {
        eprintln!("curl not installed: skipping");
        return;
    };
    assert_eq!(code, 200, "{err}");
    let (code, err) = https("secret.example.com", https_addr, &ca_file, &[]).expect("curl");
    assert_eq!(code, 403, "denied by its SNI: {err}");
    assert_eq!(app.stats().requests(), 1);

    // The TCP port: the connection is closed before anything reaches the echo server.
    let got = tokio::time::timeout(
        Duration::from_secs(10),
        trellis_testkit::tcp_echo_half_close(tcp_addr, b"ping"),
    )
    .await
    .expect("in time");
    assert!(
        got.as_ref().map_or(true, |b| b.is_empty()),
        "no echo through a denied TCP port: {got:?}"
    );
    assert_eq!(echo.stats().connections(), 0);
    let denials = |policy: &str| {
        proxy
            .shared
            .stats
            .denials_by_policy
            .lock()
            .expect("stats")
            .get(policy)
            .copied()
    };
    assert_eq!(denials("edge/no-secret-sni"), Some(1));
    assert_eq!(denials("edge/no-loopback-tcp"), Some(1));
}

/// Behind one trusted load balancer (`settings.numTrustedProxies: 1`), `remoteIpBlocks`
/// judge the client the load balancer names in `X-Forwarded-For`, not the balancer's own
/// address nor what the client wrote further left; the app sees the gateway's append.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn remote_ip_blocks_behind_a_trusted_load_balancer() {
    let app = HttpServer::start().await.expect("app");
    let text = format!(
        r#"version: gw
settings: {{numTrustedProxies: 1}}
workload:
  name: ingress
  namespace: edge
  authorization:
  - name: edge/block-bad-clients
    action: DENY
    rules:
    - from: [{{remoteIpBlocks: ["203.0.113.0/24"]}}]
clusters:
- name: app
  endpoints: [{{address: "{app}"}}]
gatewayPorts:
- port: 80
  servers:
  - gateway: edge/gw
    protocol: HTTP
    hosts: ["*"]
    virtualHosts:
    - name: edge/web
      domains: ["*"]
      httpRoutes: [{{name: web, clusters: [{{cluster: app}}]}}]
"#,
        app = app.addr
    );
    let raw = Snapshot::from_text(&text, "gw.yaml").expect("parses");
    let proxy = trellis_proxy::start(
        Config::from_wire_with(raw, None, &LoadEnv::default()).expect("converts"),
        ProxyOptions {
            gateway_listen: vec![("127.0.0.1:0".parse().expect("addr"), 80)],
            ..ProxyOptions::default()
        },
    )
    .await
    .expect("gateway");
    let url = format!("http://127.0.0.1:{}/echo", proxy.inbound_addrs[0].port());
    let status = |xff: &str| {
        let h = format!("X-Forwarded-For: {xff}");
        curl(&["-H", &h, &url]).map(|(code, _)| code)
    };
    let Some(code) = status("198.51.100.1") else {
        eprintln!("curl not installed: skipping");
        return;
    };
    assert_eq!(code, 200, "a client outside the block");
    assert_eq!(
        status("203.0.113.9"),
        Some(403),
        "the load balancer names a blocked client"
    );
    assert_eq!(
        status("203.0.113.9, 198.51.100.1"),
        Some(200),
        "what the client wrote to the left is not trusted"
    );
    // The app sees the chain with the gateway's peer (the load balancer) appended.
    let out = Command::new("curl")
        .args([
            "-sS",
            "-D",
            "-",
            "-o",
            "/dev/null",
            "-H",
            "X-Forwarded-For: 198.51.100.1",
            &url,
        ])
        .output()
        .expect("curl");
    let head = String::from_utf8_lossy(&out.stdout).to_ascii_lowercase();
    assert!(
        head.contains("x-echo-h-x-forwarded-for: 198.51.100.1, 127.0.0.1"),
        "{head}"
    );
    // An outside client cannot choose the request id that logs and traces carry: the
    // gateway gives its own (Envoy's default at the edge).
    let out = Command::new("curl")
        .args([
            "-sS",
            "-D",
            "-",
            "-o",
            "/dev/null",
            "-H",
            "x-request-id: chosen-by-the-client",
            &url,
        ])
        .output()
        .expect("curl");
    let head = String::from_utf8_lossy(&out.stdout).to_ascii_lowercase();
    let id = head
        .lines()
        .find_map(|l| l.strip_prefix("x-echo-h-x-request-id: "))
        .map(str::trim);
    assert!(
        id.is_some_and(|id| id != "chosen-by-the-client" && !id.is_empty()),
        "{head}"
    );
}
