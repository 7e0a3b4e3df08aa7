//! TLS origination (DestinationRule `trafficPolicy.tls` SIMPLE and MUTUAL): the app sends
//! plaintext HTTP, the proxy speaks TLS to a real TLS server (`openssl s_server -www`),
//! checking its certificate by SNI or by `subjectAltNames`, and presenting a client
//! certificate for MUTUAL. A server the proxy cannot verify gets no request: 503.

use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use trellis_proxy::{Config, ProxyOptions};
use trellis_testkit::http_client;
use trellis_testkit::tls::TestCa;
use trellis_xds::snapshot::Snapshot;

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

/// `openssl s_server -www` on a free port of 127.0.0.1 with `cert`/`key`; with
/// `client_ca`, it demands a client certificate from that CA. The server and its port.
/// (A port found free can be taken by another test before openssl binds it: then openssl
/// exits, and another port is tried.)
fn s_server(dir: &Path, client_ca: Option<&Path>) -> (Running, u16) {
    for _ in 0..5 {
        let port = free_port();
        let mut cmd = Command::new("openssl");
        cmd.args(["s_server", "-www", "-quiet", "-accept"])
            .arg(format!("127.0.0.1:{port}"))
            .arg("-cert")
            .arg(dir.join("server.crt"))
            .arg("-key")
            .arg(dir.join("server.key"));
        if let Some(ca) = client_ca {
            cmd.arg("-Verify").arg("1").arg("-CAfile").arg(ca);
        }
        let mut running = Running(
            cmd.stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("openssl runs"),
        );
        for _ in 0..100 {
            if matches!(running.0.try_wait(), Ok(Some(_))) {
                break; // it could not bind: another port
            }
            if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
                // Listening, and it is openssl that listens (still running).
                if matches!(running.0.try_wait(), Ok(None)) {
                    return (running, port);
                }
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    panic!("openssl s_server did not listen");
}

/// A proxy sending `api.example.com:80` to `server` with `tls` (YAML flow mapping).
async fn status_through(server: u16, tls: &str) -> u16 {
    let yaml = format!(
        "version: t\nservices:\n- hostname: api.example.com\n  ports: [{{port: 80, name: http, cluster: \"outbound|443||api.example.com\"}}]\nclusters:\n- name: \"outbound|443||api.example.com\"\n  endpoints: [{{address: \"127.0.0.1:{server}\"}}]\n  tls: {tls}\n"
    );
    let raw = Snapshot::from_text(&yaml, "t.yaml").expect("parses");
    let cfg = Config::from_wire(raw, None).expect("converts");
    let listen: SocketAddr = "127.0.0.1:0".parse().expect("addr");
    let p = trellis_proxy::start(
        cfg,
        ProxyOptions {
            outbound_listen: vec![(listen, "api.example.com".into(), 80)],
            ..ProxyOptions::default()
        },
    )
    .await
    .expect("proxy");
    let r = tokio::time::timeout(
        Duration::from_secs(10),
        http_client::get(p.outbound_addrs[0], "api.example.com", "/"),
    )
    .await
    .expect("in time")
    .expect("response");
    if r.status == 200 {
        assert!(
            String::from_utf8_lossy(&r.body).contains("s_server"),
            "the TLS server's own page"
        );
    }
    r.status.as_u16()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn destination_rule_tls_originates_simple_and_mutual() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    let ca = TestCa::new("origin CA").expect("ca");
    let issued = ca.server(&["api.example.com"]).expect("server cert");
    std::fs::write(d.join("server.crt"), &issued.cert_pem).expect("write");
    std::fs::write(d.join("server.key"), &issued.key_pem).expect("write");
    let ca_file = ca.write_ca(d).expect("ca file");
    let client = ca.client("client.example.com").expect("client cert");
    std::fs::write(d.join("client.crt"), &client.cert_pem).expect("write");
    std::fs::write(d.join("client.key"), &client.key_pem).expect("write");
    let other = TestCa::new("another CA").expect("ca");
    let other_file = other.write_ca(&d.join("other")).expect("ca file");
    let ca = ca_file.display();

    let (_simple, simple) = s_server(d, None);
    // SIMPLE: verified by the host in the cluster's name (api.example.com).
    assert_eq!(
        status_through(
            simple,
            &format!("{{mode: SIMPLE, caCertificates: \"{ca}\"}}")
        )
        .await,
        200
    );
    // Another CA's roots, or another name: nothing is sent (503).
    assert_eq!(
        status_through(
            simple,
            &format!(
                "{{mode: SIMPLE, caCertificates: \"{}\"}}",
                other_file.display()
            )
        )
        .await,
        503
    );
    assert_eq!(
        status_through(
            simple,
            &format!("{{mode: SIMPLE, caCertificates: \"{ca}\", sni: other.example.com}}")
        )
        .await,
        503
    );
    // insecureSkipVerify: even another CA's roots do (tests only).
    assert_eq!(
        status_through(
            simple,
            &format!(
                "{{mode: SIMPLE, caCertificates: \"{}\", insecureSkipVerify: true}}",
                other_file.display()
            )
        )
        .await,
        200
    );
    // subjectAltNames decide instead of the SNI.
    assert_eq!(
        status_through(
            simple,
            &format!("{{mode: SIMPLE, caCertificates: \"{ca}\", sni: other.example.com, subjectAltNames: [api.example.com]}}")
        )
        .await,
        200
    );

    // MUTUAL: the server demands a client certificate from the CA.
    let (_mutual, mutual) = s_server(d, Some(&ca_file));
    assert_eq!(
        status_through(
            mutual,
            &format!("{{mode: SIMPLE, caCertificates: \"{ca}\"}}")
        )
        .await,
        503,
        "no client certificate"
    );
    assert_eq!(
        status_through(
            mutual,
            &format!(
                "{{mode: MUTUAL, caCertificates: \"{ca}\", clientCertificate: \"{}\", privateKey: \"{}\"}}",
                d.join("client.crt").display(),
                d.join("client.key").display()
            )
        )
        .await,
        200
    );

    // A file that is not there refuses the snapshot, naming it.
    let raw = Snapshot::from_text(
        "clusters:\n- name: \"outbound|443||api.example.com\"\n  tls: {mode: SIMPLE, caCertificates: /nowhere/ca.pem}\n",
        "t.yaml",
    )
    .expect("parses");
    let e = Config::from_wire(raw, None).expect_err("missing file");
    assert!(e.to_string().contains("/nowhere/ca.pem"), "{e}");
}
