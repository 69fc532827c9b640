"""Fault injection: training killed at random moments, a second process, a full or unwritable disk.

Each test runs the real CLI (``python -m gpt2_jax.train``) in subprocesses on the micro model
and compares the end result with one uninterrupted run of the same command: the same steps,
each once, with bit-identical losses, evaluations, parameters and optimizer state. What each
fault test tried is printed (``pytest -s`` shows it); the README's "what survives what" table
quotes those figures.
"""

import json
import os
import pathlib
import random
import re
import resource
import signal
import socket
import subprocess
import sys
import time

import chex
import jax
import orbax.checkpoint as ocp
import pytest

from gpt2_jax import pretrained, rundir
from gpt2_jax import checkpoint as ckpt
from gpt2_jax.errors import UserError
from gpt2_jax.metrics import read_jsonl

REPO = pathlib.Path(__file__).resolve().parents[1]
MICRO = ["--vocab_size=512", "--n_ctx=16", "--n_layer=2", "--d_model=32", "--n_head=4", "--d_ff=64",
         "--batch_size=8", "--eval_batch_size=1024", "--warmup_steps=5", "--lr=3e-3", "--quiet"]
# 100 steps, a checkpoint every 5, an evaluation (and a plot) every 25, metrics fetched every 3 steps.
FLAGS = [*MICRO, "--max_steps=100", "--ckpt_every=5", "--eval_every=25", "--log_every=3"]
STEP_FIELDS = ("step", "loss", "grad_norm", "param_norm", "lr")  # tokens_per_s is a clock reading


def _cmd(run_dir, *extra):
    return [sys.executable, "-m", "gpt2_jax.train", f"--run_dir={run_dir}", *FLAGS, *extra]


def _start(cli_env, run_dir, *extra, prefix=()) -> subprocess.Popen:
    return subprocess.Popen([*prefix, *_cmd(run_dir, *extra)], env=cli_env, cwd=REPO, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)


