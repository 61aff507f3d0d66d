#!/usr/bin/env bash
# The simulator's benchmark: the scale run (1,000,000 requests on 100,000 nodes), the 3-day
# Azure trace on its right-sized cluster, and how wall time grows from 1,000 to 100,000 nodes
# for updraft and the central baselines. Prints one markdown table per part (BENCHMARKS.md
# holds the last run's); peak memory is the process's max RSS from GNU time.
#
#   scripts/bench-sim.sh            # everything (about 5 minutes on 2 cores)
#   OUT=/tmp/simbench scripts/bench-sim.sh
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-target/bench-sim}
TRACE=../shared/traces/azure2017_days0-3.csv
mkdir -p "$OUT"
cargo build -q --release -p sim
SIM=target/release/updraft-sim

# run NAME ARGS...: one simulator run; prints "events wall_s max_rss_mib acceptance peak_util"
run() {
    local name=$1
    shift
    /usr/bin/time -f '%M' -o "$OUT/$name.rss" "$SIM" run --no-plots --out "$OUT/$name" "$@" >/dev/null
    python3 - "$OUT/$name/report.json" "$OUT/$name.rss" <<'EOF'
import json, sys
r = json.load(open(sys.argv[1]))
r = r[0] if isinstance(r, list) else r
rss = int(open(sys.argv[2]).read().split()[-1]) / 1024
print(f"{r['events']} {r['wall_s']:.2f} {rss:.0f} {100*r['acceptance']:.2f} {100*r['peak_mem_util']:.1f} {r['decisions'] if 'decisions' in r else 0}")
EOF
}

echo "## scale run"
echo
echo "| run | events | wall | events/s | max RSS | acceptance | peak memory use |"
echo "|---|---:|---:|---:|---:|---:|---:|"
read -r ev wall rss acc util _ < <(run scale --policy updraft --synthetic --requests 1000000 \
    --rate 2000 --mean-lifetime-s 86400 --nodes 100000 --node-shape 16x64 --sample-s 60)
echo "| 1,000,000 requests (Azure mix, 2,000/s), 100,000 × 16 vCPU / 64 GiB, updraft | $ev | ${wall} s | $(python3 -c "print(f'{$ev/$wall:,.0f}')") | ${rss} MiB | ${acc}% | ${util}% |"

echo
echo "## 3-day Azure trace (242,581 VMs), 320 × 64 vCPU / 512 GiB"
echo
echo "| policy | events | wall | max RSS | acceptance |"
echo "|---|---:|---:|---:|---:|"
for p in updraft best-fit best-fit-indexed; do
    read -r ev wall rss acc util _ < <(run "trace-$p" --policy "$p" --trace "$TRACE" --nodes 320)
    echo "| $p | $ev | ${wall} s | ${rss} MiB | ${acc}% |"
done

echo
echo "## growth with the cluster (10 requests per node, the same load per node)"
echo
echo "| nodes | requests | updraft wall | updraft µs/event | best-fit (linear) µs per request | best-fit-indexed µs per request |"
echo "|---:|---:|---:|---:|---:|---:|"
for n in 1000 10000 100000; do
    reqs=$((n * 10))
    rate=$(python3 -c "print($n / 50)")
    common=(--synthetic --requests "$reqs" --rate "$rate" --mean-lifetime-s 86400 --nodes "$n"
        --node-shape 16x64 --sample-s 600)
    read -r ev wall _ _ _ _ < <(run "grow-updraft-$n" --policy updraft "${common[@]}")
    # the linear scan is O(nodes) per decision: at 100k nodes, time 20,000 requests, not 1M
    lin_reqs=$reqs
    [ "$n" -ge 100000 ] && lin_reqs=20000
    read -r _ lwall _ _ _ _ < <(run "grow-bestfit-$n" --policy best-fit --synthetic --requests "$lin_reqs" \
        --rate "$rate" --mean-lifetime-s 86400 --nodes "$n" --node-shape 16x64 --sample-s 600)
    read -r _ iwall _ _ _ _ < <(run "grow-indexed-$n" --policy best-fit-indexed "${common[@]}")
    python3 -c "
n,reqs,ev,wall,lreqs,lwall,iwall=$n,$reqs,$ev,$wall,$lin_reqs,$lwall,$iwall
print(f'| {n:,} | {reqs:,} | {wall:.2f} s | {1e6*wall/ev:.2f} | {1e6*lwall/lreqs:.1f} | {1e6*iwall/reqs:.2f} |')"
done
