"""Study 3: what a 2-core CPU can do: the tiny preset on WikiText-2 in about 30 minutes.

    python experiments/cpu_tiny.py                 # CPU, ~30 min on 2 cores

Tiny (4 layers, d_model 256, 11.4M parameters, context 128, the same 32k BPE), float32, the
training defaults (batch 32, AdamW lr 6e-4, warmup 100, cosine, weight decay 0.1, dropout 0.1), for
1 epoch: what fits about half an hour on a 2-core machine shared with other work. Test
numbers from the best checkpoint (lowest validation loss), disjoint and sliding (stride 64) windows.
Writes experiments/results/cpu_tiny/.
"""

from __future__ import annotations


import study

NAME = "cpu_tiny"
SETUP = {"size": "tiny", "batch_size": 32, "lr": 6e-4, "warmup_steps": 100, "weight_decay": 0.1, "dropout": 0.1,
         "eval_every": 250, "ckpt_every": 500, "seed": 0, "dtype": "float32"}


def main() -> None:
    p = study.arg_parser(NAME, __doc__)
    p.add_argument("--epochs", type=int, default=1, help="1 epoch (557 steps) takes about 30 min on 2 busy cores")
    p.add_argument("--max_steps", type=int, default=None)
    args = p.parse_args()
    out, run_dir, extra = study.paths_and_extra(args)
    setup = {**SETUP, "epochs": args.epochs, "quiet": "true", **extra}
    if args.max_steps:
        setup["max_steps"] = args.max_steps

    wall = study.train(run_dir, setup)
    record = {"study": NAME, "hardware": study.hardware(), "setup": setup, "train_wall_s": round(wall, 1),
              "epochs": study.epoch_table(run_dir),
              "evals": [r for r in study.read_jsonl(run_dir / "evals.jsonl")],
              "test_best_disjoint": study.evaluate(run_dir, step="best"),
              "test_best_sliding64": study.evaluate(run_dir, step="best", stride=64),
              "plot": study.copy_plot(run_dir, out, "tiny")}
    steps = study.read_jsonl(run_dir / "metrics.jsonl")
    tps = sorted(s["tokens_per_s"] for s in steps if s.get("tokens_per_s"))
    record["median_tokens_per_s"] = tps[len(tps) // 2] if tps else None
    study.save_metrics(out, record)
    study.write_samples(out / "samples.md", {"tiny": study.samples(run_dir, step="best")})

    d, s = record["test_best_disjoint"], record["test_best_sliding64"]
    vals = [r for r in record["evals"] if r["split"] == "validation"]
    best = min(vals, key=lambda r: r["loss"])
    lines = [f"# {NAME}", "", f"Hardware: {record['hardware']}. Setup: {setup}.", "",
             f"Trained {steps[-1]['step'] if steps else 0} steps ({steps[-1]['epoch'] if steps else 0:.2f} epochs) in "
             f"{wall / 60:.1f} min wall (evaluations and checkpoints included); median "
             f"{study.fmt(record['median_tokens_per_s'], 0)} training tokens/s.", "",
             f"Best validation loss {best['loss']:.4f} at step {best['step']} (epoch {best['epoch']:.2f}).", "",
             "| test split, best checkpoint | token ppl | word ppl | bits/byte | mean NLL |", "|---|---|---|---|---|",
             f"| disjoint 128-token windows | {d['token_ppl']:.2f} | {d['word_ppl']:.2f} | {d['bits_per_byte']:.3f} | "
             f"{d['mean_nll']:.4f} |",
             f"| sliding windows, stride 64 | {s['token_ppl']:.2f} | {s['word_ppl']:.2f} | {s['bits_per_byte']:.3f} | "
             f"{s['mean_nll']:.4f} |", "",
             "Validation during training:", "", "| step | epoch | val loss | val ppl | train loss (since last eval) |",
             "|---|---|---|---|---|"]
    lines += [f"| {r['step']} | {r['epoch']:.2f} | {r['loss']:.4f} | {r['ppl']:.2f} | {study.fmt(r.get('train_loss'), 4)} |"
              for r in vals]
    (out / "summary.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
