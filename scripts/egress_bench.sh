#!/usr/bin/env bash
# Egress throughput: pushes N exports through the Egress to a local hyper receiver at
# maxInFlight 64 and 256, then runs wrk against the same receiver and prints the ratio.
# Everything stays on 127.0.0.1 and stops by itself.
#
#   scripts/egress_bench.sh [--exports N] [--profiles P] [--in-flight 64,256]
#                           [--payload-bytes B] [--wrk-seconds S] [--no-wrk]
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v wrk >/dev/null 2>&1 && [[ " $* " != *" --no-wrk "* ]]; then
    echo "wrk not found; installing it (apt-get)" >&2
    if [ "$(id -u)" = 0 ]; then SUDO=; else SUDO=sudo; fi
    $SUDO apt-get update -qq && $SUDO apt-get install -y -qq wrk >/dev/null
fi

cargo build --release --example egress_bench
exec target/release/examples/egress_bench "$@"
