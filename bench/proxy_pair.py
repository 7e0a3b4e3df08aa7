#!/usr/bin/env python3
"""First proxy benchmark: load generator -> outbound proxy -> inbound proxy -> fixture
server, against load generator -> fixture server, measured in the same run.

HTTP/1.1, 1 KiB responses, 16 keep-alive connections, a fixed rate from an open-loop
generator (oha -q with --latency-correction, so coordinated omission is corrected), each
proxy on one worker thread. Runs are interleaved (direct, pair, direct, pair, ...) so that
drift on a shared machine hits both sides alike; medians over the repetitions are reported.

Reports: added p50/p99 latency over direct, proxy CPU microseconds per request
(utime+stime from /proc, load generator excluded), RSS and peak RSS per proxy.

Usage: bench/proxy_pair.py [--rate 2000] [--duration 15] [--reps 3] [--mtls] [--no-peers]
                          [--telemetry off|metrics|full] [--write-docs]
--telemetry: what both proxies' Telemetry selects: `metrics` (the default, Istio's metrics
only), `off` (every metric disabled), `full` (metrics, Istio's JSON access log line per
request to a file, tracing at 1 % to a fixture OTLP collector). Only `metrics` runs
rewrite docs/benchmarks.md.
Same-run references: one Trellis hop and one nginx hop (Debian nginx, skipped if absent);
with --mtls (the proxies speak mutual TLS with certificates from `trellis cert`, the
inbound one STRICT), an nginx pair with mutual TLS between them instead of the nginx hop.
Needs: a release build (the script runs cargo build --release), oha on PATH
(cargo install oha --locked).
"""

import argparse
import json
import os
import platform
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TICK_US = 1_000_000 / os.sysconf("SC_CLK_TCK")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port, timeout=10.0):
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"port {port} did not open")


def cpu_us(pid):
    """utime + stime of a process (all its threads), in microseconds."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) * TICK_US


def rss_kib(pid):
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(("VmRSS:", "VmHWM:")):
                k, v = line.split(":")
                out[k] = int(v.split()[0])
    return out["VmRSS"], out["VmHWM"]


def oha(url, rate, duration, conns, extra=()):
    cmd = [
        "oha", "--no-tui", "--output-format", "json",
        "-z", f"{duration}s", "-q", str(rate), "-c", str(conns),
        "--latency-correction", "-H", "Host: app", *extra, url,
    ]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    j = json.loads(out)
    pct = j["latencyPercentiles"]
    summary = j["summary"]
    codes = j.get("statusCodeDistribution", {})
    ok = int(codes.get("200", 0))
    errors = {k: int(v) for k, v in j.get("errorDistribution", {}).items()}
    # Requests still in flight when the run's time is up are cut off by oha, not failed.
    errors.pop("aborted due to deadline", None)
    errors.update({f"HTTP {k}": int(v) for k, v in codes.items() if k != "200"})
    return {
        "p50_us": pct["p50"] * 1e6,
        "p99_us": pct["p99"] * 1e6,
        "rps": summary["requestsPerSec"],
        "ok": ok,
        "errors": sum(errors.values()),
        "error_kinds": errors,
    }


def nginx_head(name):
    """The start of every nginx config here (one worker, no access log); `name` names its
    pid and error files. A `str.format` template, as the configs that follow it."""
    return f"""worker_processes 1;
