//! `trellis up` for real: pods in network namespaces with transparent interception,
//! unmodified programs in them. An unmodified `curl` in one pod reaches an unmodified
//! `python3 -m http.server` in another by service name; the server's sidecar saw the
//! request over mutual TLS; `trellis ps` lists the pods; `trellis down` leaves no
//! namespace, hosts file or process behind.
//!
//! Needs root, `ip`, `iptables-restore`, `curl` and `python3` (CI has them); without them
//! the test says what is missing and checks nothing.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_trellis");

fn have(cmd: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {cmd}")])
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

fn output(args: &[&str]) -> (bool, String) {
    match Command::new(args[0]).args(&args[1..]).output() {
        Ok(o) => (
            o.status.success(),
            String::from_utf8_lossy(&o.stdout).into_owned() + &String::from_utf8_lossy(&o.stderr),
        ),
        Err(e) => (false, e.to_string()),
    }
}

fn root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .unwrap_or_default()
        .lines()
        .any(|l| l.starts_with("Uid:") && l.split_whitespace().nth(1) == Some("0"))
}

/// Whether this machine can run pods (root and `tools`); says why not when it cannot.
fn can_run(tools: &[&str]) -> bool {
    let missing: Vec<&str> = tools.iter().copied().filter(|c| !have(c)).collect();
    if !root() || !missing.is_empty() {
        eprintln!("SKIPPED: needs root and {missing:?} (root: {})", root());
        return false;
    }
    true
}

/// The HTTP status curl gets for `url` (in network namespace `netns`, or on the host).
fn status_of(netns: Option<&str>, url: &str) -> String {
    let mut args = Vec::new();
    if let Some(ns) = netns {
        args.extend(["ip", "netns", "exec", ns]);
    }
    args.extend([
        "curl",
        "-s",
        "-m",
        "3",
        "-o",
        "/dev/null",
        "-w",
        "%{http_code}",
        url,
    ]);
    output(&args).1
}

/// Waits (at most 10 s) for `trellis up` to exit once its mesh is told to stop.
fn wait_exit(up: &mut std::process::Child) -> Option<std::process::ExitStatus> {
    let since = Instant::now();
    while since.elapsed() < Duration::from_secs(10) {
        if let Ok(Some(status)) = up.try_wait() {
            return Some(status);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    None
}

/// A pod's address (its `eth0`'s IPv4 address).
fn pod_ip(netns: &str) -> String {
    let (_, addr) = output(&["ip", "-n", netns, "-4", "-o", "addr", "show", "eth0"]);
    addr.split_whitespace()
        .nth(3)
        .and_then(|a| a.split('/').next())
        .unwrap_or_else(|| panic!("no address in {netns}: {addr}"))
        .to_string()
}

/// A free port of the host's loopback (for a gateway's hostPort).
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port()
}

const CONFIG: &str = r#"apiVersion: v1
kind: Service
metadata: {name: web, namespace: shop}
spec:
  selector: {app: web}
  ports: [{name: http, port: 80, targetPort: 8000}]
---
apiVersion: trellis.dev/v1alpha1
kind: Workload
metadata: {name: web, namespace: shop, labels: {app: web, version: v1}}
spec:
  serviceAccount: web
  command: [python3, -m, http.server, "8000"]
  ports: [{name: http, port: 8000}]
---
apiVersion: trellis.dev/v1alpha1
kind: Workload
metadata: {name: client, namespace: shop, labels: {app: client}}
spec:
  serviceAccount: client
  command: [python3, -c, "import time; time.sleep(3600)"]
---
apiVersion: trellis.dev/v1alpha1
kind: Workload
metadata: {name: ingressgateway, namespace: shop, labels: {istio: ingressgateway}}
spec:
  serviceAccount: ingressgateway
  gateway: true
  ports: [{name: http, port: 8080, hostPort: HOST_PORT}]
---
apiVersion: networking.istio.io/v1
kind: Gateway
metadata: {name: shop-gateway, namespace: shop}
spec:
  selector: {istio: ingressgateway}
  servers:
  - port: {number: 8080, name: http, protocol: HTTP}
    hosts: ["*"]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: web, namespace: shop}
spec:
  hosts: ["*"]
  gateways: [shop-gateway]
  http:
  - route:
    - destination: {host: web, port: {number: 80}}
"#;

/// Stops the mesh whatever happens to the test.
struct Down(String);

