"""Study 2: the best WikiText-2-only model at the report's sizes and context (128), by measured ablations.

    python experiments/best_recipe.py                       # on a GPU machine (bf16 compute)

Starting from the report's setup (study 1), one factor at a time is varied on the SMALL model and
kept only if it lowers the best VALIDATION loss (the test split is never used for a choice):
  1. dropout          0.1 -> 0.2, 0.3         (the report's model overfits after epoch 3)
  2. weight decay     0.1 -> 0.3
  3. peak LR          6e-4 -> 3e-4, 1e-3
  4. epochs           5 -> 10, 20             (longer cosine; early stopping = best checkpoint by validation)
The winning recipe then trains small and medium; test numbers use each run's best checkpoint,
with disjoint windows (as the report) and sliding windows (stride 64: every token sees >= 64
tokens of context), both reported.
Targets (issue 7): small word-level test ppl <= 100, token-level ppl <= half the report's (153),
medium better than small. Writes experiments/results/best_recipe/ (rewritten after every training).
With --time_limit it runs what fits, in the order above, and names what did not run;
--baseline_run reuses seed_reproduction's small run (the same setup) as the baseline. A finished run
with the same flags is reused, not resumed, so running the same command again goes on where it stopped.
"""

from __future__ import annotations

import json
import pathlib
import sys
import time

import study
from gpt2_jax.bench import train_flops_per_token
from gpt2_jax.config import GPT2Config

NAME = "best_recipe"
BASE = {"epochs": 5, "batch_size": 32, "lr": 6e-4, "warmup_steps": 100, "weight_decay": 0.1, "dropout": 0.1,
        "ckpt_every": 500, "eval_every": 250, "seed": 0}
SEARCH = (("dropout", (0.2, 0.3)), ("weight_decay", (0.3,)), ("lr", (3e-4, 1e-3)), ("epochs", (10, 20)))


def best_val(run_dir) -> float:
    evals = [r["loss"] for r in study.read_jsonl(run_dir / "evals.jsonl") if r["split"] == "validation"]
    return min(evals)


def run_span_s(run_dir: pathlib.Path) -> float:
    """Seconds from the run's creation (run.json) to its last evaluation: its wall time when it was trained
    before this process started (a reused --baseline_run), where timing the resume says nothing."""
    created = json.loads((run_dir / "run.json").read_text())["created"]
    return (run_dir / "evals.jsonl").stat().st_mtime - time.mktime(time.strptime(created, "%Y-%m-%d %H:%M:%S"))


def run_name(size: str, setup: dict) -> str:
    return f"{size}_" + "_".join(f"{k}{setup[k]:g}" for k in ("dropout", "weight_decay", "lr", "epochs"))


