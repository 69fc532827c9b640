"""Study 6: the best WikiText-2 model a 2-core CPU trains in 30 minutes (issue 20).

    python experiments/cpu_recipe.py                   # ~2 h on 2 cores: ablations, then 2 x 30 min

Greedy ablations, each under --ablation_minutes (default 6) of `train --time_budget_minutes`,
each stage keeping the best of its options by VALIDATION word perplexity only: BPE size, peak LR, shape,
dropout, schedule. The winner then trains with the full --final_minutes budget on two seeds; test
numbers (best checkpoint by validation loss, disjoint 128-token windows) are read only then.
Data preparation (tokenizer training, encoding) is timed apart, outside every budget. Runs one
at a time (the two cores are the machine). Re-running skips finished runs. Writes
experiments/results/cpu_recipe/: metrics.json, summary.md, the final run's loss plot, samples.md.
"""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys
import time

import study

from gpt2_jax import bench

NAME = "cpu_recipe"
# The starting point: the tiny preset with the training defaults (what `train --size=tiny` does).
BASE = {"size": "tiny", "vocab_size": 32000, "batch_size": 32, "lr": 6e-4, "dropout": 0.1, "schedule": "cosine",
        "weight_decay": 0.1}
SHAPES = {"tiny": {"n_layer": 4, "d_model": 256, "n_head": 4, "d_ff": 1024},
          "6x384": {"n_layer": 6, "d_model": 384, "n_head": 6, "d_ff": 1536}}
# Each stage: (what it varies, the options; the first is whatever the stages before chose).
STAGES = (
    ("vocab_size", (16384, 8192)),
    ("lr", (2e-3,)),
    ("shape", ("6x384",)),
    ("dropout", (0.0,)),
    ("schedule", ("wsd",)),
)
# Loop flags (no effect on the trajectory): ablations evaluate only at epoch ends and the last step.
ABLATION_LOOP = {"eval_every": 10**6, "ckpt_every": 10**6, "ckpt_minutes": 0, "quiet": "true", "epochs": 100}
FINAL_EVAL_EVERY = 300  # a validation curve of ~10 points in 30 minutes


def train_flags(setting: dict) -> dict:
    """A setting as `train` flags (the shape expanded to its four numbers)."""
    flags = {k: v for k, v in setting.items() if k != "shape"}
    flags.update(SHAPES[setting.get("shape", "tiny")])
    return flags


def prepare_data(vocab_size: int) -> float:
    """Tokenizer and token streams for this vocabulary, cached: seconds (0-ish once cached)."""
    t0 = time.time()
    subprocess.run([sys.executable, "-m", "gpt2_jax.data", f"--vocab_size={vocab_size}"], check=True, cwd=study.REPO,
                   stdout=subprocess.DEVNULL)
    return time.time() - t0


