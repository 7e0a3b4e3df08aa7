//! The `trellis-proxy` binary as an operator runs it: a bad snapshot stops it before it
//! listens; once running, a bad new snapshot is refused and the last good one stays; SIGTERM
//! drains and exits 0.

use std::io::Write;
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use trellis_testkit::{HttpServer, http_client};

const BIN: &str = env!("CARGO_BIN_EXE_trellis-proxy");

fn free_port() -> SocketAddr {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    l.local_addr().expect("addr")
}

fn snapshot(version: &str, app: SocketAddr) -> String {
    format!(
        "version: {version}
services:
- hostname: app.default.svc.cluster.local
  ports: [{{port: 80, name: http, cluster: app}}]
clusters:
- name: app
  endpoints: [{{address: \"{app}\"}}]
"
    )
}

struct Running(Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

async fn get(addr: SocketAddr, path: &str) -> Option<(u16, String)> {
    let r = tokio::time::timeout(Duration::from_secs(5), http_client::get(addr, "app", path))
        .await
        .ok()?
        .ok()?;
    Some((
        r.status.as_u16(),
        String::from_utf8_lossy(&r.body).into_owned(),
    ))
}

/// Polls `path` on `addr` until `pred` holds (at most 10 s, every 100 ms).
async fn wait_for(addr: SocketAddr, path: &str, pred: impl Fn(&str) -> bool) -> bool {
    for _ in 0..100 {
        if let Some((200, body)) = get(addr, path).await {
            if pred(&body) {
                return true;
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    false
}

#[test]
fn a_bad_snapshot_stops_the_proxy_with_its_position() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("bad.yaml");
    std::fs::write(
        &path,
        "version: x\nclusters:\n- name: a\n  endpoints: [{adress: \"1.2.3.4:80\"}]\n",
    )
    .expect("write");
    let out = Command::new(BIN)
        .args([
            "--config",
            path.to_str().expect("utf-8"),
            "--outbound-listen",
            "127.0.0.1:0=app:80",
        ])
        .args(["--admin", "off", "--readiness", "off"])
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("bad.yaml:4:16: clusters[0].endpoints[0].adress: unknown field `adress` (did you mean `address`?)"),
        "{err}"
    );

    std::fs::write(
        &path,
        "clusters: [{name: a, endpoints: [{address: nowhere}]}]\n",
    )
    .expect("write");
    let out = Command::new(BIN)
        .args([
            "--config",
            path.to_str().expect("utf-8"),
            "--outbound-listen",
            "127.0.0.1:0=app:80",
        ])
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("clusters[0] \"a\" endpoints[0]: address \"nowhere\" is not ip:port"),
        "{err}"
    );
}

#[tokio::test]
async fn reloads_keep_the_last_good_snapshot_and_sigterm_exits_0() {
    let app = HttpServer::start().await.expect("app");
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("snapshot.yaml");
    std::fs::write(&path, snapshot("one", app.addr)).expect("write");
    let listen = free_port();
    let admin = free_port();
    let child = Command::new(BIN)
        .args(["--config", path.to_str().expect("utf-8")])
        .args(["--outbound-listen", &format!("{listen}=app:80")])
        .args([
            "--admin",
            &admin.to_string(),
            "--readiness",
            "off",
            "--workers",
            "1",
        ])
        .args(["--drain-timeout", "2s", "--log-format", "json"])
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    let mut proxy = Running(child);
    assert!(
        wait_for(admin, "/ready", |b| b == "LIVE\n").await,
        "proxy did not become ready"
    );
    assert_eq!(get(listen, "/bytes/5").await.map(|r| r.0), Some(200));

    // A broken version is refused; the proxy keeps serving version "one".
    std::thread::sleep(Duration::from_millis(1100)); // a new mtime second
    let mut f = std::fs::File::create(&path).expect("rewrite");
    f.write_all(b"version: two\nclusters: [{name: app, endpoints: [{address: 300.0.0.1:80}]}]\n")
        .expect("write");
    drop(f);
    assert!(
        wait_for(admin, "/stats/prometheus", |b| b
            .contains("trellis_proxy_config_rejections_total 1"))
        .await,
        "the bad snapshot was not noticed"
    );
    assert!(
        wait_for(admin, "/config_dump", |b| b
            .contains("\"version\": \"one\""))
        .await
    );
    assert_eq!(get(listen, "/bytes/5").await.map(|r| r.0), Some(200));

    // A good version is applied.
    std::fs::write(&path, snapshot("three", app.addr)).expect("write");
    assert!(
        wait_for(admin, "/config_dump", |b| b
            .contains("\"version\": \"three\""))
        .await
    );

    // The log filter changes at run time; a bad filter is refused.
    let mut admin_client = http_client::HttpClient::http1(admin).await.expect("admin");
    for (q, want) in [("level=debug", 200), ("level=%5Bbad", 400), ("", 400)] {
        let req = admin_client
            .request(http::Method::POST, "localhost", &format!("/logging?{q}"))
            .body(http_body_util::Empty::<bytes::Bytes>::new())
            .expect("request");
        let r = admin_client.send(req).await.expect("response");
        assert_eq!(r.status.as_u16(), want, "{q}: {r:?}");
    }

    let pid = proxy.0.id();
    let status = Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()
        .expect("kill");
    assert!(status.success());
    let start = Instant::now();
    let code = loop {
        if let Some(s) = proxy.0.try_wait().expect("wait") {
            break s.code();
        }
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "proxy did not exit after SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(code, Some(0));
    let mut log = String::new();
    if let Some(mut e) = proxy.0.stderr.take() {
        use std::io::Read;
        let _ = e.read_to_string(&mut log);
    }
    assert!(log.contains("snapshot refused"), "{log}");
    assert!(
        log.lines().all(|l| l.starts_with('{')),
        "JSON log lines: {log}"
    );
}

/// The readiness and stats ports listen on every address: they answer readiness and
/// Prometheus only. Configuration, log levels and `/quitquitquit` are for the admin port
/// (localhost), so that no other workload can read the configuration or stop the proxy.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn public_ports_serve_readiness_and_metrics_only() {
    let app = HttpServer::start().await.expect("app");
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("s.yaml");
    std::fs::write(&path, snapshot("v1", app.addr)).expect("write");
    let (admin, ready, stats, front) = (free_port(), free_port(), free_port(), free_port());
    let _p = Running(
        Command::new(BIN)
            .args(["--config", path.to_str().expect("utf-8")])
            .args(["--outbound-listen", &format!("{front}=app:80")])
            .args(["--admin", &admin.to_string()])
            .args(["--readiness", &ready.to_string()])
            .args(["--stats", &stats.to_string()])
            .args(["--log-level", "warn"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("proxy"),
    );
    assert!(wait_for(ready, "/healthz/ready", |_| true).await, "ready");
    assert_eq!(get(front, "/bytes/8").await.map(|r| r.0), Some(200));
    for public in [ready, stats] {
        assert!(
            wait_for(public, "/stats/prometheus", |b| b
                .contains("istio_requests_total{"))
            .await,
            "metrics on {public}"
        );
        assert_eq!(get(public, "/healthz/ready").await.map(|r| r.0), Some(200));
        assert_eq!(get(public, "/config_dump").await.map(|r| r.0), Some(404));
        let quit = http_client::post(public, "localhost", "/quitquitquit", bytes::Bytes::new())
            .await
            .expect("answer");
        assert_eq!(quit.status, 404, "no quitting from {public}");
    }
    // The admin port has the rest, and the proxy is still serving.
    assert_eq!(get(admin, "/config_dump").await.map(|r| r.0), Some(200));
    assert_eq!(get(front, "/bytes/8").await.map(|r| r.0), Some(200));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn access_log_lines_written_just_before_sigterm_reach_the_file() {
    let app = HttpServer::start().await.expect("app");
    let dir = tempfile::tempdir().expect("tempdir");
    let log = dir.path().join("access.log");
    let config = dir.path().join("snapshot.yaml");
    std::fs::write(
        &config,
        format!(
            "workload:\n  name: web\n  telemetry:\n    accessLogging: [{{providers: [text]}}]\n    providers: [{{name: text, kind: envoyFileAccessLog, path: {}, logFormat: \"%REQ(:PATH)% %RESPONSE_CODE%\\n\"}}]\n{}",
            log.display(),
            snapshot("one", app.addr)
        ),
    )
    .expect("write");
    let listen = free_port();
    let mut proxy = Running(
        Command::new(BIN)
            .arg("--config")
            .arg(&config)
            .args([
                "--outbound-listen",
                &format!("{listen}=app.default.svc.cluster.local:80"),
            ])
            .args([
                "--admin",
                "off",
                "--readiness",
                "off",
                "--drain-timeout",
                "1s",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("proxy runs"),
    );
    let mut answered = false;
    for _ in 0..100 {
        if get(listen, "/bytes/10")
            .await
            .is_some_and(|(s, _)| s == 200)
        {
            answered = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(answered, "the proxy answered");
    // At once: the line is still queued for its writer.
    let status = Command::new("kill")
        .args(["-TERM", &proxy.0.id().to_string()])
        .status()
        .expect("kill");
    assert!(status.success());
    let start = Instant::now();
    while proxy.0.try_wait().expect("wait").is_none() {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "proxy did not exit"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let text = std::fs::read_to_string(&log).unwrap_or_default();
    assert!(text.lines().any(|l| l == "/bytes/10 200"), "{text:?}");
}
