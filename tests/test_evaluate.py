import json
import math
import subprocess
import sys

import jax
import numpy as np
import pytest

from gpt2_jax import cli, data, decode, evaluate, forward, init_params, memory, parallel, quantize_int8
from gpt2_jax import tokenizer as tokenizer_lib
from gpt2_jax.pretrained import save_params_as_run

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


@pytest.mark.slow
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


@pytest.mark.slow
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


def _spy_batches(monkeypatch):
    """Record the (devices, rows, seq_len) shape of every batch ``score_tokens`` scores."""
    shapes, real = [], parallel.evaluate

    def spy(p_eval_step, params_N, batches):
        batches = list(batches)
        shapes.extend(b["inputs"].shape for b in batches)
        return real(p_eval_step, params_N, batches)

    monkeypatch.setattr(parallel, "evaluate", spy)
    return shapes


def test_a_batch_larger_than_the_split_is_one_batch_of_all_its_windows(micro_cfg, stream, monkeypatch):
    """45 tokens = 6 windows of 8: a batch of 1000 would be 994 rows of padding, so it is 6 windows."""
    params = init_params(micro_cfg, jax.random.PRNGKey(0))
    shapes = _spy_batches(monkeypatch)
    big = evaluate.evaluate_split(params, micro_cfg, _corpus(stream), "test", seq_len=8, batch_size=1000)
    assert shapes == [(1, 6, 8)]
    exact = evaluate.evaluate_split(params, micro_cfg, _corpus(stream), "test", seq_len=8, batch_size=6)
    assert big == exact  # the same batch: bit for bit


def _bytes_for_rows(params, cfg, rows, seq_len):
    """What one evaluation batch of ``rows`` windows needs (the compiled step's own statement)."""
    devices = tuple(jax.local_devices())
    shape = (len(devices), rows // len(devices), seq_len)
    batch = {k: jax.ShapeDtypeStruct(shape, dtype) for k, dtype in
             (("inputs", np.int32), ("targets", np.int32), ("mask", np.float32))}
    p_step = evaluate._pmapped_eval_step(cfg, devices)
    return memory.bytes_needed(p_step.lower(parallel.replicate(params, devices), batch).compile())


def test_a_batch_too_large_for_free_memory_is_split_with_a_warning_and_the_same_result(micro_cfg, stream,
                                                                                        monkeypatch):
    params = init_params(micro_cfg, jax.random.PRNGKey(0))
    whole = evaluate.evaluate_split(params, micro_cfg, _corpus(stream), "test", seq_len=8, batch_size=6)
    two = evaluate.evaluate_split(params, micro_cfg, _corpus(stream), "test", seq_len=8, batch_size=2)
    monkeypatch.setattr(memory, "free_bytes", lambda devices: _bytes_for_rows(params, micro_cfg, 2, 8))
    shapes, warnings = _spy_batches(monkeypatch), []
    split = evaluate.evaluate_split(params, micro_cfg, _corpus(stream), "test", seq_len=8, batch_size=64,
                                    warn=warnings.append)
    assert warnings == ["a batch of 6 windows does not fit in free memory (--batch_size=64); scoring 2 windows per "
                        "batch instead"]
    assert shapes == [(1, 2, 8)] * 3
    # Exactly what batches of 2 give; against one batch of 6, only the float32 sums' order differs.
    assert split == two
    assert split.nll_sum == pytest.approx(whole.nll_sum, rel=1e-6) and split.tokens == whole.tokens == 44


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


@pytest.mark.slow
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


@pytest.mark.slow
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


@pytest.mark.slow
def test_cli_out_of_memory_is_one_line_saying_lower_batch_size_and_leaves_saved_results(tiny_run, wikitext_dir,
                                                                                         monkeypatch, capsys):
    root = tiny_run[0]
    saved = root / "run" / "eval_test_0.json"
    saved.write_text('{"an earlier": "evaluation"}\n')
    oom = "RESOURCE_EXHAUSTED: Out of memory allocating 91955200080 bytes."

    def exhausted(*args, **kwargs):
        raise jax.errors.JaxRuntimeError(oom)

    monkeypatch.setattr(parallel, "evaluate", exhausted)
    monkeypatch.setenv("GPT2_JAX_CACHE", str(root / "cache"))
    with pytest.raises(SystemExit) as e:
        cli.run(evaluate.main, ["evaluate", f"--run_dir={root / 'run'}", "--split=test", f"--data_dir={wikitext_dir}",
                                "--batch_size=200000", "--quiet"], out_of_memory=evaluate.OUT_OF_MEMORY)
    assert e.value.code == 2
    assert capsys.readouterr().err == f"error: out of memory ({oom}); lower --batch_size or --seq_len\n"
    assert saved.read_text() == '{"an earlier": "evaluation"}\n'


def test_cli_run_dir_or_hf_dir_that_is_a_file_is_named_a_file(tmp_path, capsys):
    f = tmp_path / "notes.txt"
    f.write_text("not a run\n")
    for flag, what in (("run_dir", "a run directory"), ("hf_dir", "a Hugging Face GPT-2 folder")):
        with pytest.raises(SystemExit) as e:
            cli.run(evaluate.main, ["evaluate", f"--{flag}={f}"])
        assert e.value.code == 2
        assert capsys.readouterr().err.startswith(f"error: --{flag}={f} is a file, not {what}; pass ")


@pytest.mark.slow
@pytest.mark.parametrize("flag, dtype, quantize", [([], "float32", "none"), (["--quantize=int8"], "float32", "int8"),
                                                   (["--quantize=int8_dynamic"], "float32", "int8_dynamic"),
                                                   (["--dtype=bfloat16"], "bfloat16", "none")])
def test_cli_scores_in_the_dtype_and_quantization_asked_for(tiny_run, wikitext_dir, monkeypatch, capsys, flag, dtype,
                                                           quantize):
    root, cfg, params, tok = tiny_run
    monkeypatch.setenv("GPT2_JAX_CACHE", str(root / "cache"))
    out = root / f"eval_{quantize}_{dtype}.json"
    assert evaluate.main(["evaluate", f"--run_dir={root / 'run'}", "--split=valid", f"--data_dir={wikitext_dir}",
                          "--batch_size=64", "--quiet", f"--output={out}", *flag]) == 0
    record = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert (record["dtype"], record["quantize"]) == (dtype, quantize)
    corpus = data.prepare_corpus(wikitext_dir, root / "cache", tokenizer=tok)
    lib_cfg = decode.inference_config(cfg.replace(dtype=dtype), quantize)
    lib_params = {"none": params, "int8": quantize_int8(params)}.get(quantize)
    if quantize == "int8_dynamic":  # int8 x int8 products: the (out, in) kernels decoding reads
        lib_params = decode.inference_params(params, lib_cfg, quantize)
    lib = evaluate.evaluate_split(lib_params, lib_cfg, corpus, "valid", batch_size=64)
    assert record["nll_sum"] == pytest.approx(lib.nll_sum, rel=1e-6)
