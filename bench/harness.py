#!/usr/bin/env python3
"""Trellis beside its peers, in one run: every topology at fixed rates and at saturation.

Topologies (HTTP/1.1 from the load generator, 1 KiB responses from the fixture server;
every proxy on one worker thread, peers' worker counts matched):

  direct            load generator -> fixture server (the baseline)
  trellis-off       Trellis sidecar pair, mTLS (HTTP/2 between the proxies), telemetry off
  trellis-metrics   the same with Istio's metrics (Trellis's default)
  trellis-full      metrics + a JSON access log line per request + 1 % tracing (OTLP)
  nginx             Debian nginx pair, mutual TLS between them (configs generated here)
  haproxy           Debian haproxy pair, mutual TLS between them

For each rate (default 2,000 and 10,000 rps) the topologies run interleaved, direct first,
for --reps repetitions (A B C ... A B C ...: drift on a shared machine hits all alike),
then one saturation run each (no rate limit, the proxies pinned to one core, the load
generator and fixture to the other). Figures: added latency p50/p90/p99/p99.9 over direct
(medians, with min..max), CPU microseconds per request per proxy (utime+stime from /proc,
load generator excluded), RSS idle, under load and peak, and the saturation rate.

The load generator is oha (crates.io): open loop at a fixed rate (-q) with
--latency-correction, so a slow response does not hide the requests queued behind it
(coordinated omission); 16 keep-alive connections by default.

Usage: bench/run.sh [--rates 2000,10000] [--duration 10] [--reps 3] [--connections 16]
                    [--only trellis-full,nginx] [--no-saturation] [--write-docs]
--write-docs rewrites the harness section of docs/benchmarks.md and the plots in
docs/bench/ (one SVG per topology: latency percentiles against rate).
"""

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from proxy_pair import (  # noqa: E402  (the shared helpers)
    COLLECTOR, NGINX_MTLS_IN, NGINX_MTLS_OUT, cpu_us, free_port, nginx_head, nginx_worker, rss_kib,
    wait_port, write_docs as write_section,
)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PERCENTILES = ["p50", "p90", "p99", "p99.9"]
TOPOLOGIES = ["direct", "trellis-off", "trellis-metrics", "trellis-full", "nginx", "haproxy",
              "grpc-direct", "grpc-trellis", "grpc-nginx", "grpc-haproxy",
              "tcp-direct", "tcp-trellis", "tcp-haproxy", "mesh-direct", "mesh-trellis"]
# What each topology carries, and the baseline it is measured against.
KIND = {n: n.split("-")[0] if n.startswith(("grpc-", "tcp-", "mesh-")) else "http" for n in TOPOLOGIES}
BASELINE = {"http": "direct", "grpc": "grpc-direct", "tcp": "tcp-direct", "mesh": "mesh-direct"}
# The mesh topologies: `trellis up` of this (pods in network namespaces, interception rules,
# the control plane, mTLS between the sidecars, one worker each); the baseline is the same
# fixture in a pod without a sidecar, called from another such pod.
MESH_YAML = """apiVersion: v1
kind: Service
metadata: {{name: app, namespace: default}}
spec:
  selector: {{app: app}}
  ports: [{{name: http, port: 80, targetPort: 8080}}]
---
apiVersion: trellis.dev/v1alpha1
kind: Workload
metadata:
  name: app
  labels: {{app: app}}
  annotations: {{proxy.istio.io/config: "concurrency: 1"}}
spec:
  serviceAccount: app
  command: [{fixture}, --http, "0.0.0.0:8080"]
  ports: [{{name: http, port: 8080}}]
---
apiVersion: trellis.dev/v1alpha1
kind: Workload
metadata:
  name: client
  annotations: {{proxy.istio.io/config: "concurrency: 1"}}
spec:
  serviceAccount: client
  command: [sleep, infinity]
---
apiVersion: trellis.dev/v1alpha1
kind: Workload
metadata:
  name: plain-app
  labels: {{app: plain, sidecar.istio.io/inject: "false"}}
spec:
  command: [{fixture}, --http, "0.0.0.0:8080"]
  ports: [{{name: http, port: 8080}}]
---
apiVersion: trellis.dev/v1alpha1
kind: Workload
metadata:
  name: plain-client
  labels: {{sidecar.istio.io/inject: "false"}}
spec:
  command: [sleep, infinity]
"""
MESH = "hbench"
# A gRPC unary call to the fixture's echo: one message of 1 KiB.
GRPC_BODY = b"\x00\x00\x00\x04\x00" + b"x" * 1024

