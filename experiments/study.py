"""What every study script shares: train through the CLI, evaluate, sample, summarise.

A study writes into ``experiments/results/<study>/``:
  ``metrics.json``  (every run's configuration, per-epoch losses, test numbers, timing, hardware)
  ``<run>_loss.png`` (the run's train-vs-validation curve, copied from its run dir)
  ``samples.md``    (greedy / top-k 50 / nucleus 0.9 for the report's prompts)
  ``summary.md``    (a table beside the report's numbers)
Run directories (checkpoints) stay under ``runs/`` (git-ignored).
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import shutil
import subprocess
import sys
import time

REPO = pathlib.Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run from a checkout without `pip install -e .` too
    sys.path.insert(0, str(REPO))
RESULTS = REPO / "experiments" / "results"
RUNS = REPO / "runs"

# The report's prompts, then two of ours in WikiText's tokenized style.
PROMPTS = ("The man jumped", "He had exam in a week", "The film", "In 1998 , the")
SAMPLING = (("greedy", {}), ("top_k", {"top_k": 50}), ("nucleus", {"top_p": 0.9}))

# The project report's table (context 128, 32k BPE, 5 epochs): our point of comparison.
REPORT = {
    "small": {"test_token_ppl": 306.19, "val_loss_plateau": 5.67, "time_per_epoch": "2:23"},
    "medium": {"test_token_ppl": 279.78, "val_loss_plateau": 5.58, "time_per_epoch": "6:47"},
}


def arg_parser(name: str, doc: str) -> argparse.ArgumentParser:
    """A study's flags: its own, plus --out (results), --runs (run dirs) and --extra (train flags)."""
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=str(RESULTS / name), help="where the results go")
    p.add_argument("--runs", default=str(RUNS / name), help="where the run directories go")
    p.add_argument("--extra", default="", help="extra train flags, e.g. '--max_steps=20 --n_layer=1' for a smoke test")
    return p


def paths_and_extra(args) -> tuple[pathlib.Path, pathlib.Path, dict]:
    """(results folder, created; runs folder; --extra as a dict of train flags)."""
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    extra = dict(kv.lstrip("-").split("=", 1) for kv in args.extra.split())
    return out, pathlib.Path(args.runs), extra


def hardware() -> str:
    import jax

    d = jax.devices()[0]
    if d.platform == "cpu":
        return f"CPU only: {platform.processor() or platform.machine()}, {os.cpu_count()} cores"
    return f"{jax.device_count()} x {d.device_kind}"


def train(run_dir: pathlib.Path, flags: dict) -> float:
    """Run ``python -m gpt2_jax.train`` (resumes if the run dir has checkpoints); returns wall seconds."""
    cmd = [sys.executable, "-m", "gpt2_jax.train", f"--run_dir={run_dir}"]
    cmd += [f"--{k}={v}" for k, v in flags.items()]
    print("$", " ".join(cmd), flush=True)
    t0 = time.time()
    subprocess.run(cmd, check=True, cwd=REPO)
    return time.time() - t0


def finished_run(run_dir: pathlib.Path, flags: dict) -> bool:
    """Whether ``run_dir`` holds a training started with exactly these train flags that reached its last step
    (its final validation evaluation is written), so that resuming it would do nothing."""
    try:
        run = json.loads((run_dir / "run.json").read_text())
    except (OSError, ValueError):
        return False
    given = {a for a in run.get("command", [])[1:] if not a.startswith("--run_dir=")}
    evals = [r for r in read_jsonl(run_dir / "evals.jsonl") if r.get("split") == "validation"]
    return given == {f"--{k}={v}" for k, v in flags.items()} and bool(evals) and evals[-1]["step"] == run.get("total_steps")


