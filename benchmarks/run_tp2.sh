#!/usr/bin/env bash
# Issue #15: tensor parallel on the two H200s of `nvidia-h200-x2`, against one GPU, one command
# per part (each fits the device tool's 10-minute call):
#   bash benchmarks/run_tp2.sh check     # multi-process + tp=2 correctness (tiny models)
#   bash benchmarks/run_tp2.sh bf16      # Llama-3-8B shape, bf16, tp=1 then tp=2
#   bash benchmarks/run_tp2.sh fp8       # the same with --quant fp8
#   bash benchmarks/run_tp2.sh 70b       # Llama-3-70B shape, fp8, tp=2
# Results: JSON under $OUT (bench_e2e_kiln_<quant>_tp<N>.json, check_*.json). Environment: TPS="1 2"
# (which tp), R (request counts), LIMIT (seconds per engine), KV_BLOCKS (a fixed pool instead of
# sizing it from memory), SKIP_TP_CHECK.
set -u
cd "$(dirname "$0")"
mkdir -p /tmp/pk && ln -sfn "$(cd .. && pwd)" /tmp/pk/kiln
export PYTHONPATH=/tmp/pk PYTHONUNBUFFERED=1 OUT=${OUT:-.}
W=latency_128_512,throughput_128_128,throughput_2048_128
R=${R:-throughput_128_128=1024,throughput_2048_128=1024}
TPS=${TPS:-1 2}
summary() {  # one line per workload of each result file
  python3 - "$@" <<'PY'
import json, sys
for p in sys.argv[1:]:
    res = json.load(open(p))
    print(p.rsplit("/", 1)[-1], "load_s", round(res.get("_load_s", 0), 1))
    for k, v in res.items():
        if not k.startswith("_"):
            r = v.get("results", v)
            print(" ", k, {x: r.get(x) for x in ("requests", "output_tokens_per_s", "tpot_ms_p50", "ttft_ms_p50", "skipped")},
                  "wall_s", round(v.get("wall_s", 0), 1))
PY
}
case "${1:-check}" in
  check)
    nvidia-smi -L; nvidia-smi topo -m | head -4
    python3 check_multiprocess.py --tokens 16 --attention auto 2>&1 | tail -12
    [ -n "${SKIP_TP_CHECK:-}" ] || { python3 check_tp.py --tp 2 --preset llama-tiny 2>&1 | tail -4;
                                     python3 check_tp.py --tp 1 --pp 2 --preset llama-tiny 2>&1 | tail -4; } ;;
  bf16|fp8)
    q=$([ "$1" = fp8 ] && echo "--quant fp8")
    for tp in $TPS; do
      timeout ${LIMIT:-400} python3 bench_e2e.py --part kiln $q --tp $tp --workloads $W --requests $R --tag _tp$tp \
        ${KV_BLOCKS:+--num-kv-blocks $KV_BLOCKS} \
        >"$OUT/log_$1_tp$tp.txt" 2>&1 || tail -20 "$OUT/log_$1_tp$tp.txt"
      summary "$OUT"/bench_e2e_kiln_*_tp$tp.json
    done ;;
  70b)
    python3 bench_e2e.py --part kiln --preset llama-3-70b --quant fp8 --tp 2 \
      --workloads latency_128_512,throughput_128_128 --requests throughput_128_128=1024 --tag _70b_tp2 \
      --deadline-s 420 >"$OUT/log_70b.txt" 2>&1 || tail -20 "$OUT/log_70b.txt"
    summary "$OUT"/bench_e2e_kiln_*_70b_tp2.json ;;
esac
