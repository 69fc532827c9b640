"""Shared test setup: CPU only, small configs, the WikiText-2 files from ../shared (or GPT2_JAX_DATA_DIR)."""

import os
import pathlib
import signal
import subprocess
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import pytest

from gpt2_jax import rundir
from gpt2_jax.config import GPT2Config

REPO = pathlib.Path(__file__).resolve().parents[1]


def _data_dir() -> pathlib.Path:
    env = os.environ.get("GPT2_JAX_DATA_DIR")
    return pathlib.Path(env) if env else REPO.parent / "shared" / "data" / "wikitext-2"


@pytest.fixture(scope="session")
def wikitext_dir() -> pathlib.Path:
    d = _data_dir()
    assert (d / "wiki.train.tokens").is_file(), (
        f"WikiText-2 not found at {d}; set GPT2_JAX_DATA_DIR to the folder with wiki.*.tokens")
    return d


@pytest.fixture
def micro_cfg() -> GPT2Config:
    """A 2-layer model small enough for fast unit tests."""
    return GPT2Config(vocab_size=97, n_ctx=16, n_layer=2, d_model=32, n_head=4, d_ff=64)


@pytest.fixture(scope="session")
def cli_env(wikitext_dir, tmp_path_factory) -> dict:
    """Environment for running the CLIs in subprocesses: CPU, the data, the repo importable, and one
    JAX compilation cache shared by every subprocess of the session (each compiles a step once)."""
    env = dict(os.environ, JAX_PLATFORMS="cpu", GPT2_JAX_DATA_DIR=str(wikitext_dir), PYTHONUNBUFFERED="1",
               JAX_COMPILATION_CACHE_DIR=str(tmp_path_factory.mktemp("jax_cache")),
               PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    env.pop("XLA_FLAGS", None)
    return env


@pytest.fixture(autouse=True)
def _plain_exit_in_process(monkeypatch):
    """In-process ``cli.run`` exits with a plain SystemExit.

    A real CLI gives threads that cannot finish 5 s, then ``os._exit(2)`` (tested in subprocesses in
    test_faults.py); inside pytest that would end the whole session with exit 2 and no summary whenever
    an earlier in-process test left a non-daemon thread alive (seen once in a clean-clone CI run).
    """
    import sys

    from gpt2_jax import cli

    monkeypatch.setattr(cli, "_exit", lambda code, grace_s=5.0: sys.exit(code))


def kill_once_saved(cmd, env, run_dir, step):
    """Start a training run and SIGKILL it (no handler runs, a save may be cut midway) once checkpoint
    ``step`` exists."""
    proc = subprocess.Popen(cmd, env=env, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 240
    while not (run_dir / rundir.CHECKPOINT_DIR / str(step)).is_dir():
        assert proc.poll() is None, f"the run ended before it could be killed: {proc.stderr.read()[-2000:]}"
        assert time.time() < deadline
        time.sleep(0.02)
    proc.kill()
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
