"""Our JAX train step and greedy decoding vs PyTorch's fastest CPU modes, one after another in ONE process.

    python experiments/bench_cpu_vs_pytorch.py     # tiny and small; writes experiments/results/bench/
    python experiments/bench_cpu_vs_pytorch.py --sizes=tiny --train_steps=1 --new_tokens=4 --repeats=1 --out_dir=/tmp/x

Peers: training in eager fp32, eager with bf16 autocast and torch.compile with bf16 autocast; decoding with
transformers ``generate`` and a hand-written KV-cache loop, each in fp32 and bf16. Each row's ratio is our
fastest variant over the fastest peer. The machine is shared, so the 1-minute load average is printed and
recorded before every measurement. PyTorch and transformers are benchmark-only (``pip install -e '.[hf]'``).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import inspect
import json
import os
import pathlib
import platform
import time

import torch

OUT_DIR = pathlib.Path(__file__).resolve().parent / "results" / "bench"
TRAIN_BATCH = {"tiny": 16, "small": 8, "medium": 4}
GENERATE_BATCHES = (1, 8)
CPU_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_bf16")  # what decides whether bf16 can be fast


def _load(label: str) -> float:
    load = round(os.getloadavg()[0], 2)
    print(f"load {load:5.2f} before {label}", flush=True)
    return load


def _first_line(e: Exception) -> str:
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0] if text else ''}"


def _cpu_flags() -> list[str]:
    try:
        line = next(line for line in open("/proc/cpuinfo") if line.startswith("flags"))
    except (OSError, StopIteration):
        return []
    return [f for f in CPU_FLAGS if f in line.split()]


def hf_model(cfg):
    """transformers' GPT-2 with our preset's shape (and dropout), random weights."""
    from transformers import GPT2Config as HFConfig
    from transformers import GPT2LMHeadModel

    from gpt2_jax.hf import config_to_hf

    torch.manual_seed(0)
    return GPT2LMHeadModel(HFConfig(**config_to_hf(cfg)))


def _autocast(bf16: bool):
    return torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()


# ------------------------------------------------------------------------------------ training

def torch_train(cfg, *, batch_size: int, steps: int, warmup: int, bf16: bool, compiled: bool) -> dict:
    """Tokens/s of AdamW steps with global-norm clipping; autocast covers forward + loss only."""
    model = hf_model(cfg).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1)
    forward = torch.compile(model) if compiled else model
    tokens_BT = torch.randint(0, cfg.vocab_size, (batch_size, cfg.n_ctx + 1))

    def step():
        with _autocast(bf16):
            logits_BTV = forward(input_ids=tokens_BT[:, :-1]).logits
            loss = torch.nn.functional.cross_entropy(logits_BTV.flatten(0, 1), tokens_BT[:, 1:].flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()

    t0 = time.perf_counter()
    step()  # torch.compile compiles here
    first_s = time.perf_counter() - t0
    for _ in range(warmup):
        step()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    step_s = (time.perf_counter() - t0) / steps
    return {"tokens_per_s": round(batch_size * cfg.n_ctx / step_s, 1), "ms_per_step": round(1e3 * step_s, 1),
            "compile_s": round(max(first_s - step_s, 0.0), 2)}


PEER_TRAIN = {"torch_eager_fp32": dict(bf16=False, compiled=False),
              "torch_eager_bf16_autocast": dict(bf16=True, compiled=False),
              "torch_compile_bf16_autocast": dict(bf16=True, compiled=True)}


def train_row(size: str, args) -> dict:
    from gpt2_jax.bench import bench_train
    from gpt2_jax.config import GPT2Config

    batch = TRAIN_BATCH.get(size, 8)
    ours, peers = {}, {}
    for dtype in ("float32", "bfloat16"):
        load = _load(f"train {size} ours {dtype}")
        r = bench_train(GPT2Config.preset(size, dtype=dtype), batch_size=batch, steps=args.train_steps, warmup=2)
        ours[f"ours_{dtype}"] = {k: r[k] for k in ("tokens_per_s", "ms_per_step", "compile_s")} | {"load": load}
    cfg = GPT2Config.preset(size)
    for name, mode in PEER_TRAIN.items():
        if mode["compiled"] and args.no_compile:
            continue
        load = _load(f"train {size} {name}")
        try:
            r = torch_train(cfg, batch_size=batch, steps=args.train_steps, warmup=2, **mode)
        except Exception as e:  # torch.compile needs a C++ toolchain and may not support this setup
            if not mode["compiled"]:
                raise
            r = {"failed": _first_line(e)}
        peers[name] = r | {"load": load}
    return _compare("train", size, batch, "tokens_per_s", ours, peers)


# ---------------------------------------------------------------------------------- generation

def _cache_kwarg(model) -> str:
    """transformers 5.2x renamed ``past_key_values`` to ``cache`` (the old name is removed in 5.40)."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def greedy_loop(model, prompt_BP: torch.Tensor, new_tokens: int) -> torch.Tensor:
    """Prefill once, then feed one token at a time with the KV cache; argmax each step."""
    key = _cache_kwarg(model)
    out = model(input_ids=prompt_BP, use_cache=True)
    tokens = [out.logits[:, -1:].argmax(-1)]
    for _ in range(new_tokens - 1):
        out = model(input_ids=tokens[-1], use_cache=True, **{key: getattr(out, key)})
        tokens.append(out.logits[:, -1:].argmax(-1))
    return torch.cat([prompt_BP, *tokens], dim=1)


