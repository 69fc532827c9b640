"""Fine-tuning: ``train --init_from=PATH`` starts from a Hugging Face GPT-2 folder or a gpt2_jax run.

PATH here is a small random GPT-2 saved by ``transformers`` (no network: the test builds its own
folder) with the 512-token BPE the other CLI tests use, so WikiText-2 is encoded once for all.
"""

import json
import pathlib
import subprocess
import sys

import chex
import jax
import numpy as np
import pytest
import torch
import transformers

from gpt2_jax import pretrained, rundir
from gpt2_jax import checkpoint as ckpt
from gpt2_jax import data
from gpt2_jax.metrics import read_jsonl
from gpt2_jax.tokenizer import load_tokenizer

from conftest import kill_once_saved

pytestmark = pytest.mark.slow  # every test trains or runs the CLI in subprocesses

REPO = pathlib.Path(__file__).resolve().parents[1]
V, N_CTX = 512, 32
COMMON = ("--batch_size=8", "--eval_batch_size=64", "--quiet")
FLAGS = (*COMMON, "--max_steps=20", "--ckpt_every=5", "--eval_every=10")


@pytest.fixture(scope="module")
def hf_dir(cli_env, wikitext_dir, tmp_path_factory) -> pathlib.Path:
    """A random 2-layer GPT-2 (context 32) saved by transformers, with its tokenizer.json."""
    d = tmp_path_factory.mktemp("hf") / "gpt2-micro"
    config = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=V, n_positions=N_CTX,
                                     bos_token_id=None, eos_token_id=None)
    torch.manual_seed(0)
    transformers.GPT2LMHeadModel(config).save_pretrained(d)
    data.prepare_corpus(wikitext_dir, vocab_size=V).tokenizer.save(str(d / "tokenizer.json"))
    return d


