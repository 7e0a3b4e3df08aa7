//! Pods as network namespaces, all behind one "node" namespace per mesh.
//!
//! ```text
//!   host (untouched)
//!   └─ trl-<mesh>-node       bridge br0 10.244.0.1/16, the control plane
//!      ├─ v0 ──── eth0 10.244.0.10   trl-<mesh>-<pod-a>   sidecar + app
//!      └─ v1 ──── eth0 10.244.0.11   trl-<mesh>-<pod-b>   sidecar + app
//! ```
//!
//! The bridge and every veth live in the node namespace, so the host's own interfaces,
//! routes and rules are never changed, and two meshes (or two tests) side by side only
//! need different names: their addresses are in different namespaces.
//!
//! Each pod gets interception rules equivalent to istio-iptables (`nat` table, applied
//! with `iptables-restore`, or as an nftables table `ip trellis` with `nft` where
//! iptables is missing): outbound TCP to 15001 except the proxy's own connections
//! (mark 0x539, or uid 1337), loopback and the node's address; inbound TCP to the
//! workload's ports to 15006.

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

/// Runs a command; its stderr is the error.
pub fn run(args: &[&str]) -> anyhow::Result<String> {
    let out = Command::new(args[0])
        .args(&args[1..])
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("cannot run {}", args[0]))?;
    if !out.status.success() {
        bail!(
            "{}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn have(cmd: &str) -> bool {
    std::env::var_os("PATH")
        .is_some_and(|paths| std::env::split_paths(&paths).any(|dir| dir.join(cmd).is_file()))
}

/// What this machine lacks to run pods, said the way a user can act on it.
pub fn preflight() -> anyhow::Result<()> {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let caps = status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
        .unwrap_or(0);
    const NET_ADMIN: u64 = 1 << 12;
    const SYS_ADMIN: u64 = 1 << 21;
    if caps & (NET_ADMIN | SYS_ADMIN) != NET_ADMIN | SYS_ADMIN {
        bail!(
            "running pods needs root (CAP_NET_ADMIN to make network namespaces and interception rules, CAP_SYS_ADMIN to mount them): run it with sudo"
        );
    }
    let mut missing: Vec<&str> = Vec::new();
    if !have("ip") {
        missing.push("iproute2");
    }
    match Netfilter::chosen() {
        Ok(_) => {}
        Err(pkg) => missing.push(pkg),
    }
    if !missing.is_empty() {
        bail!(
            "missing {}: install with `apt-get install -y {}`",
            missing.join(" and "),
            missing.join(" ")
        );
    }
    Ok(())
}

/// How interception rules are written into a pod.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Netfilter {
    /// `iptables-restore` (nat table; iptables-nft and iptables-legacy alike).
    Iptables,
    /// `nft -f -` (a table `ip trellis`), where iptables is not installed.
    Nft,
}

impl Netfilter {
    /// `TRELLIS_NETFILTER=iptables|nft` if set, else iptables-restore when installed,
    /// else nft; the package to install when neither is.
    pub fn chosen() -> Result<Netfilter, &'static str> {
        let forced = std::env::var("TRELLIS_NETFILTER").ok();
        match forced.as_deref() {
            Some("nft") if have("nft") => return Ok(Netfilter::Nft),
            Some("nft") => return Err("nftables"),
            Some("iptables") if have("iptables-restore") => return Ok(Netfilter::Iptables),
            Some("iptables") => return Err("iptables"),
            _ => {}
        }
        if have("iptables-restore") {
            Ok(Netfilter::Iptables)
        } else if have("nft") {
            Ok(Netfilter::Nft)
        } else {
            Err("iptables")
        }
    }
}

/// Ports of the sidecar itself, never intercepted inbound.
const PROXY_PORTS: [u16; 6] = [15000, 15001, 15006, 15020, 15021, 15090];

