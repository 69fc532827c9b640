"""Hugging Face interop, with transformers' GPT2LMHeadModel (PyTorch, CPU) as the oracle.

Every model here is randomly initialised and saved to a temp folder: nothing is downloaded.
All parameters (biases and LayerNorm scales included) are randomised, so a single misplaced
tensor changes the logits.
"""

import json
import os
import pathlib
import shutil

os.environ["HF_HUB_OFFLINE"] = "1"  # before transformers is imported: never reach the Hub

import jax
import numpy as np
import pytest
import safetensors.numpy
import torch
import transformers
from flax import traverse_util

from gpt2_jax import forward, hf, init_params
from gpt2_jax.errors import UserError
from gpt2_jax.config import GPT2Config
from gpt2_jax.tokenizer import EOT, train_tokenizer

transformers.logging.set_verbosity_error()
transformers.utils.logging.disable_progress_bar()

# GPT-2 shapes unlike each other: depth, width, heads, n_inner (None = 4·n_embd), vocabulary,
# positions, layer-norm epsilon and every tanh-GELU spelling.
HF_CONFIGS = {
    "2L-32d-4h-default-ffn": dict(n_layer=2, n_embd=32, n_head=4, vocab_size=97, n_positions=16),
    "3L-48d-3h-ffn80-eps1e-6": dict(n_layer=3, n_embd=48, n_head=3, n_inner=80, vocab_size=211, n_positions=24,
                                    layer_norm_epsilon=1e-6, activation_function="gelu_pytorch_tanh"),
    "4L-64d-8h-ffn96-eps1e-3": dict(n_layer=4, n_embd=64, n_head=8, n_inner=96, vocab_size=50, n_positions=40,
                                    layer_norm_epsilon=1e-3, activation_function="gelu_fast"),
    "2L-40d-5h-vocab300-eps1e-2": dict(n_layer=2, n_embd=40, n_head=5, vocab_size=300, n_positions=12,
                                       layer_norm_epsilon=1e-2, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.05),
}
LOGIT_ATOL = 2e-5  # float32; logits here are O(1)


def _hf_model(seed=0, **overrides) -> transformers.GPT2LMHeadModel:
    """A GPT2LMHeadModel with every parameter drawn at random (LayerNorm scales around 1)."""
    config = transformers.GPT2Config(bos_token_id=None, eos_token_id=None, **overrides)
    model = transformers.GPT2LMHeadModel(config).eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():  # tied lm_head is wte, listed once
            noise = 0.1 * torch.randn(p.shape, generator=gen)
            is_norm_scale = (".ln_" in name or "ln_f" in name) and name.endswith("weight")
            p.copy_(1.0 + noise if is_norm_scale else noise)
    return model


def _hf_logits(model, tokens_BT) -> np.ndarray:
    with torch.no_grad():
        return model(torch.from_numpy(np.asarray(tokens_BT, np.int64))).logits.numpy()


def _tokens(vocab_size, B, T, seed=0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, vocab_size, (B, T)).astype(np.int32)


def _randomised(params, seed=0):
    """Our params with noise on every leaf (fresh init has zero biases and unit LayerNorm scales)."""
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.PRNGKey(seed), len(leaves))
    return jax.tree.unflatten(treedef, [x + 0.1 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)])


@pytest.fixture(scope="module")
def tiny_hf_dir(tmp_path_factory) -> pathlib.Path:
    """One saved random GPT-2 (the first config) that refusal tests copy and edit."""
    d = tmp_path_factory.mktemp("hf") / "tiny"
    _hf_model(**HF_CONFIGS["2L-32d-4h-default-ffn"]).save_pretrained(d)
    return d


def _edited_copy(src: pathlib.Path, dst: pathlib.Path, **config_changes) -> pathlib.Path:
    shutil.copytree(src, dst)
    config = json.loads((dst / "config.json").read_text())
    config.update(config_changes)
    (dst / "config.json").write_text(json.dumps(config))
    return dst


