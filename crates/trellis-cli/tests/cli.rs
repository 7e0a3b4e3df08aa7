//! The `trellis` binary, run as a user runs it.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn trellis(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_trellis"))
        .args(args)
        .output()
        .expect("run trellis")
}

fn examples() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples")
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

#[test]
fn analyze_examples_is_clean() {
    let clean = |paths: &[PathBuf]| {
        let args: Vec<&str> = std::iter::once("analyze")
            .chain(paths.iter().map(|p| p.to_str().expect("utf-8 path")))
            .collect();
        let out = trellis(&args);
        assert_eq!(
            out.status.code(),
            Some(0),
            "{paths:?}\nstdout: {}\nstderr: {}",
            stdout(&out),
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(stdout(&out), "", "no messages expected for {paths:?}");
        assert!(String::from_utf8_lossy(&out.stderr).contains("No validation issues found"));
    };
    clean(&[examples().join("bookinfo")]);
    // Istio's routing tasks, each applied on its own over Bookinfo, as the tasks do.
    let tasks = examples().join("bookinfo-tasks");
    let mut n = 0;
    for e in std::fs::read_dir(&tasks).expect("tasks") {
        let path = e.expect("entry").path();
        let name = path
            .file_name()
            .and_then(|f| f.to_str())
            .unwrap_or("")
            .to_string();
        if name.starts_with("virtual-service-") {
            clean(&[
                examples().join("bookinfo/services.yaml"),
                examples().join("bookinfo/workloads.yaml"),
                tasks.join("destination-rule-all.yaml"),
                path,
            ]);
            n += 1;
        }
    }
    assert_eq!(n, 5, "five task files");
}

fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, text).expect("write");
    p
}

#[test]
fn errors_exit_2_with_istio_codes_and_json_output() {
    let dir = tempfile::tempdir().expect("tempdir");
    let routing = std::fs::read_to_string(examples().join("bookinfo/routing.yaml")).expect("read");
    write(
        dir.path(),
        "routing.yaml",
        &routing.replace("subset: v2", "subset: v4"),
    );
    for f in ["services.yaml", "workloads.yaml"] {
        std::fs::copy(examples().join("bookinfo").join(f), dir.path().join(f)).expect("copy");
    }
    write(
        dir.path(),
        "bad.yaml",
        "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: ratings, namespace: bookinfo}\nspec:\n  hosts: [ratings]\n  http:\n  - route:\n    - destination: {host: ratings, subset: v1}\n      weight: 40\n    - destination: {host: ratings, subset: v1}\n      weight: 50\n",
    );
    let d = dir.path().to_str().expect("utf-8");
    let out = trellis(&["analyze", d]);
    assert_eq!(out.status.code(), Some(2));
    let text = stdout(&out);
    let routing_path = dir.path().join("routing.yaml");
    assert!(
        text.contains(&format!(
            "Error [IST0101] (VirtualService bookinfo/reviews {}:59) Referenced host+subset in destinationrule not found: \"reviews+v4\"",
            routing_path.display()
        )),
        "{text}"
    );
    assert!(
        text.contains("Error [IST0106] (VirtualService bookinfo/ratings")
            && text.contains("they sum to 90"),
        "{text}"
    );

    let out = trellis(&["analyze", "-o", "json", d]);
    assert_eq!(out.status.code(), Some(2));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json output");
    let codes: Vec<&str> = v
        .as_array()
        .expect("list")
        .iter()
        .filter_map(|m| m["code"].as_str())
        .collect();
    assert!(
        codes.contains(&"IST0101") && codes.contains(&"IST0106"),
        "{codes:?}"
    );
}

#[test]
fn warnings_fail_only_when_asked() {
    let dir = tempfile::tempdir().expect("tempdir");
    // A DestinationRule for a host no service provides: IST0174 (Warning).
    let f = write(
        dir.path(),
        "dr.yaml",
        "apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {name: x}\nspec:\n  host: nothing-here\n",
    );
    let f = f.to_str().expect("utf-8");
    let out = trellis(&["analyze", f]);
    assert_eq!(out.status.code(), Some(0), "{}", stdout(&out));
    assert!(
        stdout(&out).starts_with("Warning [IST0174]"),
        "{}",
        stdout(&out)
    );
    let out = trellis(&["analyze", "--fail-on", "warning", f]);
    assert_eq!(out.status.code(), Some(1));
    let out = trellis(&["analyze", "-o", "yaml", f]);
    assert!(
        stdout(&out).starts_with("- code: IST0174\n"),
        "{}",
        stdout(&out)
    );
}

