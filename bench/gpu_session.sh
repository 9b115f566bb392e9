#!/usr/bin/env bash
# Everything a GPU machine should check, in one call, each step time-boxed so that the whole run
# fits a short loan (the device tool allows 10 minutes a command):
#   profile     where one fwd+bwd spends its time, kernel by kernel: profile384, the Triton op
#               and NX-AI's mlstm_kernels (when carried) at ViL-B's shape; profile96, the op
#               alone at ViL-T's
#   tune        the launch-parameter sweep at TUNE_DIMS (default 384, ViL-B's head dim; outputs
#               checked against the table's, the table against float64); its winners go to a
#               launch table file
#   tunelong    the two state scans swept at the issue's long sequences (S=16384: B=1 at D=384,
#               B=8 at D=96), serial against split form: where the serial scans have too few
#               programs to fill the GPU (the split form's case); no table written
#   tunechunk   the sweep at chunks of TUNE_CHUNK (default 1024: ViL's 784 tokens in one) of
#               the kernels that chunks of several tiles run differently: the two pair kernels,
#               the outputs, dq/dk and dv kernels' loops over the pairs; table file of its own
#   roofline    ViL-B's shape in one chunk (B=64, NH=4, S=784, D=384), device time per kernel
#               (profile_op) in tiles of 64 and 128, with the table's parameters and with the
#               wide ones at 8 warps (bench/tables/vil-b-wide-sm90.json: the dq/dk kernel's K
#               tiles of 128, the pair kernels' two key tiles a program); then the sweep of the
#               five matmul kernels there (wide tiles at 8 warps among the candidates, outputs
#               checked). bench/traffic.py --profile FILE --row ROW (--tile as run, and the
#               same $VIL_KERNELS_LAUNCH_TABLE) turns each row into the bandwidth and TFLOP/s
#               each kernel reached
#   goal        issue 3's measure, whose goals are set on an H100: the operator at ViL-B's shape
#               at 448 px (B=64, NH=4, S=784, D=384, bf16) and at 224 px (S=196), ours and
#               mlstm_kernels (when carried), ours with the built-in table and with each of
#               TABLES (file stems in bench/tables/, default the wide and the tiles-of-128
#               tables for ViL-B's head dim in one chunk), all in one process (kernels.py
#               --table), 448 px first; kernels.py prints each row's verdicts (1.3x the peer,
#               half the roofline) and keeps them in the file's "goals"
#   tables      ViL-B's inference and training at 448 px (our row) with the built-in table and
#               with each of TABLES through $VIL_KERNELS_LAUNCH_TABLE (the operator with them:
#               the goal step); a file a table. A table that wins both becomes built-in rules
#   tunemodel   the sweep at ViL-T's and ViL-S's cells as the main job runs them (B=256, NH=4,
#               S=784, D=96 and 192, their default chunks of 64; the built-in table was swept
#               at B=64, four times fewer programs), into a table of its own; then ViL-T's and
#               ViL-S's inference and training at 448 px (our row) with it and without
#   tests       the Triton and torch.func tests on CUDA (pytest-xdist when there); after tune, with its table
#   gatetests   tests/test_gates.py and tests/test_random_configs.py on CUDA
#   diag        bench/diag/gates32.py (where float32 loses precision with several resets in a
#               long chunk) and bench/diag/two_v_tiles.py (a reduced form of the two-V-tile
#               fault, for a Triton report)
#   kernels     the operator benchmark at S=784, D=384/192/96, with that table (kernels-all:
#               at every shape of bench/kernels.py's GPU list)
#   chunks      the Triton op in chunks of CHUNKS positions (default 64,128,256,1024: the
#               state kept at their boundaries; tiles of 64 either way) at ViL shapes and at
#               S=16384, and the peer: which chunk length the table should pick
#   tiles       the Triton op in one chunk (1024) in tiles of TILES positions (default 64,128:
#               the table's against 8-warp tiles of 128, heuristics.TILE) at S=784, D=384/192/96
#               and S=196, D=384, timed the same call: whether 128 should be a table entry;
#               then at D=96 and 64 in chunks of 64, 128 and 1024 with the outputs kernel
#               computing the pair scores (heuristics.SCORES_IN_OUTPUTS) and without
#   flash       the flash forms (heuristics.FLASH_FORWARD: one chunk without a carried state
#               in mlstm_fwd_flash_kernel, FlashAttention's one pipelined loop over key tiles;
#               with states every V column of a row tile in one outputs program; no forward
#               pair kernel either way. FLASH_BACKWARD: the backward's pair products and dq in
#               mlstm_bwd_flash_kernel, one chunk without a carried state) off, forward only,
#               backward only and both (FLASH_SETTINGS), the same call: the op in chunks of 64
#               (where they do not apply: the baseline) and 1024 (FLASH_CHUNKS) at S=784,
#               D=384/192/96 and at S=3136, D=384 (chunks of 1024 with carried states), then
#               ViL-B's inference at 448 px (our row; FLASH_MODELS) with the forward's off and
#               on; the Triton tests of several-tile chunks with both on first
#   flashauto   the flash forms set to auto (each where its build takes 4 warps: D <= 192 forward,
#               D <= 128 backward) in one chunk of 1024 against off and against the default
#               chunks of 64: device time per kernel (profile_op) at S=784, D=96/192, the op
#               at D=96/192/128, then ViL-T's inference and training at 448 px (our row;
#               FLASH_MODELS) with its cells in one chunk and by default
#   flashtrain  ViL-B's training at 448 px (our row; FLASH_MODELS) with both flash forms off
#               and on
#   chunkjob    the main job's inference at 448 px (ViL-T and ViL-B, our rows) with the cells in
#               one chunk of 1024 (the quadratic form, no state work) against the default
#               (CHUNKJOB_BENCH=train: training, where one chunk also keeps no states;
#               CHUNKJOB_MODELS picks the models, CHUNKJOB_CHUNKS the chunks: "default 128
#               1024" adds the forward's fastest chunk at D=96 in session 14's table)
#   throughput  the main job at 448 px (inference), with that table; only with STEPS naming it
#   ncu         Nsight Compute's sections for the seven kernels of one fwd+bwd at D=384 (ncu96:
#               at D=96; in the log); only with STEPS naming it
#   model       where ViL steps spend their time by kernel group (bench/profile_model.py: ViL-T
#               and ViL-B inference, ViL-T training at 448 px); only with STEPS naming it
#   modeltests  the model's tests on CUDA (its fused kernels, forward and backward)
#   modelk      bench/model_kernels.py: each fused op around the cell against its PyTorch path,
#               inference with the launch-config sweep, then forward+backward
#   train       the main job's training throughput at 448 px (ViL-T/S/B, every row)
#   recompute   ViL-B training at 448 px, our row, with and without --recompute-states
#               (images/s and peak memory of keeping or recomputing the chunk states)
#   compile     the main job's inference at 448 px under torch.compile (ViL-T: ours, DeiT):
#               inductor's fusion of the PyTorch path against the fused Triton kernels
#   host        bench/host_overhead.py: host time of a call against its wall time at small
#               shapes (where launches, not kernels, bound a call), with cProfile's top list
#   graphs      ViL-T at 224 px (inference and training, ours and DeiT) under torch.compile,
#               default mode against reduce-overhead (CUDA graphs: no host time a step)
#   fastlaunch  the CUDA tests and the host time with VIL_KERNELS_FAST_LAUNCH=0 (Triton's own
#               launch path; the default, the fast path, is what the other steps run)
#   sweep       images/s against resolution (224 to 1024 px: 196 to 4096 tokens), ViL-T and
#               DeiT-T (SWEEP_MODELS, SWEEP_BENCH=train): where the cell's linear cost
#               overtakes attention's quadratic one in a whole model; with its plot
#   train224    ViL-T training at 224 px (196 tokens, where host time bounds a step): ours and
#               DeiT, then ours with VIL_KERNELS_FAST_LAUNCH=0
# STEPS picks and orders steps (default: profile tune tests kernels). Logs and results go to
# $OUT (the device tool's output folder; at most 8 files come back) or bench/results/gpu-run;
# copy the JSON files into bench/results/ with the device in the name.
# Usage: bash bench/gpu_session.sh            STEPS="tests kernels throughput" bash ...
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-bench/results/gpu-run}"
STEPS="${STEPS:-profile tune tests kernels}"
TUNE_DIMS="${TUNE_DIMS:-384}"
TABLES="${TABLES:-vil-b-wide-sm90 vil-b-tile128-sm90}"   # bench/tables/ stems
TUNE_LIMIT="${TUNE_LIMIT:-150}"                # seconds of sweeping (the step's box: 20 more)
mkdir -p "$OUT"
LOG="$OUT/session.log"
export PYTHONUNBUFFERED=1
step() {                                       # step NAME SECONDS CMD...: log, time-box, go on
    local name=$1 secs=$2; shift 2
    local t0=$SECONDS
    echo "=== $name: $*" >> "$LOG"
    timeout "$secs" "$@" > "$OUT/step.log" 2>&1
    local rc=$?
    cat "$OUT/step.log" >> "$LOG"
    echo "$name: rc=$rc in $((SECONDS - t0)) s" | tee -a "$LOG"
    tail -n 25 "$OUT/step.log"
    rm -f "$OUT/step.log"
}
if ls .whl/mlstm_kernels-*.whl > /dev/null 2>&1; then   # the peer, when carried (carry: [".whl"])
    python -m pip install -q --no-index --no-deps --no-compile --target /tmp/peer-site .whl/mlstm_kernels-*.whl \
        && export PYTHONPATH="/tmp/peer-site${PYTHONPATH:+:$PYTHONPATH}"