def hf_generate(model, prompt_BP: torch.Tensor, new_tokens: int) -> torch.Tensor:
    return model.generate(prompt_BP, attention_mask=torch.ones_like(prompt_BP), max_new_tokens=new_tokens,
                          min_new_tokens=new_tokens, do_sample=False, use_cache=True, pad_token_id=0)


def _best_of(fn, repeats: int):
    """One warm-up call, then the best wall time of ``repeats`` calls (noise only ever adds time)."""
    out = fn()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return best, out


def torch_generate(cfg, *, size: str, batch_size: int, prompt_len: int, new_tokens: int, repeats: int) -> dict:
    model = hf_model(cfg).eval()
    prompt_BP = torch.randint(0, cfg.vocab_size, (batch_size, prompt_len))
    peers = {}
    with torch.inference_mode():
        for dtype in ("fp32", "bf16"):
            if dtype == "bf16":
                model.to(torch.bfloat16)
            outputs = {}
            for way, fn in (("generate", hf_generate), ("kv_loop", greedy_loop)):
                load = _load(f"generate {size} batch {batch_size} torch_{way}_{dtype}")
                best, outputs[way] = _best_of(functools.partial(fn, model, prompt_BP, new_tokens), repeats)
                peers[f"torch_{way}_{dtype}"] = {"new_tokens_per_s": round(batch_size * new_tokens / best, 1),
                                                 "ms_per_token": round(1e3 * best / new_tokens, 2), "load": load}
                assert outputs[way].shape == (batch_size, prompt_len + new_tokens), outputs[way].shape
            if dtype == "fp32":  # same weights, same greedy path: any difference is a bug in greedy_loop
                assert torch.equal(outputs["generate"], outputs["kv_loop"]), "greedy_loop disagrees with generate"
    return peers


def generate_row(size: str, batch: int, args) -> dict:
    from gpt2_jax.bench import bench_generate
    from gpt2_jax.config import GPT2Config

    ours = {}
    for dtype, quantize in (("float32", "none"), ("bfloat16", "none"), ("float32", "int8"), ("float32", "int8_dynamic")):
        name = f"ours_{dtype}" if quantize == "none" else f"ours_{quantize}"
        load = _load(f"generate {size} batch {batch} {name}")
        r = bench_generate(GPT2Config.preset(size, dtype=dtype), batch_size=batch, prompt_len=args.prompt_len,
                           new_tokens=args.new_tokens, method="greedy", repeats=args.repeats, quantize=quantize)
        keep = ("new_tokens_per_s", "ms_per_token", "time_to_first_token_ms", "compile_s", "weight_bytes")
        ours[name] = {k: r[k] for k in keep} | {"load": load}
    peers = torch_generate(GPT2Config.preset(size), size=size, batch_size=batch, prompt_len=args.prompt_len,
                           new_tokens=args.new_tokens, repeats=args.repeats)
    return _compare("generate_greedy", size, batch, "new_tokens_per_s", ours, peers)


# ------------------------------------------------------------------------------------- output

def _fastest(variants: dict, metric: str) -> str | None:
    ok = {name: v[metric] for name, v in variants.items() if metric in v}
    return max(ok, key=ok.get) if ok else None


def _compare(what: str, size: str, batch: int, metric: str, ours: dict, peers: dict) -> dict:
    best_ours, best_peer = _fastest(ours, metric), _fastest(peers, metric)
    ratio = None if best_peer is None else round(ours[best_ours][metric] / peers[best_peer][metric], 2)
    loads = [v["load"] for v in (ours | peers).values()]
    row = {"what": what, "size": size, "batch_size": batch, "metric": metric, "ours": ours, "peers": peers,
           "ours_fastest": best_ours, "peer_fastest": best_peer, "ratio": ratio,
           "load_range": [min(loads), max(loads)]}
    print(json.dumps(row), flush=True)
    return row


