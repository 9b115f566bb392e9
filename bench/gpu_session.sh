#!/usr/bin/env bash
# Everything a GPU machine should check, in one call, each step time-boxed so that the whole run
# fits a short loan (about 9 minutes; the device tool allows 10 a command):
#   correctness of the Triton kernels on CUDA, the operator micro-benchmark, the main job at
#   224, 448 and 1024 px. Results and logs go to $OUT (the device tool's output folder) or to
#   bench/results/gpu-run; copy the JSON files into bench/results/ with the device in the name.
# Usage: bash bench/gpu_session.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-bench/results/gpu-run}"
mkdir -p "$OUT"
step() {                                       # step NAME SECONDS CMD...: log, time-box, go on
    local name=$1 secs=$2; shift 2
    local t0=$SECONDS
    timeout "$secs" "$@" > "$OUT/$name.log" 2>&1
    echo "$name: rc=$? in $((SECONDS - t0)) s"
    tail -n 15 "$OUT/$name.log"
}
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv > "$OUT/gpu.txt" 2>&1
cat "$OUT/gpu.txt"
step tests 150 python -m pytest tests/test_triton.py tests/test_mlstm.py -q -x
step kernels 90 python bench/kernels.py --results-file "$OUT/kernels.json"
for res in 224 448 1024; do
    step "throughput-$res" 80 python bench/throughput.py --resolution "$res" --no-progress \
        --results-file "$OUT/throughput-$res.json"
done
