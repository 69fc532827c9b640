"""Train GPT-2 on WikiText-2: ``python -m gpt2_jax.train --size=tiny --run_dir=runs/tiny``.

The command-line loop around ``gpt2_jax.core`` (the pure steps) and ``gpt2_jax.parallel`` (pmap
over every device of every process): flags, the run directory, data, per-epoch progress bars,
metrics, evaluation, the loss plot, checkpoints and signals. Re-running the same command in the
same ``--run_dir`` resumes from the newest complete checkpoint, bit for bit: the state, the
dropout key and the data position are all in the checkpoint.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import os
import pathlib
import re
import sys
import time
from typing import Sequence

import jax
from absl import flags
from absl import logging as absl_logging

from gpt2_jax import data, loop, parallel, pretrained, rundir
from gpt2_jax import tokenizer as tokenizer_lib
from gpt2_jax.checkpoint import Checkpoints, write_failed
from gpt2_jax.cli import check, define_dtype_flag, parse_flags, rerun_with_huge_pages, resolve_dtype, run
from gpt2_jax.config import PRESETS, GPT2Config
from gpt2_jax.core import SCHEDULES, TrainConfig, total_steps, warmup_steps
from gpt2_jax.errors import UserError


# Named recipes (--recipe): flag values chosen by a study, applied where the flag is not given.
# cpu30: what experiments/cpu_recipe.py chose (by validation word perplexity, in 6-minute ablations)
# for 30 minutes on a 2-core CPU: tiny with the 32k BPE, a higher peak LR, no dropout, wsd.
RECIPES: dict[str, dict] = {
    "cpu30": {"size": "tiny", "vocab_size": 32000, "n_layer": 4, "d_model": 256, "n_head": 4, "d_ff": 1024,
              "batch_size": 32, "lr": 2e-3, "dropout": 0.0, "weight_decay": 0.1, "schedule": "wsd",
              "time_budget_minutes": 30.0, "epochs": 100, "eval_every": 300},
}


def recipe_text(name: str) -> str:
    return " ".join(f"--{k}={v}" for k, v in RECIPES[name].items())


def apply_recipe(fv: flags.FlagValues) -> dict | None:
    """Set ``--recipe``'s flag values where the flag was not given; -> the run.json record, or None."""
    if fv.recipe is None:
        return None
    applied = {}
    for name, value in RECIPES[fv.recipe].items():
        if not fv[name].present:
            fv[name].value = value
            applied[name] = value
    return {"name": fv.recipe, "values": RECIPES[fv.recipe], "overridden": sorted(set(RECIPES[fv.recipe]) - set(applied))}


