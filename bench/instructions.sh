#!/usr/bin/env bash
# User-space instructions per request of each proxy, counted by callgrind: exact and
# repeatable whatever else the machine is doing (wall-clock CPU on a shared host is not).
#
#   bench/instructions.sh [one|pair|pair-h1] [requests]
#   TELEMETRY=off|metrics|full bench/instructions.sh pair
#   MTLS=1 bench/instructions.sh pair      (mutual TLS between the proxies, as the harness)
#
# one:     load -> proxy (h1 in, h1 out) -> fixture
# pair:    load -> outbound (h1 in, h2 out) -> inbound (h2 in, h1 out) -> fixture
# pair-h1: the same pair with HTTP/1.1 between the proxies (keepClientProtocol)
#
# TELEMETRY (pair modes): `metrics` (the default: Istio's metrics, nothing else), `off`
# (a Telemetry override disables every metric), `full` (metrics, a JSON access log line
# per request to a file, and tracing at 1 % to a fixture OTLP collector); `tracing` and
# `log` are the metrics with one of the other two.
#
# Each proxy runs under valgrind on one worker; 300 warm-up requests, then counters are
# zeroed and `requests` (default 3000) are sent at 300 rps over 16 connections with oha.
# Needs valgrind, oha and a release build (built here). With KEEP=DIR, the callgrind
# profiles are copied there (callgrind_annotate DIR/NAME.out.1 reads them).
# With SYSCALLS=RATE, the proxies run natively and strace counts their syscalls per request
# at that rate instead (strace slows them, so keep the rate low: 300 to 2000). With CPU=RATE,
# the user and system CPU time per request of each proxy at that rate, and its RSS.
set -euo pipefail
mode=${1:-one}
n=${2:-3000}
root=$(cd "$(dirname "$0")/.." && pwd)
if [ -z "${SYSCALLS:-}${CPU:-}" ]; then
    command -v valgrind >/dev/null || { echo "valgrind not found (apt-get install valgrind)" >&2; exit 1; }
fi
command -v oha >/dev/null || { echo "oha not found (cargo install oha --locked)" >&2; exit 1; }
(cd "$root" && cargo build --release -q -p trellis-proxy -p trellis-testkit $([ -n "${MTLS:-}" ] && echo -p trellis-cli))
bin=$root/target/release
tmp=$(mktemp -d /tmp/trellis-instr-XXXXXX)
pids=()
cleanup() {
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
    rm -rf "$tmp"
}
trap cleanup EXIT

port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
wait_port() {
    for _ in $(seq 100); do
        (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0
        sleep 0.1
    done
    echo "port $1 did not open" >&2
    exit 1
}
service() { # endpoint proxied keepClientProtocol
    printf 'version: bench\nservices:\n- hostname: app.default.svc.cluster.local\n  ports: [{port: 80, name: http, cluster: app}]\nclusters:\n- name: app\n  keepClientProtocol: %s\n  endpoints: [{address: "127.0.0.1:%s", proxied: %s}]\n' "${3:-false}" "$1" "$2"
}
common=(--workers 1 --admin off --readiness off --log-level warn)
under_cg() { # name args...
    local name=$1
    shift
    if [ -n "${SYSCALLS:-}${CPU:-}" ]; then
        "$bin/trellis-proxy" "$@" "${common[@]}" >/dev/null 2>"$tmp/$name.err" &
    else
        valgrind --tool=callgrind --callgrind-out-file="$tmp/$name.out" "$bin/trellis-proxy" "$@" "${common[@]}" \
            >/dev/null 2>"$tmp/$name.err" &
    fi
    pids+=($!)
    names+=("$name")
    cgpids+=($!)
}

app=$(port)
"$bin/trellis-fixture" --http "127.0.0.1:$app" >/dev/null &
pids+=($!)
names=()
cgpids=()
front=$(port)
case $mode in
one)
    service "$app" false >"$tmp/one.yaml"
    under_cg one --config "$tmp/one.yaml" --outbound-listen "127.0.0.1:$front=app:80"
    ;;