daemon off;
pid {{tmp}}/{name}.pid;
error_log {{tmp}}/{name}.err warn;
events {{{{ worker_connections 1024; }}}}
http {{{{
  access_log off;
"""


NGINX_CONF = nginx_head("nginx") + """  upstream app {{ server 127.0.0.1:{app}; keepalive 32; }}
  server {{
    listen 127.0.0.1:{port};
    location / {{ proxy_pass http://app; proxy_http_version 1.1; proxy_set_header Connection ""; }}
  }}
}}
"""


NGINX_MTLS_OUT = nginx_head("ngx-out") + """  upstream peer {{ server 127.0.0.1:{peer}; keepalive 32; }}
  server {{
    listen 127.0.0.1:{port};
    location / {{
      proxy_pass https://peer; proxy_http_version 1.1; proxy_set_header Connection "";
      proxy_ssl_certificate {certs}/cert-chain.pem; proxy_ssl_certificate_key {certs}/key.pem;
      proxy_ssl_protocols TLSv1.3; proxy_ssl_session_reuse on;
    }}
  }}
}}
"""

NGINX_MTLS_IN = nginx_head("ngx-in") + """  upstream app {{ server 127.0.0.1:{app}; keepalive 32; }}
  server {{
    listen 127.0.0.1:{port} ssl;
    ssl_protocols TLSv1.3;
    ssl_certificate {certs}/cert-chain.pem; ssl_certificate_key {certs}/key.pem;
    ssl_client_certificate {certs}/root-cert.pem; ssl_verify_client on;
    location / {{ proxy_pass http://app; proxy_http_version 1.1; proxy_set_header Connection ""; }}
  }}
}}
"""


def nginx_worker(master_pid, timeout=5.0):
    """The pid of nginx's single worker process."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        for d in os.listdir("/proc"):
            if d.isdigit():
                try:
                    with open(f"/proc/{d}/stat") as f:
                        if int(f.read().rsplit(")", 1)[1].split()[1]) == master_pid:
                            return int(d)
                except OSError:
                    continue
        time.sleep(0.05)
    raise RuntimeError("nginx started no worker")


# A collector that takes OTLP posts and answers 200.
COLLECTOR = """
import http.server, sys
class H(http.server.BaseHTTPRequestHandler):
    def do_POST(self):
        self.rfile.read(int(self.headers.get("content-length", 0)))
        self.send_response(200); self.send_header("content-length", "0"); self.end_headers()
    def log_message(self, *a): pass
http.server.HTTPServer(("127.0.0.1", int(sys.argv[1])), H).serve_forever()
"""


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rate", type=int, default=2000)
    ap.add_argument("--duration", type=int, default=15)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--connections", type=int, default=16)
    ap.add_argument("--between", choices=["h2", "h1"], default="h2",
                    help="protocol between the proxies (h2: Trellis's default, one multiplexed "
                         "connection; h1: the cluster's keepClientProtocol, as DestinationRule "
                         "h2UpgradePolicy DO_NOT_UPGRADE sets it)")
    ap.add_argument("--mtls", action="store_true",
                    help="mutual TLS between the proxies (certificates from trellis cert; inbound STRICT)")
    ap.add_argument("--no-peers", action="store_true",
                    help="skip the same-run references (one Trellis hop, one nginx hop)")
    ap.add_argument("--telemetry", choices=["off", "metrics", "full"], default="metrics",
                    help="what both proxies' Telemetry selects (see above)")
    ap.add_argument("--write-docs", action="store_true", help="rewrite the results section of docs/benchmarks.md")
    args = ap.parse_args()

    if not shutil.which("oha"):
        sys.exit("oha not found: cargo install oha --locked")
    nginx = None if args.no_peers else shutil.which("nginx") or (
        "/usr/sbin/nginx" if os.path.exists("/usr/sbin/nginx") else None)
    if not args.no_peers and nginx is None:
        print("nginx not found (apt-get install nginx-light): the nginx reference is skipped", file=sys.stderr)
    crates = ["-p", "trellis-proxy", "-p", "trellis-testkit"] + (["-p", "trellis-cli"] if args.mtls else [])
    subprocess.run(["cargo", "build", "--release", "-q", *crates], cwd=ROOT, check=True)
    target = os.path.join(ROOT, "target", "release")

    tmp = tempfile.mkdtemp(prefix="trellis-bench-")
    app_port, in_port, out_port, one_port, nginx_port = (free_port() for _ in range(5))
    inbound_snap = os.path.join(tmp, "inbound.yaml")
    outbound_snap = os.path.join(tmp, "outbound.yaml")
    one_snap = os.path.join(tmp, "one.yaml")
    # With --mtls: certificates from the mesh CA (trellis cert), the root in the snapshots,
    # the inbound proxy STRICT, the outbound one expecting the inbound's identity.
    certs, mesh_in, mesh_out = {}, "", ""
    if args.mtls:
        for ns, sa in (("web", "web"), ("default", "app")):
            certs[sa] = os.path.join(tmp, sa)
            subprocess.run([os.path.join(target, "trellis"), "cert", "-n", ns, "--service-account", sa,
                            "--out", certs[sa], "--data-dir", os.path.join(tmp, "ca")],
                           check=True, stderr=subprocess.DEVNULL)
        with open(os.path.join(certs["app"], "root-cert.pem")) as f:
            roots = f"trustRoots: [{json.dumps(f.read())}]\n"
        mesh_in = "  mtls: STRICT\n" + roots
        mesh_out = roots
    telemetry = ""
    collector = None
    if args.telemetry == "off":
        telemetry = ("  telemetry:\n    metrics:\n      overrides: "
                     "[{metric: ALL_METRICS, mode: CLIENT_AND_SERVER, disabled: true}]\n")
    elif args.telemetry == "full":
        otlp_port = free_port()
        collector = subprocess.Popen([sys.executable, "-c", COLLECTOR, str(otlp_port)])
        telemetry = ("  telemetry:\n    tracing:\n    - {mode: CLIENT_AND_SERVER, providers: [otel], "
                     "randomSamplingPercentage: 1}\n    accessLogging:\n    - {mode: CLIENT_AND_SERVER, "
                     "providers: [log]}\n    providers:\n    - {name: otel, kind: opentelemetry, "
                     f"service: 127.0.0.1, port: {otlp_port}, path: /v1/traces}}\n    - {{name: log, "
                     f"kind: envoyJson, path: {os.path.join(tmp, 'access.log')}}}\n")
    with open(inbound_snap, "w") as f:
        f.write(f"version: bench\nworkload:\n  name: app\n  inboundPorts: [{{port: {app_port}, name: http}}]\n"
                + telemetry + mesh_in)
    service = ("version: bench\nservices:\n- hostname: app.default.svc.cluster.local\n"
               "  ports: [{port: 80, name: http, cluster: app}]\n"
               "clusters:\n- name: app\n  keepClientProtocol: %s\n"
               "  endpoints: [{address: \"127.0.0.1:%d\", proxied: %s, "
               "identity: \"spiffe://cluster.local/ns/default/sa/app\"}]\n")
    with open(outbound_snap, "w") as f:
        f.write(service % ("false" if args.between == "h2" else "true", in_port, "true") + mesh_out
                + "workload:\n  name: web\n  namespace: web\n" + telemetry)
    with open(one_snap, "w") as f:
        f.write(service % ("false", app_port, "false"))
    common = ["--workers", "1", "--admin", "off", "--readiness", "off", "--log-level", "warn"]
    proxy = os.path.join(target, "trellis-proxy")
    procs = [collector] if collector else []
    try:
        app = subprocess.Popen([os.path.join(target, "trellis-fixture"), "--http", f"127.0.0.1:{app_port}"],
                               stdout=subprocess.DEVNULL)
        procs.append(app)
        in_certs = ["--workload-cert", certs["app"]] if args.mtls else []
        out_certs = ["--workload-cert", certs["web"]] if args.mtls else []
        inbound = subprocess.Popen([proxy, "--config", inbound_snap,
                                    "--inbound-listen", f"127.0.0.1:{in_port}={app_port}", *in_certs, *common])
        procs.append(inbound)
        outbound = subprocess.Popen([proxy, "--config", outbound_snap,
                                     "--outbound-listen", f"127.0.0.1:{out_port}=app:80", *out_certs, *common])
        procs.append(outbound)
        ports = [app_port, in_port, out_port]
        # Same-run references: one Trellis hop (HTTP/1.1 both sides) and one nginx hop.
        peers = {}
        if not args.no_peers:
            one = subprocess.Popen([proxy, "--config", one_snap,
                                    "--outbound-listen", f"127.0.0.1:{one_port}=app:80", *common])
            procs.append(one)
            ports.append(one_port)
            peers["trellis (one hop)"] = ([one.pid], f"http://127.0.0.1:{one_port}/bytes/1024")
        ngx_pair = None
        if nginx and args.mtls:
            # The same pair in nginx: HTTP/1.1 in, mutual TLS between the two (nginx checks
            # the client's chain; it cannot check a SPIFFE id), HTTP/1.1 to the fixture.
            ngx_in_port, ngx_out_port = free_port(), free_port()
            ngx_pair = []
            for name, conf_text in (
                    ("in", NGINX_MTLS_IN.format(tmp=tmp, app=app_port, port=ngx_in_port, certs=certs["app"])),
                    ("out", NGINX_MTLS_OUT.format(tmp=tmp, peer=ngx_in_port, port=ngx_out_port,
                                                  certs=certs["web"]))):
                conf = os.path.join(tmp, f"nginx-{name}.conf")
                with open(conf, "w") as f:
                    f.write(conf_text)
                ngx_pair.append(subprocess.Popen([nginx, "-c", conf, "-p", tmp], stdout=subprocess.DEVNULL,
                                                 stderr=subprocess.DEVNULL))
                procs.append(ngx_pair[-1])
            ports += [ngx_in_port, ngx_out_port]
        elif nginx:
            conf = os.path.join(tmp, "nginx.conf")
            with open(conf, "w") as f:
                f.write(NGINX_CONF.format(tmp=tmp, app=app_port, port=nginx_port))
            ngx = subprocess.Popen([nginx, "-c", conf, "-p", tmp], stdout=subprocess.DEVNULL,
                                   stderr=subprocess.DEVNULL)
            procs.append(ngx)
            ports.append(nginx_port)
        for p in ports:
            wait_port(p)
        if ngx_pair:
            peers["nginx pair, mTLS (both proxies)"] = (
                [nginx_worker(p.pid) for p in ngx_pair], f"http://127.0.0.1:{ngx_out_port}/bytes/1024")
        elif nginx:
            peers["nginx (one hop)"] = ([nginx_worker(ngx.pid)], f"http://127.0.0.1:{nginx_port}/bytes/1024")
        idle_rss = {"outbound": rss_kib(outbound.pid), "inbound": rss_kib(inbound.pid)}

        direct_url = f"http://127.0.0.1:{app_port}/bytes/1024"
        pair_url = f"http://127.0.0.1:{out_port}/bytes/1024"
        # Warm up every path (connections, pools, page cache).
        for url in [direct_url, pair_url] + [u for _, u in peers.values()]:
            oha(url, args.rate, 2, args.connections)

        def run(url, pids):
            c0 = [cpu_us(p) for p in pids]
            r = oha(url, args.rate, args.duration, args.connections)
            c1 = [cpu_us(p) for p in pids]
            requests = max(r["ok"], 1)
            r["cpu"] = [(b - a) / requests for a, b in zip(c0, c1)]
            return r

        direct, pair, peer_runs = [], [], {n: [] for n in peers}
        for rep in range(args.reps):
            direct.append(run(direct_url, [app.pid]))
            r = run(pair_url, [outbound.pid, inbound.pid])
            r["cpu_us_per_req"] = {"outbound": r["cpu"][0], "inbound": r["cpu"][1]}
            pair.append(r)
            line = (f"rep {rep + 1}: direct p50 {direct[-1]['p50_us']:.0f}us p99 {direct[-1]['p99_us']:.0f}us "
                    f"(fixture cpu/req {direct[-1]['cpu'][0]:.1f}us) | "
                    f"pair p50 {r['p50_us']:.0f}us p99 {r['p99_us']:.0f}us | cpu/req out "
                    f"{r['cpu'][0]:.1f}us in {r['cpu'][1]:.1f}us | errors {r['errors']} {r['error_kinds'] or ''}")
            for name, (pids, url) in peers.items():
                pr = run(url, pids)
                peer_runs[name].append(pr)
                line += f" | {name} p50 {pr['p50_us']:.0f}us cpu/req {sum(pr['cpu']):.1f}us"
            print(line, flush=True)
        load_rss = {"outbound": rss_kib(outbound.pid), "inbound": rss_kib(inbound.pid)}
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()
        shutil.rmtree(tmp, ignore_errors=True)

    med = statistics.median
    res = {
        "direct_p50": med(d["p50_us"] for d in direct),
        "direct_p99": med(d["p99_us"] for d in direct),
        "fixture_cpu": med(d["cpu"][0] for d in direct),
        "pair_p50": med(p["p50_us"] for p in pair),
        "pair_p99": med(p["p99_us"] for p in pair),
        "added_p50": med(p["p50_us"] - d["p50_us"] for p, d in zip(pair, direct)),
        "added_p99": med(p["p99_us"] - d["p99_us"] for p, d in zip(pair, direct)),
        "added_p50_spread": (min(p["p50_us"] - d["p50_us"] for p, d in zip(pair, direct)),
                             max(p["p50_us"] - d["p50_us"] for p, d in zip(pair, direct))),
        "added_p99_spread": (min(p["p99_us"] - d["p99_us"] for p, d in zip(pair, direct)),
                             max(p["p99_us"] - d["p99_us"] for p, d in zip(pair, direct))),
        "cpu_out": med(p["cpu_us_per_req"]["outbound"] for p in pair),
        "cpu_in": med(p["cpu_us_per_req"]["inbound"] for p in pair),
        "errors": sum(p["errors"] for p in pair) + sum(d["errors"] for d in direct),
        "rps": med(p["rps"] for p in pair),
        "idle_rss": idle_rss,
        "load_rss": load_rss,
        "peers": {
            name: {
                "added_p50": med(p["p50_us"] - d["p50_us"] for p, d in zip(runs, direct)),
                "added_p99": med(p["p99_us"] - d["p99_us"] for p, d in zip(runs, direct)),
                "cpu": med(sum(p["cpu"]) for p in runs),
                "errors": sum(p["errors"] for p in runs),
            }
            for name, runs in peer_runs.items()
        },
    }
    report = render(res, args)
    print(report)
    if args.write_docs and args.telemetry == "metrics":
        write_docs(report, "proxy_pair_mtls" if args.mtls else "proxy_pair")


def render(r, args):
    machine = f"{platform.node()}: {os.cpu_count()} cores, {platform.platform()}"
    cmd = f"bench/proxy_pair.py --rate {args.rate} --duration {args.duration} --reps {args.reps}"
    if args.between != "h2":
        cmd += f" --between {args.between}"
    if args.mtls:
        cmd += " --mtls"
    if args.telemetry != "metrics":
        cmd += f" --telemetry {args.telemetry}"
    between = (f"Mutual TLS between the proxies (TLS 1.3, certificates from `trellis cert`, the inbound "
               f"proxy STRICT), " if args.mtls else "Plaintext between the proxies, ")
    target_p50 = 100 if args.mtls else 80
    lines = [
        f"### Proxy pair vs direct, HTTP/1.1, {'mTLS, ' if args.mtls else ''}{args.rate} rps "
        f"({datetime.now(timezone.utc):%Y-%m-%d})",
        "",
        f"Command: `{cmd}`. Machine: {machine}. Load: oha, open loop at {args.rate} rps with latency",
        f"correction, {args.connections} keep-alive connections, 1 KiB responses, {args.duration} s per run,",
        f"{args.reps} interleaved repetitions (medians; spread is min..max of the per-repetition",
        f"difference). {between}"
        f"{'HTTP/2' if args.between == 'h2' else 'HTTP/1.1 (keepClientProtocol)'} between them.",
        "",
        "| | direct | through the pair | added by two proxies | target |",
        "|---|---|---|---|---|",
        f"| p50 latency | {r['direct_p50']:.0f} µs | {r['pair_p50']:.0f} µs | **{r['added_p50']:.0f} µs** "
        f"({r['added_p50_spread'][0]:.0f}..{r['added_p50_spread'][1]:.0f}) | ≤ {target_p50} µs |",
        f"| p99 latency | {r['direct_p99']:.0f} µs | {r['pair_p99']:.0f} µs | **{r['added_p99']:.0f} µs** "
        f"({r['added_p99_spread'][0]:.0f}..{r['added_p99_spread'][1]:.0f}) | ≤ 250 µs |",
        "",
        "| per proxy | CPU per request | RSS idle | RSS under load | peak RSS | target |",
        "|---|---|---|---|---|---|",
    ]
    for name, cpu in (("outbound", r["cpu_out"]), ("inbound", r["cpu_in"])):
        idle, _ = r["idle_rss"][name]
        load, peak = r["load_rss"][name]
        lines.append(f"| {name} | **{cpu:.1f} µs** | {idle / 1024:.1f} MiB | {load / 1024:.1f} MiB | "
                     f"{peak / 1024:.1f} MiB | ≤ 35 µs, ≤ 15 MiB |")
    lines += ["", f"Achieved rate {r['rps']:.0f} rps; failed requests: {r['errors']}.", ""]
    if r["peers"]:
        lines += [
            "Same-run references (one worker each, upstream keep-alive; CPU per request summed",
            "over a pair's two processes), and the fixture server's own CPU per request",
            "(one `recvfrom` and one `writev` per request: the kernel's floor on this machine):",
            "",
            "| | added p50 | added p99 | CPU per request |",
            "|---|---|---|---|",
        ]
        for name, p in r["peers"].items():
            lines.append(f"| {name} | {p['added_p50']:.0f} µs | {p['added_p99']:.0f} µs | {p['cpu']:.1f} µs |")
        lines.append(f"| fixture server alone | | | {r['fixture_cpu']:.1f} µs |")
        lines.append("")
    return "\n".join(lines)


def write_docs(report, key, before=None):
    """Puts `report` between docs/benchmarks.md's `<!-- key:begin/end -->` markers; the
    first time, before the heading `before` (when given and present), else at the end."""
    path = os.path.join(ROOT, "docs", "benchmarks.md")
    begin, end = f"<!-- {key}:begin -->", f"<!-- {key}:end -->"
    text = open(path).read() if os.path.exists(path) else ""
    block = f"{begin}\n{report}\n{end}"
    if begin in text and end in text:
        text = text[: text.index(begin)] + block + text[text.index(end) + len(end):]
    elif before and before in text:
        text = text.replace(before, block + "\n\n" + before, 1)
    else:
        text = text + "\n" + block + "\n"
    with open(path, "w") as f:
        f.write(text)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