#[test]
fn missing_path_is_a_clear_error() {
    let out = trellis(&["analyze", "/nonexistent/trellis-config"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(stdout(&out).contains("cannot read"), "{}", stdout(&out));
}

#[test]
fn demo_tour_runs() {
    let out = trellis(&["demo", "--static-only"]);
    assert_eq!(out.status.code(), Some(0));
    let text = stdout(&out);
    assert!(
        text.contains("VirtualService         bookinfo/reviews"),
        "{text}"
    );
    assert!(text.contains("no validation issues"), "{text}");
}

#[test]
fn analyze_reads_stdin() {
    use std::io::Write;
    let mut child = Command::new(env!("CARGO_BIN_EXE_trellis"))
        .args(["analyze", "--namespace", "shop", "-"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawn trellis");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(b"apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {name: cart}\nspec:\n  host: cart\n  subsets:\n  - name: v1\n    labels: {version: v1}\n  - name: v1\n")
        .expect("write stdin");
    let out = child.wait_with_output().expect("wait");
    assert_eq!(out.status.code(), Some(2));
    assert_eq!(
        stdout(&out),
        "Error [IST0106] (DestinationRule shop/cart <stdin>:9:11) Schema validation error: \
         spec.subsets[1].name: duplicate subset name \"v1\"\n"
    );
}

/// `trellis gateway-snapshot PATH --label LABEL`, which must succeed: the snapshot it
/// prints (loaded as the gateway proxy would) and what it said on stderr.
fn gateway_snapshot(path: &str, label: &str) -> (trellis_xds::snapshot::Snapshot, String) {
    let out = trellis(&["gateway-snapshot", path, "--label", label]);
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    let snap = trellis_xds::snapshot::Snapshot::from_text(&stdout(&out), "gw.json").expect("loads");
    (snap, stderr)
}

#[test]
fn gateway_snapshot_translates_bookinfo_for_the_ingress_gateway() {
    let bookinfo = examples().join("bookinfo");
    let path = bookinfo.to_str().expect("utf-8 path");
    // What the gateway proxy loads.
    let (snap, stderr) = gateway_snapshot(path, "istio=ingressgateway");
    assert_eq!(snap.gateway_ports.len(), 1);
    let port = &snap.gateway_ports[0];
    assert_eq!(port.port, 8080);
    let server = &port.servers[0];
    assert_eq!(server.gateway, "bookinfo/bookinfo-gateway");
    assert_eq!(server.virtual_hosts[0].name, "bookinfo/bookinfo");
    let names: Vec<&str> = snap.clusters.iter().map(|c| c.name.as_str()).collect();
    assert_eq!(
        names,
        ["outbound|9080||productpage.bookinfo.svc.cluster.local"]
    );
    assert!(stderr.contains("no endpoints yet"), "{stderr}");

    // Labels no Gateway selects: a clear error.
    let out = trellis(&["gateway-snapshot", path, "--label", "istio=egressgateway"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("no Gateway selects"));
}

#[test]
fn gateway_snapshot_fills_service_entry_clusters_for_an_egress_gateway() {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("egress.yaml");
    std::fs::write(
        &file,
        r#"apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: httpbin-ext, namespace: shop}
spec:
  hosts: [httpbin.example.org]
  location: MESH_EXTERNAL
  resolution: DNS
  ports: [{number: 80, name: http, protocol: HTTP}]
---
apiVersion: networking.istio.io/v1
kind: Gateway
metadata: {name: egress, namespace: shop}
spec:
  selector: {istio: egressgateway}
  servers:
  - port: {number: 80, name: http, protocol: HTTP}
    hosts: [httpbin.example.org]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: via-egress, namespace: shop}
spec:
  hosts: [httpbin.example.org]
  gateways: [egress]
  http:
  - route: [{destination: {host: httpbin.example.org, port: {number: 80}}}]
"#,
    )
    .expect("write");
    let (snap, stderr) =
        gateway_snapshot(file.to_str().expect("utf-8 path"), "istio=egressgateway");
    assert_eq!(snap.clusters.len(), 1);
    let c = &snap.clusters[0];
    assert_eq!(c.name, "outbound|80||httpbin.example.org");
    assert_eq!(
        c.discovery,
        trellis_xds::snapshot::Discovery::StrictDns as i32
    );
    assert_eq!(c.endpoints[0].address, "httpbin.example.org:80");
    assert!(!stderr.contains("no endpoints yet"), "{stderr}");
}

#[test]
fn explain_tells_which_rule_a_request_meets_and_where_it_goes() {
    let bookinfo = examples().join("bookinfo");
    let path = bookinfo.to_str().expect("utf-8 path");
    let out = trellis(&[
        "explain",
        path,
        "--host",
        "reviews",
        "-n",
        "bookinfo",
        "-H",
        "end-user: jason",
    ]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = stdout(&out);
    assert!(text.contains("rule \"jason\" (http[0])"), "{text}");
    assert!(
        text.contains("100 %  reviews.bookinfo.svc.cluster.local subset v2 port 9080"),
        "{text}"
    );

    let out = trellis(&[
        "explain",
        path,
        "--host",
        "reviews.bookinfo",
        "--path",
        "/reviews/1",
    ]);
    let text = stdout(&out);
    assert!(text.contains("rule \"split\""), "{text}");
    assert!(
        text.contains("50 %  reviews.bookinfo.svc.cluster.local subset v1"),
        "{text}"
    );
    assert!(
        text.contains("50 %  reviews.bookinfo.svc.cluster.local subset v3"),
        "{text}"
    );

    // At the ingress gateway: a path the gateway's VirtualService does not route.
    let out = trellis(&[
        "explain",
        path,
        "--host",
        "bookinfo.example",
        "--gateway",
        "bookinfo/bookinfo-gateway",
        "--path",
        "/admin",
    ]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stdout(&out).contains("404 (NR)"), "{}", stdout(&out));

    // A task file: the fault is shown.
    let tasks = examples().join("bookinfo-tasks");
    let out = trellis(&[
        "explain",
        examples()
            .join("bookinfo/services.yaml")
            .to_str()
            .expect("utf-8 path"),
        tasks
            .join("destination-rule-all.yaml")
            .to_str()
            .expect("utf-8 path"),
        tasks
            .join("virtual-service-ratings-test-abort.yaml")
            .to_str()
            .expect("utf-8 path"),
        "--host",
        "ratings",
        "-n",
        "bookinfo",
        "-H",
        "end-user: jason",
    ]);
    assert!(
        stdout(&out).contains("abort with HTTP 500 for 100 % of requests"),
        "{}",
        stdout(&out)
    );
}

#[test]
fn sidecar_snapshot_builds_a_workloads_snapshot() {
    let bookinfo = examples().join("bookinfo");
    let out = trellis(&[
        "sidecar-snapshot",
        bookinfo.to_str().expect("utf-8 path"),
        "--workload",
        "productpage-v1",
        "-n",
        "bookinfo",
        "--instance",
        "productpage-v1=10.0.0.10",
        "--instance",
        "reviews-v2=10.0.0.12",
    ]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let snap = trellis_xds::snapshot::Snapshot::from_text(&stdout(&out), "pp.json").expect("loads");
    let w = snap.workload.as_ref().expect("workload");
    assert_eq!(
        (w.name.as_str(), w.addresses.as_slice()),
        ("productpage-v1", &["10.0.0.10".to_string()][..])
    );
    let reviews = snap
        .services
        .iter()
        .find(|s| s.hostname == "reviews.bookinfo.svc.cluster.local")
        .expect("reviews");
    assert!(reviews.addresses[0].starts_with("240.240."));
    assert_eq!(reviews.ports[0].http_routes[0].name, "jason");
    let v2 = snap
        .clusters
        .iter()
        .find(|c| c.name == "outbound|9080|v2|reviews.bookinfo.svc.cluster.local")
        .expect("v2 cluster");
    assert_eq!(v2.endpoints[0].address, "10.0.0.12:9080");
    // Who the endpoint is, for the labels of Istio's metrics.
    assert_eq!(
        (
            v2.endpoints[0].workload.as_str(),
            v2.endpoints[0].namespace.as_str()
        ),
        ("reviews-v2", "bookinfo")
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("reviews-v1 has no --instance address"));
    let out = trellis(&[
        "sidecar-snapshot",
        bookinfo.to_str().expect("utf-8 path"),
        "--workload",
        "nope",
    ]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("no Workload default/nope"));
}

#[test]
fn gateway_snapshot_gives_a_portless_destination_its_single_service_port() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("gw.yaml");
    std::fs::write(
        &path,
        r#"apiVersion: v1
kind: Service
metadata: {name: web, namespace: shop}
spec:
  selector: {app: web}
  ports: [{name: http, port: 80, targetPort: 8080}]
---
apiVersion: networking.istio.io/v1
kind: Gateway
metadata: {name: ingress, namespace: shop}
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
  gateways: [ingress]
  http:
  - route: [{destination: {host: web}}]
"#,
    )
    .expect("write");
    let (snap, _) = gateway_snapshot(path.to_str().expect("utf-8 path"), "istio=ingressgateway");
    let names: Vec<&str> = snap.clusters.iter().map(|c| c.name.as_str()).collect();
    // The Service's one port, not the gateway's 8080.
    assert_eq!(names, ["outbound|80||web.shop.svc.cluster.local"]);
}

#[test]
fn cert_writes_a_workload_certificate_from_the_mesh_ca() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().expect("tempdir");
    let (data, out) = (dir.path().join("data"), dir.path().join("web"));
    let cert = |ttl: &str| {
        trellis(&[
            "cert",
            "-n",
            "web",
            "--service-account",
            "web",
            "--ttl",
            ttl,
            "--out",
            out.to_str().expect("utf-8"),
            "--data-dir",
            data.to_str().expect("utf-8"),
        ])
    };
    let o = cert("2h");
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let mode = std::fs::metadata(out.join("key.pem"))
        .expect("key.pem")
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);
    // The chain is for the identity asked, signed by the data directory's CA (whose root
    // is root-cert.pem), and its key is key.pem's.
    let chain = std::fs::read_to_string(out.join("cert-chain.pem")).expect("chain");
    let root = std::fs::read_to_string(out.join("root-cert.pem")).expect("root");
    assert_eq!(
        root,
        std::fs::read_to_string(data.join("ca-cert.pem")).expect("ca")
    );
    assert!(chain.ends_with(&root), "the chain ends with the root");
    let key = std::fs::read_to_string(out.join("key.pem")).expect("key");
    use rustls::pki_types::pem::PemObject;
    let key = rustls::pki_types::PrivateKeyDer::from_pem_slice(key.as_bytes()).expect("pem");
    let rustls::pki_types::PrivateKeyDer::Pkcs8(key) = key else {
        panic!("PKCS#8 expected")
    };
    let c = trellis_identity::tls::Certified::from_pem(&[chain], key.secret_pkcs8_der().to_vec())
        .expect("the key matches the certificate");
    assert_eq!(
        c.spiffe.as_deref(),
        Some("spiffe://cluster.local/ns/web/sa/web")
    );
    assert_eq!(
        c.not_after.duration_since(c.not_before).ok(),
        Some(std::time::Duration::from_secs(7200))
    );
    // A lifetime past the CA's maximum is capped, and the command says so.
    let o = cert("720h");
    assert!(o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("capped at 7 days"));
}

#[test]
fn gateway_snapshot_carries_the_policies_that_select_the_gateway() {
    let dir = tempfile::tempdir().expect("tempdir");
    let gw = "apiVersion: networking.istio.io/v1\nkind: Gateway\nmetadata: {name: gw, namespace: shop}\nspec:\n  selector: {istio: ingressgateway}\n  servers: [{port: {number: 8080, name: http, protocol: HTTP}, hosts: [\"*\"]}]\n---\napiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: no-admin, namespace: istio-system}\nspec:\n  selector: {matchLabels: {istio: ingressgateway}}\n  action: DENY\n  rules: [{to: [{operation: {paths: [\"/admin/*\"]}}]}]\n---\napiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: other, namespace: istio-system}\nspec:\n  selector: {matchLabels: {app: other}}\n  action: DENY\n  rules: [{to: [{operation: {paths: [\"/x\"]}}]}]\n---\napiVersion: security.istio.io/v1\nkind: RequestAuthentication\nmetadata: {name: jwt, namespace: istio-system}\nspec:\n  selector: {matchLabels: {istio: ingressgateway}}\n  jwtRules: [{issuer: \"https://issuer.example\", jwksUri: \"https://issuer.example/jwks\"}]\n";
    let path = write(dir.path(), "gw.yaml", gw);
    let (snap, _) = gateway_snapshot(path.to_str().expect("utf-8"), "istio=ingressgateway");
    let w = snap.workload.expect("the gateway's policies");
    let names: Vec<&str> = w.authorization.iter().map(|p| p.name.as_str()).collect();
    assert_eq!(
        names,
        ["istio-system/no-admin"],
        "only the one selecting it"
    );
    assert_eq!(w.jwt_rules.len(), 1);
    assert_eq!(w.jwt_rules[0].issuer, "https://issuer.example");
}

#[test]
fn sidecar_snapshot_carries_the_workloads_telemetry_and_the_proxy_loads_it() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("t.yaml");
    std::fs::write(
        &path,
        r#"apiVersion: trellis.dev/v1alpha1
kind: Workload
metadata: {name: web, namespace: shop, labels: {app: web}}
spec:
  command: [sleep, "1"]
  ports: [{name: http, port: 8080}]
---
apiVersion: telemetry.istio.io/v1
kind: Telemetry
metadata: {name: mesh-default, namespace: istio-system}
spec:
  tracing: [{randomSamplingPercentage: 5}]
---
apiVersion: telemetry.istio.io/v1
kind: Telemetry
metadata: {name: web-logs, namespace: shop}
spec:
  selector: {matchLabels: {app: web}}
  accessLogging: [{filter: {expression: "response.code >= 400"}}]
"#,
    )
    .expect("write");
    let out = trellis(&[
        "sidecar-snapshot",
        path.to_str().expect("utf-8 path"),
        "--workload",
        "web",
        "-n",
        "shop",
    ]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = stdout(&out);
    let snap = trellis_xds::snapshot::Snapshot::from_text(&text, "web.json").expect("loads");
    let t = snap
        .workload
        .as_ref()
        .and_then(|w| w.telemetry.as_ref())
        .expect("telemetry");
    assert_eq!(t.sources, ["istio-system/mesh-default", "shop/web-logs"]);
    assert_eq!(t.tracing[0].random_sampling_percentage, Some(5.0));
    assert_eq!(
        t.access_logging[0].filter.as_deref(),
        Some("response.code >= 400")
    );
    // The proxy takes such a snapshot.
    let file = dir.path().join("web.json");
    std::fs::write(&file, text).expect("write");
    trellis_proxy::config::load_file_with(&file, None, &trellis_proxy::LoadEnv::default())
        .expect("the proxy loads it");
}

#[test]
fn control_plane_refuses_a_bad_mesh_config_with_the_reason() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mesh = dir.path().join("mesh.yaml");
    std::fs::write(&mesh, "outboundTrafficPolicy: {mode: SOMETIMES}\n").expect("write");
    let out = trellis(&[
        "control-plane",
        "--config-dir",
        dir.path().to_str().expect("utf-8 path"),
        "--mesh-config",
        mesh.to_str().expect("utf-8 path"),
        "--no-auth",
        "--listen",
        "127.0.0.1:0",
        "--debug-listen",
        "127.0.0.1:0",
    ]);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("mesh.yaml") && err.contains("SOMETIMES"),
        "{err}"
    );
}
