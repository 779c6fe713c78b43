#!/usr/bin/env bash
# The standard end-to-end benchmark matrix, written into BENCHMARKS.md.
#
#   scripts/bench.sh            # the full matrix (≈ 15–30 min on 2 cores, mostly the 1M loads)
#   QUICK=1 scripts/bench.sh    # 100k profiles only, 5 s phases: a smoke run
#
# For each profile count (100k, 1M) and worker count (1, 2), one `streamdest bench` process
# loads the profiles once, runs measured phases at 5k, 10k and 20k events/s offered, then
# searches the highest rate whose p99 stays under 50 ms (`--max`). Then `wrk` posts to the
# same kind of receiver (`streamdest bench --serve-only`) for the machine's HTTP ceiling.
# The tables, the date, the commit, the load average and every command go between the
# markers `<!-- bench.sh:start -->` and `<!-- bench.sh:end -->` of BENCHMARKS.md (the section
# is appended when missing; the rest of the file is left alone). Raw JSON reports stay in
# target/bench/.
#
# Environment: PROFILES ("100000 1000000"), WORKERS ("1 2"), RATES (5000,10000,20000),
# DURATION (10), WARMUP (2), P99_MS (50), BATCH_MS (5), WRK_SECONDS (5), QUICK, NO_WRK,
# OUT (BENCHMARKS.md), BIN (a prebuilt binary; default: build target/release/streamdest), REPORT_ONLY (rewrite the section from the JSON already in target/bench,
# without running anything).
set -euo pipefail
cd "$(dirname "$0")/.."

if [ -n "${QUICK:-}" ]; then
    PROFILES=${PROFILES:-100000}
    DURATION=${DURATION:-5}
    WARMUP=${WARMUP:-1}
fi
PROFILES=${PROFILES:-100000 1000000}
WORKERS=${WORKERS:-1 2}
RATES=${RATES:-5000,10000,20000}
DURATION=${DURATION:-10}
WARMUP=${WARMUP:-2}
P99_MS=${P99_MS:-50}
BATCH_MS=${BATCH_MS:-5}
WRK_SECONDS=${WRK_SECONDS:-5}
OUT=${OUT:-BENCHMARKS.md}
RESULTS=target/bench
# BIN: a streamdest binary to use as is; by default this script builds target/release's.
BUILD=${BIN:+no}
BIN=${BIN:-${CARGO_TARGET_DIR:-target}/release/streamdest}

for tool in jq awk; do
    command -v "$tool" >/dev/null || { echo "bench.sh needs $tool" >&2; exit 1; }
done
if [ -z "${NO_WRK:-}${REPORT_ONLY:-}" ] && ! command -v wrk >/dev/null 2>&1; then
    echo "wrk not found; installing it (apt-get)" >&2
    if [ "$(id -u)" = 0 ]; then SUDO=; else SUDO=sudo; fi
    $SUDO apt-get update -qq && $SUDO apt-get install -y -qq wrk >/dev/null
fi

mkdir -p "$RESULTS"
if [ -z "${REPORT_ONLY:-}" ]; then
    [ "$BUILD" = no ] || cargo build --release --bin streamdest
    rm -f "$RESULTS"/matrix-*.json
    NO_RUN=
else
    NO_RUN=1
    NO_WRK=1
fi

started=$(date -u +%Y-%m-%dT%H:%M:%SZ)
loadavg_start=$(cut -d' ' -f1-3 /proc/loadavg 2>/dev/null || echo "?")
commit=$(git rev-parse --short HEAD 2>/dev/null || echo "?")
dirty=$(git status --porcelain 2>/dev/null | grep -q . && echo " (with uncommitted changes)" || true)
commands=()

for p in $PROFILES; do
    for w in $WORKERS; do
        [ -n "$NO_RUN" ] && continue
        json="$RESULTS/matrix-$p-$w.json"
        cmd=("$BIN" bench --profiles "$p" --workers "$w" --rate "$RATES" --duration "$DURATION"
             --warmup "$WARMUP" --batch-ms "$BATCH_MS" --max --p99-ms "$P99_MS" --json "$json")
        echo "== ${cmd[*]}" >&2
        "${cmd[@]}" >"$RESULTS/matrix-$p-$w.txt"
        cat "$RESULTS/matrix-$p-$w.txt"
    done
done

