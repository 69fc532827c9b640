"""Fine-tune OpenAI's GPT-2 on WikiText-2 and report test word perplexity before and after.

    python experiments/finetune_gpt2.py --gpt2_dir=gpt2                  # a GPU: 1 epoch at each context
    python experiments/finetune_gpt2.py --gpt2_dir=gpt2 --cpu_budget     # a CPU: 30 steps at each context

``--gpt2_dir`` is a Hugging Face GPT-2 folder (README, "Hugging Face GPT-2", for the download lines);
any HF-format GPT-2 works. For each context (1024, the model's own, and 128, the report's): the
zero-shot test score of the folder (``evaluate --hf_dir``), then ``train --init_from`` with the
fine-tuning defaults (lr 1e-4, 1 epoch; the schedule's warmup is a tenth of the run), then the
test score of its best checkpoint. Disjoint windows of the context length, GPT-2's own tokenizer;
word perplexity is comparable across tokenizers. Writes experiments/results/finetune_gpt2/.
"""

from __future__ import annotations

import json
import subprocess
import sys

import study

NAME = "finetune_gpt2"


def score_hf(hf_dir: str, seq_len: int, batch_size: int) -> dict:
    """``python -m gpt2_jax.evaluate --hf_dir`` on the test split: the folder's zero-shot numbers."""
    cmd = [sys.executable, "-m", "gpt2_jax.evaluate", f"--hf_dir={hf_dir}", "--split=test", f"--seq_len={seq_len}",
           f"--batch_size={batch_size}", "--quiet"]
    print("$", " ".join(cmd), flush=True)
    out = subprocess.run(cmd, check=True, cwd=study.REPO, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    p = study.arg_parser(NAME, __doc__)
    p.add_argument("--gpt2_dir", required=True, help="Hugging Face GPT-2 folder to start from")
    p.add_argument("--contexts", default="1024,128", help="comma-separated training/evaluation contexts")
    p.add_argument("--batch_size", type=int, default=8, help="sequences per step (and per evaluation batch)")
    p.add_argument("--cpu_budget", action="store_true", help="30 steps per context: what a CPU does in minutes")
    args = p.parse_args()
    out, runs, extra = study.paths_and_extra(args)
    record = {"study": NAME, "hardware": study.hardware(), "gpt2_dir": args.gpt2_dir, "runs": []}
    for ctx in (int(c) for c in args.contexts.split(",")):
        setup = {"init_from": args.gpt2_dir, "n_ctx": ctx, "batch_size": args.batch_size,
                 "eval_batch_size": args.batch_size, "eval_every": 100, "ckpt_every": 100, "quiet": "true",
                 **({"max_steps": 30, "eval_every": 15} if args.cpu_budget else {}), **extra}
        before = score_hf(args.gpt2_dir, ctx, args.batch_size)
        run_dir = runs / f"ctx{ctx}"
        wall = study.train(run_dir, setup)
        vals = [r for r in study.read_jsonl(run_dir / "evals.jsonl") if r["split"] == "validation"]
        after = study.evaluate(run_dir, step="best")
        record["runs"].append({"context": ctx, "setup": setup, "train_wall_s": round(wall, 1),
                               "validation": [{k: r[k] for k in ("step", "epoch", "loss", "word_ppl")} for r in vals],
                               "test_before": before, "test_after_best": after,
                               "plot": study.copy_plot(run_dir, out, f"ctx{ctx}")})
        study.save_metrics(out, record)  # after every context: a stopped run keeps what finished

    lines = [f"# {NAME}", "", f"Hardware: {record['hardware']}. Start: `{args.gpt2_dir}`.", "",
             "| context | steps | val loss step 0 -> best | test word ppl before | after | test token ppl before | after "
             "| train wall |", "|---|---|---|---|---|---|---|---|"]
    for r in record["runs"]:
        v, b, a = r["validation"], r["test_before"], r["test_after_best"]
        best = min(v, key=lambda e: e["loss"])
        lines.append(f"| {r['context']} | {v[-1]['step']} | {v[0]['loss']:.4f} -> {best['loss']:.4f} (step "
                     f"{best['step']}) | {b['word_ppl']:.2f} | {a['word_ppl']:.2f} | {b['token_ppl']:.2f} | "
                     f"{a['token_ppl']:.2f} | {r['train_wall_s'] / 60:.1f} min |")
    (out / "summary.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
