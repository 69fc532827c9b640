#!/usr/bin/env bash
# CPU rehearsal of the GPU run: the exact experiments/gpu_run.sh, from a clean clone, with micro overrides.
#
#   bash experiments/rehearse_gpu_run.sh [ROOT]      # ROOT defaults to /tmp/gpu_rehearsal (wiped first)
#
# What it does, so that a missing wheel, a wrong path or a flag typo shows up here and not on the GPU:
#   1 clone    git clone of this repository's committed HEAD into ROOT/p (uncommitted edits are not in it)
#   2 wheels   experiments/build_gpu_wheels.py in the clone, for THIS machine's Python (the GPU's is 3.12):
#              ROOT/p/.whl and ROOT/p/.data/wikitext-2, as the device would get them
#   3 image    STANDING IN FOR THE GPU IMAGE: a fresh virtualenv ROOT/image with the packages the image
#              holds (.whl/image-provided.txt: jax, flax, optax, orbax, ...) from PyPI; checked to lack
#              tensorflow-datasets and array-record, which must then come from .whl alone
#   4 call 1   bash experiments/gpu_run.sh ROOT/out with GPU_RUN_ALLOW_CPU=1, JAX_PLATFORMS=cpu, a micro model
#              (1 layer, width 64, vocab 512, 8 steps), a smaller budget, no pip configuration and a dead
#              proxy (nothing can be fetched: a download attempt fails as it would on the GPU)
#              (call 1's budget leaves best_recipe time for a trial or two: it stops at its time limit)
#   5 call 2   the same command again: finished steps are skipped, best_recipe goes on from its last trial
#   6 checks   exit codes, the steps' status, what came back (at most 8 files, 16 MiB each, 2 folders
#              deep: the device tool's limits), the tarball's layout, tensorflow-datasets installed from .whl
# Prints PASS or FAIL (exit 1) and the time of each part. Needs the network to PyPI for parts 2-3 only.
# Environment: REHEARSAL_PYTHON (python3), REHEARSAL_BUDGET_S (240, call 1), REHEARSAL_BUDGET2_S (150),
# GPT2_JAX_DATA_DIR (../shared/data/wikitext-2 beside the repository).
set -euo pipefail

SRC=$(git -C "$(dirname "${BASH_SOURCE[0]}")" rev-parse --show-toplevel)
ROOT=${1:-/tmp/gpu_rehearsal}
BASE_PY=${REHEARSAL_PYTHON:-python3}
DATA=${GPT2_JAX_DATA_DIR:-$SRC/../shared/data/wikitext-2}
if [[ ! -f $DATA/wiki.train.tokens ]]; then
    echo "rehearse: no WikiText-2 in $DATA: set GPT2_JAX_DATA_DIR to the folder with wiki.{train,valid,test}.tokens" >&2
    exit 2