# One thread (as Trellis's one worker), keep-alive to the upstream.
HAPROXY_HTTP = """global
  nbthread 1
  maxconn 4096
defaults
  mode http
  timeout connect 5s
  timeout client 60s
  timeout server 60s
  http-reuse always
"""
HAPROXY_TCP = """global
  nbthread 1
  maxconn 4096
defaults
  mode tcp
  timeout connect 5s
  timeout client 60s
  timeout server 60s
"""

HAPROXY_OUT = HAPROXY_HTTP + """frontend out
  bind 127.0.0.1:{port}
  default_backend peer
backend peer
  server in 127.0.0.1:{peer} ssl verify required ca-file {certs}/root-cert.pem crt {tmp}/haproxy-web.pem ssl-min-ver TLSv1.3
"""

HAPROXY_GRPC_OUT = HAPROXY_HTTP + """frontend out
  bind 127.0.0.1:{port} proto h2
  default_backend peer
backend peer
  server in 127.0.0.1:{peer} ssl verify required ca-file {certs}/root-cert.pem crt {tmp}/haproxy-web.pem ssl-min-ver TLSv1.3 alpn h2
"""

HAPROXY_GRPC_IN = HAPROXY_HTTP + """frontend in
  bind 127.0.0.1:{port} ssl crt {tmp}/haproxy-app.pem ca-file {certs}/root-cert.pem verify required ssl-min-ver TLSv1.3 alpn h2
  default_backend app
backend app
  server app 127.0.0.1:{app} proto h2
"""

HAPROXY_TCP_OUT = HAPROXY_TCP + """listen out
  bind 127.0.0.1:{port}
  server in 127.0.0.1:{peer} ssl verify required ca-file {certs}/root-cert.pem crt {tmp}/haproxy-web.pem ssl-min-ver TLSv1.3
"""

HAPROXY_TCP_IN = HAPROXY_TCP + """listen in
  bind 127.0.0.1:{port} ssl crt {tmp}/haproxy-app.pem ca-file {certs}/root-cert.pem verify required ssl-min-ver TLSv1.3
  server app 127.0.0.1:{app}
"""

NGINX_GRPC_OUT = nginx_head("ngx-grpc-out") + """  upstream peer {{ server 127.0.0.1:{peer}; keepalive 32; }}
  server {{
    listen 127.0.0.1:{port} http2;
    location / {{
      grpc_pass grpcs://peer;
      grpc_ssl_certificate {certs}/cert-chain.pem; grpc_ssl_certificate_key {certs}/key.pem;
      grpc_ssl_protocols TLSv1.3; grpc_ssl_session_reuse on;
    }}
  }}
}}
"""

NGINX_GRPC_IN = nginx_head("ngx-grpc-in") + """  upstream app {{ server 127.0.0.1:{app}; keepalive 32; }}
  server {{
    listen 127.0.0.1:{port} ssl http2;
    ssl_protocols TLSv1.3;
    ssl_certificate {certs}/cert-chain.pem; ssl_certificate_key {certs}/key.pem;
    ssl_client_certificate {certs}/root-cert.pem; ssl_verify_client on;
    location / {{ grpc_pass grpc://app; }}
  }}
}}
"""

HAPROXY_IN = HAPROXY_HTTP + """frontend in
  bind 127.0.0.1:{port} ssl crt {tmp}/haproxy-app.pem ca-file {certs}/root-cert.pem verify required ssl-min-ver TLSv1.3
  default_backend app
backend app
  server app 127.0.0.1:{app}
"""


def tcpload(addr, rate, duration, conns, cpu=None):
    """One trellis-tcpload run (1 KiB echoed per request), in oha's terms."""
    cmd = [os.path.join(ROOT, "target", "release", "trellis-tcpload"), addr, "--rate", str(rate),
           "--duration", str(duration), "--connections", str(conns)]
    if cpu is not None:
        cmd = ["taskset", "-c", str(cpu)] + cmd
    j = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout)
    return {**{p: float(j[p]) for p in PERCENTILES}, "rps": j["rps"], "ok": j["ok"],
            "errors": j["errors"], "error_kinds": {}}


