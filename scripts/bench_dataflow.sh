#!/usr/bin/env bash
# Dataflow throughput and memory matrix (issue #2): synthetic profiles through the whole
# dataflow, exports encoded and discarded. Prints one JSON line per point and a markdown table.
#
#   scripts/bench_dataflow.sh                 # 100k profiles; workers 1,2; batch 1,1000
#   PROFILES="100000 1000000" scripts/bench_dataflow.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PROFILES=${PROFILES:-100000}
WORKERS=${WORKERS:-"1 2"}
BATCHES=${BATCHES:-"1 1000"}
UPDATES=${UPDATES:-100000}
cargo build --release --bench dataflow >/dev/null 2>&1
BIN=$(ls -t target/release/deps/dataflow-* | grep -v '\.d$' | head -1)
echo "| profiles | workers | batch | updates | events/s | µs/event | load events/s | RSS after load (MiB) | bytes/profile | peak RSS (MiB) |"
echo "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
for p in $PROFILES; do
  for w in $WORKERS; do
    for b in $BATCHES; do
      u=$UPDATES
      # batch 1 pays a full round of progress tracking per event: fewer events keep it short.
      [ "$b" -lt 100 ] && u=$(( UPDATES / 20 ))
      line=$("$BIN" --profiles "$p" --workers "$w" --batch "$b" --updates "$u")
      echo "$line" >&2
      python3 - "$line" <<'PY'
import json, sys
r = json.loads(sys.argv[1])
print(f"| {r['profiles']} | {r['workers']} | {r['batch']} | {r['updates']} | {r['events_per_s']:.0f} | {r['us_per_event']:.1f} | {r['load_events_per_s']:.0f} | {r['rss_after_load_mib']:.0f} | {r['bytes_per_profile']:.0f} | {r['peak_rss_mib']:.0f} |")
PY
    done
  done
done
