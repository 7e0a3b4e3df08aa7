#!/usr/bin/env python3
"""Route-table benchmark: a request through one Trellis proxy whose port has 1,000 HTTP
rules (the request matches the last one) against the same proxy set-up with 1 rule,
measured in the same run.

Each rule has a uri prefix and a header condition, as translated VirtualServices have
them; the request matches only the last rule. HTTP/1.1, 1 KiB responses, 16 keep-alive
connections, a fixed rate from an open-loop generator (oha -q --latency-correction), each
proxy on one worker thread, runs interleaved (1 rule, 1,000 rules, 1 rule, ...).

Reports: p50/p99 latency and proxy CPU microseconds per request for both tables, and
their differences (the issue's bound: the 1,000-rule table within 10 us of the 1-rule
table).

Usage: bench/route_table.py [--rules 1000] [--rate 2000] [--duration 10] [--reps 3] [--write-docs]
Needs: a release build (the script runs cargo build --release), oha on PATH.
"""

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from datetime import datetime, timezone
import platform

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from proxy_pair import ROOT, cpu_us, free_port, oha, wait_port, write_docs  # noqa: E402


def snapshot(rules, app_port):
    lines = [
        "version: bench",
        "services:",
        "- hostname: app.default.svc.cluster.local",
        "  ports:",
        "  - port: 80",
        "    name: http",
        "    cluster: app",
        "    httpRoutes:",
    ]
    for i in range(rules - 1):
        lines += [
            f"    - name: r{i}",
            f"      match: [{{uri: {{prefix: /svc{i}/}}, headers: {{x-tenant: {{exact: t{i}}}}}}}]",
            "      clusters: [{cluster: app}]",
        ]
    lines += [
        "    - name: last",
        "      match: [{uri: {prefix: /bytes/}, headers: {x-tenant: {exact: last}}}]",
        "      clusters: [{cluster: app}]",
        "clusters:",
        f"- name: app\n  endpoints: [{{address: \"127.0.0.1:{app_port}\"}}]",
    ]
    return "\n".join(lines) + "\n"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rules", type=int, default=1000)
    ap.add_argument("--rate", type=int, default=2000)
    ap.add_argument("--duration", type=int, default=10)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--connections", type=int, default=16)
    ap.add_argument("--write-docs", action="store_true")
    args = ap.parse_args()
    if not shutil.which("oha"):
        sys.exit("oha not found: cargo install oha --locked")
    subprocess.run(["cargo", "build", "--release", "-q", "-p", "trellis-proxy", "-p", "trellis-testkit"],
                   cwd=ROOT, check=True)
    target = os.path.join(ROOT, "target", "release")
    tmp = tempfile.mkdtemp(prefix="trellis-bench-")
    app_port, one_port, many_port = free_port(), free_port(), free_port()
    common = ["--workers", "1", "--admin", "off", "--readiness", "off", "--log-level", "warn"]
    procs = []
    try:
        procs.append(subprocess.Popen([os.path.join(target, "trellis-fixture"), "--http", f"127.0.0.1:{app_port}"],
                                      stdout=subprocess.DEVNULL))
        pids = {}
        for name, rules, port in (("one", 1, one_port), ("many", args.rules, many_port)):
            path = os.path.join(tmp, f"{name}.yaml")
            with open(path, "w") as f:
                f.write(snapshot(rules, app_port))
            p = subprocess.Popen([os.path.join(target, "trellis-proxy"), "--config", path,
                                  "--outbound-listen", f"127.0.0.1:{port}=app:80", *common])
            procs.append(p)
            pids[name] = p.pid
        for p in (app_port, one_port, many_port):
            wait_port(p)
        urls = {n: f"http://127.0.0.1:{p}/bytes/1024" for n, p in (("one", one_port), ("many", many_port))}
        hdr = ["-H", "x-tenant: last"]
        for u in urls.values():
            oha(u, args.rate, 2, args.connections, hdr)
        runs = {"one": [], "many": []}
        for rep in range(args.reps):
            for name in ("one", "many"):
                c0 = cpu_us(pids[name])
                r = oha(urls[name], args.rate, args.duration, args.connections, hdr)
                r["cpu"] = (cpu_us(pids[name]) - c0) / max(r["ok"], 1)
                runs[name].append(r)
            print(f"rep {rep + 1}: 1 rule p50 {runs['one'][-1]['p50_us']:.0f}us cpu {runs['one'][-1]['cpu']:.1f}us | "
                  f"{args.rules} rules p50 {runs['many'][-1]['p50_us']:.0f}us cpu {runs['many'][-1]['cpu']:.1f}us | "
                  f"errors {runs['one'][-1]['errors'] + runs['many'][-1]['errors']}", flush=True)
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
    diff = lambda key: med(m[key] - o[key] for m, o in zip(runs["many"], runs["one"]))  # noqa: E731
    spread = lambda key: (min(m[key] - o[key] for m, o in zip(runs["many"], runs["one"])),  # noqa: E731
                          max(m[key] - o[key] for m, o in zip(runs["many"], runs["one"])))
    machine = f"{platform.node()}: {os.cpu_count()} cores, {platform.platform()}"
    errors = sum(r["errors"] for rs in runs.values() for r in rs)
    lines = [
        f"### Route table: {args.rules} rules vs 1 rule, one proxy, {args.rate} rps "
        f"({datetime.now(timezone.utc):%Y-%m-%d})",
        "",
        f"Command: `bench/route_table.py --rules {args.rules} --rate {args.rate} --duration {args.duration} "
        f"--reps {args.reps}`. Machine: {machine}. oha open loop with latency correction, "
        f"{args.connections} keep-alive connections, 1 KiB responses; the request matches the last rule "
        "(uri prefix and a header, as every rule has).",
        "",
        f"| | 1 rule | {args.rules} rules | difference (spread) | bound |",
        "|---|---|---|---|---|",
        f"| p50 latency | {med(r['p50_us'] for r in runs['one']):.0f} µs | {med(r['p50_us'] for r in runs['many']):.0f} µs "
        f"| **{diff('p50_us'):+.0f} µs** ({spread('p50_us')[0]:+.0f}..{spread('p50_us')[1]:+.0f}) | ≤ 10 µs |",
        f"| p99 latency | {med(r['p99_us'] for r in runs['one']):.0f} µs | {med(r['p99_us'] for r in runs['many']):.0f} µs "
        f"| {diff('p99_us'):+.0f} µs ({spread('p99_us')[0]:+.0f}..{spread('p99_us')[1]:+.0f}) | |",
        f"| proxy CPU per request | {med(r['cpu'] for r in runs['one']):.1f} µs | {med(r['cpu'] for r in runs['many']):.1f} µs "
        f"| **{diff('cpu'):+.1f} µs** ({spread('cpu')[0]:+.1f}..{spread('cpu')[1]:+.1f}) | |",
        "",
        f"Failed requests: {errors}.",
        "",
    ]
    report = "\n".join(lines)
    print(report)
    if args.write_docs:
        write_docs(report, "route_table", before="## Load balancing and outlier detection")
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