def load(kind, target, rate, duration, conns, cpu=None, body=None, netns=None):
    if kind == "tcp":
        return tcpload(target, rate, duration, conns, cpu)
    return oha(target, rate, duration, conns, cpu, body, netns)


def oha(url, rate, duration, conns, cpu=None, body=None, netns=None):
    """One oha run: latency percentiles (µs), achieved rate, successes and errors."""
    cmd = ["oha", "--no-tui", "--output-format", "json", "-z", f"{duration}s", "-c", str(conns)]
    if body:
        # gRPC unary: HTTP/2 (prior knowledge), POST, the framed message (the authority is the
        # URL's: a Host header beside it is refused by nginx as a mismatch).
        cmd += ["--http2", "-m", "POST", "-T", "application/grpc", "-H", "te: trailers", "-D", body]
    else:
        cmd += ["-H", "Host: app"]
    if rate:
        cmd += ["-q", str(rate), "--latency-correction"]
    cmd.append(url)
    if netns:
        cmd = ["ip", "netns", "exec", netns] + cmd
    if cpu is not None:
        cmd = ["taskset", "-c", str(cpu)] + cmd
    j = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout)
    pct = j["latencyPercentiles"]
    codes = j.get("statusCodeDistribution", {})
    errors = {k: int(v) for k, v in j.get("errorDistribution", {}).items()}
    errors.pop("aborted due to deadline", None)
    errors.update({f"HTTP {k}": int(v) for k, v in codes.items() if k != "200"})
    return {
        **{p: (pct.get(p) or 0) * 1e6 for p in PERCENTILES},
        "rps": j["summary"]["requestsPerSec"],
        "ok": int(codes.get("200", 0)),
        "errors": sum(errors.values()),
        "error_kinds": errors,
    }