impl Drop for Down {
    fn drop(&mut self) {
        let _ = Command::new(BIN)
            .args(["down", &self.0])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        // The logs `trellis down` keeps: a test's are of no use once it is over.
        let _ = std::fs::remove_dir_all(format!("/run/trellis/{}", self.0));
    }
}

/// (This mesh's interception rules are an nftables table, as on a machine without
/// iptables; the other tests' are iptables rules.)
#[test]
fn curl_reaches_a_python_server_by_service_name_over_mtls_and_down_leaves_nothing() {
    if !can_run(&["ip", "nft", "curl", "python3"]) {
        return;
    }
    let dir = tempfile::tempdir().expect("dir");
    // A free port of the host's loopback for the gateway's hostPort.
    let host_port = free_port();
    std::fs::write(
        dir.path().join("mesh.yaml"),
        CONFIG.replace("HOST_PORT", &host_port.to_string()),
    )
    .expect("config");
    let mesh = format!("t{}", std::process::id());
    let _down = Down(mesh.clone());
    let log = dir.path().join("up.log");
    let mut up = Command::new(BIN)
        .args(["up", &dir.path().to_string_lossy(), "--name", &mesh])
        .env("TRELLIS_NETFILTER", "nft")
        .stdout(std::fs::File::create(&log).expect("log"))
        .stderr(Stdio::inherit())
        .spawn()
        .expect("trellis up");
    let client = format!("trl-{mesh}-client-0");
    let web = format!("trl-{mesh}-web-0");

    // Unmodified curl, by the service's short name, then its FQDN.
    let started = Instant::now();
    let mut last = String::new();
    let mut ok = false;
    while started.elapsed() < Duration::from_secs(30) {
        if let Ok(Some(status)) = up.try_wait() {
            panic!(
                "trellis up exited ({status}): {}",
                std::fs::read_to_string(&log).unwrap_or_default()
            );
        }
        let out = status_of(Some(&client), "http://web/");
        if out == "200" {
            ok = true;
            break;
        }
        last = out;
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(
        ok,
        "curl http://web/ from the client pod: {last:?}\n{}",
        std::fs::read_to_string(&log).unwrap_or_default()
    );
    eprintln!("first 200 after {:?}", started.elapsed());
    let (_, rules) = output(&[
        "ip", "netns", "exec", &client, "nft", "list", "table", "ip", "trellis",
    ]);
    assert!(
        rules.contains("redirect to :15001"),
        "nftables rules: {rules}"
    );
    let out = status_of(Some(&client), "http://web.shop.svc.cluster.local/");
    assert_eq!(out, "200");

    // From the host: its loopback port, forwarded to the ingress gateway's pod, routed
    // by the Gateway and VirtualService to web.
    let mut from_host = String::new();
    for _ in 0..50 {
        from_host = status_of(None, &format!("http://127.0.0.1:{host_port}/"));
        if from_host == "200" {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(from_host, "200", "through the ingress gateway");

    // The server's sidecar received it over mutual TLS from the client's identity (its
    // metrics on Istio's 15020, from the node as Prometheus would scrape them, and on
    // Envoy's 15090).
    let web_ip = pod_ip(&web);
    let (_, stats) = output(&[
        "ip",
        "netns",
        "exec",
        &format!("trl-{mesh}-node"),
        "curl",
        "-s",
        "-m",
        "5",
        &format!("http://{web_ip}:15020/stats/prometheus"),
    ]);
    let (_, envoy_port) = output(&[
        "ip",
        "netns",
        "exec",
        &web,
        "curl",
        "-s",
        "-m",
        "5",
        "http://127.0.0.1:15090/stats/prometheus",
    ]);
    assert!(envoy_port.contains("istio_requests_total{"), "{envoy_port}");
    let line = stats
        .lines()
        .find(|l| {
            l.starts_with("istio_requests_total{reporter=\"destination\"")
                && l.contains("response_code=\"200\"")
                && l.contains("sa/client\"")
        })
        .unwrap_or_else(|| panic!("no destination series:\n{stats}"));
    assert!(
        line.contains("connection_security_policy=\"mutual_tls\""),
        "{line}"
    );
    assert!(
        line.contains("source_principal=\"spiffe://cluster.local/ns/shop/sa/client\""),
        "{line}"
    );
    // The caller is no endpoint of a service: its sidecar's snapshot lists it as a peer.
    assert!(
        line.contains("source_workload=\"client\",source_canonical_service=\"client\""),
        "{line}"
    );

    // `trellis ps` lists both pods, running.
    let (ok_ps, ps) = output(&[BIN, "ps", &mesh]);
    assert!(ok_ps, "{ps}");
    assert!(
        ps.lines()
            .any(|l| l.starts_with("ingressgateway-0") && l.contains("(gateway)")),
        "{ps}"
    );
    for pod in ["web-0", "client-0"] {
        assert!(
            ps.lines()
                .any(|l| l.starts_with(pod) && l.matches("running").count() == 2),
            "{ps}"
        );
    }

    // Down: nothing left.
    let pids: Vec<String> = [&client, &web]
        .iter()
        .flat_map(|ns| {
            output(&["ip", "netns", "pids", ns])
                .1
                .split_whitespace()
                .map(str::to_string)
                .collect::<Vec<_>>()
        })
        .collect();
    assert!(pids.len() >= 4, "sidecars and apps: {pids:?}");
    let (ok_down, down) = output(&[BIN, "down", &mesh]);
    assert!(ok_down, "{down}");
    assert!(wait_exit(&mut up).is_some(), "trellis up still runs");
    let (_, list) = output(&["ip", "netns", "list"]);
    assert!(!list.contains(&format!("trl-{mesh}-")), "{list}");
    assert!(
        std::net::TcpStream::connect(("127.0.0.1", host_port)).is_err(),
        "the host port is closed"
    );
    for ns in [&client, &web] {
        assert!(!std::path::Path::new(&format!("/etc/netns/{ns}")).exists());
    }
    for pid in &pids {
        assert!(
            !std::path::Path::new(&format!("/proc/{pid}")).exists(),
            "process {pid} outlived the mesh"
        );
    }
    let text = std::fs::read_to_string(&log).unwrap_or_default();
    assert!(text.contains(&format!("Mesh {mesh} is down.")), "{text}");
    // Of the mesh's state only its logs stay (no CA key, no tokens).
    let left: Vec<String> = std::fs::read_dir(format!("/run/trellis/{mesh}"))
        .expect("the mesh's state directory")
        .filter_map(Result::ok)
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(left, ["logs"]);
}

/// Copies examples/bookinfo into `to`, its ingress gateway's host port made `port`.
fn bookinfo_copy(to: &std::path::Path, port: u16) {
    let examples = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/bookinfo");
    for f in std::fs::read_dir(&examples).expect("examples/bookinfo") {
        let f = f.expect("entry").path();
        let text = std::fs::read_to_string(&f).expect("read");
        let text = text.replace("hostPort: 8080", &format!("hostPort: {port}"));
        std::fs::write(to.join(f.file_name().expect("name")), text).expect("write");
    }
}

/// The reviews version that served the product page, seen from the host through the
/// ingress gateway.
fn reviews_seen(port: u16, user: Option<&str>) -> String {
    let url = format!("http://127.0.0.1:{port}/productpage");
    let mut args = vec!["curl", "-s", "-m", "3"];
    let header;
    if let Some(u) = user {
        header = format!("end-user: {u}");
        args.extend(["-H", &header]);
    }
    args.push(&url);
    let page = output(&args).1;
    page.split("Reviews served by <b>")
        .nth(1)
        .and_then(|r| r.split("</b>").next())
        .unwrap_or("none")
        .to_string()
}

/// Bookinfo as the demo runs it (`trellis demo-app` in every pod, the ingress gateway on
/// a host port): jason sees reviews v2, others v1 or v3; a routing rule applied to the
/// running mesh with `trellis apply` changes what curl sees, and the applied file is gone
/// from the directory when the mesh stops.
#[test]
fn bookinfo_routes_by_user_and_a_live_rule_changes_what_curl_sees() {
    if !can_run(&["ip", "iptables-restore", "curl"]) {
        return;
    }
    let dir = tempfile::tempdir().expect("dir");
    let port = free_port();
    bookinfo_copy(dir.path(), port);
    let mesh = format!("b{}", std::process::id());
    let _down = Down(mesh.clone());
    let log = dir.path().join("up.log");
    let started = Instant::now();
    let mut up = Command::new(BIN)
        .args(["up", &dir.path().to_string_lossy(), "--name", &mesh])
        .stdout(std::fs::File::create(&log).expect("log"))
        .stderr(Stdio::inherit())
        .spawn()
        .expect("trellis up");
    let mut first = String::new();
    while started.elapsed() < Duration::from_secs(30) {
        first = reviews_seen(port, None);
        if first != "none" {
            break;
        }
        if let Ok(Some(status)) = up.try_wait() {
            panic!("trellis up exited ({status})");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_ne!(
        first,
        "none",
        "{}",
        std::fs::read_to_string(&log).unwrap_or_default()
    );
    eprintln!(
        "productpage answered through the gateway after {:?}",
        started.elapsed()
    );
    for _ in 0..4 {
        assert_eq!(reviews_seen(port, Some("jason")), "reviews-v2");
    }
    let others: Vec<String> = (0..12).map(|_| reviews_seen(port, None)).collect();
    assert!(
        others
            .iter()
            .all(|v| v == "reviews-v1" || v == "reviews-v3"),
        "{others:?}"
    );

    // Every service to v1, applied to the running mesh.
    let rule = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../examples/bookinfo-tasks/virtual-service-all-v1.yaml");
    let (ok, said) = output(&[BIN, "apply", &rule.to_string_lossy(), "--mesh", &mesh]);
    assert!(ok, "{said}");
    let applied = Instant::now();
    let mut in_a_row = 0;
    while applied.elapsed() < Duration::from_secs(10) && in_a_row < 6 {
        let user = if in_a_row % 2 == 0 {
            Some("jason")
        } else {
            None
        };
        if reviews_seen(port, user) == "reviews-v1" {
            in_a_row += 1;
        } else {
            in_a_row = 0;
        }
    }
    assert_eq!(in_a_row, 6, "everyone on reviews-v1 after the rule");
    eprintln!("the rule applied within {:?}", applied.elapsed());
    assert!(
        dir.path()
            .join("applied-virtual-service-all-v1.yaml")
            .exists()
    );

    let (ok, said) = output(&[BIN, "down", &mesh]);
    assert!(ok, "{said}");
    assert!(
        wait_exit(&mut up).is_some_and(|s| s.success()),
        "trellis up ends well"
    );
    assert!(
        !dir.path()
            .join("applied-virtual-service-all-v1.yaml")
            .exists(),
        "the applied file is taken away with the mesh"
    );
    let (_, list) = output(&["ip", "netns", "list"]);
    assert!(!list.contains(&format!("trl-{mesh}-")), "{list}");
}

/// `trellis demo` as a new user runs it (here for 16 s): Bookinfo comes up, the load goes
/// through the ingress gateway on 127.0.0.1:8080, and the live view shows every edge over
/// mutual TLS; `trellis ps` and `trellis apply` (as the demo suggests, naming no mesh)
/// work on it, and the view shows the rule's effect; then everything is removed.
#[test]
fn the_demo_shows_bookinfo_s_edges_and_cleans_up() {
    if !can_run(&["ip", "iptables-restore"]) {
        return;
    }
    if std::net::TcpListener::bind("127.0.0.1:8080").is_err() {
        eprintln!("SKIPPED: 127.0.0.1:8080, the demo's gateway port, is taken");
        return;
    }
    let _down = Down("bookinfo".into());
    let mut child = Command::new(BIN)
        .args(["demo", "--for", "16s"])
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("trellis demo");
    let started = Instant::now();
    while !output(&[
        "curl",
        "-sf",
        "-o",
        "/dev/null",
        "http://127.0.0.1:8080/productpage",
    ])
    .0 && started.elapsed() < Duration::from_secs(10)
    {
        std::thread::sleep(Duration::from_millis(100));
    }
    let (ok, ps) = output(&[BIN, "ps", "bookinfo"]);
    assert!(ok && ps.contains("reviews-v2-0"), "{ps}");
    // Six seconds of the mix, then everyone to v1.
    std::thread::sleep(Duration::from_secs(6));
    let rule = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../examples/bookinfo-tasks/virtual-service-all-v1.yaml");
    let (ok, said) = output(&[BIN, "apply", &rule.to_string_lossy()]);
    assert!(ok, "{said}");
    while child.try_wait().ok().flatten().is_none() && started.elapsed() < Duration::from_secs(60) {
        std::thread::sleep(Duration::from_millis(100));
    }
    if child.try_wait().ok().flatten().is_none() {
        let _ = child.kill();
    }
    let out = child.wait_with_output().expect("output");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    for edge in [
        "ingressgateway → productpage v1",
        "productpage-v1 → details v1",
        "reviews-v2 → ratings v1",
    ] {
        assert!(
            text.lines()
                .any(|l| l.starts_with(edge) && l.ends_with("yes")),
            "{edge} over mTLS:\n{text}"
        );
    }
    // The last view: reviews v1 only.
    let last = text.rsplit("SOURCE → DESTINATION").next().unwrap_or("");
    let rps = |edge: &str| -> f64 {
        last.lines()
            .find(|l| l.starts_with(edge))
            .and_then(|l| l[edge.len()..].split_whitespace().next()?.parse().ok())
            .unwrap_or(-1.0)
    };
    assert!(rps("productpage-v1 → reviews v1") > 0.0, "{last}");
    assert_eq!(rps("productpage-v1 → reviews v2"), 0.0, "{last}");
    assert_eq!(rps("productpage-v1 → reviews v3"), 0.0, "{last}");
    assert!(text.contains("Mesh bookinfo is down."), "{text}");
    let (_, list) = output(&["ip", "netns", "list"]);
    assert!(!list.contains("trl-bookinfo-"), "{list}");
    assert!(!std::path::Path::new("/run/trellis/demo-bookinfo").exists());
}

/// nginx, a line echo (opaque TCP), a server-first protocol, a pod without a sidecar, and
/// STRICT mutual TLS for the namespace.
const PROTOCOLS: &str = r#"apiVersion: v1
kind: Service
metadata: {name: web, namespace: shop}
spec:
  selector: {app: web}
  ports: [{name: http, port: 80, targetPort: 8080}]
---
apiVersion: trellis.dev/v1alpha1
kind: Workload
metadata: {name: web, namespace: shop, labels: {app: web}}
spec:
  serviceAccount: web
  command: [nginx, -c, DIR/nginx.conf, -g, "daemon off;"]
  ports: [{name: http, port: 8080}]
---
apiVersion: v1
kind: Service
metadata: {name: echo, namespace: shop}
spec:
  selector: {app: echo}
  ports: [{name: tcp-echo, port: 9000, targetPort: 9000}]
---
apiVersion: trellis.dev/v1alpha1
kind: Workload
metadata: {name: echo, namespace: shop, labels: {app: echo}}
spec:
  serviceAccount: echo
  command: [python3, DIR/echo.py]
  ports: [{name: tcp-echo, port: 9000}]
---
apiVersion: v1
kind: Service
metadata: {name: mail, namespace: shop}
spec:
  selector: {app: mail}
  ports: [{name: mail, port: 2525, targetPort: 2525}]
---
apiVersion: trellis.dev/v1alpha1
kind: Workload
metadata: {name: mail, namespace: shop, labels: {app: mail}}
spec:
  serviceAccount: mail
  command: [python3, DIR/banner.py]
  ports: [{port: 2525}]
---
apiVersion: trellis.dev/v1alpha1
kind: Workload
metadata: {name: client, namespace: shop, labels: {app: client}}
spec:
  serviceAccount: client
  command: [python3, -c, "import time; time.sleep(3600)"]
---
apiVersion: trellis.dev/v1alpha1
kind: Workload
metadata:
  name: legacy
  namespace: shop
  labels: {app: legacy, sidecar.istio.io/inject: "false"}
spec:
  command: [python3, -c, "import time; time.sleep(3600)"]
---
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: default, namespace: shop}
spec:
  mtls: {mode: STRICT}
"#;

const NGINX_CONF: &str = r#"user root;
pid DIR/nginx.pid;
error_log stderr;
events {}
http {
  access_log off;
  client_body_temp_path DIR/nginx-body;
  proxy_temp_path DIR/nginx-proxy;
  fastcgi_temp_path DIR/nginx-fastcgi;
  uwsgi_temp_path DIR/nginx-uwsgi;
  scgi_temp_path DIR/nginx-scgi;
  server {
    listen 8080;
    location / { default_type text/plain; return 200 "hello from nginx\n"; }
  }
}
"#;

/// A line echo server: each line comes back.
const ECHO_PY: &str = r#"import socketserver
class Echo(socketserver.StreamRequestHandler):
    def handle(self):
        for line in self.rfile:
            self.wfile.write(line)
socketserver.ThreadingTCPServer.allow_reuse_address = True
socketserver.ThreadingTCPServer(("0.0.0.0", 9000), Echo).serve_forever()
"#;

/// A server-first protocol (as SMTP): a banner before the client says anything.
const BANNER_PY: &str = r#"import socketserver
class Mail(socketserver.StreamRequestHandler):
    def handle(self):
        self.wfile.write(b"220 mail.shop ready\r\n")
        self.wfile.flush()
        line = self.rfile.readline()
        self.wfile.write(b"221 bye " + line)
socketserver.ThreadingTCPServer.allow_reuse_address = True
socketserver.ThreadingTCPServer(("0.0.0.0", 2525), Mail).serve_forever()
"#;

/// In the client pod: a line through the echo service, then the mail service's banner
/// (the client waits for it without sending: the sidecar must not wait forever for the
/// client's first bytes) and its answer.
const CLIENT_PY: &str = r#"import socket
e = socket.create_connection(("echo", 9000), timeout=5)
e.sendall(b"hello mesh\n")
print("echo:", e.makefile("rb").readline().decode().strip())
m = socket.create_connection(("mail.shop.svc.cluster.local", 2525), timeout=5)
f = m.makefile("rb")
print("banner:", f.readline().decode().strip())
m.sendall(b"QUIT\r\n")
print("reply:", f.readline().decode().strip())
"#;

/// A Workload added while the mesh runs.
const LATE: &str = r#"apiVersion: v1
kind: Service
metadata: {name: late, namespace: shop}
spec:
  selector: {app: late}
  ports: [{name: http, port: 80, targetPort: 8000}]
---
apiVersion: trellis.dev/v1alpha1
kind: Workload
metadata: {name: late, namespace: shop, labels: {app: late}}
spec:
  command: [python3, -m, http.server, "8000"]
  ports: [{name: http, port: 8000}]
"#;

/// The lines of a pod's sidecar's `/stats/prometheus` that start with `prefix`.
fn series(netns: &str, prefix: &str) -> Vec<String> {
    let (_, stats) = output(&[
        "ip",
        "netns",
        "exec",
        netns,
        "curl",
        "-s",
        "-m",
        "5",
        "http://127.0.0.1:15021/stats/prometheus",
    ]);
    stats
        .lines()
        .filter(|l| l.starts_with(prefix))
        .map(str::to_string)
        .collect()
}

/// Waits (at most `limit`) until `check` holds; whether it did.
fn eventually(limit: Duration, mut check: impl FnMut() -> bool) -> bool {
    let since = Instant::now();
    while since.elapsed() < limit {
        if check() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    false
}

/// Unmodified nginx as a meshed server; a line echo as opaque TCP and a server-first
/// protocol through the sidecars (over mutual TLS); STRICT refuses `curl` and `openssl
/// s_client` from a pod without a sidecar; a Workload added to the directory while the mesh
/// runs becomes a pod that answers by its service name, and taking it away removes the pod.
#[test]
fn nginx_tcp_server_first_strict_and_workloads_added_live() {
    if !can_run(&[
        "ip",
        "iptables-restore",
        "curl",
        "python3",
        "nginx",
        "openssl",
    ]) {
        return;
    }
    let dir = tempfile::tempdir().expect("dir");
    let d = dir.path().to_string_lossy().into_owned();
    let config = dir.path().join("config");
    std::fs::create_dir(&config).expect("config dir");
    std::fs::write(config.join("mesh.yaml"), PROTOCOLS.replace("DIR", &d)).expect("config");
    std::fs::write(dir.path().join("nginx.conf"), NGINX_CONF.replace("DIR", &d)).expect("conf");
    std::fs::write(dir.path().join("echo.py"), ECHO_PY).expect("echo.py");
    std::fs::write(dir.path().join("banner.py"), BANNER_PY).expect("banner.py");
    let mesh = format!("p{}", std::process::id());
    let _down = Down(mesh.clone());
    let log = dir.path().join("up.log");
    let mut up = Command::new(BIN)
        .args(["up", &config.to_string_lossy(), "--name", &mesh])
        .stdout(std::fs::File::create(&log).expect("log"))
        .stderr(Stdio::inherit())
        .spawn()
        .expect("trellis up");
    let up_log = || std::fs::read_to_string(&log).unwrap_or_default();
    let pod = |name: &str| format!("trl-{mesh}-{name}-0");

    // nginx, by its service name, from a meshed pod.
    let mut body = String::new();
    let served = eventually(Duration::from_secs(30), || {
        body = output(&[
            "ip",
            "netns",
            "exec",
            &pod("client"),
            "curl",
            "-s",
            "-m",
            "3",
            "http://web/",
        ])
        .1;
        body == "hello from nginx\n"
    });
    assert!(served, "nginx through the mesh: {body:?}\n{}", up_log());
    let nginx_seen = series(&pod("web"), "istio_requests_total{reporter=\"destination\"");
    assert!(
        nginx_seen
            .iter()
            .any(|l| l.contains("connection_security_policy=\"mutual_tls\"")
                && l.contains("sa/client\"")),
        "{nginx_seen:?}"
    );

    // Opaque TCP and a server-first protocol, from the client pod.
    let mut said = String::new();
    let talked = eventually(Duration::from_secs(20), || {
        said = output(&[
            "timeout",
            "15",
            "ip",
            "netns",
            "exec",
            &pod("client"),
            "python3",
            "-c",
            CLIENT_PY,
        ])
        .1;
        // (Until both apps answer: under load, the echo pod's python may still be
        // starting when the first try comes, and the sidecar closes that connection.)
        said.contains("echo: hello mesh") && said.contains("reply:")
    });
    assert!(talked, "{said}\n{}", up_log());
    assert!(said.contains("echo: hello mesh"), "{said}");
    assert!(said.contains("banner: 220 mail.shop ready"), "{said}");
    assert!(said.contains("reply: 221 bye QUIT"), "{said}");
    for (name, what) in [("echo", "the echo"), ("mail", "the mail server")] {
        let opened = series(
            &pod(name),
            "istio_tcp_connections_opened_total{reporter=\"destination\"",
        );
        assert!(
            opened
                .iter()
                .any(|l| l.contains("connection_security_policy=\"mutual_tls\"")
                    && l.contains("source_principal=\"spiffe://cluster.local/ns/shop/sa/client\"")),
            "{what} saw the client over mutual TLS: {opened:?}"
        );
    }

    // STRICT: from the pod without a sidecar, plaintext and TLS without the mesh's
    // certificate are refused; nginx never sees them.
    let web_ip = pod_ip(&pod("web"));
    let plain = status_of(Some(&pod("legacy")), &format!("http://{web_ip}:8080/"));
    assert_eq!(plain, "000", "plaintext under STRICT");
    let (tls_ok, tls) = output(&[
        "sh",
        "-c",
        &format!(
            "printf 'GET / HTTP/1.0\\r\\n\\r\\n' | timeout 10 ip netns exec {} openssl s_client -connect {web_ip}:8080 -servername web 2>&1",
            pod("legacy")
        ),
    ]);
    assert!(!tls.contains("hello from nginx"), "{tls}");
    assert!(
        !tls_ok && tls.contains("Cipher is (NONE)"),
        "s_client gets no TLS session: {tls}"
    );
    eprintln!("openssl s_client without a mesh certificate:\n{tls}");

    // A Workload added to the directory: its pod starts and answers by its name.
    std::fs::write(config.join("late.yaml"), LATE).expect("late.yaml");
    let mut late = String::new();
    let added = eventually(Duration::from_secs(30), || {
        late = status_of(Some(&pod("client")), "http://late/");
        late == "200"
    });
    assert!(added, "the late pod: {late}\n{}", up_log());
    let (_, ps) = output(&[BIN, "ps", &mesh]);
    assert!(ps.lines().any(|l| l.starts_with("late-0")), "{ps}");
    assert!(
        ps.lines()
            .any(|l| l.starts_with("legacy-0") && l.contains("(none)")),
        "{ps}"
    );
    // And taken away: the pod is gone.
    std::fs::remove_file(config.join("late.yaml")).expect("rm late.yaml");
    let mut ps = String::new();
    let removed = eventually(Duration::from_secs(20), || {
        ps = output(&[BIN, "ps", &mesh]).1;
        !output(&["ip", "netns", "list"]).1.contains(&pod("late"))
            && !ps.lines().any(|l| l.starts_with("late-0"))
    });
    assert!(removed, "{ps}\n{}", up_log());

    let (ok, down) = output(&[BIN, "down", &mesh]);
    assert!(ok, "{down}");
    assert!(wait_exit(&mut up).is_some_and(|s| s.success()));
    let (_, list) = output(&["ip", "netns", "list"]);
    assert!(!list.contains(&format!("trl-{mesh}-")), "{list}");
}
