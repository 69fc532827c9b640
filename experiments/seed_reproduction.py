"""Study 1: the report's setup, reproduced: small and medium, 5 epochs, context 128, 32k BPE.

    python experiments/seed_reproduction.py                 # on a GPU machine (bf16 compute)
    python experiments/seed_reproduction.py --sizes=small   # one model; then --sizes=medium adds the other

Same setup as the report: 5 epochs, 128-token windows, a 32,000-token byte-level BPE trained on
the train split, dropout 0.1, a checkpoint every 500 steps and at each epoch end. The report
evaluated its model after epoch 5, so the headline numbers here use the LAST checkpoint; the best
checkpoint (lowest validation loss) is reported beside it to show what stopping early would give.
Writes experiments/results/seed_reproduction/; metrics.json, samples.md and summary.md are rewritten after
each model, and runs of other sizes already in metrics.json (same hardware, setup, dtype and extra
flags) are kept.
"""

from __future__ import annotations


import study

NAME = "seed_reproduction"
SETUP = {"epochs": 5, "batch_size": 32, "lr": 6e-4, "warmup_steps": 100, "weight_decay": 0.1, "dropout": 0.1,
         "ckpt_every": 500, "eval_every": 250, "seed": 0}


def main() -> None:
    p = study.arg_parser(NAME, __doc__)
    p.add_argument("--sizes", default="small,medium")
    p.add_argument("--dtype", default="bfloat16", help="compute dtype (bfloat16 on GPU)")
    args = p.parse_args()
    out, runs, extra = study.paths_and_extra(args)

    record = {"study": NAME, "hardware": study.hardware(), "setup": SETUP, "dtype": args.dtype, "extra": extra,
              "runs": {}}
    earlier = study.load_metrics(out)
    if earlier and all(earlier.get(k) == record[k] for k in ("hardware", "setup", "dtype", "extra")):
        record["runs"] = {size: r for size, r in earlier["runs"].items() if size not in args.sizes.split(",")}
    for size in args.sizes.split(","):
        run_dir = runs / size
        wall = study.train(run_dir, {"size": size, "dtype": args.dtype, "quiet": "true", **SETUP, **extra})
        final, best = study.evaluate(run_dir, step="latest"), study.evaluate(run_dir, step="best")
        epochs = study.epoch_table(run_dir)
        record["runs"][size] = {"train_wall_s": round(wall, 1), "epochs": epochs, "test_final": final,
                                "test_best": best, "plot": study.copy_plot(run_dir, out, size),
                                "samples": study.samples(run_dir, step="latest")}
        study.save_metrics(out, record)
        write_summary(out, record, args.dtype)


def write_summary(out, record: dict, dtype: str) -> None:
    study.write_samples(out / "samples.md", {size: r["samples"] for size, r in record["runs"].items()}, step="latest")
    extra = f"; extra train flags {record['extra']}" if record["extra"] else ""
    lines = [f"# {NAME}", "", f"Hardware: {record['hardware']}; compute dtype {dtype}; setup {SETUP}{extra}.", "",
             "| model | test token ppl (report) | test token ppl (ours, epoch 5) | test word ppl (ours) | "
             "best val loss (epoch) | val loss per epoch | time per epoch (report) | median tokens/s | "
             "train wall time |",
             "|---|---|---|---|---|---|---|---|---|"]
    for size, r in record["runs"].items():
        report = study.REPORT.get(size, {}).get("test_token_ppl")
        vals = ", ".join(f"{e['val_loss']:.3f}" for e in r["epochs"])
        best_e = min(r["epochs"], key=lambda e: e["val_loss"]) if r["epochs"] else None
        best_txt = "–" if best_e is None else f"{best_e['val_loss']:.3f} ({best_e['epoch']})"
        tps = r["epochs"][-1]["median_tokens_per_s"] if r["epochs"] else None
        epoch_s = r["epochs"][-1]["epoch_train_s"] if r["epochs"] else None
        lines.append(f"| {size} | {study.fmt(report)} | {r['test_final']['token_ppl']:.2f} | "
                     f"{r['test_final']['word_ppl']:.2f} | {best_txt} | {vals} | "
                     f"{study.fmt(epoch_s, 1)} s ({study.REPORT.get(size, {}).get('time_per_epoch', '–')}) | "
                     f"{study.fmt(tps, 0)} | {r['train_wall_s']:.0f} s |")
    (out / "summary.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines), flush=True)


if __name__ == "__main__":
    main()
