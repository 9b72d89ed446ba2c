#!/usr/bin/env bash
# The whole GPU run (the performance issue 13's figures, issue 25's int4 decode), one command, under 8 min on an H200:
#
#     OUT=/some/dir bash tests/gpu_check.sh       # on the GPU machine ($OUT: where results go; default ./gpu_check_out)
#     GPU_CHECK_TOY=1 bash tests/gpu_check.sh     # the same parts at toy shapes on CPU (tests/test_gpu_check.py)
#
# Writes $OUT/gpu_check.json (every figure, added as soon as it is measured, then the parts' statuses, the CUDA
# test results and the targets), $OUT/gpu_check.log (everything printed), $OUT/cuda_tests.xml (pytest junit),
# $OUT/gpu_check_parts.tsv and $OUT/profile.txt (torch.profiler kernel tables of decode at batch 1, one LoRA step
# and one MoE layer: where the time went if a target is missed). Parts run in this order: correctness first, then
# the figures the targets need, the optional ones last; each has its own time limit, and none starts once the
# budget (GPU_CHECK_BUDGET_S, default 465 s) is too nearly spent. Estimates for an H200 (~4.3 TB/s copy, ~790
# TFLOP/s bf16) from the bytes and FLOPs each part moves, plus torch.compile time (a guess: ~50 s per 32-layer
# compile with a cold cache, ~10 s for one layer; never measured here):
#   env          8 s  versions, the copy bandwidth and bf16 matmul peak of this run
#   correctness 120 s pytest -m cuda: varlen packed rows, grouped-GEMM experts (plain/LoRA/NF4), NF4's fused decode
#                     matvec (Triton), int8/int4 Mixtral experts at their real widths, continuous
#                     batching, train/sft.py steps (nccl, bf16, CPU offload, QLoRA, MoE) against CPU float32,
#                     generate/batch.py end to end, then compiled decode (5 compiles of 1-layer models: the slow,
#                     uncertain part, so it comes last)
#   decode      150 s Llama-3-8B (32 layers) bf16, batch 1/8 x prompt 128/8192, eager then compiled (2 compiles,
#                     ~50 s each; ~2.5 s per batch-8 x 8K prefill); prefill of the 8K prompt from the same runs
#   moe          15 s one Mixtral MoE layer fwd+bwd over 8K tokens (~1.7e13 FLOPs): ours vs HF loop vs grouped_mm
#   lora         45 s LoRA r=16, Llama-3-8B, one 8K packed row, checkpointing (~4e14 FLOPs, ~1 s a step): ours vs
#                     HF + peft
#   workload     70 s Mixtral-8x7B (32 layers, 87 GiB bf16), 32 prompts x 8192 tokens, 512 new each, continuous
#                     batching on 32 rows: ~7e15 prefill FLOPs (~20 s) + 512 steps reading ~130 GB (~20 s)
#   hf_decode    40 s transformers generate (sdpa, eager) at the decode cases, 32 new tokens
#   int4_decode  60 s optional: Llama-3-8B weight-only int4 (torch._weight_int4pack_mm), batch 1, prompt 128, eager
#                     and compiled (one compile)
#   hf_static    90 s optional: HF static cache + compile (generate compiles itself), batch 1, prompt 128
#   full_ft      30 s optional: full fine-tuning, Llama-3.2-1B shape, ours vs HF (autocast)
# Sum of the required parts ~450 s of the 450 s the budget leaves them: the optional ones run only if the
# others finish early.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

PY=${PYTHON:-python3}
TOY=${GPU_CHECK_TOY:-0}
OUT=${OUT:-$PWD/gpu_check_out}
BUDGET=${GPU_CHECK_BUDGET_S:-465}
RESERVE=15  # seconds kept for the summary
mkdir -p "$OUT"
JSON=$OUT/gpu_check.json
PARTS=$OUT/gpu_check_parts.tsv
JUNIT=$OUT/cuda_tests.xml
rm -f "$JSON" "$PARTS" "$JUNIT" "$OUT/profile.txt"
: >"$OUT/gpu_check.log"
exec > >(tee -a "$OUT/gpu_check.log") 2>&1
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
START=$SECONDS

part() {  # part NAME ESTIMATE_S LIMIT_S MIN_S COMMAND...: run with the smaller of its limit and the budget left
    local name=$1 est=$2 cap=$3 min=$4
    shift 4
    local left=$((BUDGET - (SECONDS - START) - RESERVE))
    local limit=$((cap < left ? cap : left))
    if ((limit < min)); then
        echo "== $name: SKIPPED, ${left}s of the budget left (needs ${min}s)"
        printf '%s\tskipped (budget)\t0\t%s\t%s\n' "$name" "$est" "$limit" >>"$PARTS"
        return
    fi
    echo "== $name (estimate ${est}s on an H200, limit ${limit}s, t=$((SECONDS - START))s): $*"
    local t0=$SECONDS rc status
    timeout -k 10 "$limit" "$@"
    rc=$?
    if ((rc == 0)); then status=ok; elif ((rc == 124 || rc == 137)); then status=timeout; else status="failed ($rc)"; fi
    printf '%s\t%s\t%d\t%s\t%s\n' "$name" "$status" $((SECONDS - t0)) "$est" "$limit" >>"$PARTS"
    echo "== $name: $status after $((SECONDS - t0))s"
}

