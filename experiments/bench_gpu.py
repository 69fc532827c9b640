"""GPU benchmark sweep, one command: training MFU of small/medium and decoding speed of small.

    python experiments/bench_gpu.py               # on a GPU machine; writes experiments/results/bench/gpu.{json,md}
    python experiments/bench_gpu.py --grid=quick  # the ~2-minute subset that experiments/gpu_run.sh runs

Rows (bf16 compute, float32 master weights):
  full grid:
  * train small / medium at global batch 64, 128, 256 with the preset's dropout (explicit attention,
    since the fused kernels have no attention dropout), and with dropout 0 (cuDNN fused attention);
  * train medium with rematerialisation;
  * generate small: batch 1 and 8, greedy and nucleus, 16-token prompt, 100 new tokens.
  quick grid, in this order (a time limit keeps the first rows): train small and medium at batch 256
  with dropout 0; generate small, greedy, batch 1 and 8; train small and medium at batch 256 with the
  preset's dropout (the report's training setup); generate small, nucleus, batch 1.
gpu.json and gpu.md are rewritten after every row, so a run stopped part-way keeps the rows it finished
(--resume then runs only the missing ones).
Goals (issue 9): small and medium >= 50% MFU; batch-1 greedy decoding of small >= 5,000 new tokens/s;
an epoch of WikiText-2 (2,281,517 train tokens with the 32k BPE) for small in well under 10 s.
--override and --batch_size shrink every row (a CPU rehearsal: --override=n_layer=1,d_model=64 ...).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import pathlib
import sys

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

TRAIN_TOKENS = 2_281_517  # WikiText-2 train split, 32k BPE (python -m gpt2_jax.data)

# (size, batch, dropout: None = the preset's, remat)
FULL_TRAIN = [(size, b, dropout, False) for size in ("small", "medium") for b in (64, 128, 256)
              for dropout in (None, 0.0)] + [("medium", 256, 0.0, True)]
FULL_GENERATE = [(b, method) for b in (1, 8) for method in ("greedy", "nucleus")]
# (kind, ...): the quick grid interleaves, most wanted first.
QUICK = [("train", "small", 256, 0.0, False), ("train", "medium", 256, 0.0, False), ("generate", 1, "greedy"),
         ("generate", 8, "greedy"), ("train", "small", 256, None, False), ("train", "medium", 256, None, False),
         ("generate", 1, "nucleus")]


def parse_override(text: str) -> dict:
    """'n_layer=1,d_model=64' -> GPT2Config fields with their types; one line and exit 2 on a mistake."""
    from gpt2_jax.config import GPT2Config

    types = {f.name: f.type if isinstance(f.type, str) else f.type.__name__ for f in dataclasses.fields(GPT2Config)}
    out = {}
    for item in filter(None, text.split(",")):
        key, _, value = item.partition("=")
        if key not in types or not value:
            usage_error(f"--override: {item!r} is not FIELD=VALUE with a GPT2Config field ({', '.join(types)})")
        kind = {"int": int, "float": float, "bool": lambda v: v.lower() in ("1", "true")}.get(types[key], str)
        try:
            out[key] = kind(value)
        except ValueError:
            usage_error(f"--override: {key}={value!r} is not a {types[key]}")
    return out


def usage_error(message: str) -> None:
    print(message, file=sys.stderr)
    sys.exit(2)


def write(out: pathlib.Path, env: dict, peak, grid: str, flags: dict, rows: list[dict]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu.json").write_text(json.dumps({"environment": env, "peak_tflops_bf16": peak, "grid": grid,
                                              "flags": flags, "rows": rows}, indent=2) + "\n")
    lines = [f"# GPU benchmark: {env['devices']} x {env['device']} (jax {env['jax']}, {grid} grid)", "",
             "| size | batch | dropout | remat | tokens/s | MFU | epoch (s) | peak mem (GiB) |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if r["bench"] == "train" and "error" not in r:
            mfu = "–" if r["mfu"] is None else f"{r['mfu']:.1%}"
            lines.append(f"| {r['size']} | {r['batch_size']} | {r['dropout']} | {r['remat']} | {r['tokens_per_s']:,.0f} | "
                         f"{mfu} | {r['epoch_s']} | {r['peak_device_mem_gib']} |")
        elif r["bench"] == "train":
            lines.append(f"| {r['size']} | {r['batch_size']} | | | failed: {r['error']} | | | |")
    lines += ["", "| generate small | method | new tokens/s | ms/token | first token (ms) | compile (s) |",
              "|---|---|---|---|---|---|"]
    for r in rows:
        if r["bench"] == "generate" and "error" not in r:
            lines.append(f"| batch {r['batch_size']} | {r['method']} | {r['new_tokens_per_s']:,.0f} | {r['ms_per_token']} | "
                         f"{r['time_to_first_token_ms']} | {r['compile_s']} |")
        elif r["bench"] == "generate":
            lines.append(f"| batch {r['batch_size']} | {r['method']} | failed: {r['error']} | | | |")
    (out / "gpu.md").write_text("\n".join(lines) + "\n")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=str(REPO / "experiments" / "results" / "bench"))
    p.add_argument("--grid", choices=("full", "quick"), default="full")
    p.add_argument("--steps", type=int, default=20, help="timed training steps per row")
    p.add_argument("--new_tokens", type=int, default=100, help="new tokens per decoding row")
    p.add_argument("--batch_size", type=int, default=None, help="one training batch for every row (default: the grid's)")
    p.add_argument("--override", default="", help="GPT2Config fields for every row, e.g. n_layer=1,d_model=64")
    p.add_argument("--resume", action="store_true",
                   help="keep the rows of an earlier gpu.json in --out with the same grid, flags and device; run the rest")
    args = p.parse_args()
    if args.steps < 1 or args.new_tokens < 1 or (args.batch_size is not None and args.batch_size < 1):
        usage_error("--steps, --new_tokens and --batch_size must be >= 1")
    override = parse_override(args.override)

    from gpt2_jax.bench import _environment, bench_generate, bench_train, device_peak_tflops
    from gpt2_jax.config import GPT2Config

    peak = device_peak_tflops("bfloat16")
    env = _environment()
    out = pathlib.Path(args.out)
    if args.grid == "full":
        grid = [("train", *row) for row in FULL_TRAIN] + [("generate", *row) for row in FULL_GENERATE]
    else:
        grid = QUICK
    flags = {"steps": args.steps, "new_tokens": args.new_tokens, "batch_size": args.batch_size, "override": override}
    rows = []
    if args.resume and (out / "gpu.json").is_file():
        earlier = json.loads((out / "gpu.json").read_text())
        if (earlier.get("environment"), earlier.get("grid"), earlier.get("flags")) == (env, args.grid, flags):
            rows = earlier["rows"]
            print(f"resuming: {len(rows)} rows of {out / 'gpu.json'} kept", flush=True)
    done = [r.get("spec") for r in rows]

    for kind, *spec in grid:
        if [kind, *spec] in done:
            continue
        if kind == "train":
            size, batch, dropout, remat = spec
            batch = args.batch_size or batch
            over = {"dtype": "bfloat16", "remat": remat, **override}
            if dropout is not None:
                over.update(dropout=dropout, attn_dropout=dropout)
            cfg = GPT2Config.preset(size, **over)
            try:
                r = bench_train(cfg, batch_size=batch, steps=args.steps, warmup=3, peak_tflops=peak)
                r.update(size=size, dropout=cfg.dropout, remat=remat, epoch_s=round(TRAIN_TOKENS / r["tokens_per_s"], 2))
            except Exception as e:  # out of memory at the largest batches: record it and go on
                r = {"bench": "train", "size": size, "batch_size": batch, "error": str(e).splitlines()[0][:200]}
        else:
            batch, method = spec
            cfg = GPT2Config.preset("small", dtype="bfloat16", **override)
            try:
                r = bench_generate(cfg, batch_size=batch, prompt_len=16, new_tokens=args.new_tokens, method=method)
                r.update(size="small")
            except Exception as e:
                r = {"bench": "generate", "size": "small", "batch_size": batch, "method": method,
                     "error": str(e).splitlines()[0][:200]}
        if override:
            r["override"] = override
        r["spec"] = [kind, *spec]
        rows.append(r)
        print(json.dumps(r), flush=True)
        write(out, env, peak, args.grid, flags, rows)
    print((out / "gpu.md").read_text())


if __name__ == "__main__":
    main()