def _assert_params_bitwise_equal(a, b):
    fa, fb = traverse_util.flatten_dict(a), traverse_util.flatten_dict(b)
    assert set(fa) == set(fb)
    for path in fa:
        x, y = np.asarray(fa[path]), np.asarray(fb[path])
        assert x.dtype == y.dtype == np.float32, path
        np.testing.assert_array_equal(x.view(np.uint32), y.view(np.uint32), err_msg=str(path))


# ----------------------------------------------------------------------------- import

@pytest.mark.slow
@pytest.mark.parametrize("name", list(HF_CONFIGS))
def test_imported_logits_equal_transformers(name, tmp_path):
    hf_config = HF_CONFIGS[name]
    model = _hf_model(seed=1, **hf_config)
    model.save_pretrained(tmp_path)
    cfg, params = hf.load_hf(tmp_path)

    assert (cfg.n_layer, cfg.d_model, cfg.n_head, cfg.n_ctx, cfg.vocab_size) == (
        hf_config["n_layer"], hf_config["n_embd"], hf_config["n_head"], hf_config["n_positions"],
        hf_config["vocab_size"])
    assert cfg.d_ff == hf_config.get("n_inner") or cfg.d_ff == 4 * hf_config["n_embd"]
    assert cfg.layer_norm_eps == hf_config.get("layer_norm_epsilon", 1e-5)
    assert (cfg.dropout, cfg.attn_dropout) == (hf_config.get("resid_pdrop", 0.1), hf_config.get("attn_pdrop", 0.1))

    tokens_BT = _tokens(cfg.vocab_size, 3, cfg.n_ctx)  # the full context: every position embedding used
    ours = np.asarray(forward(params, cfg, tokens_BT))
    theirs = _hf_logits(model, tokens_BT)
    diff = float(np.abs(ours - theirs).max())
    print(f"{name}: max |logit diff| = {diff:.3g} (logit scale {np.abs(theirs).max():.3g})")
    assert np.abs(theirs).max() > 0.5  # the comparison is not between near-zero numbers
    assert diff < LOGIT_ATOL


def test_openai_layout_without_prefix_and_with_mask_buffers_loads_identically(tiny_hf_dir, tmp_path):
    # OpenAI's released files name tensors "h.0.attn.c_attn.weight" (no "transformer.") and
    # store the causal-mask buffers "h.N.attn.bias" / "h.N.attn.masked_bias".
    state = safetensors.numpy.load_file(tiny_hf_dir / "model.safetensors")
    legacy = {k.removeprefix("transformer."): v for k, v in state.items()}
    for i in range(2):
        legacy[f"h.{i}.attn.bias"] = np.tril(np.ones((1, 1, 16, 16), np.float32))
        legacy[f"h.{i}.attn.masked_bias"] = np.array(-1e4, np.float32)
    d = tmp_path / "legacy"
    d.mkdir()
    shutil.copy(tiny_hf_dir / "config.json", d / "config.json")
    safetensors.numpy.save_file(legacy, d / "model.safetensors", metadata={"format": "pt"})

    _assert_params_bitwise_equal(hf.load_hf(d)[1], hf.load_hf(tiny_hf_dir)[1])


@pytest.mark.slow
def test_untied_head_equal_to_wte_is_accepted_and_a_different_one_refused(tmp_path):
    model = _hf_model(seed=2, tie_word_embeddings=False, **HF_CONFIGS["2L-32d-4h-default-ffn"])
    with torch.no_grad():
        model.lm_head.weight.copy_(model.transformer.wte.weight)
    model.save_pretrained(tmp_path / "same")
    cfg, params = hf.load_hf(tmp_path / "same")
    tokens_BT = _tokens(cfg.vocab_size, 2, 16)
    assert float(np.abs(np.asarray(forward(params, cfg, tokens_BT)) - _hf_logits(model, tokens_BT)).max()) < LOGIT_ATOL

    with torch.no_grad():
        model.lm_head.weight.add_(1e-3)
    model.save_pretrained(tmp_path / "different")
    with pytest.raises(UserError, match="lm_head.weight differs from the token embedding wte"):
        hf.load_hf(tmp_path / "different")


