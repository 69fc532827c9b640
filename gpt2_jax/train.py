"""Train GPT-2 on WikiText-2: ``python -m gpt2_jax.train --size=tiny --run_dir=runs/tiny``.

The pure core, for research code that builds its own loop::

    train_cfg = TrainConfig(lr=6e-4, batch_size=32)
    num_steps = total_steps(train_cfg, steps_per_epoch)
    optimizer, schedule = make_optimizer(train_cfg, num_steps), make_schedule(train_cfg, num_steps)
    state = init_train_state(cfg, optimizer, jax.random.PRNGKey(0))
    step = jax.pmap(make_train_step(cfg, optimizer, schedule), axis_name=AXIS, in_axes=(0, 0, None))
    state_N, metrics_N = step(replicate(state), batch_NBT, dropout_key)

(``axis_name=None`` gives a step for a single device under plain ``jax.jit``.)

The shell, ``main``: flags, data, the run directory (see ``gpt2_jax.checkpoint``), a loop with
per-epoch progress bars, per-step metrics, evaluation, the loss plot, Orbax checkpoints and
signals. Re-running the same command in the same ``--run_dir`` resumes from the newest complete
checkpoint, bit for bit on the same devices: the state, the dropout key and the data position are
all in the checkpoint, and every step's randomness is derived from (seed, step, global row). One
training process at a time holds a run directory (``run.lock``); a write that fails (a full or
read-only disk) stops the run with one line naming the newest complete checkpoint, and a
non-finite loss, gradient or parameter norm stops it before any checkpoint of the bad state.

Several hosts (``--distributed``, see ``init_distributed``): one process per host (or per GPU)
joins JAX's multi-controller runtime; the same pmapped step then spans every device of every
process, each process builds only its own rows of every global batch, process 0 alone writes
logs, metrics and the plot, and all processes save and restore the Orbax checkpoints of one run
directory that they all see (a shared filesystem). The global device index (``lax.axis_index``
over all processes) picks a device's rows and dropout key, so 2 processes x 1 device train
exactly as 1 process x 2 devices.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import functools
import itertools
import math
import os
import pathlib
import re
import signal
import sys
import time
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

import chex
import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import flags
from absl import logging as absl_logging
from flax import jax_utils
from jax import lax
from jax.experimental import multihost_utils
from tqdm import tqdm

from gpt2_jax import checkpoint as ckpt
from gpt2_jax import data
from gpt2_jax import evaluate as evaluate_lib
from gpt2_jax import metrics as metrics_lib
from gpt2_jax import pretrained
from gpt2_jax import tokenizer as tokenizer_lib
from gpt2_jax.cli import check, parse_flags, run
from gpt2_jax.errors import UserError
from gpt2_jax.config import PRESETS, GPT2Config
from gpt2_jax.model import chunked_token_nll, forward, init_params

AXIS = "devices"  # the pmap axis: one entry per device of every process (each process holds its local ones)


# ================================================================ pure core


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Everything that decides the optimisation trajectory (a run dir refuses a different one)."""

    batch_size: int = 32  # global: sequences per step over all devices
    epochs: int = 5
    max_steps: int | None = None  # stop before the last epoch ends (the LR schedule then ends here too)
    lr: float = 6e-4  # peak learning rate
    warmup_steps: int | None = None  # linear from 0 to lr, then cosine down; None: see warmup_steps()
    final_lr_fraction: float = 0.1
    weight_decay: float = 0.1  # decoupled (AdamW), on matrices only: see decay_mask
    grad_clip: float = 1.0  # global gradient norm; 0 disables
    b1: float = 0.9
    b2: float = 0.95  # GPT-3's; steadier than 0.999 when the loss drops fast early on
    eps: float = 1e-8
    seed: int = 0  # parameters, dropout and data order

    def __post_init__(self):
        positive = {"batch_size": self.batch_size, "epochs": self.epochs, "lr": self.lr}
        for name, value in positive.items():
            if not value > 0:
                raise ValueError(f"{name} must be > 0, got {value}")
        if self.max_steps is not None and self.max_steps < 1:
            raise ValueError(f"max_steps must be >= 1, got {self.max_steps}")
        for name in ("warmup_steps", "weight_decay", "grad_clip", "seed"):
            if getattr(self, name) is not None and getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if not 0.0 <= self.final_lr_fraction <= 1.0:
            raise ValueError(f"final_lr_fraction must be in [0, 1], got {self.final_lr_fraction}")
        if not (0.0 <= self.b1 < 1.0 and 0.0 <= self.b2 < 1.0):
            raise ValueError(f"Adam betas must be in [0, 1), got b1={self.b1}, b2={self.b2}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def total_steps(train_cfg: TrainConfig, steps_per_epoch: int) -> int:
    """Steps the run takes: all epochs, or ``max_steps`` if that comes first."""
    n = train_cfg.epochs * steps_per_epoch
    return n if train_cfg.max_steps is None else min(n, train_cfg.max_steps)


def warmup_steps(train_cfg: TrainConfig, num_steps: int) -> int:
    """The run's warmup: ``train_cfg.warmup_steps``, or by default 100 steps, a tenth of a shorter run
    (so a first 20-step smoke run just works)."""
    return min(100, num_steps // 10) if train_cfg.warmup_steps is None else train_cfg.warmup_steps


def make_schedule(train_cfg: TrainConfig, num_steps: int) -> optax.Schedule:
    """Learning rate at each step: linear warmup 0 -> lr, then cosine to ``lr * final_lr_fraction`` at ``num_steps``."""
    warmup = warmup_steps(train_cfg, num_steps)
    if not 0 <= warmup < num_steps:
        raise ValueError(f"warmup_steps={warmup} must be smaller than the {num_steps} training steps")
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=train_cfg.lr, warmup_steps=warmup,
        decay_steps=num_steps, end_value=train_cfg.lr * train_cfg.final_lr_fraction)


def decay_mask(params) -> Any:
    """True for the parameters weight decay applies to: every Dense kernel and both embedding tables.

    Biases and LayerNorm scales/offsets are not decayed: they shift and rescale activations, and
    pulling them to 0 regularises nothing (a LayerNorm scale at 0 switches its layer off).
    Embeddings ARE decayed, as in GPT-3 and nanoGPT: ``wte`` is also the tied output projection
    (a matrix that produces the logits like any kernel), and on a corpus as small as WikiText-2,
    where the model overfits within a few epochs, the extra pull on rarely seen token rows helps.
    """
    return jax.tree_util.tree_map_with_path(lambda path, _: path[-1].key in ("kernel", "embedding"), params)


def make_optimizer(train_cfg: TrainConfig, num_steps: int) -> optax.GradientTransformation:
    """Global-norm clipping, then AdamW (decoupled weight decay on ``decay_mask``) on ``make_schedule``."""
    clip = optax.clip_by_global_norm(train_cfg.grad_clip) if train_cfg.grad_clip > 0 else optax.identity()
    return optax.chain(
        clip,
        optax.adamw(make_schedule(train_cfg, num_steps), b1=train_cfg.b1, b2=train_cfg.b2, eps=train_cfg.eps,
                    weight_decay=train_cfg.weight_decay, mask=decay_mask),
    )


@flax.struct.dataclass
class TrainState:
    """What a step changes: a pytree, so it can be replicated, donated and checkpointed whole."""

    params: Any
    opt_state: Any
    step: jax.Array  # int32 scalar: updates applied so far


def init_train_state(cfg: GPT2Config, optimizer: optax.GradientTransformation, rng: jax.Array) -> TrainState:
    params = init_params(cfg, rng)
    return TrainState(params=params, opt_state=optimizer.init(params), step=jnp.zeros((), jnp.int32))


Batch = dict  # {"inputs": int32 (B, T), "targets": int32 (B, T), "mask": float32 (B, T)} per device


def example_keys(rng: jax.Array, step: jax.Array, first_row: jax.Array | int, rows: int) -> jax.Array:
    """Dropout keys of global batch rows ``first_row .. first_row + rows - 1`` at ``step``.

    ``fold_in(fold_in(rng, step), global row)``: a row's masks depend on the step and on its place
    in the global batch only, so 1 device, 2 devices and 2 processes of 1 device train alike (up
    to float reduction order), and a run resumed on another device count keeps its trajectory.
    """
    step_key = jax.random.fold_in(rng, step)
    return jax.vmap(lambda row: jax.random.fold_in(step_key, row))(first_row + jnp.arange(rows))


def make_train_step(cfg: GPT2Config, optimizer: optax.GradientTransformation, schedule: optax.Schedule, *,
                    axis_name: str | None = AXIS) -> Callable[[TrainState, Batch, jax.Array], tuple[TrainState, dict]]:
    """``train_step(state, batch, rng) -> (state, metrics)``: one AdamW update on the masked mean next-token loss.

    ``rng`` is the run's dropout key; each row draws its masks from ``example_keys`` (its global
    row index: this device's index along ``axis_name`` times its rows, plus the row), so a resumed
    run draws exactly the same masks however the batch is split. Under
    ``jax.pmap(..., axis_name=axis_name)`` every device sees its rows of the global batch and all
    devices end with identical states and metrics (all-reduced).
    """

    def train_step(state: TrainState, batch: Batch, rng: jax.Array) -> tuple[TrainState, dict]:
        inputs_BT, targets_BT, mask_BT = batch["inputs"], batch["targets"], batch["mask"]
        chex.assert_rank(inputs_BT, 2)
        chex.assert_equal_shape([inputs_BT, targets_BT, mask_BT])
        tokens = mask_BT.sum()
        if axis_name is not None:
            tokens = lax.psum(tokens, axis_name)
        B = inputs_BT.shape[0]
        first_row = 0 if axis_name is None else lax.axis_index(axis_name) * B
        keys_B = example_keys(rng, state.step, first_row, B)

        def row_features(params, tokens_T, key):  # one row, its own dropout key
            return forward(params, cfg, tokens_T[None], deterministic=False, rng=key, head=False)[0]

        def loss_fn(params):
            x_BTD = jax.vmap(row_features, in_axes=(None, 0, 0))(params, inputs_BT, keys_B)
            nll_BT = chunked_token_nll(x_BTD, params["wte"]["embedding"], targets_BT)
            # This device's NLL sum over the GLOBAL number of scored tokens: summed over devices it
            # is exactly the global masked mean (and so is its gradient) however the masks differ,
            # where a pmean of per-device means would weigh a half-masked device like a full one.
            return (nll_BT * mask_BT).sum() / jnp.maximum(tokens, 1.0)

        loss, grads = jax.value_and_grad(loss_fn)(state.params)
        if axis_name is not None:
            loss, grads = lax.psum((loss, grads), axis_name)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics = {
            "loss": loss,
            "grad_norm": optax.global_norm(grads),  # before clipping
            "param_norm": optax.global_norm(params),  # non-finite as soon as the state is
            "lr": schedule(state.step),
            "tokens": tokens,
        }
        return TrainState(params=params, opt_state=opt_state, step=state.step + 1), metrics

    return train_step


def make_eval_step(cfg: GPT2Config, *, axis_name: str | None = AXIS) -> Callable[[Any, Batch], dict]:
    """``eval_step(params, batch) -> {"nll_sum", "tokens"}`` summed over the batch (and devices): exact means."""

    def eval_step(params, batch: Batch) -> dict:
        x_BTD = forward(params, cfg, batch["inputs"], deterministic=True, head=False)
        nll_BT = chunked_token_nll(x_BTD, params["wte"]["embedding"], batch["targets"])
        mask_BT = batch["mask"]
        out = {"nll_sum": (nll_BT * mask_BT).sum(), "tokens": mask_BT.sum()}
        return lax.psum(out, axis_name) if axis_name is not None else out

    return eval_step


def replicate(tree, devices: Sequence[jax.Device] | None = None):
    """One copy of ``tree`` per local device (leading axis N), laid out exactly as ``pmap(axis_name=AXIS)``
    returns its outputs, so the step's second call does not compile again for a different input sharding."""
    return jax_utils.replicate(tree, devices, axis_name=AXIS)


def device_sharding(devices: Sequence[jax.Device] | None = None) -> jax.sharding.NamedSharding:
    """Leading axis split over the local ``devices``: the layout ``replicate`` gives and pmap's inputs take."""
    mesh = jax.sharding.Mesh(np.asarray(devices or jax.local_devices()), (AXIS,))
    return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(AXIS))


