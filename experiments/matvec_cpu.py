"""Decoding's matrix products timed alone, the way a decoding step meets them: weights not in cache.

    python experiments/matvec_cpu.py     # writes experiments/results/bench/matvec_cpu.json
    python experiments/matvec_cpu.py --out=experiments/results/bench/matvec_cpu_zen4.json

For each weight shape of tiny and small (and the tied 32k head) at 1, 2, 8, 16, 32 and 64 rows: float32
and bf16 weights stored ``(in, out)`` (``x @ w``, the training layout) and ``(out, in)`` (what
``decode.inference_params`` stores), the latter both as ``x @ wᵀ`` and with the weight as the left
operand (``(w @ xᵀ)ᵀ``); int8 weight-only as ``model.Dense`` runs it (the int8 kernel widened inside
the product); and int8 x int8 with int32 accumulation, the rows quantized on the fly
(``--quantize=int8_dynamic``, ``dots.int8_matmul_t``), in both orders. ``dots.matmul_t`` and
``dots.int8_matmul_t`` pick the faster order by these rows. Each form runs over enough
distinct copies of the weight (256 MB in all, at most 64 copies) that a product rarely finds its weight in cache; the
bytes read per product and the GB/s they imply stand beside this machine's measured streaming
bandwidth. Best of 3 runs; the 1-minute load average is recorded.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import time

import jax
import jax.numpy as jnp
from jax import lax

from gpt2_jax.bench import roofline
from gpt2_jax.dots import matmul_t, quantize_rows

OUT = pathlib.Path(__file__).resolve().parent / "results" / "bench" / "matvec_cpu.json"
SHAPES = {"tiny c_fc": (256, 1024), "tiny head": (256, 32000), "small c_fc": (768, 3072),
          "small c_proj (mlp)": (3072, 768), "small head": (768, 32000)}
F32, BF16 = jnp.float32, jnp.bfloat16
BATCHES = (1, 2, 8, 16, 32, 64)


def _two_rows(x):
    """One row as two (the copy dropped afterwards), as ``dots`` does: XLA:CPU has no bf16 or int8
    matrix-vector kernel, and a lone row runs at a tenth of the speed."""
    return jnp.concatenate([x, x]) if x.shape[0] == 1 else x


def _x_first(x, w, contract_w):
    return lax.dot_general(x, w, (((1,), (contract_w,)), ((), ())), preferred_element_type=F32)


def _w_first(x, w_OI, accumulator=F32):
    """The weight as the left operand; the barrier keeps XLA from folding the transpose into ``x @ wᵀ``."""
    y = lax.dot_general(w_OI, x, (((1,), (1,)), ((), ())), preferred_element_type=accumulator)
    return lax.optimization_barrier(y).T


def _int8_dynamic(x, w8_OI, weight_first: bool):
    q, scale_M1 = quantize_rows(_two_rows(x))
    if weight_first:
        acc = _w_first(q, w8_OI, jnp.int32)
    else:
        acc = lax.dot_general(q, w8_OI, (((1,), (1,)), ((), ())), preferred_element_type=jnp.int32)
    return acc * scale_M1


FORMS = {  # name: (weight dtype, layout, x dtype, product)
    "float32 (in,out)": (F32, "IO", F32, lambda x, w: _x_first(x, w, 0)),
    "float32 (out,in) x@wT": (F32, "OI", F32, lambda x, w: _x_first(x, w, 1)),
    "float32 (out,in) w@xT": (F32, "OI", F32, _w_first),
    "bf16 (in,out)": (BF16, "IO", BF16, lambda x, w: _x_first(_two_rows(x), w, 0)),
    "bf16 (out,in) x@wT": (BF16, "OI", BF16, lambda x, w: _x_first(_two_rows(x), w, 1)),
    "bf16 (out,in) w@xT": (BF16, "OI", BF16, lambda x, w: _w_first(_two_rows(x), w)),
    "int8 weight-only (out,in)": (jnp.int8, "OI", BF16, matmul_t),
    "int8 x int8 dynamic x@wT": (jnp.int8, "OI", F32, lambda x, w: _int8_dynamic(x, w, False)),
    "int8 x int8 dynamic w@xT": (jnp.int8, "OI", F32, lambda x, w: _int8_dynamic(x, w, True)),
}


def _best_us(form, x, ws, runs: int = 3) -> float:
    """Microseconds a product: all of ``ws`` in one compiled call, each output summed (so none is dropped)."""
    f = jax.jit(lambda x, ws: sum(form(x, w).sum() for w in ws))
    f(x, ws).block_until_ready()
    best = float("inf")
    for _ in range(runs):
        t0 = time.perf_counter()
        f(x, ws).block_until_ready()
        best = min(best, time.perf_counter() - t0)
    return best / len(ws) * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=pathlib.Path, default=OUT)
    out = parser.parse_args().out
    rows = []
    for name, (d_in, d_out) in SHAPES.items():
        w_IO = jax.random.normal(jax.random.PRNGKey(0), (d_in, d_out)) * 0.02
        for batch in BATCHES:
            row = {"shape": name, "d_in": d_in, "d_out": d_out, "batch": batch, "load": round(os.getloadavg()[0], 2)}
            for form_name, (w_dtype, layout, x_dtype, form) in FORMS.items():
                w = w_IO if layout == "IO" else w_IO.T
                w = jnp.round(w / 0.1 * 127).clip(-127, 127).astype(jnp.int8) if w_dtype == jnp.int8 else w.astype(w_dtype)
                copies = min(64, max(2, -(-256 * 2**20 // w.nbytes)))
                ws = tuple(w + jnp.zeros((), w.dtype) for _ in range(copies))  # distinct buffers
                x = jax.random.normal(jax.random.PRNGKey(1), (batch, d_in)).astype(x_dtype)
                us = _best_us(form, x, ws)
                row[f"{form_name} us"] = round(us, 1)
                row[f"{form_name} GB/s"] = round(w.nbytes / us / 1e3, 1)
                del ws
            rows.append(row)
            print(json.dumps(row), flush=True)
    record = {"roofline": roofline(), "jax": jax.__version__, "rows": rows}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=2) + "\n")
    print(json.dumps({"saved": str(out), "roofline": record["roofline"]}))


if __name__ == "__main__":
    main()
