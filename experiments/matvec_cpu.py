"""Why batch-1 decoding on CPU stays in float32: one decoding step's matrix-vector products, timed alone.

    python experiments/matvec_cpu.py     # writes experiments/results/bench/matvec_cpu.json

For each weight shape of tiny and small (and the tied 32k head) at batch 1 and 8: float32 ``x @ w``,
bf16 weights (f32 accumulation), and int8 weights dequantized in the dot (as ``model.Dense`` does), with
the bytes each reads and the GB/s that implies, beside this machine's measured streaming bandwidth.
Best of 5 runs of 100 calls each; the 1-minute load average is recorded.
"""

from __future__ import annotations

import json
import os
import pathlib
import time

import jax
import jax.numpy as jnp

from gpt2_jax.bench import roofline

OUT = pathlib.Path(__file__).resolve().parent / "results" / "bench" / "matvec_cpu.json"
SHAPES = {"tiny c_fc": (256, 1024), "tiny head": (256, 32000), "small c_fc": (768, 3072),
          "small c_proj (mlp)": (3072, 768), "small head": (768, 32000)}


def _best_us(f, *args, calls: int = 100, runs: int = 5) -> float:
    f(*args).block_until_ready()
    best = float("inf")
    for _ in range(runs):
        t0 = time.perf_counter()
        for _ in range(calls):
            out = f(*args)
        out.block_until_ready()
        best = min(best, (time.perf_counter() - t0) / calls)
    return best * 1e6


@jax.jit
def _f32(x, w):
    return x @ w


@jax.jit
def _bf16(x, w):
    return jnp.dot(x.astype(jnp.bfloat16), w, preferred_element_type=jnp.float32)


@jax.jit
def _int8(x, w, scale):
    return jnp.dot(x, w.astype(jnp.float32), preferred_element_type=jnp.float32) * scale


def main() -> None:
    rows = []
    for name, (d_in, d_out) in SHAPES.items():
        w = jax.random.normal(jax.random.PRNGKey(0), (d_in, d_out)) * 0.02
        scale = jnp.max(jnp.abs(w), axis=0) / 127
        w8 = jnp.round(w / scale).astype(jnp.int8)
        for batch in (1, 8):
            x = jax.random.normal(jax.random.PRNGKey(1), (batch, d_in))
            load = round(os.getloadavg()[0], 2)
            us = {"float32": _best_us(_f32, x, w), "bfloat16": _best_us(_bf16, x, w.astype(jnp.bfloat16)),
                  "int8": _best_us(_int8, x, w8, scale)}
            nbytes = {"float32": 4 * w.size, "bfloat16": 2 * w.size, "int8": w.size + 4 * d_out}
            rows.append({"shape": name, "d_in": d_in, "d_out": d_out, "batch": batch, "load": load,
                         **{f"{k}_us": round(v, 1) for k, v in us.items()},
                         **{f"{k}_gbps": round(nbytes[k] / us[k] / 1e3, 1) for k in us}})
            print(json.dumps(rows[-1]), flush=True)
    record = {"roofline": roofline(), "jax": jax.__version__, "rows": rows}
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(record, indent=2) + "\n")
    print(json.dumps({"saved": str(OUT), "roofline": record["roofline"]}))


if __name__ == "__main__":
    main()
