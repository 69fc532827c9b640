#!/usr/bin/env bash
# The GPU results in one command (issue 19), on a fresh GPU machine with no network:
#
#   bash experiments/gpu_run.sh OUT_DIR
#
# Before, on a machine with PyPI: `python experiments/build_gpu_wheels.py` fills .whl/ (the wheels the
# GPU image lacks: tensorflow-datasets, array-record and their dependencies) and .data/wikitext-2/; both
# are git-ignored, so carry them beside the working tree. The package itself runs from the checkout
# (PYTHONPATH), nothing is fetched. The steps, in order, each under `timeout` with its own cap and never
# past the whole budget; a step that times out or fails is recorded and the next one runs:
#   install      pip install --no-index --find-links .whl -r .whl/requirements.txt into the image's python3
#   env          nvidia-smi and the versions; stops here (exit 2) if jax sees no GPU
#   data         python -m gpt2_jax.data: TFDS preparation, the 32k BPE, token streams (~7 s on 2 CPU cores)
#   bench        experiments/bench_gpu.py --grid=quick: MFU of small and medium (bf16), decoding of small
#   seed_small   experiments/seed_reproduction.py --sizes=small: the report's setup
#   seed_medium  experiments/seed_reproduction.py --sizes=medium
#   best_recipe  experiments/best_recipe.py with the time left (--time_limit), seed_small's run as baseline
# Running the same command again on the same machine (the device tool allows 600 s a command) goes on
# where the last call stopped: finished steps are skipped, a training that was cut resumes from its last
# checkpoint, bench keeps the rows it has. OUT_DIR receives three files, rewritten after every step, so
# a kill keeps what finished:
#   results.tar.gz  results/{bench/gpu.*, seed_reproduction/, best_recipe/, gpu_run/}: commit with
#                   `tar -xzf OUT_DIR/results.tar.gz -C experiments/` (gpu_run/ holds the summary, the
#                   environment, each step's log and each run's run.json, metrics.jsonl, evals.jsonl)
#   gpu_run.md      which steps finished, timed out, failed or were skipped, with their times
#   gpu_run.log     every step's output, all calls (also printed; each step's own in gpu_run/logs/)
# Exit code: 0 when every step has finished, 3 when some have not (run it again), 2 for a missing
# input or no GPU.
# Environment, defaulting to the GPU's values (experiments/rehearse_gpu_run.sh sets them for the CPU):
#   GPU_RUN_PYTHON       the image's Python (python3)
#   GPU_RUN_BUDGET_S     seconds for all steps (540: the device tool allows 600 per command)
#   GPU_RUN_WORK         run dirs, caches and the results tree (runs/gpu_run in the checkout)
#   GPU_RUN_EXTRA        train flags added to every training, e.g. a micro model for the rehearsal
#   GPU_RUN_BENCH_FLAGS  flags added to bench_gpu.py, e.g. --override=n_layer=1,... --steps=2
#   GPU_RUN_ALLOW_CPU    1: go on when jax sees no GPU (the rehearsal); 0 (default): stop
set -uo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
if [[ $# -ne 1 || -z $1 || $1 == -* ]]; then
    echo "usage: bash experiments/gpu_run.sh OUT_DIR   (see the comment at the top of the script)" >&2
    exit 2
fi
mkdir -p "$1" || { echo "gpu_run: cannot create the output folder $1" >&2; exit 2; }
OUT=$(cd "$1" && pwd)
PY=${GPU_RUN_PYTHON:-python3}
BUDGET=${GPU_RUN_BUDGET_S:-540}
WORK=${GPU_RUN_WORK:-$REPO/runs/gpu_run}
EXTRA=${GPU_RUN_EXTRA:-}
BENCH_FLAGS=${GPU_RUN_BENCH_FLAGS:-}
ALLOW_CPU=${GPU_RUN_ALLOW_CPU:-0}
WHL=$REPO/.whl
DATA=$REPO/.data/wikitext-2

for f in "$WHL/requirements.txt" "$DATA/wiki.train.tokens" "$DATA/wiki.valid.tokens" "$DATA/wiki.test.tokens"; do
    if [[ ! -f $f ]]; then
        echo "gpu_run: $f is missing: run python experiments/build_gpu_wheels.py on a machine with PyPI and carry .whl and .data" >&2
        exit 2
    fi
done
if ! [[ $BUDGET =~ ^[0-9]+$ ]]; then
    echo "gpu_run: GPU_RUN_BUDGET_S must be whole seconds, got '$BUDGET'" >&2
    exit 2
fi
if ! command -v "$PY" > /dev/null; then
    echo "gpu_run: GPU_RUN_PYTHON=$PY is not a command" >&2
    exit 2
fi

RES=$WORK/results
LOGS=$RES/gpu_run/logs
mkdir -p "$LOGS"
export PYTHONPATH=$REPO${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
export GPT2_JAX_DATA_DIR=$DATA GPT2_JAX_CACHE=$WORK/cache
# Each study process initialises jax before it starts training subprocesses: without this the first
# one would take 75% of the GPU's memory and the trainings would start short of it.
export XLA_PYTHON_CLIENT_PREALLOCATE=false
# The same train and eval steps compile in several processes (train, evaluate, the next trial).
export JAX_COMPILATION_CACHE_DIR=$WORK/jax_cache

START=$(date +%s)
DEADLINE=$((START + BUDGET))
STATE=$WORK/steps.txt # "call|step|status|seconds|limit|command", one a step, kept across calls
NOTES=$WORK/notes.txt # one a line, kept across calls
touch "$STATE" "$NOTES"
CALL=$(($(cut -d'|' -f1 "$STATE" | sort -n | tail -1) + 1))
echo "=== gpu_run call $CALL, $(date -u '+%Y-%m-%d %H:%M:%S UTC'), budget ${BUDGET} s" | tee -a "$OUT/gpu_run.log"

summary() {
    local f=$RES/gpu_run/summary.md
    {
        echo "# gpu_run, call $CALL: $(date -u -d "@$START" '+%Y-%m-%d %H:%M UTC')"
        echo
        echo "Device: ${DEVICE:-not read yet}. Budget ${BUDGET} s a call; $(($(date +%s) - START)) s of this call used."
        echo "Checkout: ${COMMIT}. Extra train flags: '--keep=1 ${EXTRA}'. Bench flags: '--grid=quick --resume ${BENCH_FLAGS}'."
        echo
        echo "| call | step | status | seconds | limit (s) | command |"
        echo "|---|---|---|---|---|---|"
        local k n s t l c
        while IFS='|' read -r k n s t l c; do
            echo "| $k | $n | $s | $t | $l | \`$c\` |"
        done < "$STATE"
        while read -r n; do echo; echo "$n"; done < "$NOTES"
        local pending=() name
        for name in install data bench seed_small seed_medium best_recipe; do
            finished "$name" || pending+=("$name")
        done
        if ((${#pending[@]})); then
            echo
            echo "Not finished: ${pending[*]}. The same command again on the same machine goes on from there."
        fi
        echo
        echo "Results: bench/gpu.md, seed_reproduction/summary.md, best_recipe/summary.md; logs in gpu_run/logs/."
    } > "$f"
    cp "$f" "$OUT/gpu_run.md"
}

pack() {  # the results tree (plus each run's small files) -> OUT_DIR/results.tar.gz
    local run
    for run in "$WORK"/runs/*/*/; do
        [[ -f $run/run.json ]] || continue
        local dst=$RES/gpu_run/runs/$(basename "$(dirname "$run")")/$(basename "$run")
        mkdir -p "$dst"
        cp "$run"/{run.json,metrics.jsonl,evals.jsonl} "$dst"/ 2> /dev/null
    done
    summary
    tar -czf "$OUT/results.tar.gz.part" -C "$WORK" results && mv "$OUT/results.tar.gz.part" "$OUT/results.tar.gz"
}

finished() {  # finished STEP: it finished in this call or an earlier one
    grep -q "^[0-9]*|$1|finished|" "$STATE"
}

note() {
    echo "$*" >> "$NOTES"
}

step() {  # step NAME CAP_S COMMAND...: run it under timeout, log it, record how it ended
    local name=$1 cap=$2
    shift 2
    if [[ $name != env ]] && finished "$name"; then
        echo "=== gpu_run $name: finished in an earlier call" | tee -a "$OUT/gpu_run.log"
        return 0
    fi
    local left=$((DEADLINE - $(date +%s)))
    local limit=$((cap < left ? cap : left))
    if ((limit < 15)); then
        echo "$CALL|$name|skipped: no time left|0|$limit|$*" >> "$STATE"
        pack
        return 1
    fi
    echo "=== gpu_run call $CALL, $name (limit ${limit} s): $*" | tee -a "$OUT/gpu_run.log" "$LOGS/$name.log"
    local t0=$(date +%s)
    # -k: a training stopped by SIGTERM saves a checkpoint first (medium: ~4 GB)
    timeout -k 20 "$limit" "$@" 2>&1 | tee -a "$OUT/gpu_run.log" "$LOGS/$name.log"
    local rc=${PIPESTATUS[0]}
    local took=$(($(date +%s) - t0)) status
    case $rc in
        0) status=finished ;;
        124 | 137) status="timed out" ;;
        3) status="stopped at its time limit" ;; # best_recipe: what did not fit is named in its summary
        *) status="failed (exit $rc)" ;;
    esac
    echo "=== gpu_run call $CALL, $name: $status after ${took} s" | tee -a "$OUT/gpu_run.log" "$LOGS/$name.log"
    echo "$CALL|$name|$status|$took|$limit|$*" >> "$STATE"
    pack
    return "$rc"
}

install_wheels() {
    "$PY" -m pip install --no-index --find-links "$WHL" -r "$WHL/requirements.txt" && return 0
    echo "gpu_run: pip found the image's packages short of what the wheels ask (above); installing the wheels without dependency checks"
    "$PY" -m pip install --no-index --no-deps --find-links "$WHL" -r "$WHL/requirements.txt"
}

check_env() {
    nvidia-smi || echo "gpu_run: no nvidia-smi"
    "$PY" - << 'EOF'
import importlib.metadata as md, platform, sys
import jax
print("python", sys.version.split()[0], platform.platform())
print("jax", jax.__version__, "backend", jax.default_backend(), "devices", jax.devices())
for name in ("jaxlib", "flax", "optax", "orbax-checkpoint", "chex", "tokenizers", "numpy", "protobuf", "etils",
             "tensorflow-datasets", "array-record", "tensorflow-metadata"):
    try:
        print(name, md.version(name))
    except md.PackageNotFoundError:
        print(name, "missing")
import array_record, tensorflow_datasets, gpt2_jax.data  # what install was for
EOF
}
export -f install_wheels check_env
export PY WHL

COMMIT=$(git -C "$REPO" rev-parse --short HEAD 2> /dev/null || echo "a copy without .git")
if [[ -n $(git -C "$REPO" status --porcelain --untracked-files=no 2> /dev/null) ]]; then
    COMMIT="$COMMIT with uncommitted changes"
fi

step install 120 bash -c install_wheels
if [[ -f $LOGS/install.log ]] && ! grep -q "^Install, call" "$NOTES"; then
    grep -q "installing the wheels without dependency checks" "$LOGS/install.log" &&
        note "Install, call $CALL: pip's dependency checks failed against the image (logs/install.log); the wheels went in with --no-deps."
    grep -q "^Successfully installed" "$LOGS/install.log" &&
        note "Install, call $CALL: $(grep '^Successfully installed' "$LOGS/install.log" | tail -1)."
fi

step env 60 bash -c check_env
cp "$LOGS/env.log" "$RES/gpu_run/env.txt"
BACKEND=$(grep '^jax .* backend ' "$LOGS/env.log" | tail -1 | awk '{print $4}')
DEVICE=$(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2> /dev/null | head -1)
DEVICE=${DEVICE:-"no GPU (jax backend ${BACKEND:-unknown})"}
if [[ $BACKEND != gpu && $BACKEND != cuda ]]; then
    if [[ $ALLOW_CPU != 1 ]]; then
        note "Stopped, call $CALL: jax sees no GPU (backend '${BACKEND:-none}'; logs/env.log says why). GPU_RUN_ALLOW_CPU=1 goes on anyway."
        pack
        echo "gpu_run: jax sees no GPU (backend '${BACKEND:-none}'), see $LOGS/env.log; stopped" >&2
        exit 2
    fi
    grep -q "^No GPU" "$NOTES" ||
        note "No GPU: jax backend '${BACKEND:-none}', going on because GPU_RUN_ALLOW_CPU=1 (a rehearsal: its numbers are not GPU results)."
fi

step data 120 "$PY" -m gpt2_jax.data
step bench 120 "$PY" experiments/bench_gpu.py --grid=quick --resume --out="$RES/bench" $BENCH_FLAGS
STUDY_FLAGS=(--dtype=bfloat16 --extra="--keep=1 $EXTRA")
step seed_small 180 "$PY" experiments/seed_reproduction.py --sizes=small --out="$RES/seed_reproduction" \
    --runs="$WORK/runs/seed_reproduction" "${STUDY_FLAGS[@]}"
step seed_medium 300 "$PY" experiments/seed_reproduction.py --sizes=medium --out="$RES/seed_reproduction" \
    --runs="$WORK/runs/seed_reproduction" "${STUDY_FLAGS[@]}"
BASELINE=()
finished seed_small && BASELINE=(--baseline_run="$WORK/runs/seed_reproduction/small")
LEFT=$((DEADLINE - $(date +%s)))
# 30 s of the time left for what follows a training (evaluations, samples) and for a clean stop.
step best_recipe "$LEFT" "$PY" experiments/best_recipe.py --time_limit=$((LEFT > 30 ? LEFT - 30 : 1)) \
    --out="$RES/best_recipe" --runs="$WORK/runs/best_recipe" "${BASELINE[@]}" "${STUDY_FLAGS[@]}"

pack
echo "=== gpu_run call $CALL done in $(($(date +%s) - START)) s; $OUT/results.tar.gz, $OUT/gpu_run.md:" | tee -a "$OUT/gpu_run.log"
cat "$OUT/gpu_run.md"
for name in install data bench seed_small seed_medium best_recipe; do
    finished "$name" || exit 3 # not all done: the same command again goes on
done