def _define_flags() -> flags.FlagValues:
    fv = flags.FlagValues()
    d = TrainConfig()
    flags.DEFINE_enum("size", "tiny", list(PRESETS), "model preset (see python -m gpt2_jax.config)", flag_values=fv)
    flags.DEFINE_enum("recipe", None, list(RECIPES), "a named set of flag values (any flag given wins), "
                      "recorded in run.json: " + "; ".join(f"{k}: {recipe_text(k)}" for k in RECIPES),
                      flag_values=fv)
    flags.DEFINE_string("run_dir", None, "run directory: config, tokenizer, checkpoints, metrics, plot. "
                        "Re-running the same command in it resumes the run", flag_values=fv)
    flags.DEFINE_string("data_dir", None,
                        f"folder with wiki.{{train,valid,test}}.tokens (default ${data.DATA_DIR_ENV})", flag_values=fv)
    flags.DEFINE_string("cache_dir", None, f"prepared data, tokenizers and token streams "
                        f"(default ${data.CACHE_ENV} or ~/.cache/gpt2_jax)", flag_values=fv)
    flags.DEFINE_string("init_from", None, "start from these weights instead of random ones: a Hugging Face "
                        "GPT-2 folder or a gpt2_jax run directory. The model and tokenizer come from it; the "
                        f"optimizer starts afresh; defaults become {FINETUNE_DEFAULTS}", flag_values=fv)
    flags.DEFINE_string("init_step", None, "with --init_from=RUN_DIR: its checkpoint to start from (a step, "
                        "'latest' or 'best'; default the newest)", flag_values=fv)
    check(fv, "init_step", lambda v: v in ("latest", "best") or v.isdigit(), "must be a step number, 'latest' or 'best'")
    flags.DEFINE_integer("epochs", d.epochs, "passes over the training split", flag_values=fv)
    flags.DEFINE_integer("max_steps", None, "stop after this many steps (the LR schedule is fitted to the "
                         "shorter run)", flag_values=fv)
    flags.DEFINE_float("time_budget_minutes", None, "stop when this much wall time (compilation, steps, "
                       "evaluations, checkpoints; not data preparation) runs out, or at --epochs/--max_steps if "
                       "sooner: the first steps are timed, then the step count is fixed once (in run.json) and the "
                       "LR schedule ends there", flag_values=fv)
    flags.DEFINE_integer("batch_size", d.batch_size, "global batch in sequences, split over all devices of all "
                         "processes (must be divisible by their number)", flag_values=fv)
    flags.DEFINE_integer("eval_batch_size", None, "evaluation batch (default: --batch_size)", lower_bound=1,
                         flag_values=fv)
    flags.DEFINE_float("lr", d.lr, "peak learning rate", flag_values=fv)
    flags.DEFINE_integer("warmup_steps", d.warmup_steps, "linear warmup steps before the decay (default: "
                         "100, or a tenth of a shorter run)", flag_values=fv)
    flags.DEFINE_enum("schedule", d.schedule, list(SCHEDULES), "after the warmup: cosine decay, or wsd "
                      "(warmup-stable-decay: the peak held, then a linear decay over the last --decay_fraction)",
                      flag_values=fv)
    flags.DEFINE_float("decay_fraction", d.decay_fraction, "--schedule=wsd: the final linear decay's share of "
                       "the steps", flag_values=fv)
    flags.DEFINE_float("final_lr_fraction", d.final_lr_fraction, "the decay ends at lr times this",
                       flag_values=fv)
    flags.DEFINE_float("weight_decay", d.weight_decay, "AdamW decoupled weight decay (kernels and embeddings; "
                       "not biases or LayerNorm)", flag_values=fv)
    flags.DEFINE_float("grad_clip", d.grad_clip, "clip the global gradient norm to this (0 = off)",
                       flag_values=fv)
    flags.DEFINE_float("b2", d.b2, "Adam's second-moment decay", flag_values=fv)
    flags.DEFINE_integer("seed", d.seed, "seed of the parameters, dropout and data order", flag_values=fv)
    flags.DEFINE_float("dropout", None, "dropout on embeddings, residual branches and attention "
                       "(default: the preset's, 0.1)", flag_values=fv)
    define_dtype_flag(fv)
    flags.DEFINE_boolean("remat", False, "recompute activations in the backward pass (less memory)", flag_values=fv)
    for name, help_ in (("vocab_size", "BPE vocabulary"), ("n_ctx", "context = training sequence length"),
                        ("n_layer", "layers"), ("d_model", "model width"), ("n_head", "attention heads"),
                        ("d_ff", "feed-forward width")):
        # 258: the smallest byte-level BPE (256 bytes, <|endoftext|>, one merge), known before any data work
        flags.DEFINE_integer(name, None, f"override the preset's {help_}",
                             lower_bound=258 if name == "vocab_size" else None, flag_values=fv)
    _define_loop_flags(fv)
    return fv


def _define_loop_flags(fv: flags.FlagValues) -> None:
    """How the loop evaluates, saves, logs and joins other processes: no effect on the trajectory."""
    flags.DEFINE_integer("eval_every", 250, "evaluate on the validation split every this many steps "
                         "(and at every epoch end and the last step)", lower_bound=1, flag_values=fv)
    flags.DEFINE_integer("ckpt_every", 500, "save a checkpoint every this many steps (and at every epoch end, "
                         "every evaluation and the last step)", lower_bound=1, flag_values=fv)
    flags.DEFINE_float("ckpt_minutes", 10.0, "also save when this many minutes passed since the last save, so a "
                       "slow run never loses more (0 = off)", lower_bound=0.0, flag_values=fv)
    flags.DEFINE_integer("keep", 3, "checkpoints kept: the newest this many plus the best by validation loss",
                         lower_bound=1, flag_values=fv)
    flags.DEFINE_integer("log_every", 10, "fetch metrics from the devices every this many steps (each step is "
                         "still written); several processes act on a signal or --ckpt_minutes every few "
                         "seconds, at most this many steps apart",
                         lower_bound=1, flag_values=fv)
    flags.DEFINE_boolean("quiet", False, "no progress bars or eval lines, only warnings, errors and a summary",
                         flag_values=fv)
    flags.DEFINE_boolean("verbose", False, "show TensorFlow Datasets' own messages and progress bars while the "
                         "data is prepared", flag_values=fv)
    flags.DEFINE_boolean("distributed", None, "join a multi-process run through jax.distributed, one process per "
                         "host (or per GPU), all sharing one --run_dir. Default: on when --coordinator_address, "
                         "--num_processes or --process_id is given, or under srun / mpirun with 2+ tasks. "
                         "--distributed alone lets JAX read SLURM, Open MPI or a Cloud TPU pod; --nodistributed: never",
                         flag_values=fv)
    flags.DEFINE_string("coordinator_address", None, "HOST:PORT of process 0, reachable from every process "
                        "(process 0 listens on PORT)", flag_values=fv)
    check(fv, "coordinator_address", lambda a: re.fullmatch(r"\S+:\d{1,5}", a) is not None, "must be HOST:PORT")
    flags.DEFINE_integer("num_processes", None, "processes in the run (all started with the same flags)",
                         flag_values=fv)
    flags.DEFINE_integer("process_id", None, "this process's index in [0, --num_processes); process 0 writes the "
                         "logs, metrics and plot", flag_values=fv)
    flags.DEFINE_list("local_device_ids", None, "ids of the local devices this process uses, e.g. 0 or 0,1 "
                      "(default: all of them; one GPU per task under SLURM / Open MPI)", flag_values=fv)