def main() -> None:
    p = study.arg_parser(NAME, __doc__)
    p.add_argument("--search_size", default="small")
    p.add_argument("--final_sizes", default="small,medium")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--baseline_run", default=None,
                   help="run dir of a training of the baseline setup on --search_size (seed_reproduction's small "
                        "has it): resumed if unfinished and used instead of a new baseline run")
    p.add_argument("--time_limit", type=float, default=0.0,
                   help="seconds: a training that would end past this, at the pace of the last one, is not "
                        "started, nor any after it; what ran is kept, what did not is named, and the exit "
                        "code is 3 (0 = no limit)")
    args = p.parse_args()
    out, runs, extra = study.paths_and_extra(args)
    if args.time_limit < 0:
        p.error(f"--time_limit must be >= 0, got {args.time_limit}")
    if args.baseline_run is not None and not (pathlib.Path(args.baseline_run) / "run.json").is_file():
        p.error(f"--baseline_run={args.baseline_run} is not a run directory (no run.json)")

    start = time.time()
    trained = {run_name(args.search_size, BASE): pathlib.Path(args.baseline_run)} if args.baseline_run else {}
    finished: set[str] = set()
    epoch_s: dict[str, float] = {}  # size -> wall seconds per epoch of its last training (start-up included)
    record = {"study": NAME, "hardware": study.hardware(), "dtype": args.dtype, "extra": extra,
              "time_limit_s": args.time_limit or None, "ablations": [], "final": {}, "not_run": []}

    def expected_s(size: str, setup: dict) -> float:
        if size not in epoch_s:  # not trained yet: scale a measured size by FLOPs per token
            other = next(iter(epoch_s))
            scale = train_flops_per_token(GPT2Config.preset(size)) / train_flops_per_token(GPT2Config.preset(other))
            return epoch_s[other] * scale * setup["epochs"]
        return epoch_s[size] * setup["epochs"]

    def train(size: str, setup: dict):
        """The run dir, trained; None when the time limit leaves no room (then nothing more starts)."""
        name = run_name(size, setup)
        if name in finished:
            return trained[name]
        if record["not_run"] or (args.time_limit and epoch_s and
                                 time.time() - start + expected_s(size, setup) > args.time_limit):
            record["not_run"].append(name)
            return None
        run_dir = trained.setdefault(name, runs / name)
        flags = {"size": size, "dtype": args.dtype, "quiet": "true", **setup, **extra}
        wall = 0.0 if study.finished_run(run_dir, flags) else study.train(run_dir, flags)
        finished.add(name)
        epoch_s[size] = max(wall, run_span_s(run_dir)) / setup["epochs"]
        return run_dir

    best = dict(BASE)
    base_dir = train(args.search_size, best)
    best_loss = best_val(base_dir)
    record["ablations"].append({"setup": dict(best), "run": base_dir.name, "best_val_loss": best_loss, "kept": True})
    save(out, record, best, done=False)
    for factor, values in SEARCH:
        for value in values:
            trial = {**best, factor: value}
            run_dir = train(args.search_size, trial)
            if run_dir is None:
                continue
            loss = best_val(run_dir)
            kept = loss < best_loss
            record["ablations"].append({"setup": trial, "changed": factor, "run": run_dir.name, "best_val_loss": loss,
                                        "kept": kept})
            print(json.dumps(record["ablations"][-1]), flush=True)
            if kept:
                best, best_loss = trial, loss
            save(out, record, best, done=False)
    record["recipe"] = best

    for size in args.final_sizes.split(","):
        run_dir = train(size, best)
        if run_dir is None:
            continue
        record["final"][size] = {
            "run": run_dir.name, "epochs": study.epoch_table(run_dir),
            "test_best_disjoint": study.evaluate(run_dir, step="best"),
            "test_best_sliding64": study.evaluate(run_dir, step="best", stride=64),
            "plot": study.copy_plot(run_dir, out, size),
            "samples": study.samples(run_dir, step="best"),
        }
        save(out, record, best, done=False)
    save(out, record, best, done=True)
    if record["not_run"]:
        sys.exit(3)


def save(out: pathlib.Path, record: dict, best: dict, *, done: bool) -> None:
    """metrics.json, samples.md and summary.md as they stand (rewritten after every training)."""
    study.save_metrics(out, record)
    if record["final"]:
        study.write_samples(out / "samples.md", {size: r["samples"] for size, r in record["final"].items()})
    extra = f"; extra train flags {record['extra']}" if record["extra"] else ""
    lines = [f"# {NAME}", "", f"Hardware: {record['hardware']}; compute dtype {record['dtype']}{extra}.", "",
             "## Ablations (small, best validation loss; a change is kept only if it lowers it)", "",
             "| changed | setup | best val loss | kept |", "|---|---|---|---|"]
    for a in record["ablations"]:
        s = a["setup"]
        lines.append(f"| {a.get('changed', 'baseline')} | dropout {s['dropout']}, wd {s['weight_decay']}, "
                     f"lr {s['lr']:g}, epochs {s['epochs']} | {a['best_val_loss']:.4f} | {'yes' if a['kept'] else 'no'} |")
    complete = done and not record["not_run"]
    lines += ["", f"Recipe: {best}" if complete else f"Recipe so far (the search did not finish): {best}"]
    if record["not_run"]:
        lines += ["", f"Not run (--time_limit={record['time_limit_s']:g} s): {', '.join(record['not_run'])}."]
    elif not done:
        lines += ["", "In progress: this summary is rewritten after every training."]
    if record["final"]:
        lines += ["", "## Test perplexity of the recipe (best checkpoint)", "",
                  "| model | token ppl (report) | token ppl, disjoint | word ppl, disjoint | token ppl, sliding 64 | "
                  "word ppl, sliding 64 | bits/byte |", "|---|---|---|---|---|---|---|"]
    for size, r in record["final"].items():
        d, s = r["test_best_disjoint"], r["test_best_sliding64"]
        lines.append(f"| {size} | {study.fmt(study.REPORT.get(size, {}).get('test_token_ppl'))} | "
                     f"{d['token_ppl']:.2f} | {d['word_ppl']:.2f} | {s['token_ppl']:.2f} | {s['word_ppl']:.2f} | "
                     f"{d['bits_per_byte']:.3f} |")
    (out / "summary.md").write_text("\n".join(lines) + "\n")
    if done:
        print("\n".join(lines), flush=True)


if __name__ == "__main__":
    main()
