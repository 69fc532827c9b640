"""Two parts of a training step, each timed in the form jax/optax give and in the form gpt2_jax uses.

    python experiments/train_parts_cpu.py [--size=small] [--batch_size=8] [--out=FILE.json]

- dropout masks at the attention-probability shape of one layer (batch, heads, T, T):
  ``jax.random.bernoulli`` (on CPU a rolled five-step Threefry loop) against ``threefry.bernoulli``
  (the same bits, one fused loop), and the same draw at the residual shape (batch, T, d_model);
- the optimizer update on the preset's parameters: global-norm clipping then masked AdamW, with
  ``optax.clip_by_global_norm`` (a ``lax.select``) against ``core.clip_by_global_norm`` (a multiply).

Both pairs compute the same numbers (checked here too). The measured streaming bandwidth is
printed beside them: the update's floor is 7 float32 passes over the parameters (read p, g, mu,
nu; write p, mu, nu). One JSON line at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import jax
import jax.numpy as jnp
import optax

from gpt2_jax import bench, core, threefry
from gpt2_jax.config import PRESETS
from gpt2_jax.model import init_params


def best_ms(f, *args, repeats: int = 7) -> float:
    return round(1e3 * bench.best_seconds(f, *args, repeats=repeats), 2)


def time_updates(optimizer, params, grads, steps: int = 5) -> tuple[float, dict]:
    """(best ms, the parameters after the last update) of ``optimizer.update`` + ``apply_updates``, params and state donated as in training."""
    update = jax.jit(lambda p, o, g: (lambda u, o: (optax.apply_updates(p, u), o))(*optimizer.update(g, o, p)),
                     donate_argnums=(0, 1))
    p, o = jax.tree.map(jnp.copy, params), optimizer.init(params)
    p, o = update(p, o, grads)
    jax.block_until_ready(p)
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        p, o = update(p, o, grads)
        jax.block_until_ready(p)
        times.append(time.perf_counter() - t0)
    return round(1e3 * min(times), 1), p


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", default="small", choices=list(PRESETS))
    ap.add_argument("--batch_size", type=int, default=8)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    cfg = PRESETS[args.size]
    B, T = args.batch_size, cfg.n_ctx
    record = {"size": args.size, "batch_size": B, "roofline": bench.roofline(), "load_avg_1m": os.getloadavg()[0]}

    keys_B = jax.vmap(lambda r: jax.random.fold_in(jax.random.PRNGKey(0), r))(jnp.arange(B))
    for site, shape in (("attention_probs", (cfg.n_head, T, T)), ("residual", (T, cfg.d_model))):
        ref = jax.jit(jax.vmap(lambda k: jax.random.bernoulli(k, 0.9, shape)))
        ours = jax.jit(jax.vmap(lambda k: threefry.bernoulli(k, 0.9, shape)))
        assert bool((ref(keys_B) == ours(keys_B)).all())
        record[f"dropout_{site}"] = {"shape": [B, *shape], "jax_random_ms": best_ms(ref, keys_B),
                                     "threefry_ms": best_ms(ours, keys_B)}

    params = init_params(cfg, jax.random.PRNGKey(0))
    grads = jax.tree.map(lambda p: 0.01 * jnp.ones_like(p), params)  # norm > 1: clipping scales every leaf
    n_params = sum(p.size for p in jax.tree.leaves(params))
    train_cfg = core.TrainConfig(grad_clip=1.0)
    schedule = core.make_schedule(train_cfg, 100)
    adamw = optax.adamw(schedule, b1=train_cfg.b1, b2=train_cfg.b2, eps=train_cfg.eps,
                        weight_decay=train_cfg.weight_decay, mask=core.decay_mask)
    optax_ms, p_ref = time_updates(optax.chain(optax.clip_by_global_norm(1.0), adamw), params, grads)
    ours_ms, p_ours = time_updates(core.make_optimizer(train_cfg, 100), params, grads)
    gap = max(float(jnp.abs(a - b).max()) for a, b in zip(jax.tree.leaves(p_ref), jax.tree.leaves(p_ours)))
    floor_ms = 7 * 4 * n_params / (record["roofline"]["memory_gbps"] * 1e9) * 1e3
    record["optimizer_update"] = {"params": n_params, "optax_clip_ms": optax_ms, "ours_ms": ours_ms,
                                  "bandwidth_floor_ms": round(floor_ms, 1), "max_param_difference": gap}
    line = json.dumps(record)
    print(line)
    if args.out:
        with open(args.out, "w") as f:
            f.write(line + "\n")


if __name__ == "__main__":
    main()
