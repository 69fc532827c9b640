"""Hugging Face interop: read and write GPT-2 checkpoint folders (``config.json`` + weights).

The names are OpenAI's (``transformer.h.0.attn.c_attn.weight`` is our ``h_0/attn/c_attn/kernel``),
a ``Conv1D`` weight is ``(in, out)`` like a Flax ``Dense`` kernel and the LM head is tied to ``wte``:
nothing is transposed, so an import followed by an export is bit-for-bit lossless. Only
``safetensors`` is needed; a legacy ``pytorch_model.bin`` goes through PyTorch (if installed) with
``weights_only=True``, so no pickled code runs. Checkpoints whose network differs from ours (other
activations, Mistral-style attention scaling, cross-attention, an untied head) are refused in one line.
"""

from __future__ import annotations

import functools
import json
import os
import pathlib
import re
import warnings
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
import safetensors
import safetensors.numpy
import tokenizers
from flax import traverse_util
from tokenizers import decoders, models, pre_tokenizers

from gpt2_jax import files as files_lib
from gpt2_jax.errors import UserError
from gpt2_jax.config import GPT2Config
from gpt2_jax.model import init_params
from gpt2_jax.tokenizer import EOT, load_tokenizer

CONFIG_FILE = "config.json"
SAFETENSORS_FILE = "model.safetensors"
TORCH_FILE = "pytorch_model.bin"
TOKENIZER_FILE = "tokenizer.json"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
VOCAB_FILE, MERGES_FILE = "vocab.json", "merges.txt"

# The tanh GELU under each of transformers' names (gelu_fast, the PyTorch kernel: float rounding apart).
TANH_GELU_NAMES = ("gelu_new", "gelu_pytorch_tanh", "gelu_python_tanh", "gelu_fast")
ARCHITECTURES = ("GPT2LMHeadModel", "GPT2Model")

# transformers.GPT2Config's defaults, used for keys a config.json leaves out.
_HF_DEFAULTS: dict[str, Any] = dict(
    vocab_size=50257, n_positions=1024, n_embd=768, n_layer=12, n_head=12, n_inner=None,
    activation_function="gelu_new", resid_pdrop=0.1, embd_pdrop=0.1, attn_pdrop=0.1,
    layer_norm_epsilon=1e-5, scale_attn_weights=True, scale_attn_by_inverse_layer_idx=False,
    reorder_and_upcast_attn=False, add_cross_attention=False, tie_word_embeddings=True,
)

# Non-parameter buffers older checkpoints store (the causal mask); rebuilt by every model.
_BUFFER_RE = re.compile(r"h\.\d+\.attn\.(bias|masked_bias)")
_LEAF_TO_HF = {"kernel": "weight", "scale": "weight", "embedding": "weight", "bias": "bias"}


# ----------------------------------------------------------------------------- configuration

def config_from_hf(hf: Mapping[str, Any], source: str = CONFIG_FILE) -> GPT2Config:
    """Our ``GPT2Config`` for a Hugging Face GPT-2 ``config.json`` dict; ``UserError`` if unsupported.

    Our one dropout rate is ``resid_pdrop``, so a differing ``embd_pdrop`` is replaced, with a
    warning (it only matters when fine-tuning).
    """
    h = {**_HF_DEFAULTS, **hf}
    if hf.get("model_type", "gpt2") != "gpt2":
        raise UserError(f"{source}: model_type is {hf['model_type']!r}, not 'gpt2'; "
                        "only GPT-2 checkpoints can be imported")
    archs = hf.get("architectures") or []
    if any(a not in ARCHITECTURES for a in archs):
        raise UserError(f"{source}: architectures {archs} is not a GPT-2 language model; "
                        f"only {' or '.join(ARCHITECTURES)} checkpoints can be imported")
    if h["activation_function"] not in TANH_GELU_NAMES:
        raise UserError(f"{source}: activation_function={h['activation_function']!r} is not GPT-2's tanh GELU "
                        f"({', '.join(TANH_GELU_NAMES)}); gpt2_jax implements only that one")
    refused = {
        "scale_attn_by_inverse_layer_idx": "scales attention by 1/(layer+1) (Stanford CRFM's Mistral GPT-2s)",
        "reorder_and_upcast_attn": "reorders and upcasts attention (Stanford CRFM's Mistral GPT-2s)",
        "add_cross_attention": "has encoder-decoder cross-attention",
    }
    for key, what in refused.items():
        if h[key]:
            raise UserError(f"{source}: {key}=true means the model {what}, which gpt2_jax's GPT-2 does not "
                            "implement; only standard GPT-2 checkpoints can be imported")
    if not h["scale_attn_weights"]:
        raise UserError(f"{source}: scale_attn_weights=false (attention without the 1/sqrt(head width) scale) "
                        "is not standard GPT-2 and gpt2_jax does not implement it")
    n_positions = hf.get("n_positions", hf.get("n_ctx", h["n_positions"]))  # very old configs: n_ctx only
    if h["embd_pdrop"] != h["resid_pdrop"]:
        warnings.warn(f"{source}: embd_pdrop={h['embd_pdrop']} differs from resid_pdrop={h['resid_pdrop']}; "
                      f"gpt2_jax uses one dropout rate for both, {h['resid_pdrop']} (only fine-tuning is affected)",
                      stacklevel=2)
    try:
        return GPT2Config(
            vocab_size=h["vocab_size"], n_ctx=n_positions, n_layer=h["n_layer"], d_model=h["n_embd"],
            n_head=h["n_head"], d_ff=h["n_inner"] if h["n_inner"] is not None else 4 * h["n_embd"],
            layer_norm_eps=float(h["layer_norm_epsilon"]),
            dropout=float(h["resid_pdrop"]), attn_dropout=float(h["attn_pdrop"]),
        )
    except (TypeError, ValueError) as e:
        raise UserError(f"{source}: {e}") from None