# What a fine-tuning run (--init_from) changes of the from-scratch defaults; any flag given wins.
FINETUNE_DEFAULTS = {"lr": 1e-4, "epochs": 1}
MODEL_FLAGS = ("vocab_size", "n_ctx", "n_layer", "d_model", "n_head", "d_ff")
DISTRIBUTED_FLAGS = ("distributed", "coordinator_address", "num_processes", "process_id", "local_device_ids")


def _flag_error(e: ValueError) -> UserError:
    """A config's ValueError in the words of the flags: ``n_ctx must be >= 1`` -> ``--n_ctx must be >= 1``."""
    names = "|".join(f.name for f in dataclasses.fields(TrainConfig)) + "|" + "|".join(MODEL_FLAGS) + "|dropout"
    return UserError(re.sub(rf"\b(?:GPT2Config\.)?({names})\b(?==| must)", r"--\1", str(e)) + " (see --help)")


def configs_from_flags(fv: flags.FlagValues) -> tuple[GPT2Config, TrainConfig, pretrained.Pretrained | None]:
    """The model and training configs the flags describe, and the weights to start from (--init_from)."""
    overrides = {k: fv[k].value for k in MODEL_FLAGS if fv[k].value is not None}
    # --dtype=auto needs the devices, which must wait for jax.distributed: main settles it (training_dtype).
    training = {"dtype": "float32" if fv.dtype == "auto" else fv.dtype, "remat": fv.remat}
    if fv.dropout is not None:
        training.update(dropout=fv.dropout, attn_dropout=fv.dropout)
    if fv["decay_fraction"].present and fv.schedule != "wsd":
        raise UserError(f"--decay_fraction is the length of --schedule=wsd's final decay; --schedule={fv.schedule} "
                        f"has none: add --schedule=wsd or drop --decay_fraction")
    if fv.time_budget_minutes is not None and fv.warmup_steps is not None and fv.warmup_steps < 2:
        raise UserError(budget_warmup_error(fv.warmup_steps))
    source, values = None, {k: fv[k].value for k in FINETUNE_DEFAULTS}
    if fv.init_from is not None:
        source = pretrained.open_source(fv.init_from, rundir.parse_step(fv.init_step))
        values.update({k: v for k, v in FINETUNE_DEFAULTS.items() if not fv[k].present})
    elif fv.init_step is not None:
        raise UserError("--init_step needs --init_from=RUN_DIR, the run whose checkpoint to start from")
    try:
        if source is None:
            cfg = GPT2Config.preset(fv.size, **training, **overrides)
        else:
            n_ctx = overrides.pop("n_ctx", None)
            cfg = pretrained.model_config(source, size=fv.size if fv["size"].present else None,
                                          overrides=overrides, n_ctx=n_ctx, **training)
        train_cfg = TrainConfig(batch_size=fv.batch_size, max_steps=fv.max_steps,
                                time_budget_minutes=fv.time_budget_minutes, warmup_steps=fv.warmup_steps,
                                schedule=fv.schedule, decay_fraction=fv.decay_fraction,
                                final_lr_fraction=fv.final_lr_fraction, weight_decay=fv.weight_decay,
                                grad_clip=fv.grad_clip, b2=fv.b2, seed=fv.seed, **values)
    except ValueError as e:
        raise _flag_error(e) from None
    return cfg, train_cfg, source


def budget_warmup_error(warmup: int) -> str:
    return (f"--time_budget_minutes times the first steps inside the warmup (its learning rates do not depend on "
            f"the step count still to be fixed), so it needs --warmup_steps >= 2; the warmup is {warmup}")


