"""Shared test setup: CPU only, small configs, the WikiText-2 files from ../shared (or GPT2_JAX_DATA_DIR)."""

import os
import pathlib

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import pytest

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