# ---- wrk against the same kind of receiver: the machine's HTTP ceiling ---------------------
wrk_rows=""
if [ -z "${NO_WRK:-}" ]; then
    serve_log=$(mktemp)
    lua=$(mktemp --suffix=.lua)
    trap 'rm -f "$serve_log" "$lua"' EXIT
    # A payload like the bench's exports (≈ 700 bytes).
    cat >"$lua" <<'LUA'
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Idempotency-Key"] = "e03209732fb16e91-9c55"
wrk.body = '{"person":{"name":{"firstName":"Cara","lastName":"L8670"}},"personalEmail":{"address":"u8670@example.com"},"segmentMembership":{"ups":{"aud-0":{"lastQualificationTime":"2024-04-24T23:06:40Z","status":"realized","createdAt":1700000000000,"updatedAt":1700000000000,"mappingCreatedAt":1700000000000,"mappingUpdatedAt":1700000000000,"name":"Audience 0"},"aud-2":{"lastQualificationTime":"2024-04-24T23:06:40Z","status":"realized","createdAt":1700000000000,"updatedAt":1700000000000,"mappingCreatedAt":1700000000000,"mappingUpdatedAt":1700000000000,"name":"Audience 2"}}},"identityMap":{"crmid":[{"id":"8670"}],"ecid":[{"id":"e8670"}],"email":[{"id":"u8670@example.com"}]}}'
LUA
    serve_secs=$((WRK_SECONDS * 2 + 10))
    "$BIN" bench --serve-only "$serve_secs" >"$serve_log" &
    serve_pid=$!
    url=""
    for _ in $(seq 100); do
        url=$(sed -n 's/^receiver listening on //p' "$serve_log")
        [ -n "$url" ] && break
        sleep 0.1
    done
    [ -n "$url" ] || { echo "the receiver did not start" >&2; kill "$serve_pid"; exit 1; }
    for c in 64 256; do
        cmd="wrk -t2 -c$c -d${WRK_SECONDS}s --latency -s <payload.lua> $url"
        echo "== $cmd" >&2
        commands+=("$cmd")
        out=$(wrk -t2 -c"$c" -d"${WRK_SECONDS}s" --latency -s "$lua" "$url")
        echo "$out"
        rps=$(awk '/^Requests\/sec:/ {printf "%.0f", $2}' <<<"$out")
        p50=$(awk '$1 == "50%" {print $2}' <<<"$out")
        p99=$(awk '$1 == "99%" {print $2}' <<<"$out")
        wrk_rows+="| $c | $rps | $p50 | $p99 |"$'\n'
    done
    kill "$serve_pid" 2>/dev/null || true
    wait "$serve_pid" 2>/dev/null || true
    printf '%s' "$wrk_rows" >"$RESULTS/wrk.rows"
    printf '%s\n' "${commands[@]}" >"$RESULTS/wrk.commands"
elif [ -n "$NO_RUN" ] && [ -f "$RESULTS/wrk.rows" ]; then
    # REPORT_ONLY: the ceiling measured by the last full run.
    wrk_rows=$(cat "$RESULTS/wrk.rows")$'\n'
    mapfile -t commands <"$RESULTS/wrk.commands"
fi

loadavg_end=$(cut -d' ' -f1-3 /proc/loadavg 2>/dev/null || echo "?")
if [ -z "$NO_RUN" ]; then
    declare -p started loadavg_start loadavg_end commit dirty >"$RESULTS/run.meta"
elif [ -f "$RESULTS/run.meta" ]; then
    # shellcheck disable=SC1091
    . "$RESULTS/run.meta"
fi