_first_copy = jax.jit(lambda tree_N: jax.tree.map(lambda x: x[0], tree_N))


def unreplicate_global(tree_N):
    """The one value of a pmap-replicated ``tree_N`` (leading axis = local devices) as global arrays
    replicated over every device of every process, without a host copy.

    That is the form in which Orbax saves a replicated value from several processes: every process
    calls save, and only the holder of replica 0 writes. (A plain ``tree_N[0]`` is a host-local array,
    which Orbax refuses in a multi-process run.)
    """
    leaves, treedef = jax.tree.flatten(tree_N)
    devices = jax.local_devices()
    by_device = {d: [] for d in devices}
    for x in leaves:
        shards = {s.device: s.data for s in x.addressable_shards}
        assert sorted(shards, key=lambda d: d.id) == sorted(devices, key=lambda d: d.id), (x.sharding, devices)
        for d in devices:
            by_device[d].append(shards[d])
    firsts = {d: _first_copy(by_device[d]) for d in devices}  # one dispatch per device, on that device
    everywhere = jax.sharding.NamedSharding(jax.sharding.Mesh(np.asarray(jax.devices()), ("all",)),
                                            jax.sharding.PartitionSpec())
    out = [jax.make_array_from_single_device_arrays(x.shape[1:], everywhere, [firsts[d][i] for d in devices])
           for i, x in enumerate(leaves)]
    return jax.tree.unflatten(treedef, out)