class Bench:
    """The processes of every topology, started once and measured in turns."""

    def __init__(self, args):
        self.args = args
        self.tmp = tempfile.mkdtemp(prefix="trellis-harness-")
        self.procs = []
        self.topologies = {}  # name -> (target URL or address, {proxy name: pid})
        self.target = os.path.join(ROOT, "target", "release")
        self.body = os.path.join(self.tmp, "grpc.bin")
        with open(self.body, "wb") as f:
            f.write(GRPC_BODY)
        self.ports = []

    def spawn(self, cmd, **kw):
        p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=kw.pop("stderr", subprocess.DEVNULL), **kw)
        self.procs.append(p)
        return p

    def stop(self):
        if getattr(self, "mesh_up", None):
            subprocess.run([os.path.join(self.target, "trellis"), "down", MESH], capture_output=True)
        for p in self.procs:
            p.terminate()
        for p in self.procs:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()
        shutil.rmtree(self.tmp, ignore_errors=True)

    def certs(self):
        self.cert = {}
        for ns, sa in (("web", "web"), ("default", "app")):
            self.cert[sa] = os.path.join(self.tmp, sa)
            subprocess.run([os.path.join(self.target, "trellis"), "cert", "-n", ns, "--service-account", sa,
                            "--out", self.cert[sa], "--data-dir", os.path.join(self.tmp, "ca")],
                           check=True, stderr=subprocess.DEVNULL)
        with open(os.path.join(self.cert["app"], "root-cert.pem")) as f:
            self.roots = f"trustRoots: [{json.dumps(f.read())}]\n"
        # haproxy takes a certificate and its key in one file.
        for sa in ("web", "app"):
            with open(os.path.join(self.tmp, f"haproxy-{sa}.pem"), "w") as f:
                for part in ("cert-chain.pem", "key.pem"):
                    with open(os.path.join(self.cert[sa], part)) as p:
                        f.write(p.read())

    def url(self, kind, port):
        return {"http": f"http://127.0.0.1:{port}/bytes/1024", "grpc": f"http://127.0.0.1:{port}/test.Echo/Unary",
                "tcp": f"127.0.0.1:{port}"}[kind]

    def start(self, wanted):
        self.certs()
        fixture = os.path.join(self.target, "trellis-fixture")
        self.app = {}
        for kind, flag in (("http", "--http"), ("grpc", "--grpc"), ("tcp", "--tcp-echo")):
            if not any(KIND[n] == kind for n in wanted):
                continue
            port = free_port()
            pid = self.spawn([fixture, flag, f"127.0.0.1:{port}"]).pid
            self.app[kind] = port
            self.ports.append(port)
            self.topologies[BASELINE[kind]] = (self.url(kind, port), {"fixture": pid})
        if "mesh-direct" in wanted:
            self.start_mesh()
        pending_nginx = []
        for name in wanted:
            kind = KIND[name]
            if name.endswith("-direct") or name in ("direct", "mesh-trellis"):
                continue
            if name.startswith("trellis-"):
                self.trellis_pair(name, "http", name.split("-", 1)[1])
            elif name in ("grpc-trellis", "tcp-trellis"):
                self.trellis_pair(name, kind, "metrics")
            elif name.endswith("nginx"):
                pending_nginx.append((name, self.nginx_pair(name, kind)))
            elif name.endswith("haproxy"):
                self.haproxy_pair(name, kind)
        for p in self.ports:
            wait_port(p)
        for name, (pair, out_port) in pending_nginx:
            self.topologies[name] = (self.url(KIND[name], out_port),
                                     {"outbound": nginx_worker(pair[1].pid), "inbound": nginx_worker(pair[0].pid)})

    def start_mesh(self):
        """`trellis up` of MESH_YAML; its two topologies once curl gets through the mesh."""
        trellis = os.path.join(self.target, "trellis")
        subprocess.run([trellis, "down", MESH], capture_output=True)
        conf = os.path.join(self.tmp, "mesh")
        os.makedirs(conf)
        with open(os.path.join(conf, "mesh.yaml"), "w") as f:
            f.write(MESH_YAML.format(fixture=os.path.join(self.target, "trellis-fixture")))
        self.mesh_up = self.spawn([trellis, "up", conf, "--name", MESH],
                                  stderr=open(os.path.join(self.tmp, "up.log"), "w"))
        ns = lambda pod: f"trl-{MESH}-{pod}-0"  # noqa: E731
        deadline = time.time() + 60
        while True:
            got = subprocess.run(["ip", "netns", "exec", ns("client"), "curl", "-s", "-m", "2", "-o", "/dev/null",
                                  "-w", "%{http_code}", "http://app/bytes/10"], capture_output=True, text=True)
            if got.stdout == "200":
                break
            if time.time() > deadline:
                raise RuntimeError("the mesh did not come up (trellis up)")
            time.sleep(0.3)
        addr = subprocess.run(["ip", "-n", ns("plain-app"), "-4", "-o", "addr", "show", "eth0"],
                              capture_output=True, text=True, check=True).stdout.split()[3].split("/")[0]

        def pids(pod, what):
            out = []
            for pid in subprocess.run(["ip", "netns", "pids", ns(pod)], capture_output=True,
                                      text=True).stdout.split():
                try:
                    with open(f"/proc/{pid}/cmdline", "rb") as f:
                        argv = f.read().split(b"\0")
                except OSError:
                    continue
                if what.encode() in argv:
                    out.append(int(pid))
            return out[0]
        self.netns = {"mesh-direct": ns("plain-client"), "mesh-trellis": ns("client")}
        self.topologies["mesh-direct"] = (f"http://{addr}:8080/bytes/1024",
                                          {"fixture": pids("plain-app", "--http")})
        self.topologies["mesh-trellis"] = ("http://app/bytes/1024",
                                           {"outbound": pids("client", "proxy"), "inbound": pids("app", "proxy")})

    def nginx_pair(self, name, kind):
        t = self.tmp
        nginx = shutil.which("nginx") or "/usr/sbin/nginx"
        in_port, out_port = free_port(), free_port()
        conf_in, conf_out = {"http": (NGINX_MTLS_IN, NGINX_MTLS_OUT), "grpc": (NGINX_GRPC_IN, NGINX_GRPC_OUT)}[kind]
        pair = []
        for side, text in (
                ("in", conf_in.format(tmp=t, app=self.app[kind], port=in_port, certs=self.cert["app"])),
                ("out", conf_out.format(tmp=t, peer=in_port, port=out_port, certs=self.cert["web"]))):
            conf = os.path.join(t, f"{name}-{side}.conf")
            with open(conf, "w") as f:
                f.write(text)
            pair.append(self.spawn([nginx, "-c", conf, "-p", t]))
        self.ports += [in_port, out_port]
        return pair, out_port

    def haproxy_pair(self, name, kind):
        t = self.tmp
        haproxy = shutil.which("haproxy") or "/usr/sbin/haproxy"
        conf_in, conf_out = {"http": (HAPROXY_IN, HAPROXY_OUT), "grpc": (HAPROXY_GRPC_IN, HAPROXY_GRPC_OUT),
                             "tcp": (HAPROXY_TCP_IN, HAPROXY_TCP_OUT)}[kind]
        in_port, out_port = free_port(), free_port()
        pids = {}
        for side, text in (
                ("inbound", conf_in.format(tmp=t, app=self.app[kind], port=in_port, certs=self.cert["app"])),
                ("outbound", conf_out.format(tmp=t, peer=in_port, port=out_port, certs=self.cert["web"]))):
            conf = os.path.join(t, f"{name}-{side}.cfg")
            with open(conf, "w") as f:
                f.write(text)
            log = open(os.path.join(t, f"{name}-{side}.log"), "w")
            pids[side] = self.spawn([haproxy, "-db", "-f", conf], stderr=log).pid
        self.ports += [in_port, out_port]
        self.topologies[name] = (self.url(kind, out_port), pids)

    def trellis_pair(self, name, kind, telemetry_mode):
        t = self.tmp
        telemetry = ""
        if telemetry_mode == "off":
            telemetry = ("  telemetry:\n    metrics:\n      overrides: "
                         "[{metric: ALL_METRICS, mode: CLIENT_AND_SERVER, disabled: true}]\n")
        elif telemetry_mode == "full":
            otlp = free_port()
            self.spawn([sys.executable, "-c", COLLECTOR, str(otlp)])
            telemetry = ("  telemetry:\n    tracing:\n    - {mode: CLIENT_AND_SERVER, providers: [otel], "
                         "randomSamplingPercentage: 1}\n    accessLogging:\n    - {mode: CLIENT_AND_SERVER, "
                         "providers: [log]}\n    providers:\n    - {name: otel, kind: opentelemetry, "
                         f"service: 127.0.0.1, port: {otlp}, path: /v1/traces}}\n    - {{name: log, "
                         f"kind: envoyJson, path: {os.path.join(t, name + '-access.log')}}}\n")
        port_name = {"http": "http", "grpc": "grpc", "tcp": "tcp"}[kind]
        app_port = self.app[kind]
        in_port, out_port = free_port(), free_port()
        inbound = os.path.join(t, f"{name}-in.yaml")
        outbound = os.path.join(t, f"{name}-out.yaml")
        with open(inbound, "w") as f:
            f.write(f"version: bench\nworkload:\n  name: app\n  inboundPorts: [{{port: {app_port}, "
                    f"name: {port_name}}}]\n{telemetry}  mtls: STRICT\n{self.roots}")
        with open(outbound, "w") as f:
            f.write("version: bench\nservices:\n- hostname: app.default.svc.cluster.local\n"
                    f"  ports: [{{port: 80, name: {port_name}, cluster: app}}]\n"
                    "clusters:\n- name: app\n"
                    f"  endpoints: [{{address: \"127.0.0.1:{in_port}\", proxied: true, "
                    "identity: \"spiffe://cluster.local/ns/default/sa/app\"}]\n"
                    f"{self.roots}workload:\n  name: web\n  namespace: web\n{telemetry}")
        proxy = os.path.join(self.target, "trellis-proxy")
        common = ["--workers", "1", "--admin", "off", "--readiness", "off", "--log-level", "warn"]
        pin = self.spawn([proxy, "--config", inbound, "--inbound-listen", f"127.0.0.1:{in_port}={app_port}",
                          "--workload-cert", self.cert["app"], *common])
        pout = self.spawn([proxy, "--config", outbound, "--outbound-listen", f"127.0.0.1:{out_port}=app:80",
                           "--workload-cert", self.cert["web"], *common])
        self.ports += [in_port, out_port]
        self.topologies[name] = (self.url(kind, out_port), {"outbound": pout.pid, "inbound": pin.pid})

    def load(self, name, rate, duration, cpu=None):
        kind = KIND[name]
        return load(kind, self.topologies[name][0], rate, duration, self.args.connections, cpu,
                    self.body if kind == "grpc" else None, getattr(self, "netns", {}).get(name))

    def measure(self, name, rate, duration, pin=False):
        _, pids = self.topologies[name]
        if pin:
            # The proxies (or the fixture, for a baseline) on core 1; the load generator on core 0.
            for pid in pids.values():
                subprocess.run(["taskset", "-a", "-pc", "1", str(pid)], check=True, capture_output=True)
        c0 = {k: cpu_us(p) for k, p in pids.items()}
        r = self.load(name, rate, duration, cpu=0 if pin else None)
        c1 = {k: cpu_us(p) for k, p in pids.items()}
        if pin:
            every = f"0-{os.cpu_count() - 1}"
            for pid in pids.values():
                subprocess.run(["taskset", "-a", "-pc", every, str(pid)], check=True, capture_output=True)
        n = max(r["ok"], 1)
        r["cpu"] = {k: (c1[k] - c0[k]) / n for k in pids}
        r["rss"] = {k: rss_kib(p) for k, p in pids.items()}
        return r


