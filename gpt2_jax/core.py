"""The pure training core: configs, schedule, AdamW, the train state and the train / eval steps.

No I/O. A loop of your own needs only this module::

    train_cfg = TrainConfig(lr=6e-4, batch_size=32)
    num_steps = total_steps(train_cfg, steps_per_epoch)
    optimizer, schedule = make_optimizer(train_cfg, num_steps), make_schedule(train_cfg, num_steps)
    state = init_train_state(cfg, optimizer, jax.random.PRNGKey(0))
    step = jax.jit(make_train_step(cfg, optimizer, schedule, axis_name=None))
    state, metrics = step(state, batch, dropout_key)

(``gpt2_jax.parallel`` runs the same step under ``pmap`` over every device of every process.)
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import chex
import flax
import jax
import jax.numpy as jnp
import optax
from jax import lax

from gpt2_jax.config import GPT2Config
from gpt2_jax.dots import quantize_rows
from gpt2_jax.model import chunked_token_nll, forward, init_params

AXIS = "devices"  # the pmap axis: one entry per device of every process (each process holds its local ones)
SCHEDULES = ("cosine", "wsd")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Everything that decides the optimisation trajectory (a run dir refuses a different one)."""

    batch_size: int = 32  # global: sequences per step over all devices
    epochs: int = 5
    max_steps: int | None = None  # stop before the last epoch ends (the LR schedule then ends here too)
    time_budget_minutes: float | None = None  # stop where this much wall time runs out (see gpt2_jax.budget)
    lr: float = 6e-4  # peak learning rate
    warmup_steps: int | None = None  # linear from 0 to lr, then the decay; None: see warmup_steps()
    schedule: str = "cosine"  # after the warmup: "cosine" decay, or "wsd" (constant, then linear decay)
    decay_fraction: float = 0.2  # wsd: the decay takes this fraction of all steps, at the end
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
        if self.time_budget_minutes is not None and not self.time_budget_minutes > 0:
            raise ValueError(f"time_budget_minutes must be > 0, got {self.time_budget_minutes}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {', '.join(SCHEDULES)}, got {self.schedule!r}")
        if not 0.0 < self.decay_fraction <= 1.0:
            raise ValueError(f"decay_fraction must be in (0, 1], got {self.decay_fraction}")
        for name in ("warmup_steps", "weight_decay", "grad_clip", "seed"):
            if getattr(self, name) is not None and getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if not 0.0 <= self.final_lr_fraction <= 1.0:
            raise ValueError(f"final_lr_fraction must be in [0, 1], got {self.final_lr_fraction}")
        for name in ("b1", "b2"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {getattr(self, name)}")
        if self.seed >= 2**32:  # jax.random.PRNGKey keeps 32 bits: 2**32 would be seed 0 again
            raise ValueError(f"seed must be < 2**32, got {self.seed}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def total_steps(train_cfg: TrainConfig, steps_per_epoch: int) -> int:
    """Steps the run takes: all epochs, or ``max_steps`` if that comes first (a time budget may end it
    sooner: ``gpt2_jax.budget``)."""
    n = train_cfg.epochs * steps_per_epoch
    return n if train_cfg.max_steps is None else min(n, train_cfg.max_steps)


def warmup_steps(train_cfg: TrainConfig, num_steps: int) -> int:
    """The run's warmup: ``train_cfg.warmup_steps``, by default 100 steps or a tenth of a shorter run
    (so a first 20-step smoke run just works). ValueError if it does not fit in ``num_steps``."""
    warmup = min(100, num_steps // 10) if train_cfg.warmup_steps is None else train_cfg.warmup_steps
    if not 0 <= warmup < num_steps:
        raise ValueError(f"warmup_steps={warmup} must be smaller than the {num_steps} training steps")
    return warmup


def make_schedule(train_cfg: TrainConfig, num_steps: int) -> optax.Schedule:
    """Linear warmup 0 -> lr, then down to ``lr * final_lr_fraction`` at ``num_steps``.

    ``cosine``: a cosine decay right after the warmup. ``wsd`` (warmup-stable-decay, as in MiniCPM
    and Hägele et al. 2024): the peak held, then a linear decay over the last ``decay_fraction``
    of the steps (never reaching into the warmup). Either way the warmup's rates do not depend on
    ``num_steps``, which is what lets a time-budgeted run fix ``num_steps`` during its warmup.
    """
    warmup = warmup_steps(train_cfg, num_steps)
    peak, end = train_cfg.lr, train_cfg.lr * train_cfg.final_lr_fraction
    if train_cfg.schedule == "cosine":
        return optax.warmup_cosine_decay_schedule(init_value=0.0, peak_value=peak, warmup_steps=warmup,
                                                  decay_steps=num_steps, end_value=end)
    decay_start = max(warmup, num_steps - max(1, round(train_cfg.decay_fraction * num_steps)))
    return optax.join_schedules([optax.linear_schedule(0.0, peak, warmup), optax.constant_schedule(peak),
                                 optax.linear_schedule(peak, end, num_steps - decay_start)],
                                boundaries=[warmup, decay_start])


def decay_mask(params) -> Any:
    """True for the parameters weight decay applies to: every Dense kernel and both embedding tables.

    Biases and LayerNorm scales/offsets are not decayed: they shift and rescale activations, and
    pulling them to 0 regularises nothing (a LayerNorm scale at 0 switches its layer off).
    Embeddings ARE decayed, as in GPT-3 and nanoGPT: ``wte`` is also the tied output projection
    (a matrix that produces the logits like any kernel), and on a corpus as small as WikiText-2,
    where the model overfits within a few epochs, the extra pull on rarely seen token rows helps.
    """
    return jax.tree_util.tree_map_with_path(lambda path, _: path[-1].key in ("kernel", "embedding"), params)


def clip_by_global_norm(max_norm: float) -> optax.GradientTransformation:
    """``optax.clip_by_global_norm`` as one multiply: every leaf times ``min(1, max_norm / global norm)``.

    The same updates (exactly below ``max_norm``, to float rounding above it, NaN for a NaN norm) and
    the same empty state, so checkpoints are unchanged. XLA fuses this multiply into AdamW's moment
    updates, where optax's ``lax.select`` between the clipped and the unclipped leaf costs XLA:CPU an
    extra pass over every gradient: small's whole update takes 126 instead of 242 ms on the 2-core
    CPU, where 7 float32 passes over the parameters at the measured bandwidth take 108 ms
    (``experiments/train_parts_cpu.py``).
    """

    def update(updates, state, params=None):
        del params
        scale = jnp.minimum(1.0, max_norm / optax.global_norm(updates))
        return jax.tree.map(lambda g: g * scale.astype(g.dtype), updates), state

    return optax.GradientTransformation(optax.init_empty_state, update)


def make_optimizer(train_cfg: TrainConfig, num_steps: int) -> optax.GradientTransformation:
    """Global-norm clipping, then AdamW (decoupled weight decay on ``decay_mask``) on ``make_schedule``."""
    clip = clip_by_global_norm(train_cfg.grad_clip) if train_cfg.grad_clip > 0 else optax.identity()
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


def device_sum(tree: Any, axis_name: str | None) -> Any:
    """``lax.psum`` over ``axis_name`` (``None``: no axis); on an axis of one device, the tree itself,
    where XLA:CPU's one-member all-reduce would still copy every leaf (small's gradients: 64 ms a step)."""
    if axis_name is None or lax.axis_size(axis_name) == 1:
        return tree
    return lax.psum(tree, axis_name)


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
        tokens = device_sum(mask_BT.sum(), axis_name)
        B = inputs_BT.shape[0]
        first_row = 0 if axis_name is None else lax.axis_index(axis_name) * B
        keys_B = example_keys(rng, state.step, first_row, B)

        def loss_fn(params):  # each row draws its dropout masks from its own key
            x_BTD = forward(params, cfg, inputs_BT, deterministic=False, dropout_keys_B=keys_B, head=False)
            nll_BT = chunked_token_nll(x_BTD, params["wte"]["embedding"], targets_BT)
            # This device's NLL sum over the GLOBAL number of scored tokens: summed over devices it
            # is exactly the global masked mean (and so is its gradient) however the masks differ,
            # where a pmean of per-device means would weigh a half-masked device like a full one.
            return (nll_BT * mask_BT).sum() / jnp.maximum(tokens, 1.0)

        loss, grads = device_sum(jax.value_and_grad(loss_fn)(state.params), axis_name)
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
        if cfg.int8_activations:
            # The head's input rows as dots.int8_matmul_t quantizes them, so the chunked loss scores the
            # logits decoding samples from (up to float32 rounding).
            q_BTD, scale_BT1 = quantize_rows(x_BTD)
            x_BTD = q_BTD.astype(jnp.float32) * scale_BT1
        nll_BT = chunked_token_nll(x_BTD, params["wte"]["embedding"], batch["targets"],
                                   scale_V=params["wte"].get("int8_scale"))  # int8 weights: quantize_int8
        mask_BT = batch["mask"]
        out = {"nll_sum": (nll_BT * mask_BT).sum(), "tokens": mask_BT.sum()}
        return device_sum(out, axis_name)

    return eval_step