def prefetch_to_devices(items: Iterator[tuple[Any, Batch]], sharding: jax.sharding.Sharding,
                        depth: int = 2) -> Iterator[tuple[Any, Batch]]:
    """``(tag, batch)`` pairs with each batch already sent to the devices, ``depth`` batches ahead.

    Transfers are asynchronous, so the host builds and sends the next batches while the devices
    run the dispatched steps. A tag (the data position after the batch) travels with its batch,
    so whoever consumes a batch knows exactly where the stream stands, however far ahead it was read.
    """
    assert depth >= 1, depth
    queue: collections.deque = collections.deque()

    def enqueue(n: int) -> None:
        for tag, batch in itertools.islice(items, n):
            queue.append((tag, jax.device_put(batch, sharding)))

    enqueue(depth)
    while queue:
        yield queue.popleft()
        enqueue(1)


def collectives_need_serial_dispatch() -> bool:
    """True where independent pmapped calls must not be queued ahead: several CPU devices in a process.

    XLA:CPU runs every local device's executions on one thread pool (a thread per core). Calls
    with no data dependency between them (evaluation batches) may then run concurrently, and
    with as few threads as devices every thread can end up in an all-reduce waiting for a peer
    execution that never gets a thread: measured on 2 cores with 2 devices at tiny size, the
    validation pass aborted with "rendezvous ... Termination timeout of 40 seconds exceeded".
    """
    return jax.local_devices()[0].platform == "cpu" and jax.local_device_count() > 1


def evaluate(p_eval_step: Callable, params_N, batches: Iterable[Batch]) -> tuple[float, float]:
    """(total NLL in nats, scored tokens) of a pmapped ``eval_step`` over ``batches``, summed in float64."""
    serial = collectives_need_serial_dispatch()
    outs = []
    for b in batches:  # dispatched back to back (one at a time where they would deadlock), fetched once
        outs.append(p_eval_step(params_N, b))
        if serial:
            jax.block_until_ready(outs[-1])
    host = jax.device_get(outs)
    nll = math.fsum(float(o["nll_sum"][0]) for o in host)
    tokens = math.fsum(float(o["tokens"][0]) for o in host)
    return nll, tokens


# ================================================================ the shell: flags and the loop