def summarize(runs, direct):
    """Medians (and min..max) of the added latencies and CPU over the repetitions."""
    med = statistics.median
    out = {}
    for p in PERCENTILES:
        added = [r[p] - d[p] for r, d in zip(runs, direct)]
        out[p] = (med(added), min(added), max(added))
        out["abs_" + p] = med(r[p] for r in runs)
    out["cpu"] = {k: med(r["cpu"][k] for r in runs) for k in runs[0]["cpu"]}
    out["errors"] = sum(r["errors"] for r in runs)
    out["rps"] = med(r["rps"] for r in runs)
    return out


def svg_plot(name, rates, by_rate):
    """Latency percentiles (added over direct, µs) against rate: one line per percentile."""
    w, h, left, bottom, top, right = 480, 300, 60, 40, 30, 110
    colors = {"p50": "#1b9e77", "p90": "#7570b3", "p99": "#d95f02", "p99.9": "#e7298a"}
    values = [max(0.0, by_rate[r][p][0]) for r in rates for p in PERCENTILES]
    ymax = max(values + [1.0]) * 1.1
    xs = {r: left + (w - left - right) * (i / max(len(rates) - 1, 1)) for i, r in enumerate(rates)}
    y = lambda v: h - bottom - (h - bottom - top) * (max(v, 0.0) / ymax)  # noqa: E731
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="sans-serif" '
             f'font-size="12">', f'<rect width="{w}" height="{h}" fill="white"/>',
             f'<text x="{left}" y="18" font-size="14">{name}: latency added over direct</text>',
             f'<line x1="{left}" y1="{h - bottom}" x2="{w - right}" y2="{h - bottom}" stroke="black"/>',
             f'<line x1="{left}" y1="{top}" x2="{left}" y2="{h - bottom}" stroke="black"/>']
    for i in range(5):
        v = ymax * i / 4
        parts.append(f'<text x="{left - 6}" y="{y(v) + 4:.0f}" text-anchor="end">{v:.0f}</text>')
        parts.append(f'<line x1="{left}" y1="{y(v):.0f}" x2="{w - right}" y2="{y(v):.0f}" stroke="#ddd"/>')
    parts.append(f'<text x="14" y="{(h - bottom + top) / 2:.0f}" transform="rotate(-90 14 '
                 f'{(h - bottom + top) / 2:.0f})" text-anchor="middle">µs</text>')
    for r in rates:
        parts.append(f'<text x="{xs[r]:.0f}" y="{h - bottom + 16}" text-anchor="middle">{r} rps</text>')
    for j, p in enumerate(PERCENTILES):
        pts = " ".join(f"{xs[r]:.0f},{y(by_rate[r][p][0]):.0f}" for r in rates)
        parts.append(f'<polyline points="{pts}" fill="none" stroke="{colors[p]}" stroke-width="2"/>')
        for r in rates:
            parts.append(f'<circle cx="{xs[r]:.0f}" cy="{y(by_rate[r][p][0]):.0f}" r="3" fill="{colors[p]}"/>')
        ly = top + 16 * j + 10
        parts.append(f'<line x1="{w - right + 12}" y1="{ly}" x2="{w - right + 32}" y2="{ly}" '
                     f'stroke="{colors[p]}" stroke-width="2"/>')
        parts.append(f'<text x="{w - right + 38}" y="{ly + 4}">{p}</text>')
    parts.append("</svg>")
    return "\n".join(parts) + "\n"