def run_one(name: str, flags: dict, runs: pathlib.Path, results: dict, vocab_size: int) -> dict:
    """Train one setting (skipped when its record exists); its record."""
    if name in results["runs"]:
        return results["runs"][name]
    run_dir = runs / name
    prep_s = prepare_data(vocab_size)
    load_before = os.getloadavg()
    try:
        wall = study.train(run_dir, flags)
    except subprocess.CalledProcessError as e:
        if e.returncode != 2:
            raise
        # A user error: here, a budget that ends within the warmup (the shape's steps are too slow).
        results["runs"][name] = {"flags": flags, "infeasible": "train exited 2 (its one-line error is in the log)",
                                 "load_before": [round(x, 2) for x in load_before]}
        return results["runs"][name]
    load_after = os.getloadavg()
    run = json.loads((run_dir / "run.json").read_text())
    evals = study.read_jsonl(run_dir / "evals.jsonl")
    vals = [r for r in evals if r["split"] == "validation"]
    best = min(vals, key=lambda r: r["loss"])
    steps = study.read_jsonl(run_dir / "metrics.jsonl")
    tps = sorted(s["tokens_per_s"] for s in steps if s.get("tokens_per_s"))
    rec = {"flags": flags, "data_prep_s": round(prep_s, 1), "train_wall_s": round(wall, 1),
           "load_before": [round(x, 2) for x in load_before], "load_after": [round(x, 2) for x in load_after],
           "dtype": run["model"]["dtype"], "time_budget": run.get("time_budget"), "steps": run["total_steps"],
           "epochs": run["total_steps"] / run["steps_per_epoch"],
           "median_tokens_per_s": tps[len(tps) // 2] if tps else None,
           "best_val": {k: best[k] for k in ("step", "loss", "ppl", "word_ppl")},
           "validation_curve": [{k: r[k] for k in ("step", "loss", "word_ppl", "train_loss")} for r in vals],
           "in_run_test": next(({k: r[k] for k in ("step", "loss", "ppl", "word_ppl")} for r in evals
                                if r["split"] == "test"), None)}
    results["runs"][name] = rec
    return rec


def main() -> None:
    p = study.arg_parser(NAME, __doc__)
    p.add_argument("--ablation_minutes", type=float, default=6.0)
    p.add_argument("--final_minutes", type=float, default=30.0)
    p.add_argument("--seeds", type=int, nargs="*", default=[0, 1], help="seeds of the final runs (none: ablations only)")
    p.add_argument("--stages", type=int, default=len(STAGES), help="run only the first N ablation stages")
    args = p.parse_args()
    out, runs, extra = study.paths_and_extra(args)
    results = study.load_metrics(out) or {"study": NAME, "runs": {}}
    results.update(hardware=study.hardware(), cpu=bench.cpu_name() or "unknown", ablation_minutes=args.ablation_minutes,
                   final_minutes=args.final_minutes, stages=[])

    def save():
        study.save_metrics(out, results)
        (out / "summary.md").write_text(summary(results))

    chosen = dict(BASE)
    ablation = {**ABLATION_LOOP, "time_budget_minutes": args.ablation_minutes, "seed": 0, **extra}
    base_name = "base"
    run_one(base_name, {**train_flags(chosen), **ablation}, runs, results, chosen["vocab_size"])
    save()
    best_name = base_name
    for field, options in STAGES[:args.stages]:
        tried = [best_name]
        for value in options:
            setting = {**chosen, field: value}
            name = "-".join(f"{k}={setting[k]}" for k in setting if setting[k] != BASE.get(k))
            run_one(name, {**train_flags(setting), **ablation}, runs, results, setting["vocab_size"])
            save()
            tried.append(name)
        # Word perplexity, not token loss: the same text and word count whatever the vocabulary.
        winner = min((n for n in tried if "infeasible" not in results["runs"][n]),
                     key=lambda n: results["runs"][n]["best_val"]["word_ppl"])
        if winner != best_name:
            chosen = {**chosen, field: value_of(results["runs"][winner]["flags"], field)}
            best_name = winner
        results["stages"].append({"varies": field, "tried": tried, "kept": winner})
        save()
    results["chosen"] = chosen
    save()
    if not args.seeds:
        print(summary(results))
        return
    # The final runs train the named recipe itself: `train --recipe=cpu30` must be what the study chose.
    from gpt2_jax.train import RECIPES

    want = {**train_flags(chosen), "time_budget_minutes": args.final_minutes, "epochs": 100,
            "eval_every": FINAL_EVAL_EVERY}
    results["recipe_flags"] = want  # tests/test_train.py checks RECIPES['cpu30'] against it
    if RECIPES["cpu30"] != want:
        sys.exit(f"gpt2_jax/train.py's RECIPES['cpu30'] is {RECIPES['cpu30']}, the study chose {want}: set it, "
                 f"then run this again (finished runs are skipped)")
    for seed in args.seeds:
        name = f"final-seed{seed}"
        rec = run_one(name, {"recipe": "cpu30", "seed": seed, "quiet": "true", **extra}, runs, results,
                      chosen["vocab_size"])
        if "test_best_disjoint" not in rec:  # the test split, read once per final run
            rec["test_best_disjoint"] = study.evaluate(runs / name, step="best")
        save()
    first = f"final-seed{args.seeds[0]}"
    results["plot"] = study.copy_plot(runs / first, out, "final")
    study.write_samples(out / "samples.md", {first: study.samples(runs / first, step="best")})
    save()
    print(summary(results))


def value_of(flags: dict, field: str):
    if field == "shape":
        return next(k for k, v in SHAPES.items() if all(flags[f] == n for f, n in v.items()))
    return flags[field]


def summary(results: dict) -> str:
    lines = [f"# {NAME}", "", f"Hardware: {results['hardware']} ({results['cpu']}). Ablations: "
             f"{results['ablation_minutes']:g}-minute budgets, chosen by validation word ppl; final: "
             f"{results['final_minutes']:g} minutes. Budgets count compilation, steps, evaluations and checkpoints; "
             "data preparation is timed apart. Word perplexities are comparable across vocabularies.", "",
             "| run | steps | epochs | dtype | median tok/s | wall min | data prep s | load (1 min) before / after | "
             "best val loss | best val word ppl |", "|---|---|---|---|---|---|---|---|---|---|"]
    for name, r in results["runs"].items():
        if "infeasible" in r:
            lines.append(f"| {name} | {r['infeasible']} |" + " |" * 8)
            continue
        lines.append(f"| {name} | {r['steps']} | {r['epochs']:.2f} | {r['dtype']} | {study.fmt(r['median_tokens_per_s'], 0)} "
                     f"| {r['train_wall_s'] / 60:.1f} | {r['data_prep_s']:.0f} | {r['load_before'][0]:.2f} / "
                     f"{r['load_after'][0]:.2f} | {r['best_val']['loss']:.4f} | {r['best_val']['word_ppl']:.1f} |")
    if results.get("stages"):
        lines += ["", "Stages (each keeps the lowest validation word perplexity):", ""]
        lines += [f"- {s['varies']}: tried {', '.join(s['tried'])}; kept **{s['kept']}**" for s in results["stages"]]
    if results.get("chosen"):
        lines += ["", f"Chosen recipe: `{' '.join(f'--{k}={v}' for k, v in train_flags(results['chosen']).items())}`"]
    finals = {n: r for n, r in results["runs"].items() if n.startswith("final") and "test_best_disjoint" in r}
    if finals:
        lines += ["", "| final run | test token ppl | test word ppl | bits/byte | best val step |", "|---|---|---|---|---|"]
        for n, r in finals.items():
            t = r["test_best_disjoint"]
            lines.append(f"| {n} | {t['token_ppl']:.2f} | {t['word_ppl']:.2f} | {t['bits_per_byte']:.3f} | "
                         f"{r['best_val']['step']} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