def config_to_hf(cfg: GPT2Config, *, eot_id: int | None = None) -> dict[str, Any]:
    """The ``config.json`` dict of ``transformers.GPT2LMHeadModel`` for ``cfg`` (every field written)."""
    return {
        "model_type": "gpt2",
        "architectures": ["GPT2LMHeadModel"],
        "vocab_size": cfg.vocab_size,
        "n_positions": cfg.n_ctx,
        "n_embd": cfg.d_model,
        "n_layer": cfg.n_layer,
        "n_head": cfg.n_head,
        "n_inner": cfg.d_ff,
        "activation_function": "gelu_new",
        "resid_pdrop": cfg.dropout,
        "embd_pdrop": cfg.dropout,
        "attn_pdrop": cfg.attn_dropout,
        "layer_norm_epsilon": cfg.layer_norm_eps,
        "initializer_range": 0.02,
        "scale_attn_weights": True,
        "scale_attn_by_inverse_layer_idx": False,
        "reorder_and_upcast_attn": False,
        "add_cross_attention": False,
        "tie_word_embeddings": True,
        "use_cache": True,
        "bos_token_id": eot_id,
        "eos_token_id": eot_id,
        "dtype": "float32",
    }


# ----------------------------------------------------------------------------- parameters

@functools.lru_cache(maxsize=16)
def _param_shapes(cfg: GPT2Config) -> dict[tuple[str, ...], tuple[int, ...]]:
    """Every parameter path of our model for ``cfg`` and its shape (traced, nothing computed)."""
    tree = jax.eval_shape(functools.partial(init_params, cfg), jax.random.PRNGKey(0))
    return {path: leaf.shape for path, leaf in traverse_util.flatten_dict(tree).items()}


def hf_name(path: tuple[str, ...]) -> str:
    """``("h_0", "attn", "c_attn", "kernel")`` -> ``"h.0.attn.c_attn.weight"`` (no ``transformer.``)."""
    *modules, leaf = path
    modules = [f"h.{m[2:]}" if re.fullmatch(r"h_\d+", m) else m for m in modules]
    return ".".join([*modules, _LEAF_TO_HF[leaf]])


def params_from_hf(state: Mapping[str, Any], cfg: GPT2Config, source: str = "checkpoint") -> dict:
    """Our float32 params from a GPT-2 state dict (names with or without ``transformer.``).

    An ``lm_head.weight`` must equal ``wte`` (our head is tied); an unknown, missing or misshapen
    tensor is a ``UserError`` naming it.
    """
    by_name = {}
    for name, value in state.items():
        short = name.removeprefix("transformer.")
        if _BUFFER_RE.fullmatch(short):
            continue
        if short in by_name:
            raise UserError(f"{source}: tensor {short!r} appears twice (with and without 'transformer.')")
        by_name[short] = value
    lm_head = by_name.pop("lm_head.weight", None)

    params = {}
    for path, shape in _param_shapes(cfg).items():
        name = hf_name(path)
        if name not in by_name:
            raise UserError(f"{source}: tensor {name!r} is missing; the folder does not hold a complete "
                            f"GPT-2 with {cfg.n_layer} layers as its config.json says")
        value = jnp.asarray(by_name.pop(name), jnp.float32)
        if value.shape != shape:
            raise UserError(f"{source}: tensor {name!r} has shape {tuple(value.shape)} but config.json "
                            f"implies {shape}; the weights do not belong to this config.json")
        params[path] = value
    if by_name:
        unknown = sorted(by_name)
        raise UserError(f"{source}: {len(unknown)} tensors are not part of GPT-2 ({', '.join(unknown[:3])}"
                        f"{', ...' if len(unknown) > 3 else ''}); only GPT-2 language models can be imported")
    if lm_head is not None:
        wte = params[("wte", "embedding")]
        if tuple(lm_head.shape) != wte.shape or not bool(jnp.array_equal(jnp.asarray(lm_head, jnp.float32), wte)):
            raise UserError(f"{source}: lm_head.weight differs from the token embedding wte; gpt2_jax ties the "
                            "output head to wte as GPT-2 does, so an untied head cannot be imported")
    return traverse_util.unflatten_dict(params)