def _define_flags() -> flags.FlagValues:
    fv = flags.FlagValues()
    d = TrainConfig()
    flags.DEFINE_enum("size", "tiny", list(PRESETS), "model preset (see python -m gpt2_jax.config)", flag_values=fv)
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
    flags.DEFINE_integer("epochs", d.epochs, "passes over the training split", lower_bound=1, flag_values=fv)
    flags.DEFINE_integer("max_steps", None, "stop after this many steps (the LR schedule is fitted to the "
                         "shorter run)", lower_bound=1, flag_values=fv)
    flags.DEFINE_integer("batch_size", d.batch_size, "global batch in sequences, split over all devices of all "
                         "processes (must be divisible by their number)", lower_bound=1, flag_values=fv)
    flags.DEFINE_integer("eval_batch_size", None, "evaluation batch (default: --batch_size)", lower_bound=1,
                         flag_values=fv)
    flags.DEFINE_float("lr", d.lr, "peak learning rate", flag_values=fv)
    check(fv, "lr", lambda v: v > 0, "must be > 0")
    flags.DEFINE_integer("warmup_steps", d.warmup_steps, "linear warmup steps before the cosine decay (default: "
                         "100, or a tenth of a shorter run)", lower_bound=0, flag_values=fv)
    flags.DEFINE_float("final_lr_fraction", d.final_lr_fraction, "the cosine ends at lr times this",
                       lower_bound=0.0, upper_bound=1.0, flag_values=fv)
    flags.DEFINE_float("weight_decay", d.weight_decay, "AdamW decoupled weight decay (kernels and embeddings; "
                       "not biases or LayerNorm)", lower_bound=0.0, flag_values=fv)
    flags.DEFINE_float("grad_clip", d.grad_clip, "clip the global gradient norm to this (0 = off)",
                       lower_bound=0.0, flag_values=fv)
    flags.DEFINE_float("b2", d.b2, "Adam's second-moment decay", flag_values=fv)
    check(fv, "b2", lambda v: 0 <= v < 1, "must be in [0, 1)")
    # jax.random.PRNGKey keeps 32 bits: seed 2**32 would start from seed 0's parameters.
    flags.DEFINE_integer("seed", d.seed, "seed of the parameters, dropout and data order", lower_bound=0,
                         upper_bound=2**32 - 1, flag_values=fv)
    flags.DEFINE_float("dropout", None, "dropout on embeddings, residual branches and attention "
                       "(default: the preset's, 0.1)", flag_values=fv)
    check(fv, "dropout", lambda v: 0 <= v < 1, "must be in [0, 1)")
    flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "compute dtype (parameters stay float32)",
                      flag_values=fv)
    flags.DEFINE_boolean("remat", False, "recompute activations in the backward pass (less memory)", flag_values=fv)
    for name, help_ in (("vocab_size", "BPE vocabulary"), ("n_ctx", "context = training sequence length"),
                        ("n_layer", "layers"), ("d_model", "model width"), ("n_head", "attention heads"),
                        ("d_ff", "feed-forward width")):
        # 258: the smallest byte-level BPE (256 bytes, <|endoftext|>, one merge)
        flags.DEFINE_integer(name, None, f"override the preset's {help_}",
                             lower_bound=258 if name == "vocab_size" else 1, flag_values=fv)
    flags.DEFINE_integer("eval_every", 250, "evaluate on the validation split every this many steps "
                         "(and at every epoch end and the last step)", flag_values=fv)
    flags.DEFINE_integer("ckpt_every", 500, "save a checkpoint every this many steps (and at every epoch end, "
                         "every evaluation and the last step)", flag_values=fv)
    flags.DEFINE_float("ckpt_minutes", 10.0, "also save when this many minutes passed since the last save, so a "
                       "slow run never loses more (0 = off)", flag_values=fv)
    flags.DEFINE_integer("keep", 3, "checkpoints kept: the newest this many plus the best by validation loss",
                         flag_values=fv)
    flags.DEFINE_integer("log_every", 10, "fetch metrics from the devices every this many steps (each step is "
                         "still written); several processes act on a signal or --ckpt_minutes every few "
                         "seconds, at most this many steps apart",
                         flag_values=fv)
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
    return fv


# What a fine-tuning run (--init_from) changes of the from-scratch defaults; any flag given wins.
FINETUNE_DEFAULTS = {"lr": 1e-4, "epochs": 1}


def configs_from_flags(fv: flags.FlagValues) -> tuple[GPT2Config, TrainConfig, pretrained.Pretrained | None]:
    """The model and training configs the flags describe, and the weights to start from (--init_from)."""
    preset = PRESETS[fv.size]
    d_model = preset.d_model if fv.d_model is None else fv.d_model
    n_head = preset.n_head if fv.n_head is None else fv.n_head
    if d_model % n_head:
        raise UserError(f"--d_model={d_model} is not divisible by --n_head={n_head}; the heads split the width "
                        f"evenly")
    overrides = {k: fv[k].value for k in ("vocab_size", "n_ctx", "n_layer", "d_model", "n_head", "d_ff")
                 if fv[k].value is not None}
    training = {"dtype": fv.dtype, "remat": fv.remat}
    if fv.dropout is not None:
        training.update(dropout=fv.dropout, attn_dropout=fv.dropout)
    source, values = None, {k: fv[k].value for k in FINETUNE_DEFAULTS}
    if fv.init_from is not None:
        source = pretrained.open_source(fv.init_from, ckpt.parse_step(fv.init_step))
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
        train_cfg = TrainConfig(batch_size=fv.batch_size, max_steps=fv.max_steps, warmup_steps=fv.warmup_steps,
                                final_lr_fraction=fv.final_lr_fraction, weight_decay=fv.weight_decay,
                                grad_clip=fv.grad_clip, b2=fv.b2, seed=fv.seed, **values)
    except ValueError as e:
        raise UserError(f"{e} (see --help)") from None
    return cfg, train_cfg, source


class _StopRequest:
    """Signal handler that only records the signal; the loop saves and exits at the end of its step."""

    def __init__(self):
        self.signum = 0  # 0: none yet

    def __call__(self, signum, frame):
        self.signum = signum
        signal.signal(signum, signal.SIG_DFL)  # a second one ends the process at once, unsaved


class _Diverged(Exception):
    pass


def _check_divisible(what: str, n: int) -> None:
    devices, processes = jax.device_count(), jax.process_count()
    if n % devices:
        where = (f"{devices} local devices" if processes == 1 else
                 f"{devices} devices ({processes} processes x {jax.local_device_count()} local devices)")
        raise UserError(f"--{what}={n} is not divisible by the {where}; use a multiple of {devices}")


# ---------------------------------------------------------------- the shell: several processes


def cluster_task_count(environ: Mapping[str, str]) -> int:
    """Tasks of the srun (SLURM) or mpirun (Open MPI) launch this process is part of; 1 outside both.

    Reads the variables ``jax.distributed.initialize()`` configures itself from, so a run is made
    distributed automatically exactly when JAX would find its peers there.
    """
    if "OMPI_MCA_orte_hnp_uri" in environ and "OMPI_COMM_WORLD_SIZE" in environ:  # set by mpirun only
        return int(environ["OMPI_COMM_WORLD_SIZE"])
    slurm = ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS", "SLURM_PROCID", "SLURM_LOCALID")
    if all(v in environ for v in slurm):
        return int(environ["SLURM_NTASKS"])
    return 1


