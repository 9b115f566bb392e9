#!/usr/bin/env bash
# Everything a GPU machine should check, in one call, each step time-boxed so that the whole run
# fits a short loan (about 9 minutes; the device tool allows 10 a command): the launch-parameter
# sweep first (bench/tune.py: ViL-B's, ViL-T's, then ViL-S's head dim, every configuration's
# outputs checked, the table's against float64, with NX-AI's mlstm_kernels as the peer when
# installed), then the Triton tests on CUDA, the operator micro-benchmark at ViL shapes (S=784),
# the main job at 448 px (inference, ViL-T/S/B). Boxes sized from the H200 runs of
# 2026-11-25/26 (tests ~170 s, tune ~45 s a head dim once compiled in parallel). Results and logs
# go to $OUT (the device tool's output folder) or to bench/results/gpu-run; copy the JSON files
# into bench/results/ with the device in the name.
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
if ls .whl/mlstm_kernels-*.whl > /dev/null 2>&1; then   # the peer, when carried (carry: [".whl"])
    python -m pip install -q --no-index --no-deps --no-compile --target /tmp/peer-site .whl/mlstm_kernels-*.whl \
        && export PYTHONPATH="/tmp/peer-site${PYTHONPATH:+:$PYTHONPATH}"
fi
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv > "$OUT/gpu.txt" 2>&1
cat "$OUT/gpu.txt"
step tune 200 python bench/tune.py --time-limit 180 --results-file "$OUT/tune.json"
step tests 140 python -m pytest tests/test_triton.py -q -x
step kernels 80 python bench/kernels.py --shapes 64,4,784,96 --shapes 64,4,784,192 \
    --shapes 64,4,784,384 --results-file "$OUT/kernels.json"
step throughput-448-inference 100 python bench/throughput.py --resolution 448 --bench inference \
    --num-warm-iter 3 --num-bench-iter 10 --no-progress --results-file "$OUT/throughput-448.json"