def params_to_hf(params: Mapping, cfg: GPT2Config) -> dict[str, np.ndarray]:
    """The ``GPT2LMHeadModel`` state dict (``transformer.``-prefixed float32 numpy arrays) of our params."""
    flat = traverse_util.flatten_dict(params)
    expected = _param_shapes(cfg)
    assert set(flat) == set(expected), f"params do not match cfg: {sorted(set(flat) ^ set(expected))[:4]}"
    state = {}
    for path, value in flat.items():
        array = np.ascontiguousarray(np.asarray(value, np.float32))
        assert array.shape == expected[path], (path, array.shape, expected[path])
        state[f"transformer.{hf_name(path)}"] = array
    return state


# ----------------------------------------------------------------------------- files

def _read_json(path: pathlib.Path) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            record = json.load(f)
    except ValueError as e:  # not JSON, or not even UTF-8
        raise UserError(f"{path} is not valid JSON ({e})") from None
    if not isinstance(record, dict):
        raise UserError(f"{path} holds a JSON {type(record).__name__}, "
                        "not the object a Hugging Face folder has there")
    return record


def _read_safetensors(path: pathlib.Path) -> dict[str, jax.Array]:
    # framework="flax": numpy has no bfloat16, and some checkpoints are stored in it.
    try:
        with safetensors.safe_open(str(path), framework="flax") as f:
            return {k: f.get_tensor(k) for k in f.keys()}
    except safetensors.SafetensorError as e:
        raise UserError(f"{path} is not a readable safetensors file ({e})") from None


def _read_torch(path: pathlib.Path) -> dict[str, np.ndarray]:
    try:
        import torch
    except ImportError:
        raise UserError(f"{path} is a PyTorch pickle and PyTorch is not installed; install it "
                        "(pip install 'gpt2_jax[hf]') or use a folder with model.safetensors") from None
    try:  # weights_only: tensors and plain containers only, never arbitrary pickled code
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 -- torch raises several types for a refused or broken pickle
        first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"{path} could not be loaded as plain weights (weights_only=True refused or failed: "
                        f"{first_line}); use a model.safetensors instead") from None
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UserError(f"{path} does not hold a flat state dict of tensors")
    return {k: v.detach().to(torch.float32).numpy() for k, v in state.items()}


def read_hf_tensors(folder: str | os.PathLike) -> tuple[dict[str, Any], pathlib.Path]:
    """All tensors of a checkpoint folder and the file they came from: ``model.safetensors``, its
    sharded ``.index.json``, ``pytorch_model.bin`` or its index, in that order."""
    folder = pathlib.Path(folder)
    for name, reader in ((SAFETENSORS_FILE, _read_safetensors), (TORCH_FILE, _read_torch)):
        if (folder / name).is_file():
            return reader(folder / name), folder / name
        index = folder / f"{name}.index.json"
        if index.is_file():
            shards = sorted(set(_read_json(index).get("weight_map", {}).values()))
            if not shards:
                raise UserError(f"{index} has no weight_map")
            state = {}
            for shard in shards:
                if not (folder / shard).is_file():
                    raise UserError(f"{index} names the shard {shard}, which is not in {folder}")
                state.update(reader(folder / shard))
            return state, index
    raise UserError(f"{folder} has no {SAFETENSORS_FILE} or {TORCH_FILE}; pass a Hugging Face GPT-2 folder "
                    "(e.g. from `huggingface-cli download openai-community/gpt2 --local-dir gpt2`)")


def _read_config_json(folder: pathlib.Path) -> dict:
    if not (folder / CONFIG_FILE).is_file():
        raise UserError(f"{folder} has no {CONFIG_FILE}; pass a Hugging Face GPT-2 checkpoint folder")
    return _read_json(folder / CONFIG_FILE)


def read_config(folder: pathlib.Path) -> GPT2Config:
    """Our config for the Hugging Face folder's ``config.json`` (no weights read)."""
    return config_from_hf(_read_config_json(folder), str(folder / CONFIG_FILE))


