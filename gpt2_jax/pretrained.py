"""Weights in and out of run directories and Hugging Face folders: for sampling, evaluation, fine-tuning.

``load_run`` / ``load_model`` give a model ready for ``forward``; ``open_source`` and
``load_params`` give fine-tuning (``train --init_from=PATH``) PATH's config, tokenizer and
weights, a shorter context keeping PATH's first positions; ``save_params_as_run`` makes a run
directory of imported weights.
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
from typing import Any

import jax
import numpy as np
from absl import flags
from tokenizers import Tokenizer

from gpt2_jax import hf, rundir
from gpt2_jax import tokenizer as tokenizer_lib
from gpt2_jax.checkpoint import Checkpoints, abstract_params
from gpt2_jax.cli import folder_flag
from gpt2_jax.config import PRESETS, GPT2Config
from gpt2_jax.errors import UserError
from gpt2_jax.rundir import Warn, print_warning

# The shape of the network: every one comes from PATH (n_ctx may only shrink).
ARCHITECTURE_FLAGS = ("vocab_size", "n_layer", "d_model", "n_head", "d_ff")


@dataclasses.dataclass(frozen=True)
class LoadedRun:
    """A run's model, ready to use: ``forward(run.params, run.cfg, tokens_BT)``."""

    cfg: GPT2Config
    params: dict  # float32, unreplicated
    tokenizer: Any  # tokenizers.Tokenizer
    step: int
    run_dir: pathlib.Path


def load_run(run_dir: str | os.PathLike, step: int | str | None = None, *, warn: Warn = print_warning) -> LoadedRun:
    """A run's config, tokenizer and float32 params at ``step`` (None / "latest", "best" or a number)."""
    run_dir = folder_flag(run_dir, "run_dir", "a run directory", "pass the --run_dir of a training run")
    cfg = rundir.run_config(run_dir)
    tok = tokenizer_lib.load_tokenizer(run_dir / rundir.TOKENIZER_FILE)
    tokenizer_lib.check_vocab_matches(tok, cfg)
    rundir.check_tokenizer(run_dir, rundir.read_run_json(run_dir), tok)
    if not (run_dir / rundir.CHECKPOINT_DIR).is_dir():
        raise UserError(f"{run_dir} has no {rundir.CHECKPOINT_DIR}/ folder; the run saved no checkpoint yet")
    checkpoints = Checkpoints(run_dir, warn=warn)
    try:
        steps = checkpoints.steps()
        if not steps:
            raise UserError(f"{run_dir} has no complete checkpoint yet; train longer or pick another --run_dir")
        restored = checkpoints.restore(abstract_params(cfg), step=step, model=cfg.architecture())
        if restored is None:
            raise UserError(f"no checkpoint of {run_dir} is readable (steps {steps}); see the warnings above")
    finally:
        checkpoints.close()
    return LoadedRun(cfg=cfg, params=restored.params, tokenizer=tok, step=restored.step, run_dir=run_dir)


def define_model_flags(flag_values: flags.FlagValues, verb: str) -> None:
    """--run_dir, --hf_dir and --step on a CLI's FlagValues: the flags ``load_model`` takes."""
    flags.DEFINE_string("run_dir", None, f"Training run to {verb} (run.json, tokenizer.json, checkpoints/).",
                        flag_values=flag_values)
    flags.DEFINE_string("hf_dir", None, f"{verb.capitalize()} a Hugging Face GPT-2 folder (config.json, "
                        "model.safetensors, tokenizer) instead of a run directory.", flag_values=flag_values)
    flags.DEFINE_string("step", "latest", "Checkpoint to load: a step number, 'latest' (newest complete) "
                        "or 'best' (lowest validation loss).", flag_values=flag_values)


def load_model(run_dir: str | os.PathLike | None = None, hf_dir: str | os.PathLike | None = None,
               step: int | str | None = None, *, warn: Warn = print_warning) -> LoadedRun:
    """A model for inference from a training run (at ``step``) or a Hugging Face folder (step 0)."""
    if run_dir and hf_dir:
        raise UserError("give one of --run_dir=DIR or --hf_dir=DIR, not both")
    if hf_dir:
        folder_flag(hf_dir, "hf_dir", "a Hugging Face GPT-2 folder",
                    "pass the folder holding config.json, model.safetensors and the tokenizer")
        cfg, params, tok = hf.load_hf_with_tokenizer(hf_dir)
        tokenizer_lib.check_vocab_matches(tok, cfg)
        return LoadedRun(cfg=cfg, params=params, tokenizer=tok, step=0, run_dir=pathlib.Path(hf_dir))
    if not run_dir:
        raise UserError("--run_dir is required: the training run to load (e.g. --run_dir=runs/small), "
                        "or --hf_dir=DIR for a Hugging Face GPT-2 folder")
    return load_run(run_dir, rundir.parse_step(step) if isinstance(step, str) else step, warn=warn)