fi
case $ROOT in /|"$SRC"|"$SRC"/*) echo "rehearse: ROOT=$ROOT would wipe the repository" >&2; exit 2 ;; esac
rm -rf "$ROOT"
mkdir -p "$ROOT"
T0=$(date +%s)
lap() { echo "--- rehearse: $1 ($(($(date +%s) - T0)) s so far)"; }
FAILS=()
check() {  # check DESCRIPTION COMMAND...
    if "${@:2}" > /dev/null 2>&1; then echo "  ok: $1"; else echo "  FAILED: $1"; FAILS+=("$1"); fi
}

git clone -q "$SRC" "$ROOT/p"
echo "rehearse: clone of $(git -C "$ROOT/p" log -1 --format='%h %s' | cut -c1-100)"
[[ -z $(git -C "$SRC" status --porcelain --untracked-files=no -- experiments) ]] ||
    echo "rehearse: note: $SRC has uncommitted changes under experiments/; the clone has the committed ones only"
cd "$ROOT/p"
lap "cloned"

PYV=$("$BASE_PY" -c 'import platform; print(platform.python_version())')
"$BASE_PY" experiments/build_gpu_wheels.py --python_version="$PYV" --data_dir="$DATA" 2>&1 | grep -v "^WARNING: Location"
lap "wheel folder built for Python $PYV"

echo "rehearse: standing in for the GPU image: $ROOT/image from PyPI with .whl/image-provided.txt"
"$BASE_PY" -m venv "$ROOT/image"
"$ROOT/image/bin/python" -m pip install -q -r .whl/image-provided.txt 2>&1 | grep -v "^WARNING: Location" || true
"$ROOT/image/bin/python" -c 'import jax, flax, optax, orbax.checkpoint, tokenizers; print("  image stand-in: jax", jax.__version__)'
check "the stand-in image lacks tensorflow-datasets and array-record" "$ROOT/image/bin/python" -c '
import importlib.util as u, sys
sys.exit(any(u.find_spec(m) for m in ("tensorflow_datasets", "array_record")))'
lap "image stand-in ready"

MICRO="--n_layer=1 --d_model=64 --n_head=2 --d_ff=128 --vocab_size=512 --batch_size=8 --max_steps=8 --warmup_steps=2 --eval_every=4 --ckpt_every=4"
BENCH="--override=n_layer=1,d_model=64,n_head=2,d_ff=128,vocab_size=512 --batch_size=8 --steps=1 --new_tokens=8"
gpu_run() {  # gpu_run BUDGET_S: the exact script, the CPU standing in for the GPU, nothing to fetch
    env -u PIP_FIND_LINKS -u PIP_EXTRA_INDEX_URL -u PIP_INDEX_URL -u NO_PROXY -u no_proxy PIP_CONFIG_FILE=/dev/null \
        HTTP_PROXY=http://127.0.0.1:9 HTTPS_PROXY=http://127.0.0.1:9 http_proxy=http://127.0.0.1:9 \
        https_proxy=http://127.0.0.1:9 \
        JAX_PLATFORMS=cpu GPU_RUN_ALLOW_CPU=1 GPU_RUN_PYTHON="$ROOT/image/bin/python3" GPU_RUN_BUDGET_S="$1" \
        GPU_RUN_EXTRA="$MICRO" GPU_RUN_BENCH_FLAGS="$BENCH" \
        bash experiments/gpu_run.sh "$ROOT/out"
}
set +e
ablations() {  # how many best_recipe trainings the results name
    "$ROOT/image/bin/python" -c "import json; print(len(json.load(open('runs/gpu_run/results/best_recipe/metrics.json'))['ablations']))" 2> /dev/null || echo 0
}
gpu_run "${REHEARSAL_BUDGET_S:-240}" > "$ROOT/call1.log" 2>&1
RC1=$?
lap "call 1 of gpu_run.sh exited $RC1 (log $ROOT/call1.log)"
cp "$ROOT/out/gpu_run.md" "$ROOT/call1.md"
cat "$ROOT/call1.md"
ABL1=$(ablations)
gpu_run "${REHEARSAL_BUDGET2_S:-150}" > "$ROOT/call2.log" 2>&1
RC2=$?
set -e
lap "call 2 of gpu_run.sh exited $RC2 (log $ROOT/call2.log)"
echo
cat "$ROOT/out/gpu_run.md"
echo

STATE=runs/gpu_run/steps.txt
status_of() { grep "^$1|$2|" "$STATE" | tail -1 | cut -d'|' -f3; }
check "call 1 exited 3 (not all done)" test "$RC1" = 3
check "call 2 exited 0 or 3" test "$RC2" = 0 -o "$RC2" = 3
for s in install env data bench seed_small seed_medium; do
    check "call 1: $s finished" test "$(status_of 1 $s)" = finished
done
check "call 2: no step that had finished ran again" test -z "$(grep '^2|' "$STATE" | cut -d'|' -f2 | grep -v -x -e env -e best_recipe)"
check "call 1: best_recipe stopped at its time limit" grep -q "^1|best_recipe|stopped at its time limit|" "$STATE"
ABL2=$(ablations)
check "call 2: best_recipe went on ($ABL1 -> $ABL2 ablations)" test "$ABL2" -gt "$ABL1"
check "call 2: best_recipe finished or stopped at its time limit" \
    grep -Eq "^2\|best_recipe\|(finished|stopped at its time limit)\|" "$STATE"
check "tensorflow-datasets was installed from the wheel folder" \
    grep -Eq "Processing .*/\.whl/tensorflow_datasets-" runs/gpu_run/results/gpu_run/logs/install.log
check "nothing tried the network" bash -c "! grep -rqiE 'ProxyError|Max retries exceeded|Connection refused' runs/gpu_run/results/gpu_run/logs"
N=$(find "$ROOT/out" -type f | wc -l)
check "what comes back: $N files (at most 8)" test "$N" -le 8
check "what comes back: every file at most 16 MiB" test -z "$(find "$ROOT/out" -type f -size +16M)"
check "what comes back: at most 2 folders deep" test -z "$(find "$ROOT/out" -mindepth 3)"
tar -tzf "$ROOT/out/results.tar.gz" > "$ROOT/tar.txt"
for f in results/bench/gpu.json results/bench/gpu.md results/seed_reproduction/metrics.json \
    results/seed_reproduction/summary.md results/seed_reproduction/samples.md results/seed_reproduction/small_loss.png \
    results/seed_reproduction/medium_loss.png results/best_recipe/metrics.json results/best_recipe/summary.md \
    results/gpu_run/summary.md results/gpu_run/env.txt results/gpu_run/logs/seed_medium.log \
    results/gpu_run/runs/seed_reproduction/small/metrics.jsonl; do
    check "results.tar.gz holds $f" grep -qx "$f" "$ROOT/tar.txt"
done
mkdir -p "$ROOT/commit_check/experiments"
tar -xzf "$ROOT/out/results.tar.gz" -C "$ROOT/commit_check/experiments"
check "seed_reproduction has small and medium" "$ROOT/image/bin/python" -c "
import json, sys; r = json.load(open('$ROOT/commit_check/experiments/results/seed_reproduction/metrics.json'))
sys.exit(sorted(r['runs']) != ['medium', 'small'])"
echo "  sizes: $(du -h "$ROOT/out/results.tar.gz" | cut -f1) results.tar.gz; .whl $(du -sh .whl | cut -f1), .data $(du -sh .data | cut -f1)"
echo "  best_recipe: $(grep -E '^(Recipe|Not run)' "$ROOT/commit_check/experiments/results/best_recipe/summary.md" | tr '\n' ' ' | cut -c1-400)"

lap "checked"
if ((${#FAILS[@]})); then
    echo "rehearse: FAIL (${#FAILS[@]}): ${FAILS[*]}"
    exit 1
fi
echo "rehearse: PASS in $(($(date +%s) - T0)) s"
