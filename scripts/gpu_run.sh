#!/usr/bin/env bash
# One device call: GPU tests and benchmarks, results as JSON under $OUT.
#
#   STAGES="tests fwd bwd hf engine kvquant server train" bash scripts/gpu_run.sh
#
# The server stage needs FastAPI and friends, which the GPU image lacks: run
# scripts/fetch_gpu_wheels.sh here first and carry `.whl`. The train stage needs the
# corpus built by `python -m stream_attention.models.data`: carry `build/default_model`.
#
# Runs from the repository root on the GPU machine (no network): the package is used
# from the checkout via PYTHONPATH. Each stage is bounded by `timeout`; a failing stage
# is recorded and the next one still runs. At most 8 files come back from $OUT, so all
# stage outputs are packed into $OUT/results.tgz, with summary.json and gpu.log beside it.
set -uo pipefail
OUT=${OUT:-/tmp/out}
STAGES=${STAGES:-"ceil tests fwd bwd hf engine kvquant"}
RES=/tmp/gpu_results
rm -rf "$RES"; mkdir -p "$RES" "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
export TRITON_CACHE_DIR=/tmp/triton_cache NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
[ -d .whl ] && python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  && export PYTHONPATH="$PYTHONPATH:/tmp/site"
LOG="$OUT/gpu.log"
exec > >(tee -a "$LOG") 2>&1
nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.max.sm --format=csv
python3 -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__)"

declare -A STATUS
lim() { local v="LIMIT_$1"; echo "${!v:-$2}"; }
run() {  # run NAME SECONDS CMD...   (LIMIT_<NAME>=s overrides the limit)
  local name=$1 limit=$2; shift 2
  local override="LIMIT_${name//[^A-Za-z0-9_]/_}"; limit=${!override:-$limit}
  echo "=== [$name] $(date +%T) $*"
  local t0=$SECONDS
  timeout "$limit" "$@"; local rc=$?
  STATUS[$name]="rc=$rc s=$((SECONDS - t0))"
  echo "=== [$name] rc=$rc in $((SECONDS - t0)) s"
}

