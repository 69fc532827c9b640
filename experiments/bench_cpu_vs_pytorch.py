"""Side-by-side CPU comparison in ONE process: our JAX train step and generate vs PyTorch peers.

    python experiments/bench_cpu_vs_pytorch.py            # tiny and small, writes experiments/results/bench/

* Training: our pmapped ``train_step`` (AdamW, clipping, dropout 0.1) vs PyTorch eager: the same
  GPT-2 (``transformers.GPT2LMHeadModel`` with the preset's shape, dropout 0.1) stepped by
  ``torch.optim.AdamW`` with global-norm clipping, same batch and window.
* Generation: our one-jit ``generate`` (KV cache, ``lax.scan``) vs ``GPT2LMHeadModel.generate``
  (its KV cache, greedy), batch 1 and 8, same prompt length and number of new tokens.

This machine is noisy, so ratios matter more than absolute numbers: each pair runs back to back,
and the 1-minute load average is recorded before each measurement. PyTorch and transformers are
benchmark-only dependencies (``pip install -e '.[hf]'``), never needed by the package.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import time


OUT = pathlib.Path(__file__).resolve().parent / "results" / "bench"


def _load() -> float:
    return round(os.getloadavg()[0], 2)


def torch_train(cfg, *, batch_size: int, steps: int, warmup: int, threads: int) -> dict:
    import torch
    from transformers import GPT2Config as HFConfig
    from transformers import GPT2LMHeadModel

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    hf_cfg = HFConfig(vocab_size=cfg.vocab_size, n_positions=cfg.n_ctx, n_embd=cfg.d_model, n_layer=cfg.n_layer,
                      n_head=cfg.n_head, n_inner=cfg.d_ff, resid_pdrop=cfg.dropout, embd_pdrop=cfg.dropout,
                      attn_pdrop=cfg.attn_dropout, activation_function="gelu_new")
    model = GPT2LMHeadModel(hf_cfg).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1)
    tokens = torch.randint(0, cfg.vocab_size, (batch_size, cfg.n_ctx + 1))
    inputs, targets = tokens[:, :-1], tokens[:, 1:]

    def step():
        logits = model(input_ids=inputs).logits
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        return float(loss)

    for _ in range(warmup):
        step()
    load = _load()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    dt = (time.perf_counter() - t0) / steps
    return {"tokens_per_s": round(batch_size * cfg.n_ctx / dt, 1), "ms_per_step": round(1e3 * dt, 1),
            "load_before": load}


def torch_generate(cfg, *, batch_size: int, prompt_len: int, new_tokens: int, threads: int, repeats: int = 3) -> dict:
    import torch
    from transformers import GPT2Config as HFConfig
    from transformers import GPT2LMHeadModel

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    hf_cfg = HFConfig(vocab_size=cfg.vocab_size, n_positions=cfg.n_ctx, n_embd=cfg.d_model, n_layer=cfg.n_layer,
                      n_head=cfg.n_head, n_inner=cfg.d_ff, activation_function="gelu_new")
    model = GPT2LMHeadModel(hf_cfg).eval()
    prompt = torch.randint(0, cfg.vocab_size, (batch_size, prompt_len))
    kwargs = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, use_cache=True,
                  pad_token_id=0, attention_mask=torch.ones_like(prompt))
    with torch.inference_mode():
        model.generate(prompt, **kwargs)  # warm-up
        load = _load()
        best = float("inf")
        for _ in range(repeats):
            t0 = time.perf_counter()
            out = model.generate(prompt, **kwargs)
            best = min(best, time.perf_counter() - t0)
    assert out.shape == (batch_size, prompt_len + new_tokens), out.shape
    return {"new_tokens_per_s": round(batch_size * new_tokens / best, 1),
            "ms_per_token": round(1e3 * best / new_tokens, 2), "load_before": load}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="tiny,small")
    parser.add_argument("--threads", type=int, default=2, help="PyTorch intra-op threads (this machine: 2 cores)")
    parser.add_argument("--train_steps", type=int, default=5)
    parser.add_argument("--new_tokens", type=int, default=64)
    parser.add_argument("--prompt_len", type=int, default=16)
    parser.add_argument("--out", default=str(OUT / "cpu_vs_pytorch.json"))
    args = parser.parse_args()

    import jax
    import torch
    import transformers

    from gpt2_jax.bench import bench_generate, bench_train
    from gpt2_jax.config import GPT2Config

    train_batch = {"tiny": 16, "small": 8, "medium": 4}
    rows = []
    for size in args.sizes.split(","):
        cfg = GPT2Config.preset(size)
        b = train_batch.get(size, 8)
        load = _load()
        ours = bench_train(cfg, batch_size=b, steps=args.train_steps, warmup=2)
        ours["load_before"] = load
        theirs = torch_train(cfg, batch_size=b, steps=args.train_steps, warmup=2, threads=args.threads)
        rows.append({"what": "train", "size": size, "batch_size": b, "ours_tokens_per_s": ours["tokens_per_s"],
                     "pytorch_eager_tokens_per_s": theirs["tokens_per_s"],
                     "ratio": round(ours["tokens_per_s"] / theirs["tokens_per_s"], 2),
                     "ours_load_before": ours["load_before"], "pytorch_load_before": theirs["load_before"]})
        print(json.dumps(rows[-1]), flush=True)
        for batch in (1, 8):
            load = _load()
            ours = bench_generate(cfg, batch_size=batch, prompt_len=args.prompt_len, new_tokens=args.new_tokens,
                                  method="greedy")
            ours["load_before"] = load
            theirs = torch_generate(cfg, batch_size=batch, prompt_len=args.prompt_len, new_tokens=args.new_tokens,
                                    threads=args.threads)
            rows.append({"what": "generate_greedy", "size": size, "batch_size": batch,
                         "ours_new_tokens_per_s": ours["new_tokens_per_s"],
                         "transformers_new_tokens_per_s": theirs["new_tokens_per_s"],
                         "ratio": round(ours["new_tokens_per_s"] / theirs["new_tokens_per_s"], 2),
                         "ours_compile_s": ours["compile_s"], "ours_load_before": ours["load_before"],
                         "transformers_load_before": theirs["load_before"]})
            print(json.dumps(rows[-1]), flush=True)

    record = {"machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores (CPU only)",
              "jax": jax.__version__, "torch": torch.__version__, "transformers": transformers.__version__,
              "torch_threads": args.threads, "prompt_len": args.prompt_len, "new_tokens": args.new_tokens,
              "train_steps": args.train_steps, "rows": rows}
    out = pathlib.Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=2) + "\n")
    print(json.dumps({"saved": str(out), "rows": len(rows)}))


if __name__ == "__main__":
    main()
