#!/usr/bin/env bash
# Historical replay benchmark (issue #8): a generated history of PROFILES people (two fragments
# each, joined by email under privateGraph) and UPDATES updates, replayed with
# `replay --dry-run --batch 1000 --workers 2` (JSON parsing and export encoding included,
# exports to /dev/null). Prints wall seconds, events/s and peak RSS per profile for each of
# RUNS runs, then the medians. BASELINE=path/to/another/streamdest binary runs it too, in
# alternation, so the two are compared under the same load.
#
#   scripts/bench_replay.sh                      # 100k profiles, 200k updates, 3 runs
#   PROFILES=1000000 UPDATES=2000000 scripts/bench_replay.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PROFILES=${PROFILES:-100000}
UPDATES=${UPDATES:-200000}
RUNS=${RUNS:-3}
BATCH=${BATCH:-1000}
WORKERS=${WORKERS:-2}
DIR=${DIR:-target/history-$PROFILES-$UPDATES}
cargo build --release --bin streamdest >/dev/null 2>&1
[ -f "$DIR/events.ndjson" ] || python3 scripts/gen_history.py "$DIR" "$PROFILES" "$UPDATES"
EVENTS=$(wc -l < "$DIR/events.ndjson")
BINS="target/release/streamdest ${BASELINE:-}"
echo "load average: $(cut -d' ' -f1-3 /proc/loadavg)"
for run in $(seq "$RUNS"); do
  for bin in $BINS; do
    /usr/bin/time -f "%e %M" -o target/replay-time.txt "$bin" replay --config "$DIR/config.json" \
      --events "$DIR/events.ndjson" --dry-run --batch "$BATCH" --workers "$WORKERS" >/dev/null 2>&1
    read -r secs kib < target/replay-time.txt
    echo "$bin $secs $kib" | awk -v ev="$EVENTS" -v p="$PROFILES" \
      '{printf "%s run: %.2f s, %.0f events/s, peak RSS %.0f MiB, %.0f B/profile\n", $1, $2, ev/$2, $3/1024, $3*1024/p}'
    echo "$bin $secs $kib" >> target/replay-runs.txt
  done
done | tee target/replay-report.txt
echo "load average: $(cut -d' ' -f1-3 /proc/loadavg)"
for bin in $BINS; do
  grep "^$bin run" target/replay-report.txt | awk '{print $3, $9}' | sort -n | awk -v b="$bin" \
    '{s[NR]=$1} END {printf "%s median: %.2f s\n", b, s[int((NR+1)/2)]}'
done
