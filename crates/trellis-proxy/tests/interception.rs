//! Real interception: the `trellis-proxy` binary in a network namespace of its own, with
//! iptables and ip6tables REDIRECT rules like a sidecar's, an unmodified `python3 -m
//! http.server` as the destination and curl as the client. The proxy finds where each
//! connection was going with SO_ORIGINAL_DST (IPv4, also on its dual-stack listener) and
//! IP6T_SO_ORIGINAL_DST (IPv6), and its own upstream connections, marked 0x539, are not
//! redirected again.
//!
//! Needs root, `ip`, `iptables`, `ip6tables`, `curl` and `python3`; without them the test
//! says so and passes without checking anything.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_trellis-proxy");

fn have(cmd: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {cmd}")])
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

fn run(args: &[&str]) -> Result<String, String> {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .map_err(|e| format!("{args:?}: {e}"))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(format!(
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        ))
    }
}

/// A network namespace and the processes started in it; all gone on drop.
struct Netns {
    name: String,
    children: Vec<Child>,
}

impl Netns {
    fn new() -> Result<Netns, String> {
        let name = format!("trl-ic-{}", std::process::id());
        let _ = run(&["ip", "netns", "del", &name]);
        run(&["ip", "netns", "add", &name])?;
        let ns = Netns {
            name,
            children: Vec::new(),
        };
        ns.exec(&["ip", "link", "set", "lo", "up"])?;
        Ok(ns)
    }

    fn cmd(&self, args: &[&str]) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.name]).args(args);
        c
    }

    fn exec(&self, args: &[&str]) -> Result<String, String> {
        let out = self
            .cmd(args)
            .output()
            .map_err(|e| format!("{args:?}: {e}"))?;
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).into_owned())
        } else {
            Err(format!(
                "{args:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            ))
        }
    }

    fn spawn(&mut self, args: &[&str]) -> Result<(), String> {
        let child = self
            .cmd(args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| format!("{args:?}: {e}"))?;
        self.children.push(child);
        Ok(())
    }

    /// Waits (at most 10 s) until `curl` inside gets an HTTP answer from `url`.
    fn wait_http(&self, url: &str) -> bool {
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if self
                .exec(&["curl", "-s", "-o", "/dev/null", "--max-time", "1", url])
                .is_ok()
            {
                return true;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        false
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
        let _ = run(&["ip", "netns", "del", &self.name]);
    }
}

#[test]
fn intercepted_ipv4_and_ipv6_connections_reach_their_original_destination() {
    let missing: Vec<&str> = ["ip", "iptables", "ip6tables", "curl", "python3"]
        .into_iter()
        .filter(|c| !have(c))
        .collect();
    if !missing.is_empty() || !run(&["id", "-u"]).is_ok_and(|u| u.trim() == "0") {
        eprintln!("skipping: needs root and {missing:?}");
        return;
    }
    let mut ns = match Netns::new() {
        Ok(ns) => ns,
        Err(e) => {
            eprintln!("skipping: cannot make a network namespace: {e}");
            return;
        }
    };
    // A sidecar's outbound rules, for port 8080: the proxy's own connections (mark
    // 0x539) go out as they are, the rest is redirected to the capture port.
    for tables in ["iptables", "ip6tables"] {
        ns.exec(&[
            tables, "-t", "nat", "-A", "OUTPUT", "-p", "tcp", "-m", "mark", "--mark", "0x539",
            "-j", "RETURN",
        ])
        .expect("mark rule");
        ns.exec(&[
            tables,
            "-t",
            "nat",
            "-A",
            "OUTPUT",
            "-p",
            "tcp",
            "--dport",
            "8080",
            "-j",
            "REDIRECT",
            "--to-ports",
            "15001",
        ])
        .expect("redirect rule");
    }
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(dir.path().join("hello.txt"), "hello from the app\n").expect("write");
    let snap = dir.path().join("snapshot.yaml");
    std::fs::write(&snap, "version: ic\noutboundTrafficPolicy: ALLOW_ANY\n").expect("write");
    let dir_s = dir.path().to_str().expect("utf-8 path");
    // The app: unmodified, on both families.
    ns.spawn(&[
        "python3",
        "-m",
        "http.server",
        "8080",
        "--bind",
        "::",
        "--directory",
        dir_s,
    ])
    .expect("app");
    ns.spawn(&[
        BIN,
        "--config",
        snap.to_str().expect("utf-8 path"),
        "--outbound-capture",
        "[::]:15001",
        "--admin",
        "127.0.0.1:15000",
        "--readiness",
        "off",
    ])
    .expect("proxy");
    assert!(
        ns.wait_http("http://127.0.0.1:15000/ready"),
        "the proxy came up"
    );
    assert!(
        ns.wait_http("http://127.0.0.1:8080/hello.txt"),
        "the app answers through the proxy"
    );

    let passthrough = |ns: &Netns| {
        ns.exec(&[
            "curl",
            "-sS",
            "--max-time",
            "5",
            "http://127.0.0.1:15000/stats/prometheus",
        ])
        .expect("stats")
        .lines()
        .find_map(|l| l.strip_prefix("trellis_proxy_passthrough_connections_total "))
        .and_then(|v| v.trim().parse::<u64>().ok())
        .expect("passthrough counter")
    };
    let before = passthrough(&ns);
    for url in [
        "http://127.0.0.1:8080/hello.txt",
        "http://[::1]:8080/hello.txt",
    ] {
        let body = ns
            .exec(&["curl", "-sS", "--max-time", "5", url])
            .unwrap_or_else(|e| panic!("{url}: {e}"));
        assert_eq!(body, "hello from the app\n", "{url}");
    }
    // Both went through the proxy's capture listener to their original destination (a
    // passthrough: the snapshot has no services), not around it.
    assert_eq!(
        passthrough(&ns) - before,
        2,
        "IPv4 and IPv6 were intercepted"
    );
}
