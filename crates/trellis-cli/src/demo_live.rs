//! The running demo: Bookinfo as pods with transparent sidecars (`trellis up` of the
//! bundled example), a gentle load through the ingress gateway, and a live view of every
//! edge (source → destination service and version) from the sidecars' own Istio metrics,
//! refreshed every second, like `linkerd viz stat`.

use std::collections::BTreeMap;
use std::io::{IsTerminal, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

/// Where the demo's copy of the bundled Bookinfo lives while it runs.
const CONFIG_DIR: &str = "/run/trellis/demo-bookinfo";
/// The ingress gateway's port on the host (examples/bookinfo/workloads.yaml).
const GATEWAY: &str = "127.0.0.1:8080";

/// One edge's counters, summed over the series of its destination's sidecar.
#[derive(Debug, Clone, Default)]
struct Edge {
    requests: f64,
    failures: f64,
    /// Cumulative duration buckets: upper bound (µs) → count.
    buckets: BTreeMap<u64, f64>,
}

/// Source workload, destination service, destination version, mutual TLS.
type EdgeKey = (String, String, String, bool);
type Scrape = (Instant, BTreeMap<EdgeKey, Edge>);

/// Labels of one exposition line: `name{a="x",b="y"} value`.
fn labels(line: &str) -> Option<(BTreeMap<&str, &str>, f64)> {
    let (inner, value) = line.split_once('{')?.1.rsplit_once("} ")?;
    let mut out = BTreeMap::new();
    let mut rest = inner;
    while let Some((name, after)) = rest.split_once("=\"") {
        let end = after.find('"')?;
        out.insert(name.trim_start_matches(','), &after[..end]);
        rest = &after[end + 1..];
    }
    Some((out, value.trim().parse().ok()?))
}

/// Reads the destination side's series of one sidecar's exposition into edges.
fn edges_of(text: &str, into: &mut BTreeMap<EdgeKey, Edge>) {
    for line in text.lines() {
        let count = line.starts_with("istio_requests_total{reporter=\"destination\"");
        let bucket =
            line.starts_with("istio_request_duration_milliseconds_bucket{reporter=\"destination\"");
        if !count && !bucket {
            continue;
        }
        let Some((l, v)) = labels(line) else { continue };
        let key = (
            l.get("source_workload").unwrap_or(&"unknown").to_string(),
            l.get("destination_service_name")
                .unwrap_or(&"unknown")
                .to_string(),
            l.get("destination_version")
                .unwrap_or(&"unknown")
                .to_string(),
            l.get("connection_security_policy") == Some(&"mutual_tls"),
        );
        let e = into.entry(key).or_default();
        if count {
            e.requests += v;
            let code = l.get("response_code").copied().unwrap_or("0");
            if code.starts_with('5') || code == "0" {
                e.failures += v;
            }
        } else if let Some(le) = l.get("le").and_then(|b| b.parse::<f64>().ok()) {
            *e.buckets.entry((le * 1000.0) as u64).or_default() += v;
        }
    }
}

/// `GET /stats/prometheus` of a sidecar's readiness port.
fn scrape(ip: Ipv4Addr) -> Option<String> {
    let mut s =
        TcpStream::connect_timeout(&SocketAddr::from((ip, 15021)), Duration::from_millis(300))
            .ok()?;
    let _ = s.set_read_timeout(Some(Duration::from_secs(1)));
    s.write_all(b"GET /stats/prometheus HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
        .ok()?;
    let mut body = String::new();
    s.read_to_string(&mut body).ok()?;
    Some(body)
}

/// The bucket bound (µs) under which `q` of the observations between two scrapes fall.
fn quantile(now: &Edge, before: Option<&Edge>, q: f64) -> Option<u64> {
    let delta = |le: u64, v: f64| {
        v - before
            .and_then(|b| b.buckets.get(&le))
            .copied()
            .unwrap_or(0.0)
    };
    let total = now
        .buckets
        .iter()
        .map(|(le, v)| delta(*le, *v))
        .fold(0.0, f64::max);
    if total <= 0.0 {
        return None;
    }
    now.buckets
        .iter()
        .find(|(le, v)| delta(**le, **v) >= q * total)
        .map(|(le, _)| *le)
}

fn table(now: &Scrape, before: Option<&Scrape>) -> String {
    let secs = before.map_or(1.0, |b| now.0.duration_since(b.0).as_secs_f64().max(0.1));
    let mut out = format!(
        "{:<34} {:>6} {:>8} {:>8} {:>8}  {}\n",
        "SOURCE → DESTINATION", "RPS", "SUCCESS", "P50", "P99", "mTLS"
    );
    for (key, e) in &now.1 {
        let was = before.and_then(|b| b.1.get(key));
        let n = e.requests - was.map_or(0.0, |w| w.requests);
        let failed = e.failures - was.map_or(0.0, |w| w.failures);
        let (src, svc, version, mtls) = key;
        let ms = |q| {
            quantile(e, was, q).map_or("-".to_string(), |b| format!("≤{} ms", b as f64 / 1000.0))
        };
        out.push_str(&format!(
            "{:<34} {:>6.1} {:>8} {:>8} {:>8}  {}\n",
            format!("{src} → {svc} {version}"),
            n / secs,
            if n > 0.0 {
                format!("{:.1}%", 100.0 * (n - failed) / n)
            } else {
                "-".to_string()
            },
            ms(0.5),
            ms(0.99),
            if *mtls { "yes" } else { "no" }
        ));
    }
    out
}

/// A request to the product page through the ingress gateway, as `user`.
fn visit(user: Option<&str>) {
    let Ok(mut s) = TcpStream::connect_timeout(
        &GATEWAY
            .parse()
            .unwrap_or(SocketAddr::from(([127, 0, 0, 1], 8080))),
        Duration::from_secs(1),
    ) else {
        return;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
    let who = user.map_or(String::new(), |u| format!("end-user: {u}\r\n"));
    let _ = s.write_all(
        format!("GET /productpage HTTP/1.1\r\nhost: bookinfo\r\n{who}connection: close\r\n\r\n")
            .as_bytes(),
    );
    let _ = s.read_to_end(&mut Vec::new());
}

/// The Bookinfo task files, where this program can find them.
fn tasks_dir() -> PathBuf {
    let here = Path::new("examples/bookinfo-tasks");
    if here.is_dir() {
        return here.to_path_buf();
    }
    PathBuf::from(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../examples/bookinfo-tasks"
    ))
}

/// Ends the demo's threads when dropped.
struct Stop(Arc<AtomicBool>);

impl Drop for Stop {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

pub fn run(files: &[(&str, &str)], run_for: Option<Duration>) -> anyhow::Result<ExitCode> {
    let dir = Path::new(CONFIG_DIR);
    let _ = std::fs::remove_dir_all(dir);
    std::fs::create_dir_all(dir)?;
    for (name, text) in files {
        let base = Path::new(name).file_name().unwrap_or_default();
        std::fs::write(dir.join(base), text)?;
    }
    println!(
        "Trellis demo: Istio's Bookinfo, unchanged Istio YAML, as pods with transparent sidecars.\n"
    );
    let exe = std::env::current_exe()
        .map(|e| e.display().to_string())
        .unwrap_or_else(|_| "trellis".into());
    let tasks = tasks_dir();
    let t = tasks.display();
    let tries = [
        (
            format!("curl http://{GATEWAY}/productpage"),
            "the page; reload it",
        ),
        (
            format!("{exe} apply {t}/virtual-service-all-v1.yaml"),
            "everyone to v1",
        ),
        (
            format!("{exe} apply {t}/virtual-service-reviews-test-v2.yaml"),
            "jason to reviews v2",
        ),
        (
            format!("{exe} apply {t}/virtual-service-reviews-50-v3.yaml"),
            "half of reviews to v3",
        ),
        (
            format!("{exe} apply {t}/virtual-service-ratings-test-abort.yaml"),
            "ratings fail for jason",
        ),
    ];
    // The descriptions in one column, however long this program's path is.
    let width = tries
        .iter()
        .map(|(c, _)| c.chars().count())
        .max()
        .unwrap_or(0);
    let mut hint =
        String::from("Try next, in another terminal (the view shows the effect within seconds):\n");
    for (command, what) in &tries {
        hint.push_str(&format!("  {command:<width$}  {what}\n"));
    }
    hint.push_str(&format!(
        "  {exe} ps bookinfo · {exe} logs bookinfo reviews-v2-0 [--proxy]\n\
         Ctrl-C stops the mesh and removes everything it made."
    ));
    let mut hook = |net: &trellis_runtime::MeshNet, pods: &[(String, Ipv4Addr)]| {
        let stop = Arc::new(AtomicBool::new(false));
        let scrapes: Arc<Mutex<Vec<Scrape>>> = Arc::default();
        // The sidecars' metrics, from inside the node's namespace.
        let (flag, into, ips) = (
            Arc::clone(&stop),
            Arc::clone(&scrapes),
            pods.iter().map(|p| p.1).collect::<Vec<_>>(),
        );
        let _ = trellis_runtime::spawn_in(&net.node_ns(), "demo-scrape", move || {
            while !flag.load(Ordering::Relaxed) {
                let mut edges = BTreeMap::new();
                for ip in &ips {
                    if let Some(text) = scrape(*ip) {
                        edges_of(&text, &mut edges);
                    }
                }
                let mut s = into.lock().unwrap_or_else(PoisonError::into_inner);
                s.push((Instant::now(), edges));
                if s.len() > 10 {
                    s.remove(0);
                }
                drop(s);
                std::thread::sleep(Duration::from_secs(1));
            }
        });
        // A gentle load: five pages a second, every third one as jason.
        let flag = Arc::clone(&stop);
        let _ = std::thread::Builder::new()
            .name("demo-load".into())
            .spawn(move || {
                let mut n = 0u64;
                while !flag.load(Ordering::Relaxed) {
                    n += 1;
                    visit(n.is_multiple_of(3).then_some("jason"));
                    std::thread::sleep(Duration::from_millis(200));
                }
            });
        // The view.
        let (flag, from, shown_hint) = (Arc::clone(&stop), Arc::clone(&scrapes), hint.clone());
        let _ = std::thread::Builder::new()
            .name("demo-view".into())
            .spawn(move || {
                let tty = std::io::stdout().is_terminal();
                let mut shown = 0u64;
                while !flag.load(Ordering::Relaxed) {
                    std::thread::sleep(Duration::from_secs(1));
                    shown += 1;
                    let s = from.lock().unwrap_or_else(PoisonError::into_inner);
                    let (Some(now), before) = (s.last(), s.len().checked_sub(2).and_then(|i| s.get(i)))
                    else {
                        continue;
                    };
                    let view = table(now, before);
                    drop(s);
                    if tty {
                        print!(
                            "\x1b[2J\x1b[HBookinfo on Trellis: http://{GATEWAY}/productpage  (refreshed every second)\n\n{view}\n{shown_hint}\n"
                        );
                    } else if shown.is_multiple_of(5) {
                        print!("\n{view}");
                    }
                    let _ = std::io::stdout().flush();
                }
            });
        if !std::io::stdout().is_terminal() {
            println!("{hint}");
        }
        if let Some(d) = run_for {
            // Ends the demo after `d`, as Ctrl-C would.
            let _ = std::thread::Builder::new().spawn(move || {
                std::thread::sleep(d);
                trellis_runtime::net::signal(&[std::process::id()], "INT");
            });
        }
        Box::new(Stop(stop)) as Box<dyn std::any::Any>
    };
    let code = crate::up::run_mesh(dir, Some("bookinfo"), Some(&mut hook));
    let _ = std::fs::remove_dir_all(dir);
    code
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn edges_come_from_the_destination_series() {
        let text = "\
istio_requests_total{reporter=\"destination\",source_workload=\"productpage-v1\",destination_version=\"v2\",destination_service_name=\"reviews\",response_code=\"200\",connection_security_policy=\"mutual_tls\"} 8
istio_requests_total{reporter=\"destination\",source_workload=\"productpage-v1\",destination_version=\"v2\",destination_service_name=\"reviews\",response_code=\"503\",connection_security_policy=\"mutual_tls\"} 2
istio_requests_total{reporter=\"source\",source_workload=\"productpage-v1\",destination_service_name=\"reviews\"} 99
istio_request_duration_milliseconds_bucket{reporter=\"destination\",source_workload=\"productpage-v1\",destination_version=\"v2\",destination_service_name=\"reviews\",connection_security_policy=\"mutual_tls\",le=\"1\"} 5
istio_request_duration_milliseconds_bucket{reporter=\"destination\",source_workload=\"productpage-v1\",destination_version=\"v2\",destination_service_name=\"reviews\",connection_security_policy=\"mutual_tls\",le=\"5\"} 10
";
        let mut edges = BTreeMap::new();
        edges_of(text, &mut edges);
        let key = (
            "productpage-v1".to_string(),
            "reviews".to_string(),
            "v2".to_string(),
            true,
        );
        let e = &edges[&key];
        assert_eq!((e.requests, e.failures), (10.0, 2.0));
        assert_eq!(quantile(e, None, 0.5), Some(1000));
        assert_eq!(quantile(e, None, 0.99), Some(5000));
        let t = table(&(Instant::now(), edges), None);
        assert!(t.contains("productpage-v1 → reviews v2"), "{t}");
        assert!(t.contains("80.0%") && t.contains("yes"), "{t}");
    }
}
