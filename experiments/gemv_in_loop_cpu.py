"""Decoding's matrix-vector products inside a ``lax.scan``, in every form XLA:CPU offers, beside the streaming read.

    python experiments/gemv_in_loop_cpu.py            # writes experiments/results/bench/gemv_in_loop_cpu.json
    python experiments/gemv_in_loop_cpu.py --flags    # also under each XLA:CPU flag that picks another kernel

``matvec_cpu.py`` times one product per call; this times them the way the decoding loop meets them:
one jitted ``lax.scan`` whose every step runs small's 24 ``c_fc``/``c_proj`` pairs (768 x 3072 and
back, 226 MB of float32 weights, far over the L3) one after the other, so no call overhead and no
weight in cache. Forms, for float32, bf16 and int8 weights (int8 x int8 -> int32 where a dot):

- ``dot_OI_m{1,2,4}`` / ``dot_IO_m{1,2,4}``: ``lax.dot_general`` with the weight stored (out, in) or
  (in, out) and the one row repeated m times (``dots.matmul_t`` computes one row as two);
- ``reduce_OI`` / ``reduce_IO``: the product written as a multiply and a sum (the weight widened to
  float32 inside the fusion), which XLA:CPU hands to YNNPACK only in float32.

GB/s = weight bytes read per step / seconds per step (best of ``--repeats``); the measured streaming
read (``bench.roofline``'s ``jnp.sum``) stands beside it, with the load average before and after.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
from jax import lax

from gpt2_jax.bench import best_seconds, cpu_name, roofline

OUT = pathlib.Path(__file__).resolve().parent / "results" / "bench" / "gemv_in_loop_cpu.json"
D, F, LAYERS = 768, 3072, 24
FLAG_SETS = ("--xla_cpu_use_onednn=true", "--xla_cpu_use_xnnpack=false",
             "--xla_cpu_experimental_ynn_fusion_type=dot,eltwise,reduce",
             "--xla_cpu_experimental_xnn_graph_fusion_mode=XNN_GRAPH_FUSION_MODE_GREEDY_SLINKY")


DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "int8": jnp.int8}


def stores_OI(form: str) -> bool:
    """Whether ``form`` takes the weight stored (out, in); else (in, out)."""
    return "_OI" in form


def product(form: str, x_I, w):
    """``x_I @ W`` (float32 result) in ``form``; ``w`` is stored as ``stores_OI`` says."""
    f32 = jnp.float32
    contract = 1 if stores_OI(form) else 0  # w's input axis
    if form.startswith("reduce_"):
        x_bcast = x_I[None, :] if contract == 1 else x_I[:, None]
        return jnp.sum(w.astype(f32) * x_bcast, axis=contract)
    rows = int(form.split("_m")[1])
    acc = jnp.int32 if w.dtype == jnp.int8 else f32
    x_MI = jnp.broadcast_to(x_I, (rows, x_I.shape[0])).astype(w.dtype)  # int8: the values are small integers
    return lax.dot_general(x_MI, w, (((1,), (contract,)), ((), ())), preferred_element_type=acc)[0].astype(f32)


def time_form(form: str, dtype_name: str, steps: int, repeats: int) -> dict:
    dtype = DTYPES[dtype_name]

    def weight(key, d_in, d_out):
        shape = (d_out, d_in) if stores_OI(form) else (d_in, d_out)
        if dtype == jnp.int8:
            return jax.random.randint(key, shape, -127, 128, jnp.int8)
        return jax.random.normal(key, shape, dtype)

    keys = jax.random.split(jax.random.PRNGKey(0), 2 * LAYERS)
    weights = [(weight(keys[2 * i], D, F), weight(keys[2 * i + 1], F, D)) for i in range(LAYERS)]

    @jax.jit
    def loop(x_D, weights):
        def step(x_D, _):
            for w_fc, w_proj in weights:  # int8: small integers in and out, as after quantizing
                h_F = jnp.round(jnp.tanh(product(form, x_D, w_fc) * 1e-3) * 4)
                x_D = jnp.round(jnp.tanh(product(form, h_F, w_proj) * 1e-3) * 4)
            return x_D, None
        return lax.scan(step, x_D, None, length=steps)[0]

    best = best_seconds(loop, jnp.ones((D,), jnp.float32), weights, repeats=repeats)
    nbytes = sum(a.nbytes + b.nbytes for a, b in weights)
    return {"form": form, "dtype": dtype_name, "ms_per_step": round(best / steps * 1e3, 2),
            "gbps": round(nbytes * steps / best / 1e9, 1)}


FORMS = ("dot_OI_m1", "dot_OI_m2", "dot_OI_m4", "dot_IO_m1", "dot_IO_m2", "dot_IO_m4", "reduce_OI", "reduce_IO")


def run_here(steps: int, repeats: int) -> dict:
    load_before = round(os.getloadavg()[0], 2)
    rows = [time_form(f, d, steps, repeats) for d in DTYPES for f in FORMS]
    best = {d: max((r for r in rows if r["dtype"] == d), key=lambda r: r["gbps"]) for d in DTYPES}
    return {"xla_flags": os.environ.get("XLA_FLAGS", ""), "load_before": load_before, "rows": rows,
            "best": {d: {"form": r["form"], "gbps": r["gbps"]} for d, r in best.items()},
            "roofline": roofline(), "load_after": round(os.getloadavg()[0], 2), "jax": jax.__version__}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=pathlib.Path, default=OUT)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--flags", action="store_true", help="also rerun under each of FLAG_SETS")
    parser.add_argument("--one", action="store_true", help=argparse.SUPPRESS)  # a child run: print its record
    a = parser.parse_args()
    if a.one:
        print(json.dumps(run_here(a.steps, a.repeats)))
        return
    runs = []
    for flags in ("",) + (FLAG_SETS if a.flags else ()):
        env = dict(os.environ, XLA_FLAGS=flags)
        out = subprocess.run([sys.executable, __file__, "--one", f"--steps={a.steps}", f"--repeats={a.repeats}"],
                             env=env, capture_output=True, text=True, check=True).stdout
        record = json.loads(out.strip().splitlines()[-1])
        print(json.dumps({"xla_flags": flags, "best": record["best"], "memory_gbps": record["roofline"]["memory_gbps"],
                          "load": [record["load_before"], record["load_after"]]}), flush=True)
        runs.append(record)
    a.out.write_text(json.dumps({"cpu": cpu_name(), "runs": runs}, indent=1) + "\n")
    print(json.dumps({"saved": str(a.out)}))


if __name__ == "__main__":
    main()
