//! The `trellis-fixture` binary: starts the chosen servers and announces their addresses.

mod common;

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;

use common::{WAIT, bounded};
use trellis_testkit::{grpc_call, http_client, tcp_echo_half_close};

/// Kills the child when the test ends, pass or fail.
struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn binary_serves_http_grpc_and_tcp_echo() {
    let mut child = Killed(
        Command::new(env!("CARGO_BIN_EXE_trellis-fixture"))
            .args(["--http", "127.0.0.1:0", "--grpc", "127.0.0.1:0"])
            .args(["--tcp-echo", "127.0.0.1:0"])
            .stdout(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let stdout = child.0.stdout.take().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let mut addrs = std::collections::HashMap::new();
    for _ in 0..3 {
        let line = rx
            .recv_timeout(WAIT)
            .expect("fixture announced its servers");
        let (kind, addr) = line.split_once(' ').expect("`kind addr` line");
        addrs.insert(kind.to_owned(), addr.parse::<SocketAddr>().unwrap());
    }

    let resp = bounded("http", http_client::get(addrs["http"], "h", "/bytes/1024")).await;
    assert_eq!(resp.unwrap().body.len(), 1024);
    let resp = bounded(
        "h2c",
        http_client::h2c_get(addrs["http"], "h", "/status/204"),
    )
    .await;
    assert_eq!(resp.unwrap().status, http::StatusCode::NO_CONTENT);
    let msg = vec![bytes::Bytes::from_static(b"bin")];
    let resp = bounded(
        "grpc",
        grpc_call(addrs["grpc"], "/test.Echo/Unary", msg.clone()),
    )
    .await;
    assert_eq!(resp.unwrap().messages, msg);
    let echoed = bounded("tcp", tcp_echo_half_close(addrs["tcp-echo"], b"xyz")).await;
    assert_eq!(echoed.unwrap(), b"xyz");
}

#[test]
fn binary_rejects_bad_arguments() {
    let out = Command::new(env!("CARGO_BIN_EXE_trellis-fixture"))
        .args(["--http", "not-an-addr"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("usage:"), "{err}");
}

/// `trellis-tcpload` against the TCP echo: a second at 200 requests per second, every one
/// echoed, its JSON report with ordered percentiles.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcpload_reports_an_echo_service_s_latencies() {
    let echo = trellis_testkit::TcpEchoServer::start().await.expect("echo");
    let addr = echo.addr.to_string();
    let run = tokio::task::spawn_blocking(move || {
        Command::new(env!("CARGO_BIN_EXE_trellis-tcpload"))
            .args([&addr, "--rate", "200", "--duration", "1"])
            .args(["--connections", "4", "--size", "64"])
            .output()
    });
    let out = tokio::time::timeout(WAIT, run)
        .await
        .expect("in time")
        .expect("joined")
        .expect("runs");
    assert!(out.status.success());
    let report = String::from_utf8_lossy(&out.stdout).into_owned();
    // `"key": number` from the one-line JSON report.
    let field = |k: &str| -> f64 {
        report
            .split(&format!("\"{k}\": "))
            .nth(1)
            .and_then(|rest| rest.split([',', '}']).next())
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or_else(|| panic!("no {k} in {report}"))
    };
    assert!((150.0..=210.0).contains(&field("ok")), "{report}");
    assert_eq!(field("errors"), 0.0, "{report}");
    let (p50, p99, p999) = (field("p50"), field("p99"), field("p99.9"));
    assert!(p50 > 0.0 && p50 <= p99 && p99 <= p999, "{report}");
    assert_eq!(echo.stats().connections(), 4, "{report}");
}
