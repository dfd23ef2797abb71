#!/usr/bin/env bash
# The GPU checks of the kernels and adjoint issues in one device call: the kernel and whole-model tests on
# CUDA, then the GPU benchmarks, each step under its own time limit so one slow step cannot eat the lease.
#   bash bench/gpu_check.sh        (logs and pytest-benchmark JSON go to $OUT)
#   STEPS="gn attn" bash bench/gpu_check.sh   (a subset; steps: tests graphs repeat profile gn attn grad purify
#   precision, or a bench name like model)
# Next session, in this order (the open questions first): BUDGET=560 STEPS="tests grad gn attn"
#   GRAD_PROVIDERS="no-grad-purify rdp-adjoint rdp-adjoint-blocks rdp-adjoint-graphed rdp-adjoint-graphed-bf16"
#   bash bench/gpu_check.sh,
#   with .whl carried (the kernel and graph tests by name; the adjoint with its every-state default, with block
#   checkpointing against the 3x memory target, and graphed; the kernels' graph timings)
#   then STEPS="purify profile" PURIFY_BATCHES="256 64" PURIFY_PROVIDERS="bf16" bash bench/gpu_check.sh
#   (rdp-graphed-bf16 since the attention block keeps an NCHW model NCHW and bf16 keeps its weight casts,
#   against 3.174 s and 1.032 s before, beside its channels-last row rdp-graphed-bf16-cl and
#   rdp-graphed-bf16-autocast, which casts the weights at every forward as before; the profile says which
#   layout the GPU should default to)
#   STEPS=grad GRAD_PROVIDERS="rdp-adjoint torchsde-adjoint" bash bench/gpu_check.sh   (some gradient providers)
#   STEPS=precision bash bench/gpu_check.sh, with .gpu_data carried too: what bf16 changes in the purified
#   images and the ResNet-56's predictions against fp32 with the same noise (issue 8's accuracy effect).
# The CIFAR-10 test batch and the classifiers are not on the lent machines either: copy them into the
# git-ignored .gpu_data/ (34 MiB) with
#   mkdir -p .gpu_data/cifar-10-batches-py && cp ../shared/data/cifar-10-batches-py/test_batch .gpu_data/cifar-10-batches-py/ \
#     && cp -r ../shared/data/classifiers .gpu_data/
# torchsde is not on the lent machines: carry its wheels, fetched here into the git-ignored .whl/ with
#   pip download --no-deps --only-binary=:all: --python-version 3.12 -d .whl torchsde==0.2.6 trampoline==0.1.2
# Durations seen on an H200 (2026-11-27): gn about 75 s without torch.compile and 70 s more for its fp16
# compiles, attn 76 s, grad well over 190 s at batch 64 (two providers done in 190 s), tests over 120 s (the
# fp32 head_dim-512 attention kernels compile slowly): all four do not fit one 10-minute call. Second session:
# graphs 117 s; purify at batch 256 over 200 s for its first three providers, batch 64 163 s, batch 1 68 s.
# Third session (2026-11-28): purify at batch 256, torchsde + tf32 + bf16, 159 s; grad no-grad-purify 26 s,
# rdp-adjoint 97 s, torchsde-adjoint 74 s; profile 15 s; repeat 70 s alone, over 90 s beside the tests, which
# with 8 xdist workers got through 74 of 91 in 200 s.
# Starting a machine took from 30 s to over 5 minutes of the session's device time.
set -u
OUT=${OUT:-/tmp/rdp-gpu-check}
mkdir -p "$OUT"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=$PYTHONPATH:/tmp/site
fi
# A plain checkout has the Triton kernels in kernels/, which an install maps to rdp_core.kernels.
[ -e rdp_core/kernels ] || ln -s ../kernels rdp_core/kernels
log=$OUT/log.txt
{ date -u; nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm --format=csv,noheader
  python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"; } 2>&1 | tee -a "$log"

# BUDGET (seconds, optional): the whole script's; a step gets what is left of it when that is less than its own
# limit, and is skipped with a line in the log when under 20 s are left, so the script ends before the call's.
BUDGET=${BUDGET:-100000}
step() {  # step LIMIT_S COMMAND...: run under a time limit, log its output, its exit status and its duration
  local limit=$1 start=$SECONDS left=$((BUDGET - SECONDS - 5)); shift
  [ "$left" -lt "$limit" ] && limit=$left
  if [ "$limit" -lt 20 ]; then echo "=== skipped, ${left} s of the budget left: $*" | tee -a "$log"; return; fi
  echo "=== $* (limit ${limit} s)" | tee -a "$log"
  timeout "$limit" "$@" 2>&1 | tee -a "$log"
  echo "=== exit ${PIPESTATUS[0]} after $((SECONDS - start)) s" | tee -a "$log"
}

PYTEST=(python3 -m pytest -q -p no:cacheprovider -rs)
# The tests verbose (no -q): with xdist, each result is printed with its name as it comes, so a step stopped
# by its limit still says which passed and which failed.
TESTS=(python3 -m pytest -p no:cacheprovider -v -rfEs --durations=15 -n "${TEST_WORKERS:-8}" --timeout=90)
BENCH=("${PYTEST[@]}" --benchmark-only --benchmark-group-by=group --benchmark-columns=median,iqr,rounds)
STEPS=${STEPS:-tests gn attn grad}
for s in $STEPS; do case $s in
  # Spread over xdist workers (pytest-xdist is on the lent machines): the Triton compiles are CPU-bound, one
  # per kernel; pytest-timeout stops one that hangs. RDP_CORE_TRITON_AUTOTUNE=0: one compile per attention
  # kernel (its smallest config) instead of up to four; one test turns autotuning back on to sign off the
  # tuned configs.
  tests) step 300 env RDP_CORE_TRITON_AUTOTUNE=0 "${TESTS[@]}" tests/kernels/test_models_on_gpu.py \
        tests/sampling/test_graphs.py tests/sampling/test_precision.py tests/kernels --junitxml="$OUT/tests.xml" ;;
  graphs) step 120 "${TESTS[@]}" tests/sampling/test_graphs.py --junitxml="$OUT/graphs.xml" ;;
  # Batch 256 first: the targets are at that batch.
  # PURIFY_BATCHES / PURIFY_PROVIDERS (a -k expression) narrow it, e.g. PURIFY_BATCHES=256
  # PURIFY_PROVIDERS="torchsde or tf32 or bf16": the IEEE float32 rows take most of the time at batch 256.
  purify) for b in ${PURIFY_BATCHES:-256 64 1}; do
            step 200 "${BENCH[@]}" bench/bench_purify.py -k "gpu and $b- and (${PURIFY_PROVIDERS:-fp32 or tf32 or bf16})" \
              --benchmark-min-rounds=1 --benchmark-json="$OUT/bench-purify-$b.json"
          done ;;
  # Where a bf16 forward at batch 64 spends its GPU time, per kind of op and per kernel, NCHW against
  # channels-last cuDNN: reads why the bf16 purification reaches 17% of the matmul ceiling.
  profile) step 90 python3 bench/profile_model.py --device cuda --batch 64 --precision bf16 --top 15 \
             --providers rdp,rdp-channels-last,torch-eager,torch-eager-channels-last ;;
  # Eager AGDM against itself beside graphed against eager: reads the graph tests' AGDM failures.
  repeat) step 90 python3 bench/gpu/agdm_repeatability.py ;;
  precision) step 200 python3 -m rdp_core.cli purify --data "${GPU_DATA:-.gpu_data}" --device cuda \
               --n-images "${PRECISION_IMAGES:-2000}" --batch-size 250 --precision bf16 --out "$OUT/purify-bf16" ;;
  gn) step 150 "${BENCH[@]}" bench/bench_group_norm_silu.py -k gpu \
        --benchmark-warmup=on --benchmark-max-time=0.25 --benchmark-json="$OUT/bench-gn.json" ;;
  attn) step 120 "${BENCH[@]}" bench/bench_attention.py -k gpu \
        --benchmark-warmup=on --benchmark-max-time=0.25 --benchmark-json="$OUT/bench-attn.json" ;;
  # One pytest per provider, each writing its own JSON: a limit that stops one keeps the others' figures.
  grad) for p in ${GRAD_PROVIDERS:-no-grad-purify rdp-adjoint torchsde-adjoint rdp-adjoint-graphed \
        checkpoint-per-step autograd}; do
          step 150 "${BENCH[@]}" bench/bench_gradient.py -k "cuda-$p]" --benchmark-min-rounds=1 \
            --benchmark-json="$OUT/bench-grad-$p.json"
        done ;;
  *) step 600 "${BENCH[@]}" "bench/bench_$s.py" -k cuda --benchmark-json="$OUT/bench-$s.json" ;;
esac; done
# The device tool returns at most 8 files: one archive holds the JSON and XML results.
(cd "$OUT" && shopt -s nullglob && results=(*.json *.xml) && [ ${#results[@]} -gt 0 ] \
  && tar czf results.tar.gz "${results[@]}" && rm -f "${results[@]}")