/// One mesh's network: the node namespace and its pods.
#[derive(Debug, Clone)]
pub struct MeshNet {
    /// Short and unique among meshes on this machine (`[a-z0-9-]`).
    pub mesh: String,
    /// The node's address on the bridge (the pods' gateway, where the control plane
    /// listens).
    pub node_ip: Ipv4Addr,
    pub prefix_len: u8,
}

/// A pod's network.
#[derive(Debug, Clone)]
pub struct PodNet {
    pub name: String,
    /// Its namespace (`trl-<mesh>-<name>`).
    pub netns: String,
    pub ip: Ipv4Addr,
}

impl MeshNet {
    pub fn new(mesh: &str) -> MeshNet {
        MeshNet {
            mesh: mesh.to_string(),
            node_ip: Ipv4Addr::new(10, 244, 0, 1),
            prefix_len: 16,
        }
    }

    fn prefix(&self) -> String {
        format!("trl-{}-", self.mesh)
    }

    pub fn node_ns(&self) -> String {
        format!("trl-{}-node", self.mesh)
    }

    pub fn pod_ns(&self, pod: &str) -> String {
        format!("{}{pod}", self.prefix())
    }

    /// The address of the pod numbered `index` (10.244.0.10 onwards).
    pub fn pod_ip(&self, index: u32) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.node_ip) + 9 + index)
    }

    /// The node namespace and its bridge.
    pub fn create_node(&self) -> anyhow::Result<()> {
        let ns = self.node_ns();
        run(&["ip", "netns", "add", &ns]).context(
            "cannot create the node namespace (a mesh of this name may be running: `trellis down`)",
        )?;
        run(&["ip", "-n", &ns, "link", "set", "lo", "up"])?;
        run(&["ip", "-n", &ns, "link", "add", "br0", "type", "bridge"])?;
        let cidr = format!("{}/{}", self.node_ip, self.prefix_len);
        run(&["ip", "-n", &ns, "addr", "add", &cidr, "dev", "br0"])?;
        run(&["ip", "-n", &ns, "link", "set", "br0", "up"])?;
        Ok(())
    }

    /// A pod: its namespace, a veth to the bridge, its address and default route, its
    /// interception rules (inbound for `ports`; none at all for a pod without a sidecar:
    /// `None`), and its hosts file.
    pub fn create_pod(
        &self,
        name: &str,
        index: u32,
        ports: Option<&[u16]>,
        hosts: &str,
    ) -> anyhow::Result<PodNet> {
        let (node, ns) = (self.node_ns(), self.pod_ns(name));
        let ip = self.pod_ip(index);
        run(&["ip", "netns", "add", &ns])?;
        run(&["ip", "-n", &ns, "link", "set", "lo", "up"])?;
        let veth = format!("v{index}");
        run(&[
            "ip", "-n", &node, "link", "add", &veth, "type", "veth", "peer", "name", "eth0",
            "netns", &ns,
        ])?;
        run(&[
            "ip", "-n", &node, "link", "set", &veth, "master", "br0", "up",
        ])?;
        let cidr = format!("{ip}/{}", self.prefix_len);
        run(&["ip", "-n", &ns, "addr", "add", &cidr, "dev", "eth0"])?;
        run(&["ip", "-n", &ns, "link", "set", "eth0", "up"])?;
        run(&[
            "ip",
            "-n",
            &ns,
            "route",
            "add",
            "default",
            "via",
            &self.node_ip.to_string(),
        ])?;
        if let Some(ports) = ports {
            match Netfilter::chosen() {
                Ok(Netfilter::Iptables) => {
                    apply_rules(&ns, &["iptables-restore"], &self.rules(ports))?;
                }
                Ok(Netfilter::Nft) => {
                    apply_rules(&ns, &["nft", "-f", "-"], &self.nft_rules(ports))?
                }
                Err(pkg) => bail!("no iptables-restore or nft: `apt-get install -y {pkg}`"),
            }
        }
        // `ip netns exec` mounts /etc/netns/<ns>/hosts over /etc/hosts.
        let dir = etc_dir(&ns);
        std::fs::create_dir_all(&dir).with_context(|| format!("{}", dir.display()))?;
        let pod = PodNet {
            name: name.to_string(),
            netns: ns,
            ip,
        };
        pod.write_hosts(hosts)?;
        Ok(pod)
    }

    /// Removes a pod: what still runs in it (SIGTERM, then SIGKILL after `grace`), its
    /// namespace (its veth with it) and its files under /etc/netns.
    pub fn delete_pod(&self, name: &str, grace: Duration) -> anyhow::Result<()> {
        let ns = self.pod_ns(name);
        stop_all(&ns, grace);
        let deleted = run(&["ip", "netns", "del", &ns]);
        let _ = std::fs::remove_dir_all(etc_dir(&ns));
        deleted.map(|_| ())
    }

    /// The interception rules of a pod (`iptables-restore` input).
    pub fn rules(&self, ports: &[u16]) -> String {
        let mut r = String::from(
            "*nat\n\
             :PREROUTING ACCEPT [0:0]\n\
             :INPUT ACCEPT [0:0]\n\
             :OUTPUT ACCEPT [0:0]\n\
             :POSTROUTING ACCEPT [0:0]\n\
             :TRELLIS_INBOUND - [0:0]\n\
             :TRELLIS_IN_REDIRECT - [0:0]\n\
             :TRELLIS_OUTPUT - [0:0]\n\
             :TRELLIS_REDIRECT - [0:0]\n\
             -A PREROUTING -p tcp -j TRELLIS_INBOUND\n",
        );
        for p in PROXY_PORTS {
            r.push_str(&format!(
                "-A TRELLIS_INBOUND -p tcp --dport {p} -j RETURN\n"
            ));
        }
        for p in ports.iter().filter(|p| !PROXY_PORTS.contains(p)) {
            r.push_str(&format!(
                "-A TRELLIS_INBOUND -p tcp --dport {p} -j TRELLIS_IN_REDIRECT\n"
            ));
        }
        r.push_str(&format!(
            "-A TRELLIS_IN_REDIRECT -p tcp -j REDIRECT --to-ports 15006\n\
             -A OUTPUT -p tcp -j TRELLIS_OUTPUT\n\
             -A TRELLIS_OUTPUT -m mark --mark 0x539 -j RETURN\n\
             -A TRELLIS_OUTPUT -m owner --uid-owner 1337 -j RETURN\n\
             -A TRELLIS_OUTPUT -o lo -j RETURN\n\
             -A TRELLIS_OUTPUT -d {}/32 -j RETURN\n\
             -A TRELLIS_OUTPUT -j TRELLIS_REDIRECT\n\
             -A TRELLIS_REDIRECT -p tcp -j REDIRECT --to-ports 15001\n\
             COMMIT\n",
            self.node_ip
        ));
        r
    }

    /// The same rules as an nftables table (`nft -f` input).
    pub fn nft_rules(&self, ports: &[u16]) -> String {
        let list = |ports: &[u16]| {
            ports
                .iter()
                .map(u16::to_string)
                .collect::<Vec<_>>()
                .join(", ")
        };
        let mut r = String::from(
            "table ip trellis {\n  chain prerouting {\n    type nat hook prerouting priority dstnat; policy accept;\n",
        );
        r.push_str(&format!(
            "    tcp dport {{ {} }} return\n",
            list(&PROXY_PORTS)
        ));
        let inbound: Vec<u16> = ports
            .iter()
            .copied()
            .filter(|p| !PROXY_PORTS.contains(p))
            .collect();
        if !inbound.is_empty() {
            r.push_str(&format!(
                "    tcp dport {{ {} }} redirect to :15006\n",
                list(&inbound)
            ));
        }
        r.push_str(&format!(
            "  }}\n  chain output {{\n    type nat hook output priority -100; policy accept;\n    \
             meta l4proto != tcp return\n    \
             meta mark 0x539 return\n    \
             meta skuid 1337 return\n    \
             oifname \"lo\" return\n    \
             ip daddr {} return\n    \
             meta l4proto tcp redirect to :15001\n  }}\n}}\n",
            self.node_ip
        ));
        r
    }

    /// The namespaces of this mesh that exist (pods first, the node last).
    pub fn existing(&self) -> Vec<String> {
        let list = run(&["ip", "netns", "list"]).unwrap_or_default();
        let prefix = self.prefix();
        let mut names: Vec<String> = list
            .lines()
            .filter_map(|l| l.split_whitespace().next())
            .filter(|n| n.starts_with(&prefix))
            .map(str::to_string)
            .collect();
        let node = self.node_ns();
        names.sort_by_key(|n| *n == node);
        names
    }

    /// Removes everything of this mesh: the processes in its namespaces (SIGTERM, then
    /// SIGKILL after `grace`), the namespaces (their veths and the bridge with them), and
    /// their files under /etc/netns. Whatever a crash left behind goes the same way.
    pub fn teardown(&self, grace: Duration) -> anyhow::Result<()> {
        let names = self.existing();
        for ns in &names {
            stop_all(ns, grace);
        }
        let mut failed = Vec::new();
        for ns in &names {
            if let Err(e) = run(&["ip", "netns", "del", ns]) {
                failed.push(e.to_string());
            }
            let _ = std::fs::remove_dir_all(etc_dir(ns));
        }
        if !failed.is_empty() {
            bail!("{}", failed.join("; "));
        }
        Ok(())
    }
}