def load_hf(path: str | os.PathLike) -> tuple[GPT2Config, dict]:
    """``(cfg, params)`` of the Hugging Face GPT-2 checkpoint in folder ``path`` (float32 params)."""
    folder = pathlib.Path(path)
    if not folder.is_dir():
        raise UserError(f"Hugging Face folder {folder} does not exist; "
                        "pass a folder with config.json and model.safetensors")
    hf = _read_config_json(folder)
    cfg = config_from_hf(hf, str(folder / CONFIG_FILE))
    state, source = read_hf_tensors(folder)
    params = params_from_hf(state, cfg, str(source))
    if not hf.get("tie_word_embeddings", True) and not any(k.endswith("lm_head.weight") for k in state):
        raise UserError(f"{folder / CONFIG_FILE}: tie_word_embeddings=false but there is no lm_head.weight; "
                        "gpt2_jax ties the output head to wte, so this untied checkpoint cannot be imported")
    return cfg, params


def _gpt2_tokenizer(vocab: pathlib.Path, merges: pathlib.Path) -> tokenizers.Tokenizer:
    """GPT-2's byte-level BPE from ``vocab.json`` + ``merges.txt``, built as transformers' GPT2Tokenizer."""
    tok = tokenizers.Tokenizer(models.BPE.from_file(str(vocab), str(merges)))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    if tok.token_to_id(EOT) is not None:  # whole, never split into "<", "|", ...
        tok.add_special_tokens([EOT])
    return tok


def load_hf_tokenizer(path: str | os.PathLike) -> tokenizers.Tokenizer:
    """The folder's tokenizer: ``tokenizer.json``, else ``vocab.json`` + ``merges.txt``."""
    folder = pathlib.Path(path)
    if (folder / TOKENIZER_FILE).is_file():
        return load_tokenizer(folder / TOKENIZER_FILE)
    if (folder / VOCAB_FILE).is_file() and (folder / MERGES_FILE).is_file():
        try:
            return _gpt2_tokenizer(folder / VOCAB_FILE, folder / MERGES_FILE)
        except Exception as e:  # noqa: BLE001 -- tokenizers raises bare Exceptions for unreadable files
            first_line = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise UserError(f"{folder / VOCAB_FILE} + {MERGES_FILE} are not a readable BPE "
                            f"({first_line})") from None
    raise UserError(f"{folder} has no {TOKENIZER_FILE} nor {VOCAB_FILE} + {MERGES_FILE}; "
                    "copy the tokenizer files of the checkpoint into it")


def load_hf_with_tokenizer(path: str | os.PathLike) -> tuple[GPT2Config, dict, tokenizers.Tokenizer]:
    """``(cfg, params, tokenizer)`` of a Hugging Face GPT-2 folder (what the CLIs' ``--hf_dir`` loads)."""
    tokenizer = load_hf_tokenizer(path)  # first: a missing tokenizer fails before reading gigabytes
    cfg, params = load_hf(path)
    return cfg, params, tokenizer


def save_hf(cfg: GPT2Config, params: Mapping, path: str | os.PathLike,
            tokenizer: tokenizers.Tokenizer | None = None) -> pathlib.Path:
    """Write a folder ``GPT2LMHeadModel.from_pretrained`` (and, given ``tokenizer``, ``AutoTokenizer``) loads.

    ``UserError`` if any of its files already exists: nothing is ever overwritten.
    """
    folder = pathlib.Path(path)
    names = [CONFIG_FILE, SAFETENSORS_FILE] + ([TOKENIZER_FILE, TOKENIZER_CONFIG_FILE] if tokenizer else [])
    existing = [n for n in names if (folder / n).exists()]
    if existing:
        raise UserError(f"{folder / existing[0]} already exists; export into a new or empty folder")
    eot_id = tokenizer.token_to_id(EOT) if tokenizer is not None else None
    if tokenizer is not None and tokenizer.get_vocab_size() > cfg.vocab_size:
        raise UserError(f"the tokenizer has {tokenizer.get_vocab_size()} tokens but the model only "
                        f"{cfg.vocab_size}; export the tokenizer the model was trained with")
    state = params_to_hf(params, cfg)
    files = {CONFIG_FILE: json.dumps(config_to_hf(cfg, eot_id=eot_id), indent=2) + "\n"}
    if tokenizer is not None:
        specials = {f"{k}_token": EOT for k in ("bos", "eos", "unk")} if eot_id is not None else {}
        files[TOKENIZER_FILE] = tokenizer.to_str()
        tokenizer_config = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": cfg.n_ctx}
        files[TOKENIZER_CONFIG_FILE] = json.dumps({**tokenizer_config, **specials}, indent=2) + "\n"

    folder.mkdir(parents=True, exist_ok=True)
    # Each file appears complete or not at all (written aside, then renamed).
    tmp = folder / f".{SAFETENSORS_FILE}.tmp"
    safetensors.numpy.save_file(state, str(tmp), metadata={"format": "pt"})
    os.replace(tmp, folder / SAFETENSORS_FILE)
    for name, text in files.items():
        files_lib.write_atomic(folder / name, text)
    return folder