def test_pytorch_bin_loads_through_weights_only_and_equals_safetensors(tiny_hf_dir, tmp_path):
    model = transformers.GPT2LMHeadModel.from_pretrained(tiny_hf_dir)
    d = tmp_path / "bin"
    d.mkdir()
    shutil.copy(tiny_hf_dir / "config.json", d / "config.json")
    torch.save(model.state_dict(), d / "pytorch_model.bin")  # includes the tied lm_head.weight
    _assert_params_bitwise_equal(hf.load_hf(d)[1], hf.load_hf(tiny_hf_dir)[1])


class _RunsCodeWhenUnpickled:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.mkdir, (str(self.marker),)


def test_pytorch_bin_with_pickled_code_is_refused_without_running_it(tiny_hf_dir, tmp_path):
    d = tmp_path / "evil"
    d.mkdir()
    shutil.copy(tiny_hf_dir / "config.json", d / "config.json")
    marker = tmp_path / "code_was_run"
    torch.save({"transformer.wte.weight": torch.zeros(97, 32), "payload": _RunsCodeWhenUnpickled(marker)},
               d / "pytorch_model.bin")
    with pytest.raises(UserError, match="weights_only=True refused"):
        hf.load_hf(d)
    assert not marker.exists()


def test_pytorch_bin_without_torch_says_how_to_fix_it(tiny_hf_dir, tmp_path, monkeypatch):
    d = tmp_path / "bin"
    d.mkdir()
    shutil.copy(tiny_hf_dir / "config.json", d / "config.json")
    (d / "pytorch_model.bin").write_bytes(b"not read")
    monkeypatch.setitem(__import__("sys").modules, "torch", None)  # `import torch` now fails
    with pytest.raises(UserError, match="PyTorch is not installed.*model.safetensors"):
        hf.load_hf(d)