def _cell(v: dict, metric: str) -> str:
    return f"{v[metric]:,.0f}" if metric in v else "failed"


def markdown(record: dict) -> str:
    r = record["roofline"]
    lines = ["# Ours vs PyTorch on CPU (`experiments/bench_cpu_vs_pytorch.py`)\n",
             f"Machine: {record['machine']}; torch {record['torch']} ({record['torch_threads']} threads), "
             f"transformers {record['transformers']}, jax {record['jax']}. Roofline: matmul "
             f"{r['matmul_f32_gflops']} GFLOP/s fp32, {r['matmul_bf16_gflops']} bf16; memory {r['memory_gbps']} GB/s.",
             f"Train: {record['train_steps']} timed steps; generate: {record['new_tokens']} new tokens after "
             f"{record['prompt_len']}, best of {record['repeats']}. Ratio = our fastest / fastest peer.\n"]
    for what in dict.fromkeys(row["what"] for row in record["rows"]):
        rows = [row for row in record["rows"] if row["what"] == what]
        names = list(dict.fromkeys(n for row in rows for n in (*row["ours"], *row["peers"])))
        lines += [f"\n## {what} ({rows[0]['metric']})\n",
                  "| size | batch | " + " | ".join(names) + " | fastest peer | ratio | load |",
                  "|---|---|" + "---|" * len(names) + "---|---|---|"]
        for row in rows:
            variants = row["ours"] | row["peers"]
            cells = [_cell(variants[n], row["metric"]) if n in variants else "-" for n in names]
            ratio = "-" if row["ratio"] is None else f"{row['ratio']}x ({row['ours_fastest']})"
            lo, hi = row["load_range"]
            lines.append(f"| {row['size']} | {row['batch_size']} | " + " | ".join(cells)
                         + f" | {row['peer_fastest']} | {ratio} | {lo}-{hi} |")
    return "\n".join(lines) + "\n"


def environment(args) -> dict:
    import jax
    import transformers

    from gpt2_jax.bench import roofline

    _load("roofline")
    r = roofline()
    cpu = r.get("cpu") or platform.processor() or platform.machine()
    return {"machine": f"{cpu}, {os.cpu_count()} cores, CPU only", "cpu_flags": _cpu_flags(), "roofline": r,
            "torch": torch.__version__, "transformers": transformers.__version__, "jax": jax.__version__,
            "jax_backend": jax.default_backend(), "torch_threads": torch.get_num_threads(),
            "train_steps": args.train_steps, "new_tokens": args.new_tokens, "prompt_len": args.prompt_len,
            "repeats": args.repeats, "glibc_tunables": os.environ.get("GLIBC_TUNABLES")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="tiny,small")
    parser.add_argument("--threads", type=int, default=2, help="PyTorch intra-op threads (this machine: 2 cores)")
    parser.add_argument("--train_steps", type=int, default=5)
    parser.add_argument("--new_tokens", type=int, default=64)
    parser.add_argument("--prompt_len", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3, help="generate: timed runs after a warm-up; best counts")
    parser.add_argument("--no_compile", action="store_true", help="skip the torch.compile training peer")
    parser.add_argument("--out_dir", default=str(OUT_DIR))
    args = parser.parse_args()
    from gpt2_jax.config import PRESETS
    for size in args.sizes.split(","):  # transformers has no sliding window: the whole text must fit
        if size not in PRESETS or args.prompt_len + args.new_tokens > PRESETS[size].n_ctx:
            parser.error(f"--sizes={size}: unknown, or --prompt_len + --new_tokens exceeds its context")
    torch.set_num_threads(args.threads)

    record = environment(args)
    print(json.dumps(record), flush=True)
    rows = []
    for size in args.sizes.split(","):
        rows.append(train_row(size, args))
        rows += [generate_row(size, batch, args) for batch in GENERATE_BATCHES]
    record["rows"] = rows
    out = pathlib.Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "cpu_vs_pytorch.json").write_text(json.dumps(record, indent=2) + "\n")
    (out / "cpu_vs_pytorch.md").write_text(markdown(record))
    print(json.dumps({"saved": [str(out / "cpu_vs_pytorch.json"), str(out / "cpu_vs_pytorch.md")]}))


if __name__ == "__main__":
    from gpt2_jax.cli import rerun_with_huge_pages

    rerun_with_huge_pages()  # as the gpt2_jax tools do; PyTorch runs in this same process, so under it too
    main()