def init_distributed(fv: flags.FlagValues, environ) -> bool:
    """``parallel.init_distributed`` with the flags of the same names."""
    return parallel.init_distributed(environ, **{k: fv[k].value for k in DISTRIBUTED_FLAGS})


def training_dtype(requested: str, run_dir: pathlib.Path) -> tuple[str, str]:
    """(dtype, why): ``--dtype``, or for auto the dtype a resumed run recorded (its exact trajectory), or
    what auto means on this machine (``resolve_dtype``)."""
    if requested == "auto" and (run_dir / rundir.RUN_FILE).is_file():
        recorded = (rundir.read_run_json(run_dir).get("model") or {}).get("dtype")
        if recorded in ("float32", "bfloat16"):
            return recorded, f"auto: as {run_dir / rundir.RUN_FILE} recorded"
    dtype, why = resolve_dtype(requested, "batched")
    return dtype, why if requested != "auto" else f"auto: {why}"


def main(argv: Sequence[str]) -> int:
    fv = parse_flags(_define_flags(), argv, __doc__)
    if not fv.verbose:
        data.quiet_tfds()
    if not fv.run_dir:
        raise UserError("--run_dir is required: the folder that holds (or will hold) the run")
    recipe = apply_recipe(fv)
    cfg, train_cfg, source = configs_from_flags(fv)
    init_distributed(fv, os.environ)  # before anything else touches JAX
    primary = jax.process_index() == 0
    run_dir = pathlib.Path(fv.run_dir)
    dtype, why = training_dtype(fv.dtype, run_dir)
    cfg = cfg.replace(dtype=dtype)
    parallel.check_divisible("batch_size", train_cfg.batch_size)
    parallel.check_divisible("eval_batch_size", fv.eval_batch_size or train_cfg.batch_size)
    say = functools.partial(print, file=sys.stderr) if primary and not fv.quiet else (lambda *a: None)
    warn = rundir.print_warning if primary else (lambda message: None)
    absl_logging.set_verbosity(absl_logging.ERROR)  # Orbax reports routine progress at WARNING
    record = _run_record(fv, cfg, train_cfg, source, recipe, say)
    # Process 0 first (it alone locks the directory and writes files), then the others, which read
    # its tokenizer.json, so every process encodes the data with the same tokenizer.
    with contextlib.ExitStack() as held:
        opened, error = None, None
        try:
            if primary:
                held.enter_context(rundir.locked_run_dir(run_dir, warn=warn))
                opened = _open_run(fv, cfg, train_cfg, record, run_dir, argv, source)
        except UserError as e:
            error = e
        except OSError as e:  # the run dir or the data cache cannot be written
            error = UserError(f"cannot write {e.filename or run_dir} ({e.strerror}); free disk space or make "
                              f"the folder writable")
        parallel.all_ok(error, f"preparing {run_dir} and the data")
        try:
            if not primary:
                opened = _open_run(fv, cfg, train_cfg, record, run_dir, argv, source)
        except UserError as e:
            error = e
        parallel.all_ok(error, f"reading {run_dir} and the data")
        corpus, spe, num_steps, fixed = opened
        say(f"compute dtype: {dtype} ({why})")
        # The warmup of the most steps the run may do: a time budget fixes fewer, on the same warmup.
        train_cfg = dataclasses.replace(train_cfg, warmup_steps=warmup_steps(train_cfg, total_steps(train_cfg, spe)))
        run_ = loop.Run(fv=fv, cfg=cfg, train_cfg=train_cfg, corpus=corpus, run_dir=run_dir, spe=spe,
                        num_steps=num_steps, say=say, budget_record=fixed)
        checkpoints = Checkpoints(run_dir, keep=fv.keep, warn=warn, quarantine=run_dir / rundir.CORRUPT_DIR)
        try:
            code = loop.train(run_, checkpoints, source)
        except OSError as e:  # metrics, evaluations or the plot could not be written: a full disk, say
            checkpoints.close(report=False)
            raise write_failed(checkpoints.directory, e, f"to {e.filename or run_dir}") from None
        except BaseException:
            checkpoints.close(report=False)
            raise
        checkpoints.close()
        return code


# Config fields added after runs were made: a run.json without one ran with its default.
_ADDED_TRAIN_FIELDS = {"time_budget_minutes": None, "schedule": "cosine", "decay_fraction": 0.2}
_ADDED_MODEL_FIELDS = {"int8_activations": False}