def test_sharded_safetensors_index_loads_identically(tiny_hf_dir, tmp_path):
    state = safetensors.numpy.load_file(tiny_hf_dir / "model.safetensors")
    names = sorted(state)
    shards = {"model-00001-of-00002.safetensors": names[: len(names) // 2],
              "model-00002-of-00002.safetensors": names[len(names) // 2:]}
    d = tmp_path / "sharded"
    d.mkdir()
    shutil.copy(tiny_hf_dir / "config.json", d / "config.json")
    for shard, keys in shards.items():
        safetensors.numpy.save_file({k: state[k] for k in keys}, d / shard, metadata={"format": "pt"})
    weight_map = {k: shard for shard, keys in shards.items() for k in keys}
    (d / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    _assert_params_bitwise_equal(hf.load_hf(d)[1], hf.load_hf(tiny_hf_dir)[1])


def test_bfloat16_checkpoint_is_read_and_widened_exactly(tiny_hf_dir, tmp_path):
    d = tmp_path / "bf16"
    transformers.GPT2LMHeadModel.from_pretrained(tiny_hf_dir).to(torch.bfloat16).save_pretrained(d)
    _, params = hf.load_hf(d)
    _, params32 = hf.load_hf(tiny_hf_dir)
    wte, wte32 = np.asarray(params["wte"]["embedding"]), np.asarray(params32["wte"]["embedding"])
    assert wte.dtype == np.float32
    np.testing.assert_array_equal(wte.view(np.uint32) & 0xFFFF, 0)  # bf16 values widened, low bits zero
    np.testing.assert_allclose(wte, wte32, rtol=2**-8)


def test_embd_pdrop_different_from_resid_pdrop_warns_and_uses_resid_pdrop():
    with pytest.warns(UserWarning, match="embd_pdrop=0.2 differs from resid_pdrop=0.05"):
        cfg = hf.config_from_hf({"model_type": "gpt2", "n_layer": 2, "n_embd": 32, "n_head": 4,
                                 "embd_pdrop": 0.2, "resid_pdrop": 0.05, "attn_pdrop": 0.0})
    assert (cfg.dropout, cfg.attn_dropout, cfg.d_ff, cfg.vocab_size, cfg.n_ctx) == (0.05, 0.0, 128, 50257, 1024)


def test_openai_gpt2_config_json_is_the_gpt2_preset():
    # The fields of openai-community/gpt2's config.json, legacy n_ctx and task settings included.
    openai = {"activation_function": "gelu_new", "architectures": ["GPT2LMHeadModel"], "attn_pdrop": 0.1,
              "bos_token_id": 50256, "embd_pdrop": 0.1, "eos_token_id": 50256, "initializer_range": 0.02,
              "layer_norm_epsilon": 1e-05, "model_type": "gpt2", "n_ctx": 1024, "n_embd": 768, "n_head": 12,
              "n_layer": 12, "n_positions": 1024, "resid_pdrop": 0.1, "summary_activation": None,
              "summary_first_dropout": 0.1, "summary_proj_to_labels": True, "summary_type": "cls_index",
              "summary_use_proj": True, "task_specific_params": {"text-generation": {"do_sample": True}},
              "vocab_size": 50257}
    assert hf.config_from_hf(openai) == GPT2Config.preset("gpt2")
    assert hf.config_to_hf(GPT2Config.preset("gpt2"), eot_id=50256).items() >= {
        k: openai[k] for k in ("n_embd", "n_head", "n_layer", "n_positions", "vocab_size", "layer_norm_epsilon",
                               "activation_function", "bos_token_id", "eos_token_id", "model_type")}.items()


REFUSALS = {
    "relu": (dict(activation_function="relu"), "activation_function='relu' is not GPT-2's tanh GELU"),
    "exact-gelu": (dict(activation_function="gelu"), "activation_function='gelu' is not GPT-2's tanh GELU"),
    "inverse-layer-scaling": (dict(scale_attn_by_inverse_layer_idx=True), "scale_attn_by_inverse_layer_idx=true"),
    "reorder-upcast": (dict(reorder_and_upcast_attn=True), "reorder_and_upcast_attn=true"),
    "cross-attention": (dict(add_cross_attention=True), "add_cross_attention=true"),
    "unscaled-attention": (dict(scale_attn_weights=False), "scale_attn_weights=false"),
    "not-gpt2": (dict(model_type="gpt_neo"), "model_type is 'gpt_neo', not 'gpt2'"),
    "classifier": (dict(architectures=["GPT2ForSequenceClassification"]), "not a GPT-2 language model"),
    "untied-without-head": (dict(tie_word_embeddings=False), "tie_word_embeddings=false but there is no lm_head"),
    "more-layers-than-weights": (dict(n_layer=3), r"tensor 'h\.2\.[a-z_.]+' is missing"),
    "other-vocab": (dict(vocab_size=98), r"tensor 'wte.weight' has shape \(97, 32\) but config.json implies \(98, 32\)"),
    "heads-do-not-divide": (dict(n_head=5), "d_model=32 is not divisible by n_head=5"),
}


@pytest.mark.parametrize("case", list(REFUSALS))
def test_unsupported_checkpoints_are_refused_with_one_line(case, tiny_hf_dir, tmp_path):
    changes, message = REFUSALS[case]
    d = _edited_copy(tiny_hf_dir, tmp_path / case, **changes)
    with pytest.raises(UserError, match=message) as info:
        hf.load_hf(d)
    assert "\n" not in str(info.value)


def test_extra_tensors_and_missing_files_are_refused(tiny_hf_dir, tmp_path):
    state = safetensors.numpy.load_file(tiny_hf_dir / "model.safetensors")
    d = tmp_path / "extra"
    d.mkdir()
    shutil.copy(tiny_hf_dir / "config.json", d / "config.json")
    safetensors.numpy.save_file({**state, "score.weight": np.zeros((2, 32), np.float32)}, d / "model.safetensors")
    with pytest.raises(UserError, match=r"1 tensors are not part of GPT-2 \(score.weight\)"):
        hf.load_hf(d)
    (d / "model.safetensors").unlink()
    with pytest.raises(UserError, match="has no model.safetensors or pytorch_model.bin"):
        hf.load_hf(d)
    with pytest.raises(UserError, match="does not exist"):
        hf.load_hf(tmp_path / "nowhere")
    with pytest.raises(UserError, match="has no tokenizer.json nor vocab.json"):
        hf.load_hf_tokenizer(tiny_hf_dir)


# ----------------------------------------------------------------------------- export

@pytest.fixture(scope="module")
def small_tokenizer():
    lines = ["The quick brown fox jumps over the lazy dog.", "Héllo wörld, 日本語 text and numbers 12345!",
             " = Valkyria Chronicles III = ", "  double  spaces\tand tabs"] * 10
    return train_tokenizer(lines, vocab_size=300)


@pytest.mark.slow
def test_export_loads_in_transformers_and_agrees(small_tokenizer, tmp_path):
    cfg = GPT2Config(vocab_size=300, n_ctx=24, n_layer=3, d_model=48, n_head=6, d_ff=112, layer_norm_eps=1e-6,
                     dropout=0.0, attn_dropout=0.05)
    params = _randomised(init_params(cfg, jax.random.PRNGKey(3)))
    hf.save_hf(cfg, params, tmp_path / "export", small_tokenizer)

    model, info = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "export", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    c = model.config
    assert (c.n_layer, c.n_embd, c.n_head, c.n_inner, c.n_positions, c.vocab_size, c.layer_norm_epsilon) == (
        3, 48, 6, 112, 24, 300, 1e-6)
    assert (c.resid_pdrop, c.embd_pdrop, c.attn_pdrop) == (0.0, 0.0, 0.05)
    assert c.eos_token_id == c.bos_token_id == small_tokenizer.token_to_id(EOT)
    tokens_BT = _tokens(cfg.vocab_size, 3, cfg.n_ctx, seed=4)
    diff = float(np.abs(np.asarray(forward(params, cfg, tokens_BT)) - _hf_logits(model.eval(), tokens_BT)).max())
    print(f"export: max |logit diff| = {diff:.3g}")
    assert diff < LOGIT_ATOL

    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "export")
    text = "The lazy fox<|endoftext|> jumps — 日本"
    assert hf_tok(text)["input_ids"] == small_tokenizer.encode(text).ids
    assert hf_tok.eos_token == EOT


@pytest.mark.slow
def test_round_trip_is_bitwise_lossless_both_ways(tiny_hf_dir, small_tokenizer, tmp_path):
    # ours -> HF -> ours
    cfg = GPT2Config(vocab_size=300, n_ctx=8, n_layer=2, d_model=16, n_head=2, d_ff=40, layer_norm_eps=3e-5,
                     dropout=0.15, attn_dropout=0.0)
    params = _randomised(init_params(cfg, jax.random.PRNGKey(5)))
    hf.save_hf(cfg, params, tmp_path / "ours", small_tokenizer)
    cfg2, params2, tok2 = hf.load_hf_with_tokenizer(tmp_path / "ours")
    assert cfg2 == cfg
    _assert_params_bitwise_equal(params2, params)
    assert tok2.to_str() == small_tokenizer.to_str()

    # HF -> ours -> HF: the same tensors under the same names, bit for bit
    hf.save_hf(*hf.load_hf(tiny_hf_dir), tmp_path / "theirs")
    original = safetensors.numpy.load_file(tiny_hf_dir / "model.safetensors")
    again = safetensors.numpy.load_file(tmp_path / "theirs" / "model.safetensors")
    assert sorted(original) == sorted(again)
    for name in original:
        np.testing.assert_array_equal(again[name].view(np.uint32), original[name].view(np.uint32), err_msg=name)


@pytest.mark.slow
def test_export_never_overwrites_and_vocab_or_merges_tokenizer_matches_transformers(small_tokenizer, tiny_hf_dir,
                                                                                     tmp_path):
    cfg, params = hf.load_hf(tiny_hf_dir)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "config.json").write_text("precious")
    with pytest.raises(UserError, match="config.json already exists"):
        hf.save_hf(cfg, params, tmp_path / "out")
    assert (tmp_path / "out" / "config.json").read_text() == "precious"
    assert not (tmp_path / "out" / "model.safetensors").exists()

    # A folder with only vocab.json + merges.txt (as OpenAI's gpt2 also ships): the same ids as
    # transformers' GPT2Tokenizer, with <|endoftext|> kept whole.
    (tmp_path / "vm").mkdir()
    small_tokenizer.model.save(str(tmp_path / "vm"))
    ours = hf.load_hf_tokenizer(tmp_path / "vm")
    theirs = transformers.GPT2Tokenizer.from_pretrained(tmp_path / "vm")
    for text in ["Hello world", " The fox<|endoftext|>The dog", "Ünïcödé 日本 ok", "a  b\n\nc"]:
        assert ours.encode(text).ids == theirs(text)["input_ids"], text
    assert ours.encode("x<|endoftext|>").ids[-1] == small_tokenizer.token_to_id(EOT)


# ----------------------------------------------------------------------------- generation and CLI

@pytest.mark.slow
def test_greedy_kv_cache_generate_equals_transformers_token_for_token(tmp_path):
    from gpt2_jax.decode import generate

    model = _hf_model(seed=7, **HF_CONFIGS["4L-64d-8h-ffn96-eps1e-3"])
    with torch.no_grad():  # strong position embeddings: a random model's greedy text then varies
        model.transformer.wpe.weight.mul_(10.0)
    model.save_pretrained(tmp_path)
    cfg, params = hf.load_hf(tmp_path)
    lengths, N = [3, 6, 9], 31  # the longest row ends exactly at the 40-position context
    prompts_BP = _tokens(cfg.vocab_size, 3, 9, seed=8)
    ours_BS = np.asarray(generate(params, cfg, prompts_BP, max_new_tokens=N, method="greedy",
                                  prompt_lengths_B=np.array(lengths)))
    for b, P in enumerate(lengths):  # transformers on each prompt alone (no padding to trust)
        theirs_S = model.generate(torch.from_numpy(prompts_BP[b:b + 1, :P].astype(np.int64)),
                                  attention_mask=torch.ones(1, P, dtype=torch.long), do_sample=False,
                                  max_new_tokens=N, pad_token_id=0).numpy()[0]
        assert len(theirs_S) == P + N
        assert len(set(theirs_S[P:].tolist())) > 5  # a continuation that could actually disagree
        np.testing.assert_array_equal(ours_BS[b, :P + N], theirs_S)


def test_convert_cli_imports_a_run_and_exports_it_back_bit_for_bit(small_tokenizer, tmp_path, capsys):
    from gpt2_jax import convert
    from gpt2_jax.pretrained import load_run

    hf_dir, run_dir, out_dir = tmp_path / "hf", tmp_path / "run", tmp_path / "out"
    _hf_model(seed=9, **HF_CONFIGS["2L-40d-5h-vocab300-eps1e-2"]).save_pretrained(hf_dir)
    small_tokenizer.save(str(hf_dir / "tokenizer.json"))

    assert convert.main(["convert", f"--from_hf={hf_dir}", f"--run_dir={run_dir}"]) == 0
    assert f"into run {run_dir} at step 0" in capsys.readouterr().out
    run = load_run(run_dir)
    cfg, params = hf.load_hf(hf_dir)
    assert run.step == 0 and run.cfg == cfg and run.tokenizer.to_str() == small_tokenizer.to_str()
    _assert_params_bitwise_equal(run.params, params)

    assert convert.main(["convert", f"--run_dir={run_dir}", f"--to_hf={out_dir}", "--step=0"]) == 0
    original = safetensors.numpy.load_file(hf_dir / "model.safetensors")
    exported = safetensors.numpy.load_file(out_dir / "model.safetensors")
    assert sorted(original) == sorted(exported)
    for name in original:
        np.testing.assert_array_equal(exported[name].view(np.uint32), original[name].view(np.uint32), err_msg=name)
    assert (out_dir / "tokenizer.json").read_text() == small_tokenizer.to_str()


@pytest.mark.parametrize("args, message", [
    (["--from_hf=a", "--to_hf=b", "--run_dir=c"], "give exactly one of --from_hf=DIR (import) or --to_hf=DIR"),
    (["--to_hf=b"], "--run_dir=DIR is required"),
    (["--from_hf={tiny}", "--run_dir={tmp}/run"], "has no tokenizer.json nor vocab.json + merges.txt"),
    (["--from_hf={tiny}", "--run_dir={tmp}/run", "--step=3"], "--step only applies to --to_hf"),
    (["--run_dir={tmp}/missing", "--to_hf={tmp}/out"], "missing does not exist"),
], ids=["both-directions", "no-run-dir", "no-tokenizer", "step-on-import", "missing-run"])
def test_convert_cli_mistakes_exit_2_with_one_line(args, message, tiny_hf_dir, tmp_path, capsys):
    from gpt2_jax import cli, convert

    argv = ["convert"] + [a.format(tiny=tiny_hf_dir, tmp=tmp_path) for a in args]
    with pytest.raises(SystemExit) as info:
        cli.run(convert.main, argv)
    err = capsys.readouterr().err
    assert info.value.code == 2
    assert err.startswith("error: ") and err.count("\n") == 1
    assert message in err, err
    assert not (tmp_path / "run").exists() and not (tmp_path / "out").exists()


@pytest.mark.slow
def test_sample_cli_with_hf_dir_continues_greedily_like_transformers(small_tokenizer, tmp_path):
    import io

    from gpt2_jax import sample

    model = _hf_model(seed=10, n_layer=2, n_embd=32, n_head=4, vocab_size=300, n_positions=32)
    with torch.no_grad():  # strong position embeddings: a random model's greedy text then varies
        model.transformer.wpe.weight.mul_(10.0)
    model.save_pretrained(tmp_path)
    small_tokenizer.save(str(tmp_path / "tokenizer.json"))
    prompt = "The quick brown"
    ids = small_tokenizer.encode(prompt).ids
    theirs = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                            do_sample=False, max_new_tokens=12, pad_token_id=0).numpy()[0]
    expected = small_tokenizer.decode(theirs.tolist(), skip_special_tokens=False)

    out = io.StringIO()
    assert sample.main(["sample", f"--hf_dir={tmp_path}", f"--prompt={prompt}", "--method=greedy",
                        "--max_new_tokens=12", "--nostop_at_eos"], out=out) == 0
    assert len(expected) > len(prompt) + 5 and expected in out.getvalue()


@pytest.mark.parametrize("content, message", [(b"\xff\xfe\x00garbage", "is not valid JSON"),
                                              (b'{"n_layer": 2', "is not valid JSON"),
                                              (b"[1, 2]", "holds a JSON list, not the object")],
                         ids=["not-utf8", "truncated", "a-list"])
def test_a_damaged_config_json_is_one_line_naming_it(tiny_hf_dir, tmp_path, content, message):
    d = _edited_copy(tiny_hf_dir, tmp_path / "damaged")
    (d / "config.json").write_bytes(content)
    with pytest.raises(UserError, match=f"{d / 'config.json'} {message}") as e:
        hf.load_hf(d)
    assert "\n" not in str(e.value)