def init_distributed(fv: flags.FlagValues, environ: Mapping[str, str]) -> bool:
    """Join the multi-process run the flags (or the cluster environment) ask for; False when there is none.

    Must run before anything else touches JAX: it decides which devices exist.
    """
    explicit = [k for k in ("coordinator_address", "num_processes", "process_id", "local_device_ids")
                if fv[k].value is not None]
    if fv.distributed is False:
        if explicit:
            raise UserError(f"--nodistributed contradicts --{explicit[0]}; drop one of them")
        return False
    if not (fv.distributed or explicit or cluster_task_count(environ) > 1):
        return False
    if fv.num_processes is not None and fv.num_processes < 1:
        raise UserError(f"--num_processes must be >= 1, got {fv.num_processes}")
    if fv.process_id is not None and not 0 <= fv.process_id < (fv.num_processes or fv.process_id + 1):
        raise UserError(f"--process_id={fv.process_id} must be in [0, --num_processes={fv.num_processes})")
    ids = fv.local_device_ids
    if ids is not None and not all(i.strip().isdigit() for i in ids):  # isdigit: also refuses -1
        raise UserError(f"--local_device_ids must be integers like 0 or 0,1, got {','.join(ids)}")
    local_ids = None if ids is None else [int(i) for i in ids]
    # CPU devices of different processes all-reduce through gloo (GPUs use NCCL, TPUs their own links).
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    try:
        jax.distributed.initialize(coordinator_address=fv.coordinator_address, num_processes=fv.num_processes,
                                   process_id=fv.process_id, local_device_ids=local_ids)
    except ValueError as e:  # settings missing and no cluster environment to read them from
        raise UserError(f"cannot start a distributed run ({_first_line(e)}); outside SLURM, Open MPI or a TPU pod "
                        f"pass --coordinator_address=HOST:PORT, --num_processes and --process_id") from None
    except RuntimeError as e:  # coordinator unreachable, timed out, or JAX already in use in this process
        raise UserError(f"cannot join the distributed run at {fv.coordinator_address or 'the detected coordinator'} "
                        f"({_first_line(e)}); start every process with the same --coordinator_address, "
                        f"--num_processes and a distinct --process_id") from None
    return True


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0][:200]


def _all_ok(error: UserError | None, doing: str) -> None:
    """Raise in every process if ``error`` happened in any, so no process waits forever for a failed peer."""
    if jax.process_count() == 1:
        if error is not None:
            raise error
        return
    failed = multihost_utils.process_allgather(np.int32(error is not None))
    if error is not None:
        raise error
    if failed.any():
        raise UserError(f"process {int(np.argmax(failed))} failed while {doing} (its error says why); "
                        f"every process stops")


