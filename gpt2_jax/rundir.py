"""A run directory: its file names, ``run.json``, and the lock of the one training process using it.

    run.json          {"model": GPT2Config dict, "train": TrainConfig dict or null, ...}
    run.lock          held (flock) by the training process using the directory; says who it is
    tokenizer.json    the run's tokenizer (the model's vocabulary is meaningless without it)
    checkpoints/      Orbax steps (see ``gpt2_jax.checkpoint``); corrupt_checkpoints/ what was set aside
    metrics.jsonl     one line per training step; evals.jsonl one per evaluation; loss.png the plot
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import pathlib
import socket
import sys
import time
from typing import Callable, Iterator

from gpt2_jax import files
from gpt2_jax import tokenizer as tokenizer_lib
from gpt2_jax.config import GPT2Config
from gpt2_jax.errors import UserError, describe

RUN_FILE = "run.json"
LOCK_FILE = "run.lock"
TOKENIZER_FILE = "tokenizer.json"
CHECKPOINT_DIR = "checkpoints"
CORRUPT_DIR = "corrupt_checkpoints"  # unreadable checkpoints are moved here, never deleted
METRICS_FILE = "metrics.jsonl"
EVALS_FILE = "evals.jsonl"
PLOT_FILE = "loss.png"

Warn = Callable[[str], None]


def print_warning(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr)


def read_run_json(run_dir: str | os.PathLike) -> dict:
    path = pathlib.Path(run_dir) / RUN_FILE
    if not path.is_file():
        raise UserError(f"{run_dir} is not a run directory (no {RUN_FILE}); pass the --run_dir a training run wrote")
    try:
        record = json.loads(path.read_bytes())
    except (OSError, ValueError) as e:  # ValueError: not JSON, or not even UTF-8
        raise UserError(f"cannot read {path} ({describe(e)}); restore it from a copy or start a new --run_dir") \
            from None
    if not (isinstance(record, dict) and isinstance(record.get("model"), dict)
            and isinstance(record.get("train"), (dict, type(None)))):
        raise UserError(f"{path} is not a run record (a JSON object with a 'model' and a 'train' section); "
                        f"restore it from a copy or start a new --run_dir")
    return record


def write_run_json(run_dir: str | os.PathLike, record: dict) -> None:
    """Write ``run.json`` atomically (temp file + rename), so a crash never leaves half a file."""
    files.write_atomic(pathlib.Path(run_dir) / RUN_FILE, json.dumps(record, indent=2, sort_keys=True) + "\n")


def config_differences(saved: dict, current: dict) -> list[str]:
    """``["train.lr: 0.001 in the run dir, 0.0003 now", ...]`` for every field that differs."""
    diffs = []
    for section in sorted(set(saved) | set(current)):
        a, b = saved.get(section) or {}, current.get(section) or {}
        for key in sorted(set(a) | set(b)):
            if a.get(key) != b.get(key):
                diffs.append(f"{section}.{key}: {a.get(key)!r} in the run dir, {b.get(key)!r} now")
    return diffs


def check_tokenizer(run_dir: str | os.PathLike, record: dict, tok) -> None:
    """A UserError unless ``tok`` is the tokenizer ``run.json`` recorded (runs older than the record pass)."""
    expected = record.get("tokenizer")
    if expected is not None and tokenizer_lib.tokenizer_fingerprint(tok) != expected:
        raise UserError(f"{pathlib.Path(run_dir) / TOKENIZER_FILE} is not the tokenizer this run was trained with "
                        f"(fingerprint {tokenizer_lib.tokenizer_fingerprint(tok)}, {RUN_FILE} says {expected}); "
                        f"put the run's own tokenizer.json back")


def run_config(run_dir: str | os.PathLike) -> GPT2Config:
    record = read_run_json(run_dir)
    try:
        return GPT2Config.from_dict(record["model"])
    except (KeyError, TypeError, ValueError) as e:
        raise UserError(f"{pathlib.Path(run_dir) / RUN_FILE} has no valid model config ({e})") from None


@contextlib.contextmanager
def locked_run_dir(run_dir: str | os.PathLike, *, warn: Warn = print_warning) -> Iterator[pathlib.Path]:
    """Hold ``run_dir`` exclusively while a training process uses it (created if missing).

    The lock is ``flock`` on ``run.lock``: the kernel drops it when its process ends, however it
    ends (SIGKILL, OOM, a lost node), so a dead run never leaves the directory locked; the file
    only tells the next process who holds it. A second process gets a one-line UserError. A
    directory this call created and that is still empty (apart from the lock) when the block
    ends, e.g. because the first check failed, is removed again.
    """
    run_dir = pathlib.Path(run_dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise UserError(f"--run_dir={run_dir} is a file, not a directory; choose another --run_dir")
    created = not run_dir.exists()
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create --run_dir={run_dir} ({e.strerror}); choose a folder you can write") from None
    path = run_dir / LOCK_FILE
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise UserError(f"cannot write in --run_dir={run_dir} ({e.strerror}); choose a folder you can "
                            f"write or fix its permissions") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            os.close(fd)
            if e.errno not in (errno.EAGAIN, errno.EACCES):  # the filesystem has no locks (some NFS/FUSE)
                warn(f"cannot lock {run_dir} ({e.strerror}); make sure no other training process uses it")
                fd = None
                break
            try:
                holder = json.loads(path.read_text())
                who = f"pid {holder['pid']} on {holder['host']}, since {holder['since']}"
            except (OSError, ValueError, KeyError, TypeError):
                who = "its holder is still starting"
            raise UserError(f"--run_dir={run_dir} is in use by another training process ({who}); wait for it "
                            f"to end or stop it (a stopped run resumes), or choose another --run_dir") from None
        # The holder before us may have removed the file between our open and our lock: lock the new one.
        try:
            same = os.path.samestat(os.fstat(fd), os.stat(path))
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    try:
        if fd is not None:
            info = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.strftime("%Y-%m-%d %H:%M:%S")}
            os.ftruncate(fd, 0)
            os.write(fd, (json.dumps(info) + "\n").encode())
        yield run_dir
    finally:
        if created and [p.name for p in run_dir.iterdir()] in ([LOCK_FILE], []):
            path.unlink(missing_ok=True)  # while still locked: nobody can be using it
            run_dir.rmdir()
        if fd is not None:
            os.close(fd)  # releases the lock


def parse_step(text: str | None) -> int | str | None:
    """A ``--step`` flag's value: None, "latest", "best" or a step number (UserError otherwise)."""
    if text is None or text in ("latest", "best"):
        return text
    if text.isdigit():
        return int(text)
    raise UserError(f"--step must be a step number, 'latest' or 'best', got {text!r}")