def evaluate(run_dir: pathlib.Path, *, split: str = "test", step: str = "best", stride: int | None = None) -> dict:
    """``python -m gpt2_jax.evaluate``'s JSON line."""
    cmd = [sys.executable, "-m", "gpt2_jax.evaluate", f"--run_dir={run_dir}", f"--split={split}", f"--step={step}",
           "--quiet"]
    if stride is not None:
        cmd.append(f"--stride={stride}")
    print("$", " ".join(cmd), flush=True)
    out = subprocess.run(cmd, check=True, cwd=REPO, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def read_jsonl(path: pathlib.Path) -> list[dict]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def epoch_table(run_dir: pathlib.Path) -> list[dict]:
    """Validation loss (and mean train loss since the previous evaluation) at each epoch end, with wall time."""
    evals = [r for r in read_jsonl(run_dir / "evals.jsonl") if r["split"] == "validation"]
    steps = read_jsonl(run_dir / "metrics.jsonl")
    run = json.loads((run_dir / "run.json").read_text())
    tokens_per_step = run["train"]["batch_size"] * run["model"]["n_ctx"]
    rows = []
    for r in evals:
        if abs(r["epoch"] - round(r["epoch"])) > 1e-9 or round(r["epoch"]) == 0:
            continue
        epoch = round(r["epoch"])
        in_epoch = [s for s in steps if epoch - 1 < s["epoch"] <= epoch]
        tps = [s["tokens_per_s"] for s in in_epoch if s.get("tokens_per_s")]
        median = sorted(tps)[len(tps) // 2] if tps else None
        rows.append({"epoch": epoch, "step": r["step"], "val_loss": r["loss"], "val_ppl": r["ppl"],
                     "train_loss": r.get("train_loss"), "median_tokens_per_s": median,
                     # training compute time of the epoch (its tokens at the median rate; no eval/compile)
                     "epoch_train_s": None if not median else len(in_epoch) * tokens_per_step / median})
    return rows


def samples(run_dir: pathlib.Path, *, step: str = "best", max_new_tokens: int = 60, seed: int = 0) -> list[dict]:
    """Greedy, top-k 50 and nucleus 0.9 continuations of every prompt (library calls, same seed)."""
    import jax
    import numpy as np

    from gpt2_jax.pretrained import load_run
    from gpt2_jax.decode import generate
    from gpt2_jax.tokenizer import EOT

    run = load_run(run_dir, step)
    tok = run.tokenizer
    eos = tok.token_to_id(EOT)
    out = []
    for i, prompt in enumerate(PROMPTS):
        ids = tok.encode(prompt, add_special_tokens=False).ids
        row = {"prompt": prompt}
        for method, kw in SAMPLING:
            gen = np.asarray(generate(run.params, run.cfg, np.asarray([ids], np.int32), max_new_tokens=max_new_tokens,
                                      method=method, rng=jax.random.PRNGKey(seed + i), eos_id=eos, **kw))[0]
            new = gen[len(ids):].tolist()
            if eos in new:
                new = new[:new.index(eos)]
            row[method] = tok.decode(ids + new, skip_special_tokens=False)
        out.append(row)
    return out


def write_samples(path: pathlib.Path, by_run: dict[str, list[dict]], *, step: str = "best") -> None:
    which = {"best": "best checkpoint (lowest validation loss)", "latest": "last checkpoint"}.get(step, f"step {step}")
    lines = ["# Samples", "", "Greedy, top-k (k=50) and nucleus (p=0.9) decoding, 60 new tokens, seed 0 + prompt index, from each "
             f"run's {which}.", ""]
    for run, rows in by_run.items():
        lines += [f"## {run}", ""]
        for row in rows:
            lines += [f"**Prompt:** {row['prompt']}", ""]
            for method, _ in SAMPLING:
                text = row[method].replace("\n", " ⏎ ")
                lines += [f"- *{method}*: {text}"]
            lines.append("")
    path.write_text("\n".join(lines))


def copy_plot(run_dir: pathlib.Path, out_dir: pathlib.Path, name: str) -> str:
    src = run_dir / "loss.png"
    dst = out_dir / f"{name}_loss.png"
    if src.is_file():
        shutil.copyfile(src, dst)
    return dst.name


def load_metrics(out_dir: pathlib.Path) -> dict | None:
    """The study's metrics.json from an earlier invocation, or None."""
    path = out_dir / "metrics.json"
    return json.loads(path.read_text()) if path.is_file() else None


def save_metrics(out_dir: pathlib.Path, record: dict) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "metrics.json").write_text(json.dumps(record, indent=2) + "\n")


def fmt(x, digits=2) -> str:
    return "–" if x is None else f"{x:.{digits}f}"