class _CheckIns:
    """Where the processes of a run agree on signals and overdue saves, and when they next will.

    Every process must take the same decision at the same step, so the steps between check-ins
    come from an all-gather too: as many as the slowest process does in ``CHECK_IN_SECONDS``,
    at least 1 and at most ``--log_every``. A signal is then acted on within a few seconds however
    slow a step is. One process checks in at every step (nothing to agree on).
    """

    CHECK_IN_SECONDS = 5.0

    def __init__(self, step: int):
        self.next_step, self._step, self._time = step + 1, step, time.monotonic()

    def __call__(self, step: int, signum: int, overdue: bool, log_every: int) -> tuple[int, bool]:
        """(a signal any process received or 0, whether any process is overdue for a save)."""
        now = time.monotonic()
        step_ms = 1000 * (now - self._time) / max(step - self._step, 1)
        self._step, self._time = step, now
        if jax.process_count() == 1:
            self.next_step = step + 1
            return signum, overdue
        votes = multihost_utils.process_allgather(np.asarray([signum, overdue, math.ceil(step_ms)], np.int32))
        slowest_s = max(int(votes[:, 2].max()), 1) / 1000
        every = max(1, min(log_every, int(self.CHECK_IN_SECONDS / slowest_s)))
        self.next_step = (step // every + 1) * every  # multiples of --log_every while steps are fast
        signals = [int(v) for v in votes[:, 0] if v]
        return (signals[0] if signals else 0), bool(votes[:, 1].any())


def main(argv: Sequence[str]) -> int:
    fv = parse_flags(_define_flags(), argv, __doc__)
    if not fv.verbose:
        data.quiet_tfds()
    if not fv.run_dir:
        raise UserError("--run_dir is required: the folder that holds (or will hold) the run")
    for name in ("eval_every", "ckpt_every", "keep", "log_every"):
        if fv[name].value < 1:
            raise UserError(f"--{name} must be >= 1, got {fv[name].value}")
    if fv.ckpt_minutes < 0:
        raise UserError(f"--ckpt_minutes must be >= 0 (0 = off), got {fv.ckpt_minutes}")
    cfg, train_cfg, source = configs_from_flags(fv)
    init_distributed(fv, os.environ)  # before anything else touches JAX
    primary = jax.process_index() == 0
    run_dir = pathlib.Path(fv.run_dir)
    _check_divisible("batch_size", train_cfg.batch_size)
    _check_divisible("eval_batch_size", fv.eval_batch_size or train_cfg.batch_size)
    say = functools.partial(print, file=sys.stderr) if primary and not fv.quiet else (lambda *a: None)
    warn = ckpt.print_warning if primary else (lambda message: None)
    absl_logging.set_verbosity(absl_logging.ERROR)  # Orbax reports routine progress at WARNING

    # ---- the run directory and the data: process 0 first (it alone locks the directory and creates
    # files), then the others, which read its tokenizer.json, so every process encodes the data with
    # the same tokenizer.
    record = {"model": cfg.to_dict(), "train": train_cfg.to_dict()}
    if source is not None:
        defaults = [k for k in FINETUNE_DEFAULTS if not fv[k].present]
        record["init_from"] = {**source.record(), "finetune_defaults": defaults}
        if defaults:
            say("fine-tuning defaults: " + ", ".join(f"--{k}={FINETUNE_DEFAULTS[k]:g}" for k in defaults)
                + " (give the flag to override)")
    with contextlib.ExitStack() as held:
        opened, error = None, None
        try:
            if primary:
                held.enter_context(ckpt.locked_run_dir(run_dir, warn=warn))
                opened = _open_run(fv, cfg, train_cfg, record, run_dir, argv, source)
        except UserError as e:
            error = e
        except OSError as e:  # the run dir or the data cache cannot be written
            error = UserError(f"cannot write {e.filename or run_dir} ({e.strerror}); free disk space or make "
                              f"the folder writable")
        _all_ok(error, f"preparing {run_dir} and the data")
        try:
            if not primary:
                opened = _open_run(fv, cfg, train_cfg, record, run_dir, argv, source)
        except UserError as e:
            error = e
        _all_ok(error, f"reading {run_dir} and the data")
        return _restore_and_train(fv, cfg, train_cfg, run_dir, *opened, say, warn, source=source)


def _restore_and_train(fv, cfg, train_cfg, run_dir, corpus, spe, num_steps, say, warn, *, source) -> int:
    eval_batch = fv.eval_batch_size or train_cfg.batch_size
    schedule = make_schedule(train_cfg, num_steps)
    optimizer = make_optimizer(train_cfg, num_steps)
    params_key, dropout_key = jax.random.split(jax.random.PRNGKey(train_cfg.seed))
    init = functools.partial(init_train_state, cfg, optimizer)
    abstract = jax.eval_shape(init, params_key)
    manager = ckpt.make_manager(run_dir, keep=fv.keep, warn=warn, quarantine=run_dir / ckpt.CORRUPT_DIR)
    try:
        restored = ckpt.restore_latest(manager, abstract.params, abstract.opt_state, model=cfg.architecture(),
                                       warn=warn, quarantine=run_dir / ckpt.CORRUPT_DIR)
        if jax.process_count() > 1:
            found = multihost_utils.process_allgather(np.int32(-1 if restored is None else restored.step))
            if len(set(found.tolist())) > 1:
                raise UserError(f"the processes found different checkpoints in {run_dir} (steps "
                                f"{sorted(set(found.tolist()))}); --run_dir must be one folder all processes see")
        if restored is None:
            state = jax.jit(init)(params_key) if source is None else _pretrained_state(source, cfg, optimizer, say)
            position, rng = data.DataPosition(), dropout_key
            if jax.process_count() > 1:  # every process starts from process 0's bits, whatever its float rounding
                state = state.replace(params=multihost_utils.broadcast_one_to_all(state.params))
        else:
            state = TrainState(params=restored.params, opt_state=restored.opt_state,
                               step=jnp.asarray(restored.step, jnp.int32))
            position = data.DataPosition.from_dict(restored.meta["data_position"])
            rng = jnp.asarray(restored.meta["rng"], jnp.uint32)
            assert position == data.DataPosition(*divmod(restored.step, spe)), (position, restored.step, spe)
            ckpt.prune(manager, fv.keep)  # what a kill stopped Orbax from removing
            say(f"resuming {run_dir} from step {restored.step} (epoch {restored.step / spe:.2f})")
        code = _train(fv, cfg, train_cfg, corpus, run_dir, manager, optimizer, schedule, state, position, rng,
                      spe, num_steps, eval_batch, say, evaluate_first=source is not None)
    except OSError as e:  # metrics, evaluations or the plot could not be written: a full disk, say
        ckpt.close_manager(manager, report=False)
        raise ckpt.write_failed(run_dir / ckpt.CHECKPOINT_DIR, e, f"to {e.filename or run_dir}") from None
    except BaseException:
        ckpt.close_manager(manager, report=False)
        raise
    ckpt.close_manager(manager)
    return code


def _pretrained_state(source: pretrained.Pretrained, cfg: GPT2Config, optimizer, say) -> TrainState:
    """Step 0 of a fine-tuning run: PATH's weights (at ``cfg``'s context) and a fresh optimizer."""
    params, from_step = pretrained.load_params(source)
    params = pretrained.fit_context(params, cfg.n_ctx)
    where = f"{source.path} (step {from_step})" if source.kind == "run" else str(source.path)
    shorter = f", its first {cfg.n_ctx} of {source.cfg.n_ctx} positions" if cfg.n_ctx < source.cfg.n_ctx else ""
    say(f"fine-tuning {where} at context {cfg.n_ctx}{shorter}")
    return TrainState(params=params, opt_state=optimizer.init(params), step=jnp.zeros((), jnp.int32))


def _open_run(fv, cfg, train_cfg, record, run_dir, argv, source) -> tuple[data.Corpus, int, int]:
    """Check (or, in process 0, create) the run directory; load the corpus. -> (corpus, steps per epoch, steps)."""
    primary = jax.process_index() == 0
    resuming = (run_dir / ckpt.RUN_FILE).exists()
    if not resuming and not primary:
        raise UserError(f"{run_dir / ckpt.RUN_FILE}, just written by process 0, is not visible to process "
                        f"{jax.process_index()}; --run_dir must be on a filesystem all processes share")
    tok = None if source is None else source.tokenizer  # fine-tuning: PATH's tokenizer encodes the data
    if resuming:
        saved = ckpt.read_run_json(run_dir)
        diffs = ckpt.config_differences({k: saved.get(k) for k in record}, record)
        if diffs:
            more = f" (and {len(diffs) - 1} more)" if len(diffs) > 1 else ""
            raise UserError(f"{run_dir} belongs to a different config: {diffs[0]}{more}; use a new --run_dir "
                            f"or the flags it was started with")
        tok = tokenizer_lib.load_tokenizer(run_dir / ckpt.TOKENIZER_FILE)
        ckpt.check_tokenizer(run_dir, saved, tok)
    log = functools.partial(print, file=sys.stderr) if primary and not fv.quiet else None
    corpus = data.prepare_corpus(fv.data_dir, fv.cache_dir, vocab_size=cfg.vocab_size, tokenizer=tok, log=log)
    tokenizer_lib.check_vocab_matches(corpus.tokenizer, cfg)
    spe = data.steps_per_epoch(len(corpus.tokens["train"]), cfg.n_ctx, train_cfg.batch_size)
    num_steps = total_steps(train_cfg, spe)
    if train_cfg.warmup_steps is not None and train_cfg.warmup_steps >= num_steps:  # the default always fits
        raise UserError(f"--warmup_steps={train_cfg.warmup_steps} must be smaller than the {num_steps} training "
                        f"steps; lower it or raise --max_steps/--epochs")
    if not resuming:
        run_dir.mkdir(parents=True, exist_ok=True)
        tokenizer_lib.save_tokenizer(corpus.tokenizer, run_dir / ckpt.TOKENIZER_FILE)
        ckpt.write_run_json(run_dir, {**record, "steps_per_epoch": spe, "total_steps": num_steps,
                                      "warmup_steps": warmup_steps(train_cfg, num_steps),
                                      "tokenizer": tokenizer_lib.tokenizer_fingerprint(corpus.tokenizer),
                                      "created": time.strftime("%Y-%m-%d %H:%M:%S"), "command": list(argv)})
    return corpus, spe, num_steps


def _train(fv, cfg, train_cfg, corpus, run_dir, manager, optimizer, schedule, state, position, rng,
           spe, num_steps, eval_batch, say, *, evaluate_first: bool = False) -> int:
    primary, multi = jax.process_index() == 0, jax.process_count() > 1
    layout = {"num_devices": jax.local_device_count(), "process_index": jax.process_index(),
              "process_count": jax.process_count()}
    step = int(state.step)
    metrics_path, evals_path = run_dir / ckpt.METRICS_FILE, run_dir / ckpt.EVALS_FILE
    if primary:
        for path in (metrics_path, evals_path):
            metrics_lib.drop_records_after(path, step)  # written after the checkpoint, recomputed identically below
    # Every process reads the records: what is left to evaluate at the end is decided the same way everywhere.
    step_records = [r for r in metrics_lib.read_jsonl(metrics_path) if r["step"] <= step]
    eval_records = [r for r in metrics_lib.read_jsonl(evals_path) if r["step"] <= step]

    p_train = jax.pmap(make_train_step(cfg, optimizer, schedule), axis_name=AXIS, in_axes=(0, 0, None),
                       donate_argnums=(0,), devices=jax.devices())
    p_eval = jax.pmap(make_eval_step(cfg), axis_name=AXIS, devices=jax.devices())
    state_N = replicate(state, jax.local_devices())
    del state
    batches = prefetch_to_devices(data.train_batches(
        corpus.tokens["train"], seq_len=cfg.n_ctx, global_batch=train_cfg.batch_size, seed=train_cfg.seed,
        start=position, **layout), device_sharding(jax.local_devices()))

    def run_eval(split: str) -> dict:
        nll, tokens = evaluate(p_eval, state_N.params, data.eval_batches(
            corpus.tokens[split], seq_len=cfg.n_ctx, batch_size=eval_batch, **layout))
        assert tokens == len(corpus.tokens[split]) - 1, (tokens, len(corpus.tokens[split]))  # each target once
        since = max([r["step"] for r in eval_records if r["split"] == "validation" and r["step"] < step], default=0)
        recent = [r["loss"] for r in step_records if since < r["step"] <= step]
        res = evaluate_lib.EvalResult(split=split, nll_sum=nll, tokens=int(tokens), words=corpus.words[split],
                                      bytes=corpus.bytes[split], seq_len=cfg.n_ctx, stride=None)
        rec = {"step": step, "epoch": step / spe, "split": split, "loss": res.mean_nll, "ppl": res.token_ppl,
               "word_ppl": res.word_ppl, "bits_per_byte": res.bits_per_byte, "tokens": res.tokens,
               "train_loss": float(np.mean(recent)) if recent else None}
        eval_records.append(rec)
        if primary:
            metrics_lib.append_jsonl(evals_path, [rec])
            metrics_lib.plot_losses(step_records, eval_records, run_dir / ckpt.PLOT_FILE, steps_per_epoch=spe,
                                    vocab_size=cfg.vocab_size, title=f"{run_dir.name}: {fv.size}, batch "
                                    f"{train_cfg.batch_size}x{cfg.n_ctx}, lr {train_cfg.lr:g}")
        say(f"step {step} (epoch {step / spe:.2f}): {split} loss {rec['loss']:.4f}, ppl {rec['ppl']:.2f}, "
            f"word ppl {rec['word_ppl']:.2f}")
        return rec

    if evaluate_first and step == 0 and not any(r["step"] == 0 for r in eval_records):
        run_eval("validation")  # the starting point of a fine-tuning run: PATH's own validation loss
    pending: list[tuple[int, dict]] = []  # dispatched steps whose metrics are still on the devices
    clock = [time.perf_counter()]

    def flush(keep_last: bool) -> None:
        """Fetch pending metrics (all, or all but the newest so the device queue never drains)."""
        take = pending[:-1] if keep_last else pending[:]
        if not take:
            return
        del pending[:len(take)]
        host = jax.device_get([m for _, m in take])
        now = time.perf_counter()
        tokens = sum(float(m["tokens"][0]) for m in host)
        tps = tokens / max(now - clock[0], 1e-9)
        clock[0] = now
        recs = [{"step": s, "epoch": s / spe, **{k: float(v[0]) for k, v in m.items() if k != "tokens"},
                 "tokens_per_s": tps} for (s, _), m in zip(take, host)]
        step_records.extend(recs)
        if primary:
            metrics_lib.append_jsonl(metrics_path, recs)
        # The metrics are all-reduced: every process sees the same values and stops at the same step.
        bad = [r for r in recs if not all(math.isfinite(r[k]) for k in ("loss", "grad_norm", "param_norm"))]
        if bad:
            raise _Diverged(bad[0])
        if bar is not None:
            bar.set_postfix(loss=f"{recs[-1]['loss']:.3f}", lr=f"{recs[-1]['lr']:.2e}", tok_s=f"{tps:,.0f}")

    last_save = [time.monotonic()]

    def save(val_loss: float | None) -> None:
        last_save[0] = time.monotonic()
        ckpt.save_checkpoint(manager, step, params=unreplicate_global(state_N.params),
                             opt_state=unreplicate_global(state_N.opt_state),
                             meta={"step": step, "model": cfg.architecture(), "data_position": position.to_dict(),
                                   "rng": np.asarray(rng).tolist(),
                                   "num_devices": jax.device_count(), "num_processes": jax.process_count()},
                             val_loss=val_loss)

    stop = _StopRequest()
    previous = {s: signal.signal(s, stop) for s in (signal.SIGTERM, signal.SIGINT)}
    bar = None
    planned_epochs = -(-num_steps // spe)  # what this run will do: --max_steps may end it early
    check_in = _CheckIns(step)
    try:
        while step < num_steps:
            epoch = step // spe
            if bar is None:
                in_epoch = min(spe, num_steps - epoch * spe)
                bar = tqdm(total=in_epoch, initial=step - epoch * spe, desc=f"epoch {epoch + 1}/{planned_epochs}",
                           unit="step", disable=fv.quiet or not primary, dynamic_ncols=True, file=sys.stderr)
                clock[0] = time.perf_counter()
            position, batch = next(batches)  # the position after this batch: saved with the state it produces
            state_N, m = p_train(state_N, batch, rng)
            step += 1
            pending.append((step, m))
            if len(pending) > 1:
                # No more than this step and the one before it on the devices, so a signal is acted
                # on after the step in flight, not after a queue of up to --log_every steps.
                jax.block_until_ready(pending[-2][1])
            bar.update(1)
            epoch_end, last = step % spe == 0, step == num_steps
            do_eval = step % fv.eval_every == 0 or epoch_end or last
            # Signals and the save clock are per process; several processes act on them together at
            # check-ins (scheduled saves, and a few seconds apart: see _CheckIns), one process at every step.
            signum, overdue = 0, False
            if not multi or do_eval or step % fv.ckpt_every == 0 or step >= check_in.next_step:
                due = fv.ckpt_minutes > 0 and time.monotonic() - last_save[0] >= 60 * fv.ckpt_minutes
                signum, overdue = check_in(step, stop.signum, due, fv.log_every)  # a signal may come anywhere
            do_save = do_eval or step % fv.ckpt_every == 0 or overdue or signum != 0
            if do_eval or do_save:
                flush(keep_last=False)  # a checkpoint is only written after its losses are seen finite
            elif len(pending) > fv.log_every:
                flush(keep_last=True)
            val_loss = run_eval("validation")["loss"] if do_eval else None
            if do_save:
                save(val_loss)
            if do_eval:
                clock[0] = time.perf_counter()  # evaluation and saving are not training throughput
            if signum:
                bar.close()
                ckpt.finish_saves(manager)
                if primary:
                    print(f"stopped by {signal.Signals(signum).name} at step {step}: checkpoint saved in {run_dir}; "
                          f"run the same command to resume", file=sys.stderr)
                return 0
            if epoch_end or last:
                bar.close()
                bar = None
    except _Diverged as e:
        if bar is not None:
            bar.close()
        ckpt.finish_saves(manager)
        r = e.args[0]
        good = manager.latest_step()
        kept = f"the last good checkpoint, step {good}, is kept" if good is not None else "no checkpoint was saved"
        raise UserError(f"training diverged at step {r['step']} (loss {r['loss']}, grad norm {r['grad_norm']}, "
                        f"param norm {r['param_norm']}); stopped, {kept} in {run_dir}; "
                        f"lower --lr (now {train_cfg.lr:g}) or raise --warmup_steps") from None
    finally:
        for s, h in previous.items():
            signal.signal(s, h)

    # ---- the end: the last step's validation (done in the loop unless resumed right here) and the test split
    done = {(r["split"], r["step"]) for r in eval_records}
    val = next(r for r in reversed(eval_records) if r["split"] == "validation") if ("validation", step) in done \
        else run_eval("validation")
    test = next(r for r in reversed(eval_records) if r["split"] == "test") if ("test", step) in done \
        else run_eval("test")
    ckpt.finish_saves(manager)
    tps = float(np.median([r["tokens_per_s"] for r in step_records])) if step_records else float("nan")
    if primary:
        print(f"done: {step} steps ({step / spe:.2f} epochs); validation loss {val['loss']:.4f} "
              f"(ppl {val['ppl']:.2f}), test loss {test['loss']:.4f} (ppl {test['ppl']:.2f}, "
              f"word ppl {test['word_ppl']:.2f}); "
              f"median {tps:,.0f} tokens/s; plot {run_dir / ckpt.PLOT_FILE}", file=sys.stderr)
    return 0


# Out of memory in training: a smaller batch, or activations recomputed instead of kept.
OUT_OF_MEMORY = "lower --batch_size (or --eval_batch_size) or pass --remat"

if __name__ == "__main__":
    run(main, out_of_memory=OUT_OF_MEMORY)