for stage in $STAGES; do
  case $stage in
    ceil)    run ceilings 60 python3 benchmarks/ceilings.py --out "$RES/ceilings.json" ;;
    fwdtests) run fwdtests 240 python3 -m pytest -m gpu -q -p no:cacheprovider tests/test_attention_fwd.py ;;
    tests)   run tests "${TESTS_LIMIT_S:-240}" python3 -m pytest -m gpu -q --continue-on-collection-errors -p no:cacheprovider \
                 --junitxml="$RES/gpu_tests.xml" ${TEST_FILES:-tests} ;;
    fwd)     for d in 128 64; do for c in "" "--causal"; do
               run "fwd_d${d}${c}" 200 python3 -m stream_attention.cli.benchmark --seq 1024 2048 4096 8192 16384 \
                 --tokens-per-batch 16384 --heads $((2048 / d)) --dim $d $c --dtype bf16 --warmup 25 --iters 100 \
                 --impls sdpa-flash sdpa-cudnn flex --no-progress --json "$RES/fwd_d${d}${c:+_causal}.json"
             done; done ;;
    bwd)     run bwd 240 python3 benchmarks/bench_backward.py --out "$RES/bwd.json" --budget-s "${BWD_BUDGET_S:-165}" ;;
    hf)      run hf 150 python3 benchmarks/bench_hf.py --out "$RES/hf.json" --budget-s "${HF_BUDGET_S:-85}" ;;
    engine)  for part in ${ENGINE_PARTS:-decode hf engine}; do
               run "engine_$part" "$(lim engine_$part 150)" python3 benchmarks/bench_engine.py --only $part \
                 --out "$RES/engine_$part.json" ${ENGINE_ARGS:-}
             done
             if [[ ${ENGINE_PARTS:-engine} == *engine* && ${STATUS[engine_engine]:-} != rc=0* ]]; then  # a crash: rerun small and synchronous for a traceback
               run engine_debug 120 env CUDA_LAUNCH_BLOCKING=1 python3 benchmarks/bench_engine.py --only engine --quick \
                 --out "$RES/engine_debug.json"
             fi ;;
    hopper)  run hopper 330 python3 benchmarks/bench_hopper.py --out "$RES/hopper.json" --png "$OUT/hopper_fwd.png" \
               --budget-s "${HOPPER_BUDGET_S:-280}" --sweep-s "${HOPPER_SWEEP_S:-110}" ;;
    enginedebug) run engine_debug_full 120 env CUDA_LAUNCH_BLOCKING=1 python3 benchmarks/bench_engine.py --only engine \
               --out "$RES/engine_debug_full.json" ;;
    probe)   for c in ${PROBE_CASES:-tiny-mixed 1b-eager 1b-bigstep}; do
               if [[ $c == tiny-* ]] && command -v compute-sanitizer >/dev/null; then
                 run "probe_$c" 150 compute-sanitizer --tool memcheck --print-limit 5 python3 scripts/engine_probe.py "$c"
               else
                 run "probe_$c" 100 python3 scripts/engine_probe.py "$c"
               fi
             done ;;
    fp8)     run fp8 120 python3 benchmarks/bench_fp8.py --out "$RES/fp8.json" ${FP8_ARGS:-} ;;
    reads)   run reads 240 python3 benchmarks/bench_decode_reads.py --out "$RES/reads.json" --budget-s "${READS_BUDGET_S:-150}" ${READS_ARGS:-} ;;
    kvquant) run kvquant 150 python3 benchmarks/bench_kv_quant.py --out "$RES/kv_quant.json" ${KVQ_ARGS:-} ;;
    structured) run structured 200 python3 benchmarks/bench_structured.py --out "$RES/structured.json" ${STRUCTURED_ARGS:-} ;;
    soak)    ulimit -n 65536 2>/dev/null; echo "open-file limit: soft $(ulimit -Sn), hard $(ulimit -Hn)"
             run soak "${SOAK_LIMIT_S:-300}" python3 benchmarks/soak.py --model default --device cuda \
               --duration-s "${SOAK_DURATION_S:-120}" --concurrency "${SOAK_CONCURRENCY:-1000}" --out "$RES/soak_gpu.json" ;;
    spec)    run spec 170 python3 benchmarks/bench_spec.py --out "$RES/spec.json" ${SPEC_ARGS:-} ;;
    families) run families 170 python3 benchmarks/bench_families.py --out "$RES/families.json" ${FAMILIES_ARGS:-} ;;
    longprompt) run longprompt 200 python3 benchmarks/bench_long_prompt.py --out "$RES/long_prompt.json" --budget-s 170 ;;
    sweep)   run sweep 170 python3 benchmarks/bench_sweep.py --out "$RES/sweep.json" --budget-s 140 --rates 4 8 16 32 inf \
               --num-requests 64 ;;
    longctx) run longctx 200 python3 benchmarks/bench_long_context.py --out "$RES/long_context.json" --budget-s 170 ;;
    server)  run server 300 python3 benchmarks/bench_server.py --out "$RES/server.json" ${SERVER_ARGS:-} ;;
    engine2) run engine_alt 150 python3 benchmarks/bench_engine.py --only engine --out "$RES/engine_alt.json" \
               ${ENGINE2_ARGS:-} ;;
    train)   run train "${TRAIN_LIMIT_S:-420}" env STREAM_ATTENTION_AUTOTUNE=0 bash benchmarks/train_default.sh "$RES/train"
             # The packed model can exceed the 16 MiB a returned file may have: ship it in parts.
             if [ -f "$RES/train/default_model.tar.gz" ]; then
               split -b 15M "$RES/train/default_model.tar.gz" "$OUT/default_model.tar.gz.part-"
               rm "$RES/train/default_model.tar.gz"
             fi ;;
    *)       echo "unknown stage $stage" ;;
  esac
done

python3 - "$RES" "$OUT" <<'PY'
import json, os, sys, glob
res, out = sys.argv[1], sys.argv[2]
summary = {}
for path in sorted(glob.glob(os.path.join(res, "*.json"))):
    try:
        summary[os.path.basename(path)] = json.load(open(path))
    except Exception as exc:
        summary[os.path.basename(path)] = {"error": str(exc)}
json.dump(summary, open(os.path.join(out, "summary.json"), "w"), indent=1)
PY
for k in "${!STATUS[@]}"; do echo "stage $k: ${STATUS[$k]}"; done
tar -C "$RES" -czf "$OUT/results.tgz" .
ls -la "$OUT"
