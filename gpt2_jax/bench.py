"""Speed benchmarks with random weights and random tokens; each prints ONE JSON line, last.

    python -m gpt2_jax.bench train --size=small --batch_size=64 --steps=20 --warmup=3 --dtype=bfloat16
    python -m gpt2_jax.bench generate --size=small --batch_size=1 --prompt_len=16 --new_tokens=128 --method=greedy
    python -m gpt2_jax.bench roofline      # this machine's measured matmul peaks and memory bandwidth

Training FLOPs per token (stated, so MFU numbers can be checked):
    6 · N_matmul  +  12 · L · D · T
where N_matmul = non-embedding parameters + V·D (the tied LM head is a matmul; the position table is
a lookup, not counted), and 12·L·D·T is the attention score/value matmuls (forward + backward) at
window T. MFU = tokens/s · FLOPs per token / peak FLOP/s of the device (table below, dense, no
sparsity; on CPU pass --peak_tflops, else MFU is null). Every train/generate line also carries this
machine's measured roofline (``roofline``) and MFU / %-of-bandwidth against it, so no peak is assumed.
"""

from __future__ import annotations

import json
import resource
import sys
import time
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags

from gpt2_jax import cli, core, decode, parallel
from gpt2_jax.errors import UserError
from gpt2_jax.config import PRESETS, GPT2Config, param_count
from gpt2_jax.model import init_params

# Dense peak TFLOP/s by device kind substring: (bfloat16, float32-as-TF32). Vendor data sheets.
PEAK_TFLOPS = {
    "H200": (989.4, 494.7),
    "H100": (989.4, 494.7),  # SXM
    "A100": (312.0, 156.0),
    "L4": (121.0, 60.0),
    "V100": (125.0, 15.7),
}


def train_flops_per_token(cfg: GPT2Config, seq_len: int | None = None) -> float:
    T = cfg.n_ctx if seq_len is None else seq_len
    n_matmul = param_count(cfg, embeddings=False) + cfg.vocab_size * cfg.d_model
    return 6.0 * n_matmul + 12.0 * cfg.n_layer * cfg.d_model * T


def device_peak_tflops(dtype: str) -> float | None:
    kind = jax.devices()[0].device_kind
    for name, (bf16, fp32) in PEAK_TFLOPS.items():
        if name in kind:
            return bf16 if dtype == "bfloat16" else fp32
    return None


def best_seconds(f, *args, repeats: int = 5) -> float:
    """The fastest of ``repeats`` timed calls of ``f(*args)``, after one untimed call (compile, warm-up)."""
    jax.block_until_ready(f(*args))  # compile
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(f(*args))
        best = min(best, time.perf_counter() - t0)
    return best


def cpu_name() -> str | None:
    """The CPU's model name from /proc/cpuinfo with its family and model numbers (a VM's name is often
    just "AMD EPYC", which covers several generations), or None where there is none."""
    fields = {}
    try:
        for line in open("/proc/cpuinfo"):
            key, _, value = line.partition(":")
            if not key.strip():
                break  # the first processor's block is enough
            fields.setdefault(key.strip(), value.strip())
    except OSError:
        return None
    name = fields.get("model name")
    if name and "cpu family" in fields and "model" in fields:
        return f"{name} (family {fields['cpu family']}, model {fields['model']})"
    return name