def _run_record(fv, cfg, train_cfg, source, recipe, say) -> dict:
    """What run.json records of the configs (a resumed run must match it): model, train, recipe, init_from."""
    record = {"model": cfg.to_dict(), "train": train_cfg.to_dict()}
    if recipe is not None:
        record["recipe"] = recipe
    if source is not None:
        defaults = [k for k in FINETUNE_DEFAULTS if not fv[k].present]
        record["init_from"] = {**source.record(), "finetune_defaults": defaults}
        if defaults:
            say("fine-tuning defaults: " + ", ".join(f"--{k}={FINETUNE_DEFAULTS[k]:g}" for k in defaults)
                + " (give the flag to override)")
    return record


def _open_run(fv, cfg, train_cfg, record, run_dir, argv, source) -> tuple[data.Corpus, int, int, dict | None]:
    """Check (or, in process 0, create) the run directory; load the corpus.

    -> (corpus, steps per epoch, steps, the time budget's record once it fixed the steps, else None).
    """
    resuming = (run_dir / rundir.RUN_FILE).exists()
    if not resuming and jax.process_index() != 0:
        raise UserError(f"{run_dir / rundir.RUN_FILE}, just written by process 0, is not visible to process "
                        f"{jax.process_index()}; --run_dir must be on a filesystem all processes share")
    tok = None if source is None else source.tokenizer  # fine-tuning: PATH's tokenizer encodes the data
    saved = {}
    if resuming:
        saved = rundir.read_run_json(run_dir)
        before = {k: saved.get(k) for k in record}
        if isinstance(before.get("train"), dict):
            before["train"] = {**_ADDED_TRAIN_FIELDS, **before["train"]}
        if isinstance(before.get("model"), dict):
            before["model"] = {**_ADDED_MODEL_FIELDS, **before["model"]}
        diffs = rundir.config_differences(before, record)
        if diffs:
            more = f" (and {len(diffs) - 1} more)" if len(diffs) > 1 else ""
            raise UserError(f"{run_dir} belongs to a different config: {diffs[0]}{more}; use a new --run_dir "
                            f"or the flags it was started with")
        tok = tokenizer_lib.load_tokenizer(run_dir / rundir.TOKENIZER_FILE)
        rundir.check_tokenizer(run_dir, saved, tok)
    log = functools.partial(print, file=sys.stderr) if jax.process_index() == 0 and not fv.quiet else None
    corpus = data.prepare_corpus(fv.data_dir, fv.cache_dir, vocab_size=cfg.vocab_size, tokenizer=tok, log=log)
    tokenizer_lib.check_vocab_matches(corpus.tokenizer, cfg)
    spe = data.steps_per_epoch(len(corpus.tokens["train"]), cfg.n_ctx, train_cfg.batch_size)
    num_steps = total_steps(train_cfg, spe)  # under a time budget: the most it may fix
    try:
        warmup = warmup_steps(train_cfg, num_steps)  # fixed now, before a time budget fixes the step count
    except ValueError as e:
        raise UserError(f"--{e}; lower it or raise --max_steps/--epochs") from None
    if train_cfg.time_budget_minutes is not None and warmup < 2:
        raise UserError(budget_warmup_error(warmup))
    fixed = saved.get("time_budget")
    if fixed is not None:
        if not (isinstance(fixed, dict) and isinstance(fixed.get("steps"), int) and warmup < fixed["steps"] <= num_steps
                and isinstance(fixed.get("fixed_at_step"), int)):
            raise UserError(f"{run_dir / rundir.RUN_FILE}'s time_budget record is damaged (no steps between the "
                            f"{warmup} warmup steps and {num_steps}, or no fixed_at_step); restore it from a copy")
        num_steps = fixed["steps"]
    if not resuming:
        run_dir.mkdir(parents=True, exist_ok=True)
        tokenizer_lib.save_tokenizer(corpus.tokenizer, run_dir / rundir.TOKENIZER_FILE)
        rundir.write_run_json(run_dir, {**record, "steps_per_epoch": spe, "total_steps": num_steps,
                                        "warmup_steps": warmup,
                                        "tokenizer": tokenizer_lib.tokenizer_fingerprint(corpus.tokenizer),
                                        "created": time.strftime("%Y-%m-%d %H:%M:%S"), "command": list(argv)})
    return corpus, spe, num_steps, fixed


# Out of memory in training: a smaller batch, or activations recomputed instead of kept.
OUT_OF_MEMORY = "lower --batch_size (or --eval_batch_size) or pass --remat"

if __name__ == "__main__":
    rerun_with_huge_pages()
    run(main, out_of_memory=OUT_OF_MEMORY)