# ---- the markdown section --------------------------------------------------------------------
section=$(mktemp)
{
    echo "<!-- bench.sh:start -->"
    echo "## End-to-end matrix (\`scripts/bench.sh\`)"
    echo
    if [ -n "$NO_RUN" ] && [ ! -f "$RESULTS/run.meta" ]; then
        started=$(jq -r '.date' "$(ls "$RESULTS"/matrix-*.json | head -1)")
        loadavg_start=$(jq -r '.machine.loadavg_start' "$(ls "$RESULTS"/matrix-*.json | head -1)")
        loadavg_end=$(jq -r '.machine.loadavg_end' "$(ls "$RESULTS"/matrix-*.json | tail -1)")
    fi
    echo "Run $started, commit \`$commit\`$dirty, $(nproc) cores, load average $loadavg_start at the start and $loadavg_end at the end (this machine is shared: the figures move with its load)."
    echo "Each row is one measured phase of \`streamdest bench\`: events at a fixed offered rate (open loop), latency from each event's scheduled time to the receipt of its export at a local hyper endpoint in the same process. \"max\" is the highest offered rate whose p99 stayed under the bound (\`--p99-ms\`, ${P99_MS} ms) in a short trial (\`--max\`: 5 s after 1 s of warm-up, doubling from 5k events/s, then bisecting). Latencies in ms."
    echo
    echo "| profiles | workers | offered ev/s | achieved ev/s | exports/s | p50 ms | p95 ms | p99 ms | p99.9 ms | max ms | backlog | CPU cores | peak RSS MiB | |"
    echo "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"
    for json in "$RESULTS"/matrix-*.json; do
        jq -r '
          def r1: . * 10 | round / 10;
          def row($name): "| \(.p) | \(.w) | \($name) | \(.r.achieved_events_per_s) | \(.r.achieved_exports_per_s) | \(.r.latency_ms.p50 | r1) | \(.r.latency_ms.p95 | r1) | \(.r.latency_ms.p99 | r1) | \(.r.latency_ms.p999 | r1) | \(.r.latency_ms.max | r1) | \(.r.backlog_events) | \(.r.cpu_cores) | \(.rss | round) | \(if .r.passed then "ok" elif .r.aborted then "FAIL (fell behind, stopped)" else "FAIL" end) |";
          . as $top
          | {p: .params.profiles, w: .params.workers, rss: .resources.peak_rss_mib} as $k
          | ($top.runs[] | $k + {r: .} | row("\(.r.rate_offered)")),
            (if $top.max then
               ([$top.max.trials[] | select(.passed and .rate_offered == $top.max.best_rate)] | first) as $best
               | if $best then ($k + {r: $best} | row("**max \($best.rate_offered)**"))
                 else "| \($k.p) | \($k.w) | **max**: no trial passed (lowest tried \([$top.max.trials[].rate_offered] | min)) | | | | | | | | | | | |" end
             else empty end)
        ' "$json"
    done
    echo
    echo "Where the time goes, ms (p50 / p99): *ingest* = scheduled → epoch pushed (batching, backpressure); *dataflow* = push → epoch complete (per epoch, queueing behind earlier epochs included); *queue* = complete → accepted by the egress; *egress* = accepted → delivered (HTTP round trip, per-profile ordering, \`maxInFlight\`)."
    echo
    echo "| profiles | workers | offered ev/s | events/epoch | ingest | dataflow | queue | egress |"
    echo "|---:|---:|---:|---:|---|---|---|---|"
    for json in "$RESULTS"/matrix-*.json; do
        jq -r '
          def r1: . * 10 | round / 10;
          def pq($x): "\($x.p50 | r1) / \($x.p99 | r1)";
          .params as $p
          | .runs[]
          | "| \($p.profiles) | \($p.workers) | \(.rate_offered) | \(.events_per_epoch | round) | \(pq(.breakdown_ms.ingest_wait)) | \(pq(.breakdown_ms.dataflow_per_epoch)) | \(pq(.breakdown_ms.queue_before_egress)) | \(pq(.breakdown_ms.egress)) |"
        ' "$json"
    done
    echo
    echo "Initial load (not part of the latency figures; its exports are counted and discarded):"
    echo
    echo "| profiles | workers | events | seconds | events/s | RSS after load MiB | peak RSS MiB |"
    echo "|---:|---:|---:|---:|---:|---:|---:|"
    for json in "$RESULTS"/matrix-*.json; do
        jq -r '"| \(.params.profiles) | \(.params.workers) | \(.load.events) | \(.load.seconds) | \(.load.events_per_s) | \(.load.rss_mib_after | round) | \(.resources.peak_rss_mib | round) |"' "$json"
    done
    if [ -n "$wrk_rows" ]; then
        echo
        echo "HTTP ceiling: \`wrk\` (2 threads) posting a 700-byte export to the same receiver (\`streamdest bench --serve-only\`), on the same machine:"
        echo
        echo "| connections | requests/s | p50 | p99 |"
        echo "|---:|---:|---|---|"
        printf '%s' "$wrk_rows"
    fi
    echo
    echo "Commands:"
    echo
    echo '```sh'
    for json in "$RESULTS"/matrix-*.json; do
        jq -r '.command | sub("^[^ ]*streamdest "; "target/release/streamdest ")' "$json"
    done
    for c in "${commands[@]}"; do
        echo "$c"
    done
    echo '```'
    echo "<!-- bench.sh:end -->"
} >"$section"

touch "$OUT"
if grep -q '<!-- bench.sh:start -->' "$OUT" && grep -q '<!-- bench.sh:end -->' "$OUT"; then
    awk -v section="$section" '
        /<!-- bench.sh:start -->/ { while ((getline line < section) > 0) print line; skip = 1; next }
        /<!-- bench.sh:end -->/ { skip = 0; next }
        !skip { print }
    ' "$OUT" >"$OUT.tmp"
    mv "$OUT.tmp" "$OUT"
else
    { [ -s "$OUT" ] && echo; cat "$section"; } >>"$OUT"
fi
rm -f "$section"
echo "wrote the matrix into $OUT" >&2