def _finish(cli_env, run_dir, *extra) -> subprocess.CompletedProcess:
    p = subprocess.run(_cmd(run_dir, *extra), env=cli_env, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0 and p.stderr.startswith("done: 100 steps"), p.stderr[-3000:]
    return p


def _step_records(run_dir):
    return [tuple(r[k] for k in STEP_FIELDS) for r in read_jsonl(pathlib.Path(run_dir) / rundir.METRICS_FILE)]


def _last_logged_step(run_dir) -> int:
    return max((r[0] for r in _step_records(run_dir)), default=0)


def _state(run_dir, step):
    """Params and optimizer state as saved (no target: the arrays exactly as written)."""
    # Orbax itself, not our wrapper: the independent reader of what was written.
    manager = ocp.CheckpointManager(run_dir / rundir.CHECKPOINT_DIR, options=ocp.CheckpointManagerOptions(create=False))
    try:
        out = manager.restore(step, args=ocp.args.Composite(params=ocp.args.StandardRestore(),
                                                            opt_state=ocp.args.StandardRestore()))
    finally:
        manager.close()
    return jax.device_get({"params": out["params"], "opt_state": out["opt_state"]})


def _assert_same_run(run_dir, reference):
    """Every step once with the reference's values; same evaluations; same final state, bit for bit."""
    assert _step_records(run_dir) == _step_records(reference)
    assert [r[0] for r in _step_records(run_dir)] == list(range(1, 101))
    assert read_jsonl(run_dir / rundir.EVALS_FILE) == read_jsonl(reference / rundir.EVALS_FILE)
    chex.assert_trees_all_equal(_state(run_dir, 100), _state(reference, 100))
    assert ckpt.complete_steps(run_dir / rundir.CHECKPOINT_DIR) == ckpt.complete_steps(reference / rundir.CHECKPOINT_DIR)
    assert not (run_dir / rundir.CORRUPT_DIR).exists(), "a committed checkpoint was damaged"


@pytest.fixture(scope="module")
def reference(cli_env, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("faults") / "uninterrupted"
    _finish(cli_env, run_dir)
    return run_dir


# ---------------------------------------------------------------- SIGKILL at random moments


def _new_entries(folder: pathlib.Path, since_ns: int, pattern: str) -> list[str]:
    try:
        entries = list(os.scandir(folder))
    except FileNotFoundError:
        return []
    out = []
    for e in entries:
        try:
            if re.fullmatch(pattern, e.name) and e.stat().st_ctime_ns >= since_ns:
                out.append(e.name)
        except FileNotFoundError:  # renamed (committed) while we looked
            continue
    return out


def _wait_and_kill(proc, run_dir, mode, delay, deadline=120.0):
    """Kill ``proc`` with SIGKILL: after ``delay`` s ("anytime"), as soon as a checkpoint starts being
    written ("mid_save"), or as soon as one is complete ("after_save"). Returns False if it ended first."""
    checkpoints = run_dir / rundir.CHECKPOINT_DIR
    start_ns, t0 = time.time_ns() - 10**9, time.monotonic()  # ctime has coarse ticks: look 1 s back
    before = set(ckpt.complete_steps(checkpoints))
    while proc.poll() is None:
        elapsed = time.monotonic() - t0
        assert elapsed < deadline, "the run neither progressed nor ended"
        if mode == "anytime" and elapsed >= delay:
            break
        if mode == "mid_save" and _new_entries(checkpoints, start_ns, r"\d+\.orbax-checkpoint-tmp.*"):
            break
        if mode == "after_save" and set(ckpt.complete_steps(checkpoints)) - before:
            break
        time.sleep(0.001)
    if proc.poll() is not None:
        return False
    proc.kill()
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    return True


@pytest.mark.slow
def test_killed_at_random_moments_and_rerun_each_time_ends_bitwise_identical_to_the_uninterrupted_run(
        cli_env, reference, tmp_path):
    run_dir = tmp_path / "killed"
    rng = random.Random(20261125)
    modes = ["anytime", "mid_save", "after_save"]
    kills = []
    for i in range(18):
        mode, delay = modes[i % 3], rng.uniform(0.0, 6.0)
        proc = _start(cli_env, run_dir)
        if not _wait_and_kill(proc, run_dir, mode, delay):
            assert proc.returncode == 0, proc.stderr.read()[-3000:]
            break
        partial = _new_entries(run_dir / rundir.CHECKPOINT_DIR, 0, r"\d+\.orbax-checkpoint-tmp.*")
        kills.append({"mode": mode, "after_s": round(delay, 2) if mode == "anytime" else None,
                      "last_logged_step": _last_logged_step(run_dir) if run_dir.exists() else 0,
                      "partial_checkpoint_left": bool(partial)})
    _finish(cli_env, run_dir)
    print(f"\nfault injection: {len(kills)} SIGKILLs, {sum(k['partial_checkpoint_left'] for k in kills)} of them "
          f"left a half-written checkpoint; steps reached when killed: {[k['last_logged_step'] for k in kills]}")
    assert len(kills) >= 12, kills
    assert any(k["partial_checkpoint_left"] for k in kills), "no kill landed in the middle of a save"
    _assert_same_run(run_dir, reference)
    assert not _new_entries(run_dir / rundir.CHECKPOINT_DIR, 0, r".*orbax-checkpoint-tmp.*")  # leftovers cleaned


# ---------------------------------------------------------------- one process per run directory


@pytest.mark.slow
def test_a_second_process_on_a_run_dir_in_use_is_refused_and_a_killed_holder_leaves_no_lock(cli_env, tmp_path):
    run_dir = tmp_path / "busy"
    holder = _start(cli_env, run_dir, "--max_steps=100000", "--ckpt_every=100000", "--eval_every=100000")
    deadline = time.monotonic() + 120
    while not _step_records(run_dir):  # training under way
        assert holder.poll() is None and time.monotonic() < deadline
        time.sleep(0.05)
    files = {p: p.stat().st_mtime_ns for p in run_dir.rglob("*") if p.is_file() and p.name != rundir.METRICS_FILE}
    second = subprocess.run(_cmd(run_dir, "--max_steps=100000", "--ckpt_every=100000", "--eval_every=100000"),
                            env=cli_env, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert second.returncode == 2
    assert re.fullmatch(rf"error: --run_dir={re.escape(str(run_dir))} is in use by another training process "
                        rf"\(pid {holder.pid} on {re.escape(socket.gethostname())}, since [0-9: -]+\); wait for it "
                        r"to end or stop it \(a stopped run resumes\), or choose another --run_dir\n", second.stderr), \
        second.stderr
    assert holder.poll() is None, "the refused process disturbed the running one"
    assert {p: p.stat().st_mtime_ns for p in files} == files
    holder.kill()
    holder.wait()
    with rundir.locked_run_dir(run_dir):  # the kernel dropped the dead holder's lock
        assert json.loads((run_dir / rundir.LOCK_FILE).read_text())["pid"] == os.getpid()


def test_lock_is_exclusive_released_on_exit_and_a_directory_it_created_for_nothing_is_removed(tmp_path):
    fresh = tmp_path / "fresh"
    with rundir.locked_run_dir(fresh):
        with pytest.raises(UserError, match=rf"is in use by another training process \(pid {os.getpid()} on "):
            with rundir.locked_run_dir(fresh):
                pass
    assert not fresh.exists()  # created, nothing written: gone again
    kept = tmp_path / "kept"
    with rundir.locked_run_dir(kept):
        (kept / "run.json").write_text("{}")
    with rundir.locked_run_dir(kept):  # released: can be taken again
        pass
    assert sorted(p.name for p in kept.iterdir()) == ["run.json", rundir.LOCK_FILE]
    (tmp_path / "file").write_text("")
    with pytest.raises(UserError, match="is a file, not a directory"):
        with rundir.locked_run_dir(tmp_path / "file"):
            pass


# ---------------------------------------------------------------- a full disk, an unwritable run dir


# Writes past the limit then fail with EFBIG instead of killing the process (an ignored signal stays
# ignored across exec; no preexec_fn, which would fork this multithreaded JAX process).
IGNORE_SIGXFSZ = ("sh", "-c", 'trap "" XFSZ; exec "$@"', "sh")


INTACT = (r"; the newest complete checkpoint, step (\d+), is intact; free disk space or make the folder "
          r"writable, then run the same command to resume\n")


@pytest.mark.slow
@pytest.mark.parametrize("what", ["checkpoint", "metrics"])
def test_a_full_disk_stops_with_one_line_keeps_the_last_checkpoint_and_the_rerun_resumes_identically(
        cli_env, reference, tmp_path, what):
    """The disk fills up under a running job: RLIMIT_FSIZE lowered on the live process (prlimit)
    makes every later write past the limit fail in the kernel, for Python's writes and Orbax's
    (TensorStore's C++) alike. 40 kB: the metrics log fits, a checkpoint's array file does not."""
    run_dir = tmp_path / "full"
    proc = _start(cli_env, run_dir, prefix=IGNORE_SIGXFSZ)
    deadline = time.monotonic() + 120
    while 5 not in ckpt.complete_steps(run_dir / rundir.CHECKPOINT_DIR):
        assert proc.poll() is None and time.monotonic() < deadline
        time.sleep(0.001)
    limit = 40_000 if what == "checkpoint" else (run_dir / rundir.METRICS_FILE).stat().st_size
    resource.prlimit(proc.pid, resource.RLIMIT_FSIZE, (limit, limit))
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 2, err
    where = (rf"a checkpoint in {re.escape(str(run_dir / rundir.CHECKPOINT_DIR))}" if what == "checkpoint"
             else f"to {re.escape(str(run_dir / rundir.METRICS_FILE))}")
    m = re.fullmatch(rf"error: cannot write {where} \(File too large\){INTACT}", err)
    assert m, err
    intact = int(m.group(1))
    assert intact == max(ckpt.complete_steps(run_dir / rundir.CHECKPOINT_DIR))
    assert pretrained.load_run(run_dir, intact).step == intact  # readable, checksums verified
    _finish(cli_env, run_dir)  # space is back: the same command resumes
    _assert_same_run(run_dir, reference)


# Runs the CLI with a Python audit hook that, from the moment checkpoint 10 starts being written,
# refuses every create, write, rename or delete in the checkpoint folder with EACCES: the folder
# turned read-only under a live job (root ignores chmod, so permissions cannot show it here).
# TensorStore's C++ writes bypass the hook, but Orbax creates each step's folder from Python first.
READ_ONLY_FROM_STEP_10 = """
import errno, os, runpy, sys
run_dir = os.path.join(os.path.realpath(sys.argv[1].split("=", 1)[1]), "checkpoints")
denied = [False]
WRITE = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC
def inside(path):
    return isinstance(path, (str, os.PathLike)) and os.path.realpath(os.fspath(path)).startswith(run_dir + os.sep)
def hook(event, args):
    if event == "os.mkdir" and inside(args[0]) and os.path.basename(args[0]).startswith("10.orbax-checkpoint-tmp"):
        denied[0] = True
    if not denied[0]:
        return
    writes = (event == "open" and inside(args[0]) and (args[2] or 0) & WRITE) or \\
        (event in ("os.mkdir", "os.remove", "os.rmdir") and inside(args[0])) or \\
        (event in ("os.rename", "os.replace") and (inside(args[0]) or inside(args[1])))
    if writes:
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), os.fspath(args[0]))
sys.addaudithook(hook)
sys.argv[0] = "gpt2_jax.train"
runpy.run_module("gpt2_jax.train", run_name="__main__")
"""


@pytest.mark.slow
def test_a_checkpoint_folder_turned_unwritable_while_saving_stops_with_one_line_and_the_last_checkpoint_intact(
        cli_env, reference, tmp_path):
    run_dir = tmp_path / "readonly"
    t0 = time.monotonic()
    p = subprocess.run([sys.executable, "-c", READ_ONLY_FROM_STEP_10, *_cmd(run_dir)[3:]], env=cli_env, cwd=REPO,
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 2, p.stderr[-3000:]
    m = re.fullmatch(rf"error: cannot write a checkpoint in {re.escape(str(run_dir / rundir.CHECKPOINT_DIR))} "
                     rf"\(Permission denied\){INTACT}", p.stderr)
    assert m and int(m.group(1)) == 5, p.stderr
    assert time.monotonic() - t0 < 60, "Orbax's stuck save threads kept the failed process alive"
    assert ckpt.complete_steps(run_dir / rundir.CHECKPOINT_DIR) == [5]
    assert pretrained.load_run(run_dir, 5).step == 5
    _finish(cli_env, run_dir)
    _assert_same_run(run_dir, reference)