pair | pair-h1)
    in=$(port)
    telemetry=""
    case ${TELEMETRY:-metrics} in
    metrics) ;;
    off) telemetry='  telemetry:\n    metrics:\n      overrides: [{metric: ALL_METRICS, mode: CLIENT_AND_SERVER, disabled: true}]\n' ;;
    full)
        collector=$(port)
        python3 -c '
import http.server, sys
class H(http.server.BaseHTTPRequestHandler):
    def do_POST(self):
        self.rfile.read(int(self.headers.get("content-length", 0)))
        self.send_response(200); self.send_header("content-length", "0"); self.end_headers()
    def log_message(self, *a): pass
http.server.HTTPServer(("127.0.0.1", int(sys.argv[1])), H).serve_forever()
' "$collector" &
        pids+=($!)
        telemetry="  telemetry:\n    tracing:\n    - {mode: CLIENT_AND_SERVER, providers: [otel], randomSamplingPercentage: 1}\n    accessLogging:\n    - {mode: CLIENT_AND_SERVER, providers: [log]}\n    providers:\n    - {name: otel, kind: opentelemetry, service: 127.0.0.1, port: $collector, path: /v1/traces}\n    - {name: log, kind: envoyJson, path: $tmp/access.log}\n"
        ;;
    tracing | log)
        # One part of `full` on its own (with the metrics): tracing at 1 %, or the log.
        collector=$(port)
        python3 -c 'import socket, sys; s = socket.socket(); s.bind(("127.0.0.1", int(sys.argv[1]))); s.listen(); [c.close() for c, _ in iter(s.accept, None)]' "$collector" &
        pids+=($!)
        if [ "$TELEMETRY" = tracing ]; then
            telemetry="  telemetry:\n    tracing:\n    - {mode: CLIENT_AND_SERVER, providers: [otel], randomSamplingPercentage: 1}\n    providers:\n    - {name: otel, kind: opentelemetry, service: 127.0.0.1, port: $collector, path: /v1/traces}\n"
        else
            telemetry="  telemetry:\n    accessLogging:\n    - {mode: CLIENT_AND_SERVER, providers: [log]}\n    providers:\n    - {name: log, kind: envoyJson, path: $tmp/access.log}\n"
        fi
        ;;
    *)
        echo "TELEMETRY is off, metrics, tracing, log or full" >&2
        exit 2
        ;;
    esac
    printf "version: bench\nworkload:\n  name: app\n  inboundPorts: [{port: %s, name: http}]\n$telemetry" "$app" >"$tmp/in.yaml"
    { printf "workload:\n  name: web\n  namespace: web\n$telemetry"; service "$in" true "$([ "$mode" = pair ] && echo false || echo true)"; } >"$tmp/out.yaml"
    in_certs=()
    out_certs=()
    if [ -n "${MTLS:-}" ]; then
        # Mutual TLS between the proxies, as the harness runs them: certificates from the
        # mesh CA (trellis cert), the inbound STRICT, the outbound expecting its identity.
        for sa in web:web default:app; do
            "$bin/trellis" cert -n "${sa%%:*}" --service-account "${sa#*:}" --out "$tmp/${sa#*:}" \
                --data-dir "$tmp/ca" 2>/dev/null
        done
        roots="trustRoots: [$(python3 -c 'import json, sys; print(json.dumps(open(sys.argv[1]).read()))' "$tmp/app/root-cert.pem")]"
        printf '  mtls: STRICT\n%s\n' "$roots" >>"$tmp/in.yaml"
        sed -i 's|proxied: true}|proxied: true, identity: "spiffe://cluster.local/ns/default/sa/app"}|' "$tmp/out.yaml"
        printf '%s\n' "$roots" >>"$tmp/out.yaml"
        in_certs=(--workload-cert "$tmp/app")
        out_certs=(--workload-cert "$tmp/web")
    fi
    under_cg inbound --config "$tmp/in.yaml" --inbound-listen "127.0.0.1:$in=$app" "${in_certs[@]}"
    under_cg outbound --config "$tmp/out.yaml" --outbound-listen "127.0.0.1:$front=app:80" "${out_certs[@]}"
    ;;
