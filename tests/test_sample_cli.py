"""Specification of ``python -m gpt2_jax.sample``: what it prints, how it streams, how it refuses bad input.

The run directories hold a micro model (random weights) and a 300-token BPE trained on WikiText-2 lines.
"""

import itertools
import os
import pathlib
import re
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest

from gpt2_jax import cli, decode
from gpt2_jax import memory, pretrained
from gpt2_jax import sample as sample_lib
from gpt2_jax.cli import run
from gpt2_jax.config import GPT2Config
from gpt2_jax.model import init_params
from gpt2_jax.decode import METHODS, generate
from gpt2_jax.sample import main
from gpt2_jax.tokenizer import EOT, save_tokenizer, train_tokenizer

REPO = pathlib.Path(__file__).resolve().parents[1]
PROMPT = "The man jumped"


@pytest.fixture(scope="module")
def tokenizer(wikitext_dir):
    lines = (wikitext_dir / "wiki.train.tokens").read_text(encoding="utf-8").splitlines()[:3000]
    return train_tokenizer(lines, vocab_size=300)


@pytest.fixture(scope="module")
def cfg(tokenizer):
    return GPT2Config(vocab_size=300, n_ctx=32, n_layer=2, d_model=32, n_head=4, d_ff=64)


def _noisy(params, std=0.3, seed=1):
    """Random weights with enough spread that greedy text does not repeat one token."""
    leaves, tree = jax.tree_util.tree_flatten(params)
    keys = jax.random.split(jax.random.PRNGKey(seed), len(leaves))
    return jax.tree_util.tree_unflatten(tree, [x + std * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)])


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, cfg, tokenizer):
    params = _noisy(init_params(cfg, jax.random.PRNGKey(0)))
    return pretrained.save_params_as_run(tmp_path_factory.mktemp("runs") / "micro", cfg, params, tokenizer, step=3)


@pytest.fixture(scope="module")
def eos_run_dir(tmp_path_factory, cfg, tokenizer):
    """A model that always predicts end-of-text: the final LayerNorm outputs a multiple of EOT's embedding."""
    params = init_params(cfg, jax.random.PRNGKey(0))
    eot = tokenizer.token_to_id(EOT)
    wte = params["wte"]["embedding"]
    params["ln_f"] = {"scale": params["ln_f"]["scale"] * 0, "bias": 50.0 * wte[eot] / np.linalg.norm(wte[eot]) ** 2}
    return pretrained.save_params_as_run(tmp_path_factory.mktemp("runs") / "eos", cfg, params, tokenizer, step=0)


class Recorder:
    """A stdout stand-in that remembers every write separately (to see streaming)."""

    def __init__(self):
        self.writes = []

    def write(self, s):
        self.writes.append(s)

    def flush(self):
        pass

    @property
    def text(self):
        return "".join(self.writes)


def _main(*flags):
    out = Recorder()
    assert main(["sample", *flags], out=out) == 0
    return out


def _expected_text(run_dir, tokenizer, method, *, seed=0, n=20, **kw):
    """The CLI's contract restated: prompt + generate's continuation for the method's seed stream, in the
    dtype --dtype=auto picks on this machine (bfloat16 where the CPU has native bf16 dots)."""
    loaded = pretrained.load_run(run_dir)
    cfg = loaded.cfg.replace(dtype=cli.resolve_dtype("auto", "decode")[0])
    params = decode.inference_params(loaded.params, cfg, "none")
    ids = tokenizer.encode(PROMPT).ids
    rng = jax.random.fold_in(jax.random.PRNGKey(seed), METHODS.index(method))
    out = np.asarray(generate(params, cfg, np.asarray([ids]), max_new_tokens=n, method=method, rng=rng, **kw))[0]
    return tokenizer.decode(out.tolist(), skip_special_tokens=False)


@pytest.mark.slow
def test_one_sample_is_streamed_in_chunks_as_the_prompt_then_its_continuation(run_dir, tokenizer):
    out = _main(f"--run_dir={run_dir}", "--method=nucleus", f"--prompt={PROMPT}", "--max_new_tokens=20",
                "--seed=5", "--nostop_at_eos")
    header = out.writes.index("## nucleus (p=0.9, T=1.0)\n")
    streamed = out.writes[header + 1:]
    expected = _expected_text(run_dir, tokenizer, "nucleus", seed=5, top_p=0.9)
    assert "".join(streamed) == expected + "\n"
    assert streamed[0] == PROMPT
    assert len([w for w in streamed[1:] if w.strip()]) >= 2  # 20 tokens arrive in chunks of 8, not at once
    assert "step 3" in out.text  # the header names the checkpoint