def _run(cli_env, module, *flags, expect_rc=0):
    p = subprocess.run([sys.executable, "-m", f"gpt2_jax.{module}", *flags], env=cli_env, cwd=REPO,
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == expect_rc, p.stderr[-3000:]
    return p


def _train(cli_env, run_dir, *flags, expect_rc=0):
    return _run(cli_env, "train", f"--run_dir={run_dir}", *flags, expect_rc=expect_rc)


@pytest.fixture(scope="module")
def finetuned(cli_env, hf_dir, tmp_path_factory) -> pathlib.Path:
    run_dir = tmp_path_factory.mktemp("runs") / "finetuned"
    _train(cli_env, run_dir, f"--init_from={hf_dir}", *FLAGS)
    return run_dir


def test_step_0_evaluation_equals_evaluate_of_path_and_training_improves_on_it(cli_env, hf_dir, finetuned):
    evals = read_jsonl(finetuned / rundir.EVALS_FILE)
    assert [(r["split"], r["step"]) for r in evals] == [("validation", 0), ("validation", 10),
                                                      ("validation", 20), ("test", 20)]
    dtype = json.loads((finetuned / rundir.RUN_FILE).read_text())["model"]["dtype"]  # what --dtype=auto chose
    p = _run(cli_env, "evaluate", f"--hf_dir={hf_dir}", "--split=valid", "--batch_size=64", "--quiet",
             f"--dtype={dtype}")
    theirs = json.loads(p.stdout)
    first = evals[0]
    # Same weights, windows, batches and compute dtype: the same float32 sums, bit for bit.
    assert first["loss"] == theirs["mean_nll"] and first["word_ppl"] == theirs["word_ppl"], (first, theirs)
    assert first["tokens"] == theirs["tokens"]
    assert evals[1]["loss"] < first["loss"] - 0.005 and evals[2]["loss"] < evals[1]["loss"]  # it learns (lr 1e-4)


def test_finetuning_takes_path_model_and_tokenizer_and_records_them_with_its_defaults(hf_dir, finetuned):
    record = json.loads((finetuned / rundir.RUN_FILE).read_text())
    assert (record["model"]["n_layer"], record["model"]["d_model"], record["model"]["vocab_size"],
            record["model"]["n_ctx"]) == (2, 32, V, N_CTX)
    assert record["init_from"]["path"] == str(hf_dir.resolve()) and record["init_from"]["kind"] == "hf"
    assert record["init_from"]["finetune_defaults"] == ["lr", "epochs"]
    assert record["train"]["lr"] == 1e-4 and record["train"]["epochs"] == 1
    assert load_tokenizer(finetuned / rundir.TOKENIZER_FILE).to_str() == load_tokenizer(hf_dir / "tokenizer.json").to_str()
    assert record["init_from"]["tokenizer"] == record["tokenizer"]


def test_a_run_directory_works_as_path_too_and_starts_from_its_checkpoint(cli_env, finetuned, tmp_path):
    run_dir = tmp_path / "from_run"
    _train(cli_env, run_dir, f"--init_from={finetuned}", "--init_step=10", *COMMON, "--max_steps=5",
           "--lr=3e-4", "--eval_every=100")
    evals = read_jsonl(run_dir / rundir.EVALS_FILE)
    at_10 = next(r for r in read_jsonl(finetuned / rundir.EVALS_FILE) if r["step"] == 10)
    assert evals[0]["step"] == 0 and evals[0]["loss"] == at_10["loss"]  # the source's own step-10 validation
    record = json.loads((run_dir / rundir.RUN_FILE).read_text())
    assert record["init_from"]["kind"] == "run" and record["init_from"]["step"] == 10
    assert record["init_from"]["finetune_defaults"] == ["epochs"] and record["train"]["lr"] == 3e-4


def test_finetuning_killed_with_sigkill_and_rerun_ends_bitwise_identical(cli_env, hf_dir, finetuned, tmp_path):
    run_dir = tmp_path / "killed"
    cmd = [sys.executable, "-m", "gpt2_jax.train", f"--run_dir={run_dir}", f"--init_from={hf_dir}", *FLAGS]
    kill_once_saved(cmd, cli_env, run_dir, 10)
    assert ckpt.complete_steps(run_dir / rundir.CHECKPOINT_DIR)[-1] < 20, "killed too late to test anything"
    _train(cli_env, run_dir, f"--init_from={hf_dir}", *FLAGS)  # resumes its own checkpoint, not PATH's weights
    strip = lambda rs: [{k: v for k, v in r.items() if k != "tokens_per_s"} for r in rs]  # noqa: E731
    assert strip(read_jsonl(run_dir / rundir.METRICS_FILE)) == strip(read_jsonl(finetuned / rundir.METRICS_FILE))
    assert read_jsonl(run_dir / rundir.EVALS_FILE) == read_jsonl(finetuned / rundir.EVALS_FILE)
    a, b = pretrained.load_run(finetuned, 20), pretrained.load_run(run_dir, 20)
    chex.assert_trees_all_equal(jax.device_get(a.params), jax.device_get(b.params))


def test_a_shorter_context_keeps_the_first_positions(cli_env, hf_dir, tmp_path):
    run_dir = tmp_path / "short"
    p = _train(cli_env, run_dir, f"--init_from={hf_dir}", "--n_ctx=16", *COMMON, "--max_steps=2",
               "--eval_every=100", "--noquiet")
    assert "at context 16, its first 16 of 32 positions" in p.stderr, p.stderr[-2000:]
    wpe = pretrained.load_run(run_dir).params["wpe"]["embedding"]
    assert wpe.shape == (16, 32)
    path_wpe = transformers.GPT2LMHeadModel.from_pretrained(hf_dir).transformer.wpe.weight.detach().numpy()
    assert not np.array_equal(np.asarray(wpe), path_wpe[:16])  # trained for 2 steps from those rows
    np.testing.assert_allclose(np.asarray(wpe), path_wpe[:16], atol=0.01)


@pytest.mark.parametrize("flags, message", [
    (("--size=small",), "--size=small contradicts --init_from="),
    (("--vocab_size=1024",), "--vocab_size=1024 contradicts --init_from="),
    (("--d_model=64", "--n_head=4"), "--d_model=64 contradicts --init_from="),
    (("--n_ctx=64",), "--n_ctx=64 is longer than the 32 positions --init_from="),
    (("--init_step=3",), "--init_step applies to gpt2_jax run directories"),
])
def test_flags_that_contradict_path_are_one_line_errors(cli_env, hf_dir, tmp_path, flags, message):
    p = _train(cli_env, tmp_path / "r", f"--init_from={hf_dir}", *COMMON, *flags, expect_rc=2)
    assert p.stderr.startswith(f"error: {message}") and p.stderr.count("\n") == 1, p.stderr
    assert not (tmp_path / "r").exists()


def test_init_from_nowhere_or_a_plain_folder_is_one_line(cli_env, tmp_path):
    p = _train(cli_env, tmp_path / "r", f"--init_from={tmp_path / 'nope'}", *COMMON, expect_rc=2)
    assert p.stderr == f"error: --init_from={tmp_path / 'nope'} does not exist; give the folder of the weights " \
                       f"to start from\n"
    p = _train(cli_env, tmp_path / "r", f"--init_from={tmp_path}", *COMMON, expect_rc=2)
    assert p.stderr.startswith(f"error: --init_from={tmp_path} holds neither run.json") and not (tmp_path / "r").exists()