*)
    echo "usage: $0 [one|pair|pair-h1] [requests]" >&2
    exit 2
    ;;
esac
wait_port "$app"
wait_port "$front"
url=http://127.0.0.1:$front/bytes/1024
oha --no-tui -n 300 -q 100 -c 16 -H 'Host: app' "$url" >/dev/null
if [ -n "${CPU:-}" ]; then
    # CPU time instead: user and system time of each proxy (every thread) over the run,
    # from /proc, per request; and its RSS after. Noisy on a shared machine: compare runs
    # made one after the other, or use the harness.
    ticks() { awk '{print $14, $15}' "/proc/$1/stat"; }
    declare -A before
    for p in "${cgpids[@]}"; do before[$p]=$(ticks "$p"); done
    oha --no-tui -n "$n" -q "$CPU" -c 16 -H 'Host: app' "$url" | grep -E "Success rate"
    hz=$(getconf CLK_TCK)
    for i in "${!cgpids[@]}"; do
        p=${cgpids[$i]}
        read -r u0 s0 <<<"${before[$p]}"
        read -r u1 s1 <<<"$(ticks "$p")"
        rss=$(awk '/VmRSS/ {print $2}' "/proc/$p/status")
        awk -v name="$mode ${names[$i]}" -v u=$((u1 - u0)) -v s=$((s1 - s0)) -v hz="$hz" -v n="$n" -v rss="$rss" \
            'BEGIN { printf "%s: %.1f us user + %.1f us system per request, RSS %.1f MiB\n", name, u * 1e6 / hz / n, s * 1e6 / hz / n, rss / 1024 }'
    done
    exit 0
fi
if [ -n "${SYSCALLS:-}" ]; then
    # Syscalls per request instead: strace counts every thread of each proxy during the run.
    command -v strace >/dev/null || { echo "strace not found (apt-get install strace)" >&2; exit 1; }
    tracers=()
    for i in "${!cgpids[@]}"; do
        strace -f -c -o "$tmp/${names[$i]}.strace" -p "${cgpids[$i]}" 2>/dev/null &
        tracers+=($!)
    done
    sleep 1
    oha --no-tui -n "$n" -q "${SYSCALLS}" -c 16 -H 'Host: app' "$url" | grep -E "Success rate"
    for t in "${tracers[@]}"; do kill -INT "$t"; done
    wait "${tracers[@]}" 2>/dev/null || true
    for name in "${names[@]}"; do
        echo "$mode $name: syscalls per request"
        # strace -c: % time, seconds, usecs/call, calls, [errors,] syscall.
        awk -v n="$n" '$NF ~ /^[a-z_0-9]+$/ && $4 ~ /^[0-9]+$/ && $NF != "total" { printf "  %-16s %6.2f\n", $NF, $4 / n }' "$tmp/$name.strace" | sort -k2 -rn
        awk -v n="$n" '$NF ~ /^[a-z_0-9]+$/ && $4 ~ /^[0-9]+$/ && $NF != "total" { c += $4 } END { printf "  %-16s %6.2f\n", "total", c / n }' "$tmp/$name.strace"
    done
    exit 0
fi
for p in "${cgpids[@]}"; do callgrind_control -z "$p" >/dev/null 2>&1; done
oha --no-tui -n "$n" -q 300 -c 16 -H 'Host: app' "$url" | grep -E "Success rate"
for p in "${cgpids[@]}"; do callgrind_control -d "$p" >/dev/null 2>&1; done
sleep 1
for name in "${names[@]}"; do
    total=$(callgrind_annotate "$tmp/$name.out.1" 2>/dev/null | awk '/PROGRAM TOTALS/ {gsub(",", "", $1); print $1}')
    echo "$mode $name: $((total / n)) instructions per request"
    if [ -n "${KEEP:-}" ]; then
        mkdir -p "$KEEP"
        cp "$tmp/$name.out.1" "$KEEP/$name.out.1"
    fi
done
