//! Control-plane scale over the network: the real `trellis control-plane` binary (its own
//! process, `--no-auth`, loopback) with a mesh of N services, and N fake proxies in this
//! process, each a Delta ADS stream on its own TCP connection (HTTP/2, gRPC), announcing
//! one instance of one of the services and ACKing every response.
//!
//! Measures, for 5 VirtualService changes written to the configuration directory: the
//! time from the write to the last proxy receiving the change (raw, and minus the two
//! debounces: the directory watcher's 100 ms and the control plane's 10 ms); the control
//! plane's RSS idle and per connected proxy; the bytes a proxy gets on connecting and for
//! one change.
//!
//! `cargo bench -p trellis-cli --bench push_network -- [N ...]` (default 100 1000).
//! The control plane and the fake proxies share the machine's cores.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use prost::Message;
use trellis_xds::ads::{
    Announce, DELTA_ADS_PATH, Deframer, DeltaDiscoveryRequest, DeltaDiscoveryResponse,
    SNAPSHOT_TYPE_URL, frame,
};

/// Set once the measurement is over (fake proxies then lose their streams quietly).
static STOPPING: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

const WATCH_DEBOUNCE: Duration = Duration::from_millis(100);
const CP_DEBOUNCE: Duration = Duration::from_millis(10);

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.split_whitespace().next()?.parse().ok())
        })
        .unwrap_or(0)
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

fn services(n: usize) -> String {
    (0..n)
        .map(|i| {
            format!(
                "apiVersion: v1\nkind: Service\nmetadata: {{name: svc-{i}, namespace: mesh}}\nspec:\n  selector: {{app: svc-{i}}}\n  ports: [{{name: http, port: 80}}]\n---\n"
            )
        })
        .collect()
}

/// Writes the VirtualService of change `round` (atomically: a rename).
fn write_change(dir: &Path, round: usize) {
    let text = format!(
        "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {{name: svc-0, namespace: mesh}}\nspec:\n  hosts: [svc-0]\n  http:\n  - name: change-{round}\n    route: [{{destination: {{host: svc-0}}}}]\n"
    );
    let tmp = dir.join(".vs.yaml.tmp");
    std::fs::write(&tmp, text).expect("write");
    std::fs::rename(&tmp, dir.join("vs.yaml")).expect("rename");
}

struct Fake {
    /// The highest change seen.
    seen: AtomicUsize,
    /// Responses received.
    responses: AtomicUsize,
    first_bytes: AtomicUsize,
    last_bytes: AtomicUsize,
}

/// The change a response carries, if it holds svc-0's service resource.
fn change_in(resp: &DeltaDiscoveryResponse) -> Option<usize> {
    let r = resp
        .resources
        .iter()
        .find(|r| r.name == "service/svc-0.mesh.svc.cluster.local")?;
    let svc = trellis_xds::snapshot::Service::decode(r.resource.as_ref()?.value.as_slice()).ok()?;
    svc.ports
        .iter()
        .flat_map(|p| &p.http_routes)
        .find_map(|r| r.name.strip_prefix("change-")?.parse().ok())
}

async fn fake_proxy(addr: SocketAddr, i: usize, state: Arc<Fake>) -> Result<(), String> {
    let tcp = tokio::net::TcpStream::connect(addr)
        .await
        .map_err(|e| e.to_string())?;
    let (mut client, conn) = h2::client::handshake(tcp)
        .await
        .map_err(|e| e.to_string())?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    let req = http::Request::post(format!("http://{addr}{DELTA_ADS_PATH}"))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(())
        .map_err(|e| e.to_string())?;
    let (resp, mut send) = client.send_request(req, false).map_err(|e| e.to_string())?;
    let announce = Announce {
        name: format!("svc-{i}-0"),
        namespace: "mesh".into(),
        service_account: format!("svc-{i}"),
        labels: BTreeMap::from([("app".to_string(), format!("svc-{i}"))]),
        addresses: vec![format!(
            "10.{}.{}.{}",
            (i >> 16) & 255,
            (i >> 8) & 255,
            i & 255
        )],
        ports: vec![(Some("http".into()), 80)],
        locality: None,
        workload_group: None,
    };
    let first = DeltaDiscoveryRequest {
        node: Some(announce.to_node()),
        type_url: SNAPSHOT_TYPE_URL.into(),
        resource_names_subscribe: vec!["*".into()],
        ..Default::default()
    };
    send.send_data(Bytes::from(frame(&first)), false)
        .map_err(|e| e.to_string())?;
    let mut body = resp.await.map_err(|e| e.to_string())?.into_body();
    let mut deframer = Deframer::default();
    while let Some(chunk) = body.data().await {
        let chunk = chunk.map_err(|e| e.to_string())?;
        let _ = body.flow_control().release_capacity(chunk.len());
        deframer.push(&chunk);
        while let Some(r) = deframer
            .next_message::<DeltaDiscoveryResponse>()
            .map_err(|e| e.to_string())?
        {
            let size = r.encoded_len();
            if state.responses.fetch_add(1, Ordering::Relaxed) == 0 {
                state.first_bytes.store(size, Ordering::Relaxed);
            }
            if let Some(k) = change_in(&r) {
                state.last_bytes.store(size, Ordering::Relaxed);
                state.seen.fetch_max(k, Ordering::Relaxed);
            }
            let ack = DeltaDiscoveryRequest {
                type_url: SNAPSHOT_TYPE_URL.into(),
                response_nonce: r.nonce,
                ..Default::default()
            };
            send.send_data(Bytes::from(frame(&ack)), false)
                .map_err(|e| e.to_string())?;
        }
    }
    Ok(())
}