if [[ $TOY == 1 ]]; then  # toy shapes on CPU: every code path, seconds each
    DEV=(--device cpu)
    DECODE=(--shape tiny --dtype float32 --batch_sizes 1,2 --prompt_lens 16,48 --max_new_tokens 6 --iters 1)
    WORK=(--shape tiny-moe --dtype bfloat16 --n_prompts 6 --prompt_len 64 --new_tokens 8 --batch_size 4
          --extrapolate 20,96,16)
    HF_DECODE=(--shape tiny --dtype float32 --batch_sizes 1,2 --prompt_lens 16,48 --max_new_tokens 6 --iters 1)
    HF_STATIC=(--shape tiny --dtype float32 --batch_sizes 1 --prompt_lens 16 --max_new_tokens 6 --iters 1)
    INT4=(--shape tiny --dtype bfloat16 --batch_sizes 1 --prompt_lens 16 --max_new_tokens 6 --iters 1 --impls ours)
    TRAIN=(--tiny --seq_len 128 --moe_tokens 128 --iters 1)
    ENV_FLAGS=(--toy)
else
    DEV=(--device cuda)
    DECODE=(--shape llama3-8b --dtype bfloat16 --batch_sizes 1,8 --prompt_lens 128,8192 --max_new_tokens 64 --iters 2)
    WORK=(--shape mixtral-8x7b --dtype bfloat16 --n_prompts 32 --prompt_len 8192 --new_tokens 512 --batch_size 32
          --extrapolate 285,12288,1024)
    HF_DECODE=(--shape llama3-8b --dtype bfloat16 --batch_sizes 1,8 --prompt_lens 128,8192 --max_new_tokens 32
               --iters 1)
    HF_STATIC=(--shape llama3-8b --dtype bfloat16 --batch_sizes 1 --prompt_lens 128 --max_new_tokens 32 --iters 1)
    INT4=(--shape llama3-8b --dtype bfloat16 --batch_sizes 1 --prompt_lens 128 --max_new_tokens 32 --iters 1
          --impls ours,ours_compile)
    TRAIN=(--seq_len 8192 --moe_tokens 8192 --iters 2)
    ENV_FLAGS=()
fi

part env 8 40 5 "$PY" tests/gpu_check_report.py env --json "$JSON" "${DEV[@]}" "${ENV_FLAGS[@]}"
# one line per test as it finishes (the log keeps them if the part is cut short; the junit file is written at the end)
PYTEST_TIMEOUT=()
"$PY" -c "import pytest_timeout" 2>/dev/null && PYTEST_TIMEOUT=(--timeout 90)
part correctness 120 150 30 "$PY" -m pytest -m cuda tests/test_gpu_paths.py -vv -rfE -p no:cacheprovider \
    --junitxml="$JUNIT" "${PYTEST_TIMEOUT[@]}"
part decode 150 180 40 "$PY" generate/bench.py "${DECODE[@]}" "${DEV[@]}" --impls ours,ours_compile --json "$JSON" \
    --profile "$OUT/profile.txt"
part moe 15 40 10 "$PY" train/bench.py --cases moe "${TRAIN[@]}" "${DEV[@]}" --json "$JSON" \
    --profile "$OUT/profile.txt"
part lora 45 80 30 "$PY" train/bench.py --cases lora "${TRAIN[@]}" "${DEV[@]}" --json "$JSON" \
    --profile "$OUT/profile.txt"
part workload 70 110 40 "$PY" generate/bench.py --workload "${WORK[@]}" "${DEV[@]}" --json "$JSON"
part hf_decode 40 70 20 "$PY" generate/bench.py "${HF_DECODE[@]}" "${DEV[@]}" --impls hf --json "$JSON"
part int4_decode 60 120 30 "$PY" generate/bench.py "${INT4[@]}" "${DEV[@]}" --quantize int4 --json "$JSON" \
    --profile "$OUT/profile.txt"
part hf_static 90 150 40 "$PY" generate/bench.py "${HF_STATIC[@]}" "${DEV[@]}" --impls hf_static --json "$JSON"
part full_ft 30 60 20 "$PY" train/bench.py --cases full "${TRAIN[@]}" "${DEV[@]}" --json "$JSON"

"$PY" tests/gpu_check_report.py summary --json "$JSON" --parts "$PARTS" --junit "$JUNIT"
echo "== done in $((SECONDS - START))s; results in $OUT"
# exit 1 if a part failed or ran out of its time (skipped for lack of budget is not a failure)
! cut -f2 "$PARTS" | grep -qv -e '^ok$' -e '^skipped'