impl PodNet {
    /// Writes the pod's hosts file in place: the processes already running (whose
    /// /etc/hosts is this file, bind-mounted) see the new names too.
    pub fn write_hosts(&self, hosts: &str) -> anyhow::Result<()> {
        let path = etc_dir(&self.netns).join("hosts");
        rewrite_in_place(&path, hosts).with_context(|| format!("{}", path.display()))
    }
}

/// Replaces a file's content in place without ever leaving it empty or cut short, as
/// truncating first would: an app that reads it meanwhile (a name lookup reads
/// /etc/hosts each time) gets the old content or the new. The new content is written
/// over the old in one write; when it is shorter, blank lines fill the rest (the file
/// never shrinks, so nothing is truncated).
fn rewrite_in_place(path: &Path, content: &str) -> std::io::Result<()> {
    use std::io::Write;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(false)
        .open(path)?;
    let old = f.metadata()?.len() as usize;
    let mut bytes = content.as_bytes().to_vec();
    if bytes.len() < old {
        bytes.resize(old, b'\n');
    }
    f.write_all(&bytes)
}

fn etc_dir(ns: &str) -> PathBuf {
    PathBuf::from("/etc/netns").join(ns)
}

/// Feeds `rules` to `tool` (`iptables-restore`, or `nft -f -`) in namespace `ns`.
fn apply_rules(ns: &str, tool: &[&str], rules: &str) -> anyhow::Result<()> {
    use std::io::Write;
    let name = tool.first().copied().unwrap_or("iptables-restore");
    let mut child = Command::new("ip")
        .args(["netns", "exec", ns])
        .args(tool)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("cannot run {name}"))?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin.write_all(rules.as_bytes())?;
    }
    let out = child.wait_with_output()?;
    if !out.status.success() {
        bail!(
            "{name} in {ns}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// The processes in a namespace.
pub fn pids(ns: &str) -> Vec<u32> {
    run(&["ip", "netns", "pids", ns])
        .unwrap_or_default()
        .split_whitespace()
        .filter_map(|p| p.parse().ok())
        .collect()
}

pub fn alive(pid: u32) -> bool {
    std::path::Path::new(&format!("/proc/{pid}")).exists()
        && !std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| {
            s.rsplit(')')
                .next()
                .is_some_and(|r| r.trim_start().starts_with('Z'))
        })
}

/// Sends `signal` (`TERM`, `KILL`) to processes.
pub fn signal(pids: &[u32], signal: &str) {
    if pids.is_empty() {
        return;
    }
    let mut args = vec!["kill".to_string(), format!("-{signal}")];
    args.extend(pids.iter().map(u32::to_string));
    let _ = Command::new(&args[0])
        .args(&args[1..])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
}

/// Stops every process of a namespace: SIGTERM, then SIGKILL to those still there after
/// `grace`.
pub fn stop_all(ns: &str, grace: Duration) {
    let list = pids(ns);
    signal(&list, "TERM");
    let until = Instant::now() + grace;
    while list.iter().any(|p| alive(*p)) && Instant::now() < until {
        std::thread::sleep(Duration::from_millis(50));
    }
    let left: Vec<u32> = list.into_iter().filter(|p| alive(*p)).collect();
    signal(&left, "KILL");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_file_rewritten_in_place_keeps_its_inode_and_never_holds_a_stale_tail() {
        let dir = std::env::temp_dir().join(format!("trellis-rewrite-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let path = dir.join("hosts");
        let long = "10.244.0.10 web-0\n10.244.0.11 reviews reviews.shop.svc.cluster.local\n";
        rewrite_in_place(&path, long).expect("first");
        let inode =
            |p: &Path| std::os::unix::fs::MetadataExt::ino(&std::fs::metadata(p).expect("meta"));
        let before = inode(&path);
        rewrite_in_place(&path, "10.244.0.10 web-0\n").expect("shorter");
        let text = std::fs::read_to_string(&path).expect("read");
        assert_eq!(inode(&path), before, "the same file (bind mounts see it)");
        assert_eq!(text.len(), long.len(), "no truncation");
        let lines: Vec<&str> = text.lines().filter(|l| !l.is_empty()).collect();
        assert_eq!(lines, ["10.244.0.10 web-0"]);
        rewrite_in_place(&path, long).expect("longer again");
        assert_eq!(std::fs::read_to_string(&path).expect("read"), long);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn rules_send_outbound_to_15001_and_the_workload_s_ports_to_15006() {
        let net = MeshNet::new("t");
        let r = net.rules(&[9080, 15021]);
        assert!(r.contains("-A TRELLIS_INBOUND -p tcp --dport 9080 -j TRELLIS_IN_REDIRECT\n"));
        assert!(!r.contains("--dport 15021 -j TRELLIS_IN_REDIRECT"), "{r}");
        assert!(r.contains("-A TRELLIS_OUTPUT -m mark --mark 0x539 -j RETURN\n"));
        assert!(r.contains("-A TRELLIS_OUTPUT -d 10.244.0.1/32 -j RETURN\n"));
        assert!(r.ends_with("REDIRECT --to-ports 15001\nCOMMIT\n"));
        assert_eq!(net.pod_ip(0), Ipv4Addr::new(10, 244, 0, 10));
        assert_eq!(net.pod_ns("web-0"), "trl-t-web-0");
    }

    #[test]
    fn nft_rules_say_the_same() {
        let net = MeshNet::new("t");
        let r = net.nft_rules(&[9080, 15021]);
        assert!(r.contains("tcp dport { 9080 } redirect to :15006\n"), "{r}");
        assert!(r.contains("meta mark 0x539 return\n"), "{r}");
        assert!(r.contains("meta skuid 1337 return\n"), "{r}");
        assert!(r.contains("ip daddr 10.244.0.1 return\n"), "{r}");
        assert!(r.contains("meta l4proto tcp redirect to :15001\n"), "{r}");
        // No inbound ports: no inbound redirect (an empty set is not valid nft).
        assert!(!net.nft_rules(&[]).contains(":15006"));
    }
}