@pytest.mark.slow
def test_method_all_prints_greedy_top_k_and_nucleus_side_by_side(run_dir, tokenizer):
    out = _main(f"--run_dir={run_dir}", "--method=all", f"--prompt={PROMPT}", "--max_new_tokens=20",
                "--nostop_at_eos")
    lines = out.text.split("\n")  # not splitlines(): it also splits at characters inside a cell
    title = next(i for i, line in enumerate(lines) if line.startswith("greedy"))
    assert [c.strip() for c in lines[title].split(" │ ")] == ["greedy", "top_k (k=50, T=1.0)", "nucleus (p=0.9, T=1.0)"]
    rows = [(line + " ").split(" │ ") for line in lines[title + 2:] if line]  # lines are right-stripped
    columns = [" ".join(c.strip() for c in col if c.strip()) for col in itertools.zip_longest(*rows, fillvalue="")]
    expected = [_expected_text(run_dir, tokenizer, "greedy"),
                _expected_text(run_dir, tokenizer, "top_k", top_k=50),
                _expected_text(run_dir, tokenizer, "nucleus", top_p=0.9)]
    printable = ["".join(c if c.isprintable() else " " for c in e) for e in expected]
    assert columns == [" ".join(e.split()) for e in printable]
    assert len(set(columns)) == 3


def test_several_samples_are_printed_separately_and_follow_the_seed(run_dir):
    flags = [f"--run_dir={run_dir}", "--method=top_k", f"--prompt={PROMPT}", "--prompt=In 1990", "--num_samples=2",
             "--max_new_tokens=12"]
    a, b, c = _main(*flags, "--seed=0").text, _main(*flags, "--seed=0").text, _main(*flags, "--seed=1").text
    sections = [s for s in a.split("\n## ")[1:]]
    assert [s.split(" · ")[0] for s in sections] == [
        "prompt 1/2, sample 1/2", "prompt 1/2, sample 2/2", "prompt 2/2, sample 1/2", "prompt 2/2, sample 2/2"]
    texts = [s.split("\n", 1)[1].strip() for s in sections]
    assert texts[0].startswith(PROMPT) and texts[2].startswith("In 1990")
    assert texts[0] != texts[1]
    assert a == b and a != c


@pytest.mark.slow
def test_stop_at_eos_trims_the_continuation_at_end_of_text(eos_run_dir):
    flags = [f"--run_dir={eos_run_dir}", "--method=greedy", f"--prompt={PROMPT}", "--max_new_tokens=5"]
    stopped = _main(*flags).text.splitlines()[-1]
    assert stopped == PROMPT
    kept = _main(*flags, "--nostop_at_eos").text.splitlines()[-1]
    assert kept == PROMPT + EOT * 5
    batched = _main(*flags, "--num_samples=2", "--method=top_k").text
    assert batched.count(f"\n{PROMPT}\n") == 2


