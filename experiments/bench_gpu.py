"""GPU benchmark sweep, one command: training MFU of small/medium and decoding speed of small.

    python experiments/bench_gpu.py          # on a GPU machine; writes experiments/results/bench/gpu.{json,md}

Rows (bf16 compute, float32 master weights):
  * train small / medium at global batch 64, 128, 256 with the preset's dropout (explicit attention,
    since the fused kernels have no attention dropout), and with dropout 0 (cuDNN fused attention);
  * train medium with rematerialisation;
  * generate small: batch 1 and 8, greedy and nucleus, 16-token prompt, 100 new tokens.
Goals (issue 9): small and medium >= 50% MFU; batch-1 greedy decoding of small >= 5,000 new tokens/s;
an epoch of WikiText-2 (2,281,517 train tokens with the 32k BPE) for small in well under 10 s.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

TRAIN_TOKENS = 2_281_517  # WikiText-2 train split, 32k BPE (python -m gpt2_jax.data)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=str(REPO / "experiments" / "results" / "bench"))
    p.add_argument("--steps", type=int, default=20)
    args = p.parse_args()

    from gpt2_jax.bench import _environment, bench_generate, bench_train, device_peak_tflops
    from gpt2_jax.config import GPT2Config

    peak = device_peak_tflops("bfloat16")
    rows = []

    def add(row):
        rows.append(row)
        print(json.dumps(row), flush=True)

    train_grid = [(size, b, dropout, False) for size in ("small", "medium") for b in (64, 128, 256)
                  for dropout in (None, 0.0)] + [("medium", 256, 0.0, True)]
    for size, batch, dropout, remat in train_grid:
        over = {"dtype": "bfloat16", "remat": remat}
        if dropout is not None:
            over.update(dropout=dropout, attn_dropout=dropout)
        cfg = GPT2Config.preset(size, **over)
        try:
            r = bench_train(cfg, batch_size=batch, steps=args.steps, warmup=3, peak_tflops=peak)
        except Exception as e:  # out of memory at the largest batches: record it and go on
            add({"bench": "train", "size": size, "batch_size": batch, "error": str(e).splitlines()[0][:200]})
            continue
        r.update(size=size, dropout=cfg.dropout, remat=remat,
                 epoch_s=round(TRAIN_TOKENS / r["tokens_per_s"], 2))
        add(r)
    cfg = GPT2Config.preset("small", dtype="bfloat16")
    for batch in (1, 8):
        for method in ("greedy", "nucleus"):
            r = bench_generate(cfg, batch_size=batch, prompt_len=16, new_tokens=100, method=method)
            r.update(size="small")
            add(r)

    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    env = _environment()
    (out / "gpu.json").write_text(json.dumps({"environment": env, "peak_tflops_bf16": peak, "rows": rows},
                                             indent=2) + "\n")
    lines = [f"# GPU benchmark: {env['devices']} x {env['device']} (jax {env['jax']})", "",
             "| size | batch | dropout | remat | tokens/s | MFU | epoch (s) | peak mem (GiB) |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if r["bench"] == "train" and "error" not in r:
            lines.append(f"| {r['size']} | {r['batch_size']} | {r['dropout']} | {r['remat']} | {r['tokens_per_s']:,.0f} | "
                         f"{r['mfu']:.1%} | {r['epoch_s']} | {r['peak_device_mem_gib']} |")
        elif r["bench"] == "train":
            lines.append(f"| {r['size']} | {r['batch_size']} | | | failed: {r['error']} | | | |")
    lines += ["", "| generate small | method | new tokens/s | ms/token | first token (ms) | compile (s) |",
              "|---|---|---|---|---|---|"]
    for r in rows:
        if r["bench"] == "generate":
            lines.append(f"| batch {r['batch_size']} | {r['method']} | {r['new_tokens_per_s']:,.0f} | {r['ms_per_token']} | "
                         f"{r['time_to_first_token_ms']} | {r['compile_s']} |")
    (out / "gpu.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
