#!/usr/bin/env bash
# One command for the peer benchmarks: installs what is missing (Debian's nginx and haproxy,
# oha from crates.io), builds the release binaries, and runs bench/harness.py with the
# arguments given (see `bench/run.sh --help`; `--write-docs` rewrites docs/benchmarks.md).
# CONTROL_PLANE=1 adds the control plane's push-to-ACK benchmark for 100 and 1,000 proxies.
set -euo pipefail
cd "$(dirname "$0")/.."

missing=()
for pkg in nginx haproxy; do
  command -v "$pkg" >/dev/null 2>&1 || [ -x "/usr/sbin/$pkg" ] || missing+=("$pkg")
done
command -v taskset >/dev/null 2>&1 || missing+=(util-linux)
if [ ${#missing[@]} -gt 0 ]; then
  if [ "$(id -u)" -ne 0 ]; then
    echo "missing ${missing[*]}: run as root, or apt-get install -y ${missing[*]}" >&2
    exit 1
  fi
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}"
fi
command -v oha >/dev/null 2>&1 || cargo install oha --locked
cargo build --release -q -p trellis-proxy -p trellis-testkit -p trellis-cli
python3 bench/harness.py "$@"
# The control plane's side (CONTROL_PLANE=1): push to ACK for 100 and 1,000 fake proxies
# over the network, and its RSS per proxy (docs/benchmarks.md, "Over the network").
if [ "${CONTROL_PLANE:-0}" = 1 ]; then
  cargo bench -p trellis-cli --bench push_network -- 100 1000
fi
