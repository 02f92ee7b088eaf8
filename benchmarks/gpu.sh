#!/usr/bin/env bash
# The GPU benchmark on one CUDA GPU, offline, in under 8 minutes:
#
#     bash benchmarks/gpu.sh OUTDIR
#
# Runs the CUDA tests (pytest -m gpu), training throughput (with and without torch.compile), PGD attack
# throughput, one trial profiled end to end through Ray Tune and MLflow (phases, peak GPU memory), trial packing
# (1, 2, 4, 8 trials on the GPU as processes), stacked trials (K = 1, 4, 16 LeNet-5s / ResNet-20s as one vmapped
# model, benchmarks.stacking) and the evaluation engine against the original AutoAttack and torchattacks
# (benchmarks.evaluation), each under a timeout, writing <step>.json, log.txt (everything shown on screen), environment.txt and
# summary.md into OUTDIR. A failing or timed-out step is recorded and the next one still runs; the exit status
# is then 1. Exit 2: no CUDA device. Worst case by the timeouts: 150 + 130 + 80 + 110 + 140 + 120 + 150 s of
# steps, plus ~20 s of set-up; expected ~7 minutes.
#
# Python: $PYTHON if set, else the project's .venv/bin/python, else `python`; the project root found from this
# script's location goes first on PYTHONPATH, so this checkout's code is what runs.
# GCE_BENCH_ALLOW_CPU=1 runs the same steps on the CPU with short settings (to test this script without a GPU).
set -euo pipefail