def roofline(n: int = 2048, stream_mib: int = 512) -> dict:
    """Measured peaks of the first device: an n^3 matmul in float32 and with bfloat16 inputs and float32
    accumulation (GFLOP/s, best of 5), and streaming read bandwidth (GB/s, a sum over ``stream_mib``)."""
    rng = np.random.default_rng(0)
    a, b = (jnp.asarray(rng.standard_normal((n, n)), jnp.float32) for _ in range(2))
    f32 = jax.jit(lambda x, y: x @ y)
    bf16 = jax.jit(lambda x, y: jnp.matmul(x, y, preferred_element_type=jnp.float32))
    flops = 2.0 * n**3
    stream = jnp.ones((stream_mib * 2**20 // 4,), jnp.float32)
    read = best_seconds(jax.jit(jnp.sum), stream)
    return {"matmul_f32_gflops": round(flops / best_seconds(f32, a, b) / 1e9, 1),
            "matmul_bf16_gflops": round(flops / best_seconds(bf16, a.astype(jnp.bfloat16),
                                                               b.astype(jnp.bfloat16)) / 1e9, 1),
            "memory_gbps": round(stream.nbytes / read / 1e9, 1), "matmul_n": n, "stream_mib": stream_mib,
            "cpu": cpu_name(), "device": jax.devices()[0].device_kind}


def _memory() -> dict:
    stats = jax.local_devices()[0].memory_stats() or {}
    peak = stats.get("peak_bytes_in_use")
    return {
        "peak_device_mem_gib": None if peak is None else round(peak / 2**30, 3),
        "host_peak_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 3),
    }


def _environment() -> dict:
    d = jax.devices()[0]
    return {"backend": jax.default_backend(), "device": d.device_kind, "devices": jax.local_device_count(),
            "jax": jax.__version__}


def train_step_and_inputs(cfg: GPT2Config, *, batch_size: int, num_steps: int = 100, seed: int = 0):
    """``(p_step, state, batch, rng)``: the pmapped train step as ``loop`` runs it (AdamW, clipping,
    dropout; state donated, without a device axis), a replicated fresh state and a fixed random batch."""
    n_dev = jax.local_device_count()
    if batch_size % n_dev:
        raise UserError(f"--batch_size={batch_size} is not divisible by the {n_dev} local devices")
    train_cfg = core.TrainConfig(batch_size=batch_size, warmup_steps=0, lr=1e-4)
    optimizer = core.make_optimizer(train_cfg, num_steps)
    schedule = core.make_schedule(train_cfg, num_steps)
    state = parallel.replicate(core.init_train_state(cfg, optimizer, jax.random.PRNGKey(seed)))
    p_step = jax.pmap(core.make_train_step(cfg, optimizer, schedule), axis_name=core.AXIS,
                      in_axes=(None, 0, None), out_axes=(None, 0), donate_argnums=(0,))  # as loop._pmapped_step
    T = cfg.n_ctx
    tokens = np.random.default_rng(seed).integers(0, cfg.vocab_size, (n_dev, batch_size // n_dev, T + 1), np.int32)
    batch = {"inputs": tokens[..., :-1], "targets": tokens[..., 1:], "mask": np.ones(tokens[..., 1:].shape, np.float32)}
    return p_step, state, jax.device_put(batch, parallel.device_sharding()), jax.random.PRNGKey(seed + 1)


def bench_train(cfg: GPT2Config, *, batch_size: int, steps: int, warmup: int, peak_tflops: float | None = None,
                seed: int = 0) -> dict:
    """Time the real pmapped train step (AdamW, clipping, dropout) on a fixed random batch."""
    p_step, state, batch, rng = train_step_and_inputs(cfg, batch_size=batch_size, num_steps=warmup + steps + 2,
                                                      seed=seed)
    T = cfg.n_ctx
    t0 = time.perf_counter()
    state, m = p_step(state, batch, rng)
    jax.block_until_ready(m)
    first_s = time.perf_counter() - t0
    for _ in range(warmup):
        state, m = p_step(state, batch, rng)
    jax.block_until_ready(m)
    t0 = time.perf_counter()
    for _ in range(steps):  # no host sync inside the timed loop
        state, m = p_step(state, batch, rng)
    jax.block_until_ready(m)
    elapsed = time.perf_counter() - t0
    step_s = elapsed / steps
    tokens_per_s = batch_size * T / step_s
    flops = train_flops_per_token(cfg, T)
    mfu = None if not peak_tflops else tokens_per_s * flops / (peak_tflops * 1e12)
    return {
        "bench": "train", "tokens_per_s": round(tokens_per_s, 1), "ms_per_step": round(1e3 * step_s, 2),
        "compile_s": round(max(first_s - step_s, 0.0), 2), "mfu": None if mfu is None else round(mfu, 4),
        "flops_per_token": flops, "peak_tflops": peak_tflops, "batch_size": batch_size, "seq_len": T,
        "steps": steps, "warmup": warmup, "final_loss": float(m["loss"][0]), **_memory(),
    }


def compiled_generate(params, cfg: GPT2Config, *, batch_size: int, prompt_length: int, max_new_tokens: int,
                      method: str = "greedy", top_k: int = 50, top_p: float = 0.9, temperature: float = 1.0,
                      slide_keep: int | None = None, seed: int = 0) -> tuple[Any, tuple]:
    """``(compiled, args)``: ``decode.generate``'s one-jit loop compiled for random prompts, and its arguments."""
    prompt_BP = jax.random.randint(jax.random.PRNGKey(seed), (batch_size, prompt_length), 0,
                                   cfg.vocab_size)
    window_BW, window_lengths_B, _ = decode.prompt_windows(cfg, np.asarray(prompt_BP))
    slide_keep = cfg.n_ctx // 2 if slide_keep is None else slide_keep
    decode.check_sampling_args(cfg, method=method, max_new_tokens=max_new_tokens,
                               temperature=temperature, top_k=top_k, top_p=top_p,
                               slide_keep=slide_keep)
    args = (params, jnp.asarray(window_BW), jnp.asarray(window_lengths_B),
            jax.random.PRNGKey(seed), jnp.arange(batch_size, dtype=jnp.int32),
            decode.sampling_settings(temperature=temperature, top_k=top_k, top_p=top_p))
    compiled = decode._generate_jit.lower(*args, cfg=cfg, method=method, slide_keep=slide_keep,
                                          max_new_tokens=max_new_tokens).compile()
    return compiled, args


def time_generate(params, cfg: GPT2Config, *, batch_size: int, prompt_length: int,
                  max_new_tokens: int, repeats: int = 3, **settings) -> dict[str, float]:
    """Compile seconds and new tokens/s of ``decode.generate``'s compiled core on random prompts
    (``settings``: ``compiled_generate``'s method, sampling settings and seed).

    The best of ``repeats`` runs counts: noise from other processes inflates it the least.
    """
    t0 = time.perf_counter()
    compiled, args = compiled_generate(params, cfg, batch_size=batch_size, prompt_length=prompt_length,
                                       max_new_tokens=max_new_tokens, **settings)
    compile_s = time.perf_counter() - t0
    run_s = best_seconds(compiled, *args, repeats=repeats)  # its first call warms up
    return {"compile_s": compile_s, "run_s": run_s,
            "new_tokens_per_s": batch_size * max_new_tokens / run_s, "batch_size": batch_size,
            "prompt_length": prompt_length, "max_new_tokens": max_new_tokens}


def bench_generate(cfg: GPT2Config, *, batch_size: int, prompt_len: int, new_tokens: int,
                   method: str, repeats: int = 3, seed: int = 0, quantize: str = "none") -> dict:
    """New tokens/s of the one-jit decode loop, and time to first token (prefill + 1 token)."""
    params = decode.inference_params(init_params(cfg, jax.random.PRNGKey(seed)), cfg, quantize)
    cfg = decode.inference_config(cfg, quantize)
    timing, first = (time_generate(params, cfg, batch_size=batch_size, prompt_length=prompt_len,
                                   max_new_tokens=n, method=method, repeats=repeats, seed=seed)
                     for n in (new_tokens, 1))  # 1: the same loop, time to first token
    return {
        "bench": "generate", "new_tokens_per_s": round(timing["new_tokens_per_s"], 1),
        "ms_per_token": round(1e3 * timing["run_s"] / new_tokens, 3),
        "time_to_first_token_ms": round(1e3 * first["run_s"], 2),
        "compile_s": round(timing["compile_s"], 2), "batch_size": batch_size,
        "prompt_len": prompt_len, "new_tokens": new_tokens, "method": method, "quantize": quantize,
        "weight_bytes": sum(a.nbytes for a in jax.tree.leaves(params)), **_memory(),
    }


# ----------------------------------------------------------------------------------------- CLI

def _define_flags(command: str = "train") -> flags.FlagValues:
    fv = flags.FlagValues()
    flags.DEFINE_enum("size", "tiny", list(PRESETS), "Model preset.", flag_values=fv)
    cli.define_dtype_flag(fv)
    cli.define_quantize_flag(fv)  # generate only
    flags.DEFINE_integer("batch_size", None, "Global batch (default: 32 train, 1 generate).", lower_bound=1,
                         flag_values=fv)
    flags.DEFINE_integer("steps", 10, "train: timed steps.", lower_bound=1, flag_values=fv)
    flags.DEFINE_integer("warmup", 2, "train: untimed steps after the compile.", lower_bound=0, flag_values=fv)
    flags.DEFINE_bool("remat", False, "train: recompute activations in the backward pass.", flag_values=fv)
    flags.DEFINE_float("dropout", None, "Override the preset's dropout (both kinds), in [0, 1); 0 lets attention "
                       "use the fused kernel.", flag_values=fv)
    cli.check(fv, "dropout", lambda p: 0 <= p < 1, "must be in [0, 1)")
    flags.DEFINE_enum("attention", "auto", ["auto", "xla", "cudnn"], "Attention implementation.", flag_values=fv)
    flags.DEFINE_float("peak_tflops", None, "Device peak for MFU (default: from the device table; none on CPU).",
                       flag_values=fv)
    cli.check(fv, "peak_tflops", lambda t: t > 0, "must be > 0")
    flags.DEFINE_integer("prompt_len", 16, "generate: prompt tokens, at most the preset's context.", lower_bound=1,
                         flag_values=fv)
    flags.DEFINE_integer("new_tokens", 64, "generate: new tokens per row.", lower_bound=1, flag_values=fv)
    flags.DEFINE_enum("method", "greedy", ["greedy", "top_k", "nucleus"], "generate: decoding method.",
                      flag_values=fv)
    flags.DEFINE_integer("repeats", 3, "generate: timed runs (best counts).", lower_bound=1, flag_values=fv)
    # jax.random.PRNGKey keeps 32 bits: a larger seed would silently repeat a smaller one.
    flags.DEFINE_integer("seed", 0, "Random weights and tokens.", lower_bound=0, upper_bound=2**32 - 1,
                         flag_values=fv)
    return fv


def main(argv: Sequence[str]) -> int:
    argv = list(argv)
    if len(argv) < 2 or argv[1] not in ("train", "generate", "roofline"):
        if any(a in ("--help", "-h") for a in argv[1:]):
            print(__doc__)
            return 0
        raise UserError("first argument must be a subcommand: train, generate or roofline (see --help)")
    command = argv.pop(1)
    fv = cli.parse_flags(_define_flags(command), argv, __doc__)
    if command == "roofline":
        print(json.dumps({"bench": "roofline", **roofline(), **_environment()}))
        return 0
    n_ctx = PRESETS[fv.size].n_ctx
    if command == "generate" and fv.prompt_len > n_ctx:
        raise UserError(f"--prompt_len={fv.prompt_len} exceeds the {fv.size} preset's context of {n_ctx} tokens")
    if command == "train" and fv.quantize != "none":
        raise UserError("--quantize applies to bench generate (inference); drop it for bench train")
    dtype, why = cli.resolve_dtype(fv.dtype, "decode" if command == "generate" else "batched")
    overrides = dict(dtype=dtype, remat=fv.remat, attention=fv.attention)
    if fv.dropout is not None:
        overrides.update(dropout=fv.dropout, attn_dropout=fv.dropout)
    cfg = GPT2Config.preset(fv.size, **overrides)
    if command == "train":
        peak = fv.peak_tflops if fv.peak_tflops is not None else device_peak_tflops(dtype)
        result = bench_train(cfg, batch_size=fv.batch_size or 32, steps=fv.steps, warmup=fv.warmup,
                             peak_tflops=peak, seed=fv.seed)
    else:
        result = bench_generate(cfg, batch_size=fv.batch_size or 1, prompt_len=fv.prompt_len,
                                new_tokens=fv.new_tokens, method=fv.method, repeats=fv.repeats, seed=fv.seed,
                                quantize=fv.quantize)
    measured = roofline()
    if command == "train":
        peak_gflops = measured["matmul_bf16_gflops" if dtype == "bfloat16" else "matmul_f32_gflops"]
        result["mfu_measured_peak"] = round(result["tokens_per_s"] * result["flops_per_token"] / (peak_gflops * 1e9), 4)
    else:  # batch-1 decoding reads every weight once per step: bound by memory bandwidth
        steps_per_s = result["new_tokens_per_s"] / result["batch_size"]
        result["pct_of_bandwidth"] = round(100 * result["weight_bytes"] * steps_per_s
                                           / (measured["memory_gbps"] * 1e9), 1)
    record = {**result, "size": fv.size, "dtype": dtype, "dtype_why": why, "remat": fv.remat, "attention": fv.attention,
              "roofline": measured, **_environment()}
    print(json.dumps(record))
    sys.stdout.flush()
    return 0


OUT_OF_MEMORY = "lower --batch_size (train: or pass --remat; generate: or lower --new_tokens)"

if __name__ == "__main__":
    cli.rerun_with_huge_pages()
    cli.run(main, out_of_memory=OUT_OF_MEMORY)
