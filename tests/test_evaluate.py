import json
import math
import subprocess
import sys

import jax
import numpy as np
import pytest

from gpt2_jax import data, evaluate, forward, init_params
from gpt2_jax import tokenizer as tokenizer_lib
from gpt2_jax.checkpoint import save_params_as_run

from conftest import REPO


def _corpus(tokens, words=1000, nbytes=5000):
    return data.Corpus(tokenizer=None, tokens={"test": tokens}, words={"test": words}, bytes={"test": nbytes})


def _reference_nll(params, cfg, tokens, context_start):
    """Independent: target j scored by a separate forward over tokens[context_start(j) : j]."""
    total = 0.0
    for j in range(1, len(tokens)):
        ctx = tokens[context_start(j):j]
        logp = jax.nn.log_softmax(forward(params, cfg, ctx[None])[0, -1])
        total -= float(logp[tokens[j]])
    return total


@pytest.fixture
def stream(micro_cfg):
    return np.asarray(jax.random.randint(jax.random.PRNGKey(7), (45,), 0, micro_cfg.vocab_size), np.int32)


def test_disjoint_windows_match_independent_per_token_sum(micro_cfg, stream):
    params = init_params(micro_cfg, jax.random.PRNGKey(0))
    T = 8
    result = evaluate.evaluate_split(params, micro_cfg, _corpus(stream), "test", seq_len=T, batch_size=3)
    ref = _reference_nll(params, micro_cfg, stream, lambda j: T * ((j - 1) // T))
    assert result.tokens == len(stream) - 1 and result.stride is None
    assert result.nll_sum == pytest.approx(ref, rel=1e-5)
    assert result.token_ppl == pytest.approx(math.exp(ref / 44), rel=1e-5)
    assert result.word_ppl == pytest.approx(math.exp(ref / 1000), rel=1e-5)
    assert result.bits_per_byte == pytest.approx(ref / math.log(2) / 5000, rel=1e-5)


def test_sliding_stride_one_gives_every_token_full_left_context(micro_cfg, stream):
    params = init_params(micro_cfg, jax.random.PRNGKey(0))
    T = 8
    result = evaluate.evaluate_split(params, micro_cfg, _corpus(stream), "test",
                                     seq_len=T, batch_size=4, stride=1)
    ref = _reference_nll(params, micro_cfg, stream, lambda j: max(0, j - T))
    assert result.tokens == len(stream) - 1
    assert result.nll_sum == pytest.approx(ref, rel=1e-5)
    assert result.to_dict()["windows"] == "sliding"


def test_result_does_not_depend_on_batch_size(micro_cfg):
    """Padding rows of the last batch must not change the sum."""
    params = init_params(micro_cfg, jax.random.PRNGKey(1))
    tokens = np.tile(np.arange(10, dtype=np.int32), 7)
    a = evaluate.evaluate_split(params, micro_cfg, _corpus(tokens), "test", seq_len=16, batch_size=1)
    b = evaluate.evaluate_split(params, micro_cfg, _corpus(tokens), "test", seq_len=16, batch_size=5)
    assert a.nll_sum == pytest.approx(b.nll_sum, rel=1e-6) and a.tokens == b.tokens == 69


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, wikitext_dir):
    """A micro model with a 400-entry BPE trained on a slice of the train split, saved as a run dir."""
    root = tmp_path_factory.mktemp("evalrun")
    lines = data.load_split_lines("train", wikitext_dir, tfds_dir=root / "cache" / "tfds")
    tok = tokenizer_lib.train_tokenizer(lines[:2000], vocab_size=400)
    from gpt2_jax import GPT2Config
    cfg = GPT2Config(vocab_size=400, n_ctx=32, n_layer=1, d_model=32, n_head=2, d_ff=64)
    params = init_params(cfg, jax.random.PRNGKey(0))
    save_params_as_run(root / "run", cfg, params, tok, step=0)
    return root, cfg, params, tok


def test_cli_prints_one_json_line_consistent_with_library(tiny_run, wikitext_dir):
    root, cfg, params, tok = tiny_run
    env = {"GPT2_JAX_CACHE": str(root / "cache"), "JAX_PLATFORMS": "cpu", "PATH": "/usr/bin:/bin"}
    proc = subprocess.run([sys.executable, "-m", "gpt2_jax.evaluate", f"--run_dir={root / 'run'}", "--split=valid",
                           f"--data_dir={wikitext_dir}", "--batch_size=64", "--quiet"],
                          capture_output=True, text=True, cwd=REPO, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr
    record = json.loads(proc.stdout.strip().splitlines()[-1])
    corpus = data.prepare_corpus(wikitext_dir, root / "cache", tokenizer=tok)
    assert record["words"] == 217_646 and record["split"] == "validation"
    assert record["tokens"] == len(corpus.tokens["validation"]) - 1
    assert record["bytes"] == corpus.bytes["validation"]
    lib = evaluate.evaluate_split(params, cfg, corpus, "valid", batch_size=64)
    assert record["nll_sum"] == pytest.approx(lib.nll_sum, rel=1e-6)
    assert record["word_ppl"] == pytest.approx(math.exp(record["nll_sum"] / 217_646), rel=1e-9)
    # An untrained model is near-uniform over its 400 tokens.
    assert abs(record["mean_nll"] - math.log(400)) < 0.5
    saved = json.loads((root / "run" / "eval_validation_0.json").read_text())
    assert saved["nll_sum"] == record["nll_sum"]


@pytest.mark.parametrize("args,needle", [
    (["--split=dev"], "--split"),
    (["--stride=0"], "--stride"),
    ([], "--run_dir is required"),
    (["--hf_dir=/nonexistent"], "not both"),
    (["--step=last"], "--step must be"),
])
def test_cli_user_errors_exit_2_with_one_line(tiny_run, args, needle):
    root = tiny_run[0]
    run_arg = [] if needle == "--run_dir is required" else [f"--run_dir={root / 'run'}"]
    proc = subprocess.run([sys.executable, "-m", "gpt2_jax.evaluate", *run_arg, *args], capture_output=True,
                          text=True, cwd=REPO, timeout=300, env={"JAX_PLATFORMS": "cpu", "PATH": "/usr/bin:/bin"})
    assert proc.returncode == 2
    assert needle in proc.stderr and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