if [[ $# -ne 1 || -z "${1:-}" ]]; then
  echo "usage: bash benchmarks/gpu.sh OUTDIR   (OUTDIR receives the JSON results, log.txt and summary.md)" >&2
  exit 64
fi
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
OUTDIR=$(realpath -m -- "$1")  # absolute before the cd below
LOG="$OUTDIR/log.txt"
cd "$ROOT"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1  # progress reaches log.txt and the screen as it happens

if [[ -n "${PYTHON:-}" ]]; then
  PY=$PYTHON
elif [[ -x "$ROOT/.venv/bin/python" ]]; then
  PY="$ROOT/.venv/bin/python"
else
  PY=python
fi

if ! "$PY" -c 'import torch' 2>/dev/null; then
  echo "error: $PY cannot import torch (create the environment with scripts/setup.sh, or set PYTHON=...)" >&2
  exit 2
fi
if "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
  DEVICE=cuda
  TRAIN_ARGS=(--epochs 5 --compile)
  ATTACK_ARGS=(--scale 20)
  PROFILE_ARGS=(--epochs 20)
  PACK_ARGS=(--concurrency 1 2 4 8 --seconds 15)
  EVAL_ARGS=(--models lenet5-ce,lenet5-at,resnet20-ce --points 1000 --eps 0.1,0.3)
  STACK_ARGS=(--models lenet5,resnet20 --stack 1 4 16 --seconds 3)
elif [[ "${GCE_BENCH_ALLOW_CPU:-}" == 1 ]]; then
  DEVICE=cpu
  TRAIN_ARGS=(--repeats 1)
  ATTACK_ARGS=(--scale 0.2 --steps 10)
  PROFILE_ARGS=(--epochs 2)
  PACK_ARGS=(--concurrency 1 2 --seconds 5)
  EVAL_ARGS=(--models lenet5-ce --points 40 --eps 0.3)
  STACK_ARGS=(--models lenet5 --stack 1 2 --seconds 1 --batches 3)
else
  build=$("$PY" -c 'import torch; print(f"torch {torch.__version__}, built for CUDA {torch.version.cuda}")')
  echo "error: no CUDA device visible to $PY ($build). This benchmark needs one GPU;" \
       "set GCE_BENCH_ALLOW_CPU=1 to run it on the CPU with short settings." >&2
  exit 2
fi

mkdir -p "$OUTDIR"
# Results of an earlier run in OUTDIR must not pass for this run's in the summary.
rm -f "$OUTDIR/cuda_tests.xml" "$OUTDIR"/{train_throughput,attack_throughput,trial_profile,packing,stacking,evaluation}.json \
  "$OUTDIR/summary.md"
echo "=== gpu.sh $(date -u +%Y-%m-%dT%H:%M:%SZ) in $ROOT, device $DEVICE ===" | tee -a "$LOG"
if [[ $DEVICE == cpu ]]; then
  echo "GCE_BENCH_ALLOW_CPU=1: no CUDA device, running the steps on the CPU with short settings" | tee -a "$LOG"
fi

{
  echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
  echo "host: $(uname -a)"
  echo "commit: $(git -C "$ROOT" rev-parse HEAD 2>/dev/null || echo unknown)"
  echo "uncommitted changes: $(git -C "$ROOT" status --porcelain 2>/dev/null | wc -l) files"
  echo "python: $PY"
  echo "device mode: $DEVICE"
  echo
  "$PY" -c 'import platform, torch
print("python", platform.python_version())
print("torch", torch.__version__, "| CUDA build", torch.version.cuda, "| cuDNN", torch.backends.cudnn.version())
print("cpu threads", torch.get_num_threads())
for i in range(torch.cuda.device_count()):
    p = torch.cuda.get_device_properties(i)
    print(f"cuda:{i} {p.name}, {p.total_memory / 2**30:.0f} GiB, capability {p.major}.{p.minor}")' || true
  echo
  if command -v nvidia-smi >/dev/null; then
    nvidia-smi || echo "(nvidia-smi failed)"
  else
    echo "(nvidia-smi not found)"
  fi
  echo
  echo "packages:"
  "$PY" -m pip freeze 2>/dev/null || "$PY" -c 'import importlib.metadata as m
print("\n".join(sorted(f"{d.name}=={d.version}" for d in m.distributions())))' || true
} > "$OUTDIR/environment.txt" 2>&1

FAILED=()
step() {  # step NAME TIMEOUT_S COMMAND...: run under a timeout, shown and appended to log.txt
  local name=$1 limit=$2 rc=0 start=$SECONDS
  shift 2
  echo "== $name: $* (timeout ${limit}s) ==" | tee -a "$LOG"
  timeout --kill-after=5 "$limit" "$@" 2>&1 | tee -a "$LOG" || rc=$?
  if [[ $rc -ne 0 ]]; then
    local why="exit status $rc"
    [[ $rc -eq 124 || $rc -eq 137 ]] && why="timed out after ${limit}s"
    echo "!! $name FAILED ($why)" | tee -a "$LOG"
    FAILED+=("$name ($why)")
  fi
  echo "== $name: $((SECONDS - start)) s ==" | tee -a "$LOG"
}

# The CUDA tests first (skipped on the CPU): a device that computes wrongly makes every figure below moot.
if [[ $DEVICE == cuda ]]; then
  step cuda_tests 150 "$PY" -m pytest -q -p no:cacheprovider -m gpu tests/ --junitxml="$OUTDIR/cuda_tests.xml"
fi
step train_throughput 130 "$PY" -m benchmarks.train_throughput --device "$DEVICE" ${TRAIN_ARGS[@]+"${TRAIN_ARGS[@]}"} --out "$OUTDIR"
step attack_throughput 80 "$PY" -m benchmarks.attack_throughput --device "$DEVICE" "${ATTACK_ARGS[@]}" \
  --out "$OUTDIR"
step trial_profile 110 "$PY" -m benchmarks.trial_profile --device "$DEVICE" "${PROFILE_ARGS[@]}" --out "$OUTDIR"
# A profile killed by its timeout leaves its MLflow server (own session) and Ray behind: they must not share
# the GPU with the packing step.
if [[ "${FAILED[*]-}" == *"trial_profile ("* ]]; then
  pkill -f gce-bench-profile- 2>/dev/null || true
  "$PY" -m ray.scripts.scripts stop --force >/dev/null 2>&1 || true
fi
step packing 140 "$PY" -m benchmarks.packing --device "$DEVICE" "${PACK_ARGS[@]}" --out "$OUTDIR"
step stacking 120 "$PY" -m benchmarks.stacking --device "$DEVICE" "${STACK_ARGS[@]}" --out "$OUTDIR"
step evaluation 150 "$PY" -m benchmarks.evaluation --device "$DEVICE" "${EVAL_ARGS[@]}" --out "$OUTDIR"

echo "== summary ==" | tee -a "$LOG"
"$PY" - "$OUTDIR" ${FAILED[@]+"${FAILED[@]}"} <<'EOF' 2>&1 | tee -a "$LOG" || FAILED+=("summary")
import json
import sys
from pathlib import Path

out, failed = Path(sys.argv[1]), sys.argv[2:]


def load(name):
    path = out / f"{name}.json"
    return json.loads(path.read_text()) if path.exists() else None


def num(x):
    if x is None or x != x:
        return "-"
    return f"{x:,.2f}" if abs(x) < 100 else f"{x:,.0f}"


rows, notes, env = [], [], None
train = load("train_throughput")
if train:
    env = train["environment"]
    base = train["rows"][0]
    for r in train["rows"][1:]:
        rows.append((f"LeNet-5 training: {r['method']}, images/s", r["images_per_s"], base["images_per_s"],
                     r["images_per_s"] / base["images_per_s"], base["method"]))
attack = load("attack_throughput")
if attack:
    env = env or attack["environment"]
    for r in attack["rows"]:
        rows.append((f"{r['attack'].split()[0]} on {r['model']} ({r['images']} images), images/s", r["images_per_s"],
                     r.get("torchattacks_images_per_s"), r.get("ratio"), "torchattacks PGD"))
profile = load("trial_profile")
if profile:
    env = env or profile["environment"]
    by = {r["phase"]: r for r in profile["rows"]}
    whole = by.get("whole trial", {}).get("seconds")
    for r in profile["rows"]:
        if r["phase"].startswith("peak"):
            rows.append((f"one trial: {r['phase']}", r["value"], None, None, ""))
        elif r["phase"] != "whole trial":
            rows.append((f"one trial ({num(whole)} s): {r['phase']}, s", r["seconds"], whole,
                         r["share_of_trial"], "share of the whole trial"))
packing = load("packing")
if packing:
    env = env or packing["environment"]
    solo = packing["rows"][0]["per_trial_images_per_s"]
    for r in packing["rows"]:
        n = r["concurrency"]
        rows.append((f"packing {n} trial{'s' if n > 1 else ''}, total images/s", r["total_images_per_s"], solo,
                     r["total_vs_solo"], f"1 trial alone; each at {r['per_trial_vs_solo']:.0%} of it "
                     f"(slowest {r['worst_vs_solo']:.0%}), {r['peak_mem_mb_per_trial']:,.0f} MB"))
        if n == 4:
            met = r["worst_vs_solo"] >= 0.8
            notes.append(f"Target (on a GPU, 4 packed small-model trials each keep >= 80% of their solo "
                         f"throughput): {'MET' if met else 'NOT MET'}, slowest of 4 at {r['worst_vs_solo']:.0%}.")

stacking = load("stacking")
if stacking:
    env = env or stacking["environment"]
    for r in stacking["rows"]:
        rows.append((f"{r['model']}: {r['K']} trials stacked (vmap), trials/hour of training",
                     r["stacked_trials_per_h"], r["sequential_trials_per_h"], r["stacked_vs_sequential"],
                     f"the same {r['K']} one after another; auto picks {r['auto_picks']}; GPU busy "
                     f"{num(r.get('stacked_gpu_util_pct'))}% vs {num(r.get('sequential_gpu_util_pct'))}%"))
    # Trials/hour of the paper_mnist setting (LeNet-5, 20 epochs x 54,000 images): one trial at a time, packed
    # processes (fractional GPUs) and stacks, all against one trial at a time.
    run_images = 20 * 54_000
    lenet = {r["K"]: r for r in stacking["rows"] if r["model"] == "lenet5"}
    alone = [lenet[1]["sequential_trials_per_h"]] if 1 in lenet else []
    if packing:
        solo_process = packing["rows"][0]["total_images_per_s"] * 3600 / run_images  # N = 1: a trial alone
        alone.append(solo_process)
        for r in packing["rows"]:
            per_h = r["total_images_per_s"] * 3600 / run_images
            rows.append((f"lenet5: {r['concurrency']} packed processes, trials/hour of training", per_h,
                         solo_process, per_h / solo_process, "one trial alone in its process"))
    # One trial at a time: the faster of its two measurements (in the stacking run and alone in a process).
    one = max(alone) if alone else None
    if one and lenet and max(lenet) > 1:
        k = max(lenet)
        ratio = lenet[k]["stacked_trials_per_h"] / one
        notes.append(f"Target (stacked LeNet-5 trials >= 10x the trials/hour of one trial at a time): "
                     f"{'MET' if ratio >= 10 else 'NOT MET'}, {ratio:.1f}x at K = {k}.")

evaluation = load("evaluation")
if evaluation:
    env = env or evaluation["environment"]
    for r in evaluation["rows"]:
        rows.append((f"{r['comparison']} on {r['model']} ({r['points']} points), images/s", r["ours_images_per_s"],
                     r["reference_images_per_s"], r["ratio"],
                     ("pyautoattack" if r["comparison"].startswith("AutoAttack") else "torchattacks")
                     + f"; robust {r['ours_robust']:.3f} vs {r['reference_robust']:.3f}"))

junit = out / "cuda_tests.xml"
if junit.exists():
    import xml.etree.ElementTree as ET

    suite = ET.parse(junit).getroot()
    suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
    counts = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
    notes.insert(0, f"CUDA tests (pytest -m gpu): {counts['tests']} run, {counts['failures']} failed, "
                    f"{counts['errors']} errors, {counts['skipped']} skipped.")

lines = []
if env:
    lines.append(f"Device: {env['device']}, torch {env['torch']}, Python {env['python']}")
    lines.append("")
lines.append("| benchmark | ours | baseline | ratio | baseline is |")
lines.append("|---|---:|---:|---:|---|")
lines += [f"| {b} | {num(o)} | {num(base)} | {num(r)} | {what} |" for b, o, base, r, what in rows]
lines.append("")
lines.append("Ratio > 1: ours is faster than the baseline measured in the same run; for packing, how many solo "
             "trials' worth of images the packed trials process together.")
for name in ("train_throughput", "attack_throughput", "trial_profile", "packing", "stacking", "evaluation"):
    if not (out / f"{name}.json").exists():
        notes.append(f"{name}.json missing: that step produced no result.")
notes += [f"FAILED: {f}" for f in failed]
lines += [""] + notes if notes else []
text = "\n".join(lines) + "\n"
(out / "summary.md").write_text(text)
print(text, end="")
EOF

echo "gpu.sh: ${SECONDS}s in all; results in $OUTDIR" | tee -a "$LOG"
if [[ $DEVICE == cuda && $SECONDS -gt 480 ]]; then
  echo "gpu.sh: warning: over the 8-minute budget" | tee -a "$LOG" >&2
fi
if [[ ${#FAILED[@]} -gt 0 ]]; then
  echo "gpu.sh: ${#FAILED[@]} step(s) failed: ${FAILED[*]} (details in $LOG)" | tee -a "$LOG" >&2
  exit 1
fi