def render(args, rates, results, saturation, idle_rss, load_rss, names):
    machine = f"{platform.node()}: {os.cpu_count()} cores, {platform.platform()}"
    lines = [
        f"### All topologies, mTLS pairs, 1 KiB ({datetime.now(timezone.utc):%Y-%m-%d})",
        "",
        f"Command: `bench/run.sh --rates {','.join(map(str, rates))} --duration {args.duration} "
        f"--reps {args.reps} --write-docs`. Machine: {machine}. oha open loop with latency correction, "
        f"{args.connections} keep-alive connections, 1 KiB responses, "
        f"every proxy on one worker; {args.reps} interleaved repetitions per rate (medians, min..max "
        "in brackets).",
        "",
    ]
    titles = {"http": "HTTP/1.1 from the client", "grpc": "gRPC unary (HTTP/2 end to end, 1 KiB message)",
              "tcp": "opaque TCP (1 KiB echoed per request, trellis-tcpload)",
              "mesh": "HTTP/1.1 between pods (`trellis up`: network namespaces, interception rules, "
                      "certificates from the control plane; the baseline is the same fixture and client "
                      "in pods without sidecars)"}
    for rate in rates:
        by = results[rate]
        for kind in ("http", "grpc", "tcp", "mesh"):
            base = BASELINE[kind]
            shown = [n for n in names if KIND[n] == kind and n != base]
            if base not in by or not shown:
                continue
            d = by[base]
            lines += [f"**{rate} rps, {titles[kind]}.** Baseline ({base}): p50 {d['abs_p50']:.0f} µs, "
                      f"p99 {d['abs_p99']:.0f} µs, p99.9 {d['abs_p99.9']:.0f} µs.", "",
                      "| topology | added p50 | added p90 | added p99 | added p99.9 | CPU per request "
                      "(outbound + inbound) | failed |",
                      "|---|---|---|---|---|---|---|"]
            for n in shown:
                s = by[n]
                cells = [f"{s[p][0]:.0f} µs ({s[p][1]:.0f}..{s[p][2]:.0f})" for p in PERCENTILES]
                cpu = s["cpu"]
                lines.append(f"| {n} | " + " | ".join(cells) +
                             f" | {sum(cpu.values()):.1f} µs ({cpu.get('outbound', 0):.1f} + "
                             f"{cpu.get('inbound', 0):.1f}) | {s['errors']} |")
            ours = {"http": "trellis-full", "grpc": "grpc-trellis", "tcp": "tcp-trellis", "mesh": ""}[kind]
            peers = [n for n in shown if n.endswith(("nginx", "haproxy"))]
            if peers and ours in by:
                t = by[ours]
                ratio = []
                for pn in peers:
                    p = by[pn]
                    ratio.append(f"against {pn}: added p50 {t['p50'][0] / max(p['p50'][0], 1):.2f}×, "
                                 f"added p99 {t['p99'][0] / max(p['p99'][0], 1):.2f}×, CPU "
                                 f"{sum(t['cpu'].values()) / max(sum(p['cpu'].values()), 0.001):.2f}×")
                lines += ["", f"{ours} as ratios (below 1.0: Trellis ahead): " + "; ".join(ratio) + "."]
            if kind == "mesh" and "mesh-trellis" in by and "trellis-metrics" in by:
                m, e = by["mesh-trellis"], by["trellis-metrics"]
                lines += ["", "The price of the `trellis up` path over the explicit listeners on loopback "
                          "(mesh-trellis minus trellis-metrics, each over its own baseline): added p50 "
                          f"{m['p50'][0] - e['p50'][0]:+.0f} µs, added p99 {m['p99'][0] - e['p99'][0]:+.0f} µs, "
                          f"CPU {sum(m['cpu'].values()) - sum(e['cpu'].values()):+.1f} µs per request."]
            lines.append("")
    if saturation:
        lines += ["**Saturation** (no rate limit, the proxies pinned to core 1, the load generator to "
                  "core 0, one run each):", "", "| topology | requests per second | failed |", "|---|---|---|"]
        for n in names:
            if n in saturation:
                s = saturation[n]
                lines.append(f"| {n} | {s['rps']:.0f} | {s['errors']} |")
        lines.append("")
    lines += ["**Memory** (RSS per proxy; idle before the first run, then after the last):", "",
              "| topology | proxy | RSS idle | RSS under load | peak RSS |", "|---|---|---|---|---|"]
    for n in names:
        for side in ("outbound", "inbound"):
            if side in idle_rss.get(n, {}):
                idle, _ = idle_rss[n][side]
                load, peak = load_rss[n][side]
                lines.append(f"| {n} | {side} | {idle / 1024:.1f} MiB | {load / 1024:.1f} MiB | "
                             f"{peak / 1024:.1f} MiB |")
    lines.append("")
    lines += [f"![{n}](bench/{n}.svg)" for n in names if n not in BASELINE.values()]
    lines.append("")
    return "\n".join(lines)