@pytest.mark.slow
def test_many_samples_beyond_free_memory_print_exactly_the_text_of_one_call(run_dir, monkeypatch):
    flags = [f"--run_dir={run_dir}", "--method=nucleus", f"--prompt={PROMPT}", "--prompt=In 1990", "--num_samples=3",
             "--max_new_tokens=12", "--seed=4", "--dtype=float32"]  # the dtype the sizes below are taken in
    whole = _main(*flags).text
    loaded, real = pretrained.load_run(run_dir), decode._generate_jit
    shape = lambda *s: jax.ShapeDtypeStruct(s, np.int32)
    two_rows = memory.bytes_needed(real.lower(
        loaded.params, shape(2, 16), shape(2), jax.random.PRNGKey(0), shape(2), decode.sampling_settings(),
        cfg=loaded.cfg, method="nucleus", max_new_tokens=12, slide_keep=loaded.cfg.n_ctx // 2).compile())
    monkeypatch.setattr(memory, "free_bytes", lambda devices: two_rows)
    calls = []

    def spy(*args, **kwargs):
        calls.append(args[1].shape[0])
        return real(*args, **kwargs)

    spy.lower = real.lower
    monkeypatch.setattr(decode, "_generate_jit", spy)
    assert _main(*flags).text == whole
    assert calls == [2, 2, 2]  # 2 prompts x 3 samples, 2 rows per call


OOM = "RESOURCE_EXHAUSTED: Out of memory allocating 38231101808 bytes."


@pytest.mark.slow
def test_out_of_memory_is_one_line_naming_the_flags_to_lower(run_dir, monkeypatch, capsys):
    argv = ["sample", f"--run_dir={run_dir}", f"--prompt={PROMPT}", "--num_samples=2"]

    def exhausted(*args, **kwargs):
        raise jax.errors.JaxRuntimeError(OOM)

    monkeypatch.setattr(sample_lib, "generate", exhausted)
    with pytest.raises(SystemExit) as e:
        run(main, argv, out_of_memory=sample_lib.OUT_OF_MEMORY)
    assert e.value.code == 2
    assert capsys.readouterr().err == f"error: out of memory ({OOM}); lower --max_new_tokens or --num_samples\n"
    # Rows are split to fit, so what can still fail is one row too long for the memory there is.
    monkeypatch.undo()
    monkeypatch.setattr(memory, "free_bytes", lambda devices: 1000)
    with pytest.raises(SystemExit) as e:
        run(main, argv, out_of_memory=sample_lib.OUT_OF_MEMORY)
    err = capsys.readouterr().err
    assert e.value.code == 2
    assert re.fullmatch(r"error: out of memory \(1 row needs [0-9.]+ [KM]iB, more than the 1000 bytes that can be "
                        r"used\); lower --max_new_tokens or --num_samples\n", err), err


@pytest.fixture(scope="module")
def mismatched_run_dir(tmp_path_factory, run_dir, wikitext_dir):
    bad = tmp_path_factory.mktemp("runs") / "mismatch"
    shutil.copytree(run_dir, bad)
    lines = (wikitext_dir / "wiki.train.tokens").read_text(encoding="utf-8").splitlines()[:3000]
    save_tokenizer(train_tokenizer(lines, vocab_size=280), bad / "tokenizer.json")
    return bad


@pytest.mark.parametrize("flags,message", [
    ([f"--prompt={PROMPT}"], "--run_dir is required"),
    (["--run_dir={missing}", f"--prompt={PROMPT}"], "does not exist"),
    (["--run_dir={file}", f"--prompt={PROMPT}"], "--run_dir={file} is a file, not a run directory; pass the --run_dir"),
    (["--hf_dir={file}", f"--prompt={PROMPT}"], "--hf_dir={file} is a file, not a Hugging Face GPT-2 folder"),
    (["--run_dir={run}", f"--prompt={PROMPT}", "--step=7"], "no checkpoint at step 7"),
    (["--run_dir={run}", f"--prompt={PROMPT}", "--step=last"], "--step must be a step number"),
    (["--run_dir={run}", f"--prompt={PROMPT}", "--step=best"], "no checkpoint with a validation loss"),
    (["--run_dir={mismatch}", f"--prompt={PROMPT}"], "tokenizer has 280 tokens but the model expects 300"),
    (["--run_dir={run}"], "give at least one --prompt"),
    (["--run_dir={run}", "--prompt="], "is empty after tokenization"),
    (["--run_dir={run}", f"--prompt={PROMPT}", "--top_p=1.5"], "flag --top_p=1.5: must be in (0, 1]"),
    (["--run_dir={run}", f"--prompt={PROMPT}", "--top_p=0"], "flag --top_p=0.0: must be in (0, 1]"),
    (["--run_dir={run}", f"--prompt={PROMPT}", "--method=top_k", "--top_k=0"], "flag --top_k=0: 0 is not a positive"),
    (["--run_dir={run}", f"--prompt={PROMPT}", "--method=all", "--top_k=301"], "--top_k must be between 1 and"),
    (["--run_dir={run}", f"--prompt={PROMPT}", "--temperature=-1"], "flag --temperature=-1: -1.0 is not a non-neg"),
    (["--run_dir={run}", f"--prompt={PROMPT}", "--max_new_tokens=0"], "flag --max_new_tokens=0: 0 is not a positive"),
    (["--run_dir={run}", f"--prompt={PROMPT}", "--num_samples=0"], "flag --num_samples=0: 0 is not a positive integer"),
    (["--run_dir={run}", f"--prompt={PROMPT}", "--method=beam"], "method"),
    (["--run_dir={run}", f"--prompt={PROMPT}", "--slide_keep=33"], "--slide_keep must be between 1 and n_ctx=32"),
])
def test_bad_input_is_one_error_line_and_exit_code_2(flags, message, run_dir, mismatched_run_dir, tmp_path, capsys):
    names = {"run": run_dir, "missing": tmp_path / "nope", "mismatch": mismatched_run_dir, "file": tmp_path / "a_file"}
    names["file"].write_text("not a run\n")
    argv = ["sample"] + [f.format(**names) for f in flags]
    with pytest.raises(SystemExit) as e:
        run(main, argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and message.format(**names) in err, err


@pytest.mark.slow
def test_python_dash_m_runs_end_to_end_and_exits_2_on_a_missing_run(run_dir, tmp_path):
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO))
    cmd = [sys.executable, "-m", "gpt2_jax.sample", f"--prompt={PROMPT}", "--max_new_tokens=4", "--method=greedy"]
    ok = subprocess.run(cmd + [f"--run_dir={run_dir}"], capture_output=True, text=True, env=env, cwd=REPO, timeout=300)
    assert ok.returncode == 0, ok.stderr
    streamed = ok.stdout.split("## greedy\n", 1)[1]
    assert streamed.startswith(PROMPT) and len(streamed.rstrip("\n")) > len(PROMPT)
    bad = subprocess.run(cmd + [f"--run_dir={tmp_path / 'nope'}"], capture_output=True, text=True, env=env, cwd=REPO,
                         timeout=300)
    assert bad.returncode == 2 and bad.stderr.startswith("error: ") and "Traceback" not in bad.stderr


def test_dtype_bfloat16_decodes_with_bf16_weights_and_says_so(run_dir, tokenizer):
    fv = sample_lib.define_flags()
    fv(["sample", f"--run_dir={run_dir}", "--dtype=bfloat16"])
    model = sample_lib._load_model(fv)
    assert model.cfg.dtype == "bfloat16" and model.description.endswith("bfloat16")
    assert {x.dtype for x in jax.tree.leaves(model.params)} == {np.dtype("bfloat16")}
    loaded = pretrained.load_run(run_dir)
    text = _main(f"--run_dir={run_dir}", "--dtype=bfloat16", "--method=greedy", f"--prompt={PROMPT}", "--nostop_at_eos",
                 "--max_new_tokens=20").text
    cfg16 = loaded.cfg.replace(dtype="bfloat16")
    ids = tokenizer.encode(PROMPT).ids
    out = np.asarray(generate(decode.inference_params(loaded.params, cfg16), cfg16, np.asarray([ids]),
                              max_new_tokens=20, method="greedy"))[0]
    assert tokenizer.decode(out.tolist(), skip_special_tokens=False) in text
    fv = sample_lib.define_flags()
    fv(["sample", f"--run_dir={run_dir}"])  # auto: this device's dtype (cli.auto_dtype)
    assert sample_lib._load_model(fv).cfg.dtype == cli.resolve_dtype("auto", "decode")[0]


@pytest.mark.parametrize("quantize", ["int8", "int8_dynamic"])
def test_quantize_int8_samples_from_int8_weights_and_says_so(run_dir, tokenizer, quantize):
    fv = sample_lib.define_flags()
    fv(["sample", f"--run_dir={run_dir}", f"--quantize={quantize}"])
    model = sample_lib._load_model(fv)
    assert model.description.endswith(f"{quantize} weights, {cli.resolve_dtype('auto', 'decode')[0]}")
    assert model.params["h_0"]["mlp"]["c_fc"]["kernel_OI"].dtype == np.int8  # (out, in): decode.inference_params
    assert model.params["wte"]["embedding"].dtype == np.int8 and model.params["wte"]["int8_scale"].dtype == np.float32
    assert model.cfg.int8_activations == (quantize == "int8_dynamic")
    text = _main(f"--run_dir={run_dir}", f"--quantize={quantize}", "--method=greedy", f"--prompt={PROMPT}",
                 "--nostop_at_eos", "--max_new_tokens=20").text
    ids = tokenizer.encode(PROMPT).ids
    out = np.asarray(generate(model.params, model.cfg, np.asarray([ids]), max_new_tokens=20, method="greedy"))[0]
    assert tokenizer.decode(out.tolist(), skip_special_tokens=False) in text
