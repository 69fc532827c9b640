"""A run's metric files (JSON lines) and its train-vs-validation loss plot.

``metrics.jsonl`` has one record per training step (``step``, ``epoch``, ``loss``, ``lr``,
``grad_norm``, ``param_norm``, ``tokens_per_s``); ``evals.jsonl`` one per evaluation (``step``,
``epoch``, ``split``, ``loss``, ``ppl``, ``word_ppl``, ``bits_per_byte``, ``train_loss``).
Both are append-only while training; on resume, records past the restored step (written before a
crash, recomputed identically after) are dropped so every step appears once.
"""

from __future__ import annotations

import json
import math
import os
import pathlib
from typing import Iterable, Sequence

import numpy as np

from gpt2_jax import files


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    """All records of a JSON-lines file ([] if absent); a torn last line (crash mid-write) is skipped."""
    path = pathlib.Path(path)
    if not path.is_file():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def append_jsonl(path: str | os.PathLike, records: Iterable[dict]) -> None:
    lines = "".join(json.dumps(r) + "\n" for r in records)
    if lines:
        try:
            with open(path, "a") as f:
                f.write(lines)
        except OSError as e:  # a failed write() names no file: name it for the report
            raise OSError(e.errno, e.strerror, str(path)) from e


def drop_records_after(path: str | os.PathLike, step: int) -> int:
    """Rewrite ``path`` atomically without the records past ``step``; returns how many went."""
    records = read_jsonl(path)
    kept = [r for r in records if r["step"] <= step]
    path = pathlib.Path(path)
    if path.is_file() and len(kept) != len(path.read_text().splitlines()):
        files.write_atomic(path, "".join(json.dumps(r) + "\n" for r in kept))
    return len(records) - len(kept)


def moving_average(x: Sequence[float], window: int) -> np.ndarray:
    """Trailing mean over up to ``window`` values (shorter at the start), same length as ``x``."""
    x = np.asarray(x, np.float64)
    c = np.concatenate([[0.0], np.cumsum(x)])
    i = np.arange(1, len(x) + 1)
    lo = np.maximum(i - window, 0)
    return (c[i] - c[lo]) / (i - lo)


def plot_losses(steps_records: Sequence[dict], eval_records: Sequence[dict], out_png: str | os.PathLike, *,
                steps_per_epoch: int, vocab_size: int | None = None, title: str = "") -> None:
    """Train loss per step (raw and smoothed) and validation/test loss per evaluation, by step and epoch."""
    import matplotlib

    matplotlib.use("Agg")  # files only, never a window
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=110)
    if steps_records:
        s = np.array([r["step"] for r in steps_records])
        loss = np.array([r["loss"] for r in steps_records])
        ax.plot(s, loss, color="tab:blue", alpha=0.25, lw=0.8)
        smoothed = moving_average(loss, max(1, len(loss) // 50))
        ax.plot(s, smoothed, color="tab:blue", lw=1.6, label="train (smoothed)")
    for split, style in (("validation", dict(color="tab:orange", marker="o", lw=1.6)),
                         ("test", dict(color="tab:red", marker="*", ms=10, ls="none"))):
        ev = [r for r in eval_records if r["split"] == split]
        if ev:
            ax.plot([r["step"] for r in ev], [r["loss"] for r in ev], label=split, **style)
    if vocab_size:
        ax.axhline(math.log(vocab_size), color="gray", ls=":", lw=1, label=f"uniform: log {vocab_size}")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats / token)")
    ax.grid(alpha=0.3)
    ax.legend(loc="upper right")
    top = ax.secondary_xaxis("top", functions=(lambda x: x / steps_per_epoch, lambda e: e * steps_per_epoch))
    top.set_xlabel("epoch")
    if title:
        ax.set_title(title, fontsize=10)
    fig.tight_layout()
    out_png = pathlib.Path(out_png)
    tmp = out_png.with_name(f".{out_png.stem}.tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    os.replace(tmp, out_png)  # a reader never sees half a PNG