def save_params_as_run(run_dir: str | os.PathLike, cfg: GPT2Config, params, tokenizer, step: int = 0,
                       *, source: str | None = None) -> pathlib.Path:
    """Make ``run_dir`` a run holding ``params`` (e.g. imported weights) that ``load_run`` reads.

    Refuses to touch an existing run directory, so nothing already saved is lost.
    """
    run_dir = folder_flag(run_dir, "run_dir", "a run directory", "choose a new --run_dir", may_be_new=True)
    if (run_dir / rundir.RUN_FILE).exists() or (run_dir / rundir.CHECKPOINT_DIR).exists():
        raise UserError(f"{run_dir} already holds a run; choose a new --run_dir (nothing was overwritten)")
    tokenizer_lib.check_vocab_matches(tokenizer, cfg)
    shapes = jax.tree.map(lambda a: (a.shape, np.dtype(a.dtype).name), abstract_params(cfg))
    given = jax.tree.map(lambda a: (tuple(a.shape), np.dtype(a.dtype).name), params)
    assert jax.tree.structure(shapes) == jax.tree.structure(given) and shapes == given, "params do not match cfg"
    run_dir.mkdir(parents=True, exist_ok=True)
    tokenizer_lib.save_tokenizer(tokenizer, run_dir / rundir.TOKENIZER_FILE)
    rundir.write_run_json(run_dir, {"model": cfg.to_dict(), "train": None, "source": source,
                                    "tokenizer": tokenizer_lib.tokenizer_fingerprint(tokenizer)})
    checkpoints = Checkpoints(run_dir, keep=1, asynchronous=False)
    checkpoints.save(step, params=params, opt_state=None,
                     meta={"step": step, "source": source, "model": cfg.architecture()})
    checkpoints.close()
    return run_dir


# ---------------------------------------------------------------- fine-tuning: train --init_from=PATH


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
    if (folder / rundir.RUN_FILE).is_file():
        cfg = rundir.run_config(folder)
        tok = tokenizer_lib.load_tokenizer(folder / rundir.TOKENIZER_FILE)
        rundir.check_tokenizer(folder, rundir.read_run_json(folder), tok)
        kind = "run"
    elif (folder / hf.CONFIG_FILE).is_file():
        if step is not None:
            raise UserError(f"--init_step applies to gpt2_jax run directories; the Hugging Face folder {folder} "
                            f"holds one set of weights: drop --init_step")
        cfg, tok, kind = hf.read_config(folder), hf.load_hf_tokenizer(folder), "hf"
    else:
        raise UserError(f"--init_from={folder} holds neither {rundir.RUN_FILE} (a gpt2_jax run) nor "
                        f"{hf.CONFIG_FILE} (a Hugging Face GPT-2 folder)")
    tokenizer_lib.check_vocab_matches(tok, cfg)
    return Pretrained(folder, kind, step, cfg, tok)


def load_params(source: Pretrained) -> tuple[dict, int]:
    """(float32 params at PATH's full context, the step they are from: 0 for a Hugging Face folder)."""
    if source.kind == "run":
        run = load_run(source.path, source.step)
        params, step = run.params, run.step
    else:  # the tokenizer is already in ``source``: read only the weights
        params, step = hf.load_hf(source.path)[1], 0
    assert jax.tree.map(lambda x: x.shape, params) == jax.tree.map(
        lambda x: x.shape, abstract_params(source.cfg)), "PATH's weights do not match its config"
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
    return source.cfg.replace(n_ctx=source.cfg.n_ctx if n_ctx is None else n_ctx, **training)


def fit_context(params: dict, n_ctx: int) -> dict:
    """``params`` with only the first ``n_ctx`` position embeddings (a shorter context than PATH's)."""
    return {**params, "wpe": {"embedding": params["wpe"]["embedding"][:n_ctx]}}
