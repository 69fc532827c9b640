"""Weights to start training from (``train --init_from=PATH``): a Hugging Face GPT-2 folder or a gpt2_jax run.

The model's shape and its tokenizer come from PATH; the caller starts a fresh optimizer on the
weights. A shorter context than PATH's keeps PATH's first positions (``wpe`` rows).
"""

from __future__ import annotations

import dataclasses
import pathlib

import jax
from tokenizers import Tokenizer

from gpt2_jax import checkpoint as ckpt
from gpt2_jax import hf
from gpt2_jax import tokenizer as tokenizer_lib
from gpt2_jax.cli import folder_flag
from gpt2_jax.errors import UserError
from gpt2_jax.config import PRESETS, GPT2Config

# The shape of the network: every one comes from PATH (n_ctx may only shrink).
ARCHITECTURE_FLAGS = ("vocab_size", "n_layer", "d_model", "n_head", "d_ff")


@dataclasses.dataclass(frozen=True)
class Pretrained:
    path: pathlib.Path
    kind: str  # "hf" (a Hugging Face folder) or "run" (a gpt2_jax run directory)
    step: int | str | None  # a run's checkpoint: a step, "best", or None for the newest
    cfg: GPT2Config  # PATH's, full context
    tokenizer: Tokenizer

    def record(self) -> dict:
        """What run.json keeps of the source, so a resume must name the same one."""
        return {"path": str(self.path.resolve()), "kind": self.kind, "step": self.step,
                "tokenizer": tokenizer_lib.tokenizer_fingerprint(self.tokenizer)}


def open_source(path: str, step: int | str | None = None) -> Pretrained:
    """The config and tokenizer of ``path`` (no JAX: this runs before a distributed start-up)."""
    folder = folder_flag(path, "init_from", "a Hugging Face GPT-2 folder or a gpt2_jax run directory",
                         "give the folder of the weights to start from")
    if (folder / ckpt.RUN_FILE).is_file():
        cfg = ckpt.run_config(folder)
        tok = tokenizer_lib.load_tokenizer(folder / ckpt.TOKENIZER_FILE)
        ckpt.check_tokenizer(folder, ckpt.read_run_json(folder), tok)
        kind = "run"
    elif (folder / hf.CONFIG_FILE).is_file():
        if step is not None:
            raise UserError(f"--init_step applies to gpt2_jax run directories; the Hugging Face folder {folder} "
                            f"holds one set of weights: drop --init_step")
        cfg, tok, kind = hf.read_config(folder), hf.load_hf_tokenizer(folder), "hf"
    else:
        raise UserError(f"--init_from={folder} holds neither {ckpt.RUN_FILE} (a gpt2_jax run) nor "
                        f"{hf.CONFIG_FILE} (a Hugging Face GPT-2 folder)")
    tokenizer_lib.check_vocab_matches(tok, cfg)
    return Pretrained(folder, kind, step, cfg, tok)


def load_params(source: Pretrained) -> tuple[dict, int]:
    """(float32 params at PATH's full context, the step they are from: 0 for a Hugging Face folder)."""
    if source.kind == "run":
        run = ckpt.load_run(source.path, source.step)
        params, step = run.params, run.step
    else:
        cfg, params = hf.load_hf(source.path)
        step = 0
    assert jax.tree.map(lambda x: x.shape, params) == jax.tree.map(
        lambda x: x.shape, ckpt.abstract_params(source.cfg)), "PATH's weights do not match its config"
    return params, step


def model_config(source: Pretrained, *, size: str | None, overrides: dict, n_ctx: int | None,
                 **training) -> GPT2Config:
    """PATH's config with the training-time settings (``dtype``, ``remat``, dropout, a shorter ``n_ctx``).

    A given ``--size`` and architecture flags (``overrides``) must agree with PATH: the weights
    fix the network's shape.
    """
    def differs(cfg: GPT2Config, names) -> str | None:
        return next((n for n in names if getattr(cfg, n) != getattr(source.cfg, n)), None)

    for name, value in overrides.items():
        if value != getattr(source.cfg, name):
            raise UserError(f"--{name}={value} contradicts --init_from={source.path}, whose model has "
                            f"{name}={getattr(source.cfg, name)}; the weights fix the model: drop --{name}")
    if size is not None and (name := differs(PRESETS[size], ARCHITECTURE_FLAGS)) is not None:
        raise UserError(f"--size={size} contradicts --init_from={source.path}, whose model has "
                        f"{name}={getattr(source.cfg, name)} ({size}: {getattr(PRESETS[size], name)}); the weights "
                        f"fix the model: drop --size")
    if n_ctx is not None and n_ctx > source.cfg.n_ctx:
        raise UserError(f"--n_ctx={n_ctx} is longer than the {source.cfg.n_ctx} positions --init_from={source.path} "
                        f"was trained with; use --n_ctx <= {source.cfg.n_ctx}")
    return source.cfg.replace(n_ctx=n_ctx or source.cfg.n_ctx, **training)


def fit_context(params: dict, n_ctx: int) -> dict:
    """``params`` with only the first ``n_ctx`` position embeddings (a shorter context than PATH's)."""
    return {**params, "wpe": {"embedding": params["wpe"]["embedding"][:n_ctx]}}