def write_docs(report, plots):
    write_section(report, "harness")
    os.makedirs(os.path.join(ROOT, "docs", "bench"), exist_ok=True)
    for name, svg in plots.items():
        with open(os.path.join(ROOT, "docs", "bench", f"{name}.svg"), "w") as f:
            f.write(svg)
    print(f"wrote {len(plots)} plots in docs/bench/")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rates", default="2000,10000")
    ap.add_argument("--duration", type=int, default=10)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--connections", type=int, default=16)
    ap.add_argument("--only", default="", help="comma-separated topologies (direct always runs)")
    ap.add_argument("--no-saturation", action="store_true")
    ap.add_argument("--write-docs", action="store_true")
    args = ap.parse_args()
    rates = [int(r) for r in args.rates.split(",") if r]
    names = list(TOPOLOGIES) if not args.only else [n for n in args.only.split(",") if n]
    unknown = [n for n in names if n not in TOPOLOGIES]
    if unknown:
        sys.exit(f"unknown topologies {unknown}; known: {TOPOLOGIES}")
    # The pods need root (network namespaces); without it they are left out.
    if os.geteuid() != 0 and any(KIND[n] == "mesh" for n in names):
        print("not root: the mesh-* topologies (network namespaces) are left out", file=sys.stderr)
        names = [n for n in names if KIND[n] != "mesh"]
    # Each topology's baseline runs too, first of its kind.
    for kind in ("mesh", "tcp", "grpc", "http"):
        if any(KIND[n] == kind for n in names) and BASELINE[kind] not in names:
            names.insert(0, BASELINE[kind])
    names.sort(key=TOPOLOGIES.index)

    bench = Bench(args)
    try:
        bench.start(names)
        idle_rss = {n: {k: rss_kib(p) for k, p in pids.items()} for n, (_, pids) in bench.topologies.items()}
        for n in names:
            bench.load(n, 1000, 2)  # warm up: connections, pools, page cache
        results = {}
        for rate in rates:
            runs = {n: [] for n in names}
            for rep in range(args.reps):
                line = f"{rate} rps, rep {rep + 1}:"
                for n in names:
                    r = bench.measure(n, rate, args.duration)
                    runs[n].append(r)
                    line += f" | {n} p50 {r['p50']:.0f} p99 {r['p99']:.0f} cpu {sum(r['cpu'].values()):.1f}"
                print(line, flush=True)
            results[rate] = {n: summarize(runs[n], runs[BASELINE[KIND[n]]]) for n in names}
        load_rss = {n: {k: rss_kib(p) for k, p in pids.items()} for n, (_, pids) in bench.topologies.items()}
        saturation = {}
        if not args.no_saturation and shutil.which("taskset") and os.cpu_count() >= 2:
            for n in names:
                saturation[n] = bench.measure(n, 0, args.duration, pin=True)
                print(f"saturation {n}: {saturation[n]['rps']:.0f} rps", flush=True)
    finally:
        bench.stop()
    report = render(args, rates, results, saturation, idle_rss, load_rss, names)
    print(report)
    if args.write_docs:
        plots = {n: svg_plot(n, rates, {r: results[r][n] for r in rates})
                 for n in names if n not in BASELINE.values()}
        write_docs(report, plots)


if __name__ == "__main__":
    main()