/// `GET path` on `addr` (HTTP/1.0, blocking): the body.
fn http_get(addr: SocketAddr, path: &str) -> Option<String> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: cp\r\n\r\n").ok()?;
    let mut text = String::new();
    s.read_to_string(&mut text).ok()?;
    Some(text.split_once("\r\n\r\n")?.1.to_string())
}

/// Whether the control plane's proxy-status shows `instance` synced (ACKed what it
/// was last sent).
fn synced(debug: SocketAddr, instance: &str) -> bool {
    let Some(body) = http_get(debug, "/debug/proxy-status") else {
        return false;
    };
    let Ok(serde_json::Value::Array(list)) = serde_json::from_str(&body) else {
        return false;
    };
    list.iter().any(|p| {
        p["instance"] == instance
            && !p["sentVersion"].is_null()
            && p["sentVersion"] == p["ackedVersion"]
    })
}

/// A real `trellis-proxy` (release, built beside `trellis`) following the control plane:
/// what one proxy holds with every service of the mesh in scope.
fn real_proxy(xds: SocketAddr) -> Option<Killed> {
    let bin = Path::new(env!("CARGO_BIN_EXE_trellis")).with_file_name("trellis-proxy");
    if !bin.exists() {
        eprintln!(
            "no {} (cargo build --release -p trellis-proxy): no proxy RSS figure",
            bin.display()
        );
        return None;
    }
    Command::new(bin)
        .args([
            "--xds",
            &xds.to_string(),
            "--name",
            "real-0",
            "--namespace",
            "mesh",
        ])
        .args(["--label", "app=real", "--address", "10.254.0.1"])
        .args(["--admin", "off", "--readiness", "off", "--workers", "1"])
        .args([
            "--log-level",
            "warn",
            "--outbound-listen",
            "127.0.0.1:0=svc-0:80",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .ok()
        .map(Killed)
}

struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

async fn wait_until(within: Duration, mut f: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + within;
    while Instant::now() < deadline {
        if f() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    f()
}

fn run(n: usize) {
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(dir.path().join("services.yaml"), services(n)).expect("services");
    let (xds, debug) = (free_port(), free_port());
    let addr: SocketAddr = ([127, 0, 0, 1], xds).into();
    let cp = Killed(
        Command::new(env!("CARGO_BIN_EXE_trellis"))
            .args(["control-plane", "--no-auth", "--config-dir"])
            .arg(dir.path())
            .args(["--listen", &addr.to_string()])
            .args(["--debug-listen", &format!("127.0.0.1:{debug}")])
            .args(["--debounce", "10ms", "--debounce-max", "100ms"])
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(
                std::fs::File::create(std::env::temp_dir().join("push_network-cp.log"))
                    .map_or_else(|_| Stdio::null(), Stdio::from),
            )
            .spawn()
            .expect("trellis control-plane"),
    );
    let pid = cp.0.id();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        let up = wait_until(Duration::from_secs(30), || {
            std::net::TcpStream::connect(addr).is_ok()
        })
        .await;
        assert!(up, "the control plane did not start");
        tokio::time::sleep(Duration::from_millis(300)).await;
        let idle = rss_kib(pid);
        let fakes: Vec<Arc<Fake>> = (0..n)
            .map(|_| {
                Arc::new(Fake {
                    seen: AtomicUsize::new(0),
                    responses: AtomicUsize::new(0),
                    first_bytes: AtomicUsize::new(0),
                    last_bytes: AtomicUsize::new(0),
                })
            })
            .collect();
        for (i, f) in fakes.iter().enumerate() {
            let f = Arc::clone(f);
            tokio::spawn(async move {
                // As a real proxy, it reconnects (a few times, backing off) when its
                // connection fails before its first snapshot.
                for attempt in 1..=5u32 {
                    match fake_proxy(addr, i, Arc::clone(&f)).await {
                        Err(e) if STOPPING.load(Ordering::Relaxed) => return drop(e),
                        Err(e) if f.responses.load(Ordering::Relaxed) == 0 && attempt < 5 => {
                            eprintln!("fake proxy {i}: {e}; reconnecting");
                            tokio::time::sleep(Duration::from_millis(100 * u64::from(attempt)))
                                .await;
                        }
                        Err(e) => return eprintln!("fake proxy {i}: {e}"),
                        Ok(()) => return,
                    }
                }
            });
        }
        // Every proxy has its first snapshot, and the pushes its neighbours' arrival
        // caused are over.
        let connected = wait_until(Duration::from_secs(120), || {
            fakes.iter().all(|f| f.responses.load(Ordering::Relaxed) > 0)
        })
        .await;
        assert!(connected, "not every fake proxy got a snapshot");
        tokio::time::sleep(Duration::from_secs(2)).await;
        let rss = rss_kib(pid);
        let debug_addr: SocketAddr = ([127, 0, 0, 1], debug).into();
        let real = real_proxy(addr);
        let real_synced = match &real {
            Some(_) => wait_until(Duration::from_secs(60), || synced(debug_addr, "real-0")).await,
            None => false,
        };
        let real_rss = real.as_ref().filter(|_| real_synced).map(|p| rss_kib(p.0.id()));
        let mut times = Vec::new();
        for round in 1..=5 {
            let start = Instant::now();
            write_change(dir.path(), round);
            let all = wait_until(Duration::from_secs(60), || {
                fakes
                    .iter()
                    .all(|f| f.seen.load(Ordering::Relaxed) >= round)
            })
            .await;
            assert!(all, "change {round} did not reach every proxy");
            times.push(start.elapsed());
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
        // The real proxy took every change (each converted with the whole snapshot).
        let real_after = match &real {
            Some(p) if real_synced && wait_until(Duration::from_secs(30), || synced(debug_addr, "real-0")).await => {
                Some(rss_kib(p.0.id()))
            }
            _ => None,
        };
        times.sort();
        let (median, max) = (times[times.len() / 2], times[times.len() - 1]);
        let less = |d: Duration| d.saturating_sub(WATCH_DEBOUNCE + CP_DEBOUNCE);
        println!(
            "{n} services, {n} proxies over the network: file written to the last proxy: median {median:?}, max {max:?} (minus the 110 ms of debounces: median {:?}, max {:?}); control-plane RSS {:.1} MiB idle, {:.1} MiB connected ({:.3} MiB per proxy); a proxy receives {:.1} KiB on connecting, {:.2} KiB for a route change",
            less(median),
            less(max),
            idle as f64 / 1024.0,
            rss as f64 / 1024.0,
            rss.saturating_sub(idle) as f64 / 1024.0 / n as f64,
            fakes[n / 2].first_bytes.load(Ordering::Relaxed) as f64 / 1024.0,
            fakes[n / 2].last_bytes.load(Ordering::Relaxed) as f64 / 1024.0,
        );
        match (real_rss, real_after) {
            (Some(a), Some(b)) => println!(
                "  a real trellis-proxy with the {n} services in scope: RSS {:.1} MiB with its first snapshot, {:.1} MiB after the 5 changes",
                a as f64 / 1024.0,
                b as f64 / 1024.0
            ),
            _ if real.is_some() => println!("  the real trellis-proxy did not sync"),
            _ => {}
        }
        STOPPING.store(true, Ordering::Relaxed);
    });
    drop(cp);
    rt.shutdown_background();
}

fn main() {
    let ns: Vec<usize> = std::env::args()
        .skip(1)
        .filter_map(|a| a.parse().ok())
        .collect();
    let ns = if ns.is_empty() { vec![100, 1000] } else { ns };
    if let [n] = ns.as_slice() {
        run(*n);
        return;
    }
    // Each size in a process of its own: nothing of one run (threads, sockets) is left
    // to weigh on the next.
    let me = std::env::current_exe().expect("own path");
    for n in ns {
        let ok = Command::new(&me)
            .arg(n.to_string())
            .status()
            .is_ok_and(|s| s.success());
        assert!(ok, "the run with {n} failed");
    }
}