fi
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv 2>&1 | tee "$LOG"
TABLE="$OUT/launch-table.json"
XDIST=$(python -c "import xdist" 2>/dev/null && echo "-n 8")
for s in $STEPS; do
    case $s in
    profile) STEPS_NOW="profile384 profile96" ;;
    *) STEPS_NOW=$s ;;
    esac
    for t in $STEPS_NOW; do
    case $t in
    profile384)
        step profile-384 90 python bench/profile_op.py --shape 64,4,784,384 --peer-chunks 128 \
            --results-file "$OUT/profile-384.json" ;;
    profile96)
        step profile-96 40 python bench/profile_op.py --shape 64,4,784,96 --peer-chunks \
            --results-file "$OUT/profile-96.json" ;;
    tune)
        step tune $((TUNE_LIMIT + 20)) python bench/tune.py --dims $TUNE_DIMS --time-limit $TUNE_LIMIT \
            --results-file "$OUT/tune.json" --write-table "$TABLE"
        # later steps run with the sweep's winners
        [ -f "$TABLE" ] && export VIL_KERNELS_LAUNCH_TABLE="$TABLE" ;;
    tunelong)                                  # the issue's two long shapes
        step tunelong-384 110 python bench/tune.py --dims 384 --B 1 --S 16384 \
            --kernels fwd_state bwd_state --time-limit 90 --results-file "$OUT/tune-long-384.json"
        step tunelong-96 110 python bench/tune.py --dims 96 --B 8 --S 16384 \
            --kernels fwd_state bwd_state --time-limit 90 --results-file "$OUT/tune-long-96.json" ;;
    tunechunk)                                 # chunks of several tiles (TUNE_CHUNK)
        step tunechunk $((TUNE_LIMIT + 20)) python bench/tune.py --dims $TUNE_DIMS \
            --chunks "${TUNE_CHUNK:-1024}" --kernels fwd_pair bwd_pair bwd_dqk bwd_dv fwd_out \
            --time-limit $TUNE_LIMIT --results-file "$OUT/tune-chunk.json" \
            --write-table "$OUT/launch-table-chunk.json" ;;
    roofline)
        ROOF="python bench/profile_op.py --shape 64,4,784,384 --chunk-size 1024"
        step roofline-profile 180 $ROOF --tile 64,128 --peer-chunks \
            --results-file "$OUT/profile-roofline.json"
        VIL_KERNELS_LAUNCH_TABLE=bench/tables/vil-b-wide-sm90.json \
            step roofline-profile-wide 120 $ROOF --tile 64 --peer-chunks \
            --results-file "$OUT/profile-roofline-wide.json"
        step roofline-tune 120 python bench/tune.py --dims 384 --chunks 1024 \
            --kernels bwd_dqk bwd_pair fwd_pair fwd_out bwd_dv --time-limit 100 \
            --results-file "$OUT/tune-roofline.json" ;;
    tunemodel)                                 # the sweep at the main job's batch
        step tunemodel $((TUNE_LIMIT + 20)) python bench/tune.py --dims 96 192 --B 256 \
            --chunks 64 --kernels fwd_state fwd_out bwd_state bwd_dqk bwd_dv \
            --time-limit $TUNE_LIMIT --results-file "$OUT/tune-model.json" \
            --write-table "$OUT/launch-table-model.json"
        for T in "" "$OUT/launch-table-model.json"; do
            [ -z "$T" ] || [ -f "$T" ] || continue
            VIL_KERNELS_LAUNCH_TABLE="$T" step "tunemodel-job${T:+-table}" 150 \
                python bench/throughput.py --resolution 448 --model vil2-tiny,vil2-small \
                --rows ours --bench both --num-warm-iter 3 --num-bench-iter 10 --no-progress \
                --results-file "$OUT/throughput-448-model${T:+-table}.json"
        done ;;
    goal)                                      # issue 3's measure at ViL-B's shape
        words=builtin
        for t in $TABLES; do words="$words,$t"; done
        step goal 330 python bench/kernels.py --paths triton,mlstm_kernels-xl_chunk \
            --table "$words" --shapes 64,4,784,384 --shapes 64,4,196,384 --num-bench-iter 10 \
            --results-file "$OUT/kernels-goal.json" ;;
    tables)                                    # ViL-B's steps with each candidate, built-in first
        for t in builtin $TABLES; do
            T=""; [ "$t" = builtin ] || T="bench/tables/$t.json"
            VIL_KERNELS_LAUNCH_TABLE="$T" step "table-$t-vil" 150 python bench/throughput.py \
                --resolution 448 --model vil2-base --rows ours --bench both --num-warm-iter 3 \
                --num-bench-iter 10 --no-progress --results-file "$OUT/throughput-448-table-$t.json"
        done ;;
    tests)
        step tests 100 python -m pytest tests/test_triton.py tests/test_func.py -q $XDIST ;;
    gatetests)                                 # infinite gates and the random configurations
        step gatetests 80 python -m pytest tests/test_gates.py tests/test_random_configs.py -q \
            $XDIST ;;
    diag)                                      # session 19's open questions (bench/diag/)
        step diag-gates32 40 python bench/diag/gates32.py
        step diag-two-v-tiles 40 python bench/diag/two_v_tiles.py ;;
    kernels)
        step kernels 80 python bench/kernels.py --shapes 64,4,784,384 \
            --shapes 64,4,784,192 --shapes 64,4,784,96 --results-file "$OUT/kernels.json" ;;
    kernels-all)                               # the issue's list: S=196/784/3136 and 16384
        # (~400 s at 5 timed calls on an H200: KERNELS_SHAPES="--shapes B,NH,S,D ..." for part)
        step kernels-all "${KERNELS_LIMIT:-420}" python bench/kernels.py --num-bench-iter 5 \
            ${KERNELS_SHAPES:-} --results-file "$OUT/kernels.json" ;;
    chunks)                                    # one process, a row per chunk length
        # shapes by importance (ViL-B's first): results are written after every shape, so a
        # run cut by the time box keeps what it measured
        step chunks "${CHUNKS_LIMIT:-420}" python bench/kernels.py \
            --paths triton,mlstm_kernels-xl_chunk --chunk-size "${CHUNKS:-64,128,256,1024}" \
            --num-bench-iter 5 --shapes 64,4,784,384 --shapes 64,4,784,192 \
            --shapes 64,4,784,96 --shapes 64,4,3136,96 --shapes 64,4,3136,384 \
            --shapes 64,4,196,192 --shapes 1,4,16384,384 --shapes 8,4,16384,96 \
            --results-file "$OUT/kernels-chunks.json" ;;
    tiles)                                     # one process, a row per tile
        step tiles "${TILES_LIMIT:-240}" python bench/kernels.py --paths triton \
            --chunk-size "${TILES_CHUNK:-1024}" --tile "${TILES:-64,128}" --num-bench-iter 10 \
            --shapes 64,4,784,384 --shapes 64,4,784,192 --shapes 64,4,784,96 \
            --shapes 64,4,196,384 --results-file "$OUT/kernels-tiles.json"
        for sc in 1 0; do
            VIL_KERNELS_SCORES_IN_OUTPUTS=$sc step "scores-$sc" 120 python bench/kernels.py \
                --paths triton --chunk-size 64,128,1024 --num-bench-iter 10 \
                --shapes 64,4,784,96 --shapes 64,4,784,64 \
                --results-file "$OUT/kernels-scores-$sc.json"
        done ;;
    flash)                                     # one process, a row per setting
        # first the Triton tests that run chunks of several tiles, with the form on
        VIL_KERNELS_FLASH_FORWARD=1 VIL_KERNELS_FLASH_BACKWARD=1 step flashtests 100 \
            python -m pytest tests/test_triton.py -q -k "flash or bfloat16 or one_chunk or tiles" \
            $XDIST
        step flash "${FLASH_LIMIT:-300}" python bench/kernels.py --paths triton \
            --chunk-size "${FLASH_CHUNKS:-64,1024}" --flash "${FLASH_SETTINGS:-off,fwd,bwd,on}" \
            --num-bench-iter 10 \
            --shapes 64,4,784,384 --shapes 64,4,784,192 --shapes 64,4,784,96 \
            --shapes 64,4,3136,384 --results-file "$OUT/kernels-flash.json"
        for fl in 0 1; do
            VIL_KERNELS_FLASH_FORWARD=$fl step "flashjob-$fl" 120 python bench/throughput.py \
                --resolution 448 --model "${FLASH_MODELS:-vil2-base}" --rows ours \
                --bench inference --num-warm-iter 3 --num-bench-iter 10 --no-progress \
                --results-file "$OUT/throughput-448-inference-flash-$fl.json"
        done ;;
    flashauto)                                 # flash auto in one chunk against the default
        # device time per kernel (profile_op), then the host-timed op and ViL-T at 448 px
        for D in 96 192; do
            step "flashprof-$D" 60 python bench/profile_op.py --shape 64,4,784,$D --reps 20 \
                --peer-chunks --chunk-size 64,1024 --flash off,auto \
                --results-file "$OUT/profile-$D-flash.json"
        done
        step flashauto "${FLASH_LIMIT:-90}" python bench/kernels.py --paths triton \
            --chunk-size 64,1024 --flash off,auto --num-bench-iter 20 --shapes 64,4,784,96 \
            --shapes 64,4,784,192 --shapes 64,4,784,128 --results-file "$OUT/kernels-flash-auto.json"
        for bench in inference train; do
            for c in default 1024; do
                FLAG=""; [ "$c" = default ] || FLAG="--mlstm-chunk-size $c"
                VIL_KERNELS_FLASH_FORWARD=auto VIL_KERNELS_FLASH_BACKWARD=auto \
                    step "flashauto-$bench-$c" 50 python bench/throughput.py --resolution 448 \
                    --model "${FLASH_MODELS:-vil2-tiny}" --rows ours --bench $bench \
                    --num-warm-iter 3 --num-bench-iter 10 --no-progress $FLAG \
                    --results-file "$OUT/throughput-448-$bench-flash-auto-chunk-$c.json"
            done
        done ;;
    flashtrain)
        for fl in 0 1; do
            VIL_KERNELS_FLASH_FORWARD=$fl VIL_KERNELS_FLASH_BACKWARD=$fl step "flashtrain-$fl" 150 \
                python bench/throughput.py --resolution 448 --model "${FLASH_MODELS:-vil2-base}" \
                --rows ours --bench train --num-warm-iter 3 --num-bench-iter 10 --no-progress \
                --results-file "$OUT/throughput-448-train-flash-$fl.json"
        done ;;
    chunkjob)
        for c in ${CHUNKJOB_CHUNKS:-default 1024}; do
            FLAG=""; [ "$c" = default ] || FLAG="--mlstm-chunk-size $c"
            step "chunkjob-$c" 150 python bench/throughput.py --resolution 448 \
                --model "${CHUNKJOB_MODELS:-vil2-tiny,vil2-base}" --rows ours \
                --bench "${CHUNKJOB_BENCH:-inference}" --num-warm-iter 3 \
                --num-bench-iter 10 --no-progress $FLAG \
                --results-file "$OUT/throughput-448-${CHUNKJOB_BENCH:-inference}-chunk-$c.json"
        done ;;
    sweep)
        step sweep "${SWEEP_LIMIT:-240}" python bench/throughput.py \
            --sweep "${SWEEP_RES:-224,448,768,1024}" --model "${SWEEP_MODELS:-vil2-tiny}" \
            --rows ours,deit --bench "${SWEEP_BENCH:-inference}" --num-warm-iter 3 \
            --num-bench-iter 10 --no-progress \
            --results-file "$OUT/sweep-${SWEEP_BENCH:-inference}.json" ;;
    host)
        step host 60 python bench/host_overhead.py --profile ;;
    train224)
        step train224 90 python bench/throughput.py --resolution 224 --model vil2-tiny \
            --rows ours,deit --bench train --num-warm-iter 2 --num-bench-iter 6 --no-progress \
            --results-file "$OUT/throughput-224-train-vil2-tiny.json"
        step train224-triton-launch 90 env VIL_KERNELS_FAST_LAUNCH=0 python \
            bench/throughput.py --resolution 224 --model vil2-tiny --rows ours --bench train \
            --num-warm-iter 2 --num-bench-iter 6 --no-progress \
            --results-file "$OUT/throughput-224-train-vil2-tiny-triton-launch.json" ;;
    graphs)                                    # CUDA graphs where the host bounds a step
        for mode in default reduce-overhead; do
            step "graphs-224-$mode" 150 python bench/throughput.py --resolution 224 \
                --model vil2-tiny --rows ours,deit --bench both --compile --compile-mode "$mode" \
                --num-warm-iter 3 --num-bench-iter 10 --no-progress \
                --results-file "$OUT/throughput-224-vil2-tiny-compile-$mode.json"
        done ;;
    fastlaunch)
        step fastlaunch-tests 120 env VIL_KERNELS_FAST_LAUNCH=0 python -m pytest \
            tests/test_triton.py tests/test_model.py -q $XDIST
        step fastlaunch-host 60 env VIL_KERNELS_FAST_LAUNCH=0 python bench/host_overhead.py ;;
    throughput)
        step throughput 150 python bench/throughput.py --resolution 448 \
            --bench inference --num-warm-iter 3 --num-bench-iter 10 --no-progress \
            --results-file "$OUT/throughput-448.json" ;;
    ncu|ncu96)                                 # why each kernel takes its time
        D=384; [ "$t" = ncu96 ] && D=96
        NCU=$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu /usr/local/cuda/bin/ncu 2>/dev/null | head -n 1)
        if [ -n "$NCU" ]; then
            # the first fwd+bwd's seven kernels: speed of light, memory, occupancy, stalls
            step "$t" $([ "$t" = ncu ] && echo 150 || echo 100) "$NCU" --clock-control none --kernel-name "regex:mlstm_" \
                --launch-count 7 --section SpeedOfLight --section MemoryWorkloadAnalysis \
                --section Occupancy --section WarpStateStats --section LaunchStats \
                python bench/profile_op.py --shape 64,4,784,$D --peer-chunks --reps 1
        else
            echo "ncu: not found" | tee -a "$LOG"
        fi ;;
    modeltests)
        step modeltests 120 python -m pytest tests/test_model.py -q $XDIST
        # alone, without xdist: its gradient mismatch on torch 2.11 (docs/versions.md) is
        # order-dependent or not
        step modeltests-compile 60 python -m pytest tests/test_model.py -q \
            -k compile_fullgraph_matches_eager ;;
    modelk)                                    # MODELK_SWEEP="" skips the sweep
        step modelk-inference 200 python bench/model_kernels.py ${MODELK_SWEEP---sweep} \
            --results-file "$OUT/model-kernels-inference.json"
        step modelk-train 60 python bench/model_kernels.py --mode train \
            --results-file "$OUT/model-kernels-train.json" ;;
    train)                                     # a run a model: a timeout loses one only
        for m in vil2-tiny vil2-small vil2-base; do
            step "train-$m" 90 python bench/throughput.py --resolution 448 --model "$m" \
                --bench train --num-warm-iter 2 --num-bench-iter 6 --no-progress \
                --results-file "$OUT/throughput-448-train-$m.json"
        done ;;
    recompute)
        for flag in "" --recompute-states; do
            step "recompute${flag:+-on}" 90 python bench/throughput.py --resolution 448 \
                --model vil2-base --rows ours --bench train --num-warm-iter 2 \
                --num-bench-iter 6 --no-progress $flag \
                --results-file "$OUT/throughput-448-train-vil2-base-recompute${flag:+-on}.json"
        done ;;
    compile)
        step compile 240 python bench/throughput.py --resolution 448 --model vil2-tiny \
            --rows ours,deit --bench inference --compile --num-warm-iter 3 \
            --num-bench-iter 10 --no-progress --results-file "$OUT/throughput-448-compile.json" ;;
    model)
        for m in "vil2-tiny inference" "vil2-base inference" "vil2-tiny train"; do
            set -- $m
            step "model-$1-$2" 60 python bench/profile_model.py --model "$1" --mode "$2" \
                --results-file "$OUT/profile-model-$1-$2.json"
        done ;;
    *) echo "unknown step $t" ;;
    esac
    done
done
