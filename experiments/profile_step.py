"""Where a training step or a decoding loop spends its time, by XLA op, from ``jax.profiler``'s trace.

    python experiments/profile_step.py train --size=small --batch_size=8 --dtype=bfloat16
    python experiments/profile_step.py generate --size=small --dtype=bfloat16 --new_tokens=120
    python experiments/profile_step.py generate --size=small --quantize=int8_dynamic --out=FILE.json

The step (``bench.train_step_and_inputs``, as ``bench train`` times it) or the one-jit decode loop
(``bench.compiled_generate``) is compiled once, warmed up, then run ``--calls`` times under the
profiler. Every op the XLA executable ran is summed over the calls and over the threads that ran it
(so the ops' total can exceed the wall time when both cores work at once), then grouped by its name
without the trailing number: ``ynn_fusion`` are the products YNNPACK runs, ``*convert*`` fusions
change dtypes, ``copy*`` move bytes. The top ops carry their HLO result shape from the compiled
module's text. Prints one JSON line (and writes it to ``--out`` if given); the measured roofline
and the load average stand beside it, since the VM's speed moves between runs.
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import os
import re
import tempfile
import time

from gpt2_jax import cli

HLO_LINE = re.compile(r"^\s*(?:ROOT\s+)?%?(?P<name>[\w.\-]+)\s*=\s*(?P<shape>\([^=]*?\)|\S+)\s")


def hlo_shapes(hlo_text: str) -> dict[str, str]:
    """Each instruction's result shape in an HLO module's text, by instruction name."""
    shapes = {}
    for line in hlo_text.splitlines():
        m = HLO_LINE.match(line)
        if m:
            shapes.setdefault(m["name"], re.sub(r"\{[^}]*\}", "", m["shape"]))
    return shapes


def dumped_shapes(dump_dir: str, seconds: dict[str, float]) -> dict[str, str]:
    """``hlo_shapes`` of the optimized module in ``dump_dir`` (``--xla_dump_to``) naming most of ``seconds``' ops."""
    best: dict[str, str] = {}
    for path in glob.glob(f"{dump_dir}/*after_optimizations.txt"):
        with open(path) as f:
            shapes = hlo_shapes(f.read())
        if sum(n in shapes for n in seconds) > sum(n in best for n in seconds):
            best = shapes
    return best


def op_seconds(trace_events: list[dict], calls: int) -> dict[str, float]:
    """Seconds per call of each XLA op (events that name an ``hlo_op``), summed over threads: the
    module with the most time only (the profiled executable, not stray compiles or transfers)."""
    by_module: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    for e in trace_events:
        args = e.get("args") or {}
        if e.get("ph") == "X" and "hlo_op" in args and "dur" in e:
            by_module[args.get("hlo_module", "")][args["hlo_op"]] += e["dur"] * 1e-6 / calls
    if not by_module:
        return {}
    return dict(max(by_module.values(), key=lambda c: sum(c.values())))


def summarize(seconds: dict[str, float], shapes: dict[str, str], top: int = 15) -> dict:
    """Ops' total, their groups by name (the trailing ``.N`` dropped), and the ``top`` slowest ops."""
    groups = collections.Counter()
    for name, s in seconds.items():
        groups[re.sub(r"(\.\d+)+$", "", name)] += s
    slowest = sorted(seconds.items(), key=lambda kv: -kv[1])[:top]
    return {
        "ops_s": round(sum(seconds.values()), 4),
        "groups_s": {g: round(s, 4) for g, s in groups.most_common() if s >= 5e-4},
        "top_ops": [{"op": n, "s": round(s, 4), "shape": shapes.get(n)} for n, s in slowest],
    }


def _trace(run, calls: int) -> list[dict]:
    import jax
    with tempfile.TemporaryDirectory() as d:
        with jax.profiler.trace(d, create_perfetto_trace=True):
            for _ in range(calls):
                run()
        path, = glob.glob(f"{d}/**/perfetto_trace.json.gz", recursive=True)
        with gzip.open(path) as f:
            events = json.load(f)
    return events["traceEvents"] if isinstance(events, dict) else events


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=["train", "generate"])
    parser.add_argument("--size", default="small")
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"])
    parser.add_argument("--batch_size", type=int, default=None, help="default: 8 train, 1 generate")
    parser.add_argument("--quantize", default="none", choices=["none", "int8", "int8_dynamic"], help="generate only")
    parser.add_argument("--prompt_len", type=int, default=8)
    parser.add_argument("--new_tokens", type=int, default=120)
    parser.add_argument("--calls", type=int, default=3)
    parser.add_argument("--top", type=int, default=15)
    parser.add_argument("--out", default=None)
    a = parser.parse_args()

    dump_dir = tempfile.TemporaryDirectory()  # the optimized HLO of what runs: the ops' shapes
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} --xla_dump_to={dump_dir.name} --xla_dump_hlo_as_text"
    import jax

    from gpt2_jax import bench, decode
    from gpt2_jax.config import GPT2Config
    from gpt2_jax.model import init_params

    dtype, _ = cli.resolve_dtype(a.dtype, "batched" if a.what == "train" else "decode")
    cfg = GPT2Config.preset(a.size, dtype=dtype)
    record = {"what": a.what, "size": a.size, "dtype": dtype, "load_before": round(os.getloadavg()[0], 2)}
    if a.what == "train":
        batch_size = a.batch_size or 8
        p_step, state, batch, rng = bench.train_step_and_inputs(cfg, batch_size=batch_size)
        box = [state]  # run by p_step itself: its .lower().compile() ran small's step 1.7x slower

        def run():
            box[0], m = p_step(box[0], batch, rng)
            jax.block_until_ready(m)
        record.update(batch_size=batch_size, tokens_per_call=batch_size * cfg.n_ctx)
    else:
        batch_size = a.batch_size or 1
        params = decode.inference_params(init_params(cfg, jax.random.PRNGKey(0)), cfg, a.quantize)
        cfg = decode.inference_config(cfg, a.quantize)
        compiled, args = bench.compiled_generate(params, cfg, batch_size=batch_size, prompt_length=a.prompt_len,
                                                 max_new_tokens=a.new_tokens)

        def run():
            jax.block_until_ready(compiled(*args))  # what bench generate times
        record.update(batch_size=batch_size, quantize=a.quantize, prompt_len=a.prompt_len,
                      new_tokens=a.new_tokens, weight_bytes=sum(x.nbytes for x in jax.tree.leaves(params)))
    for _ in range(2):
        run()
    t0 = time.perf_counter()
    for _ in range(a.calls):
        run()
    record["wall_s_per_call"] = round((time.perf_counter() - t0) / a.calls, 4)  # outside the profiler
    events = _trace(run, a.calls)
    seconds = op_seconds(events, a.calls)
    record.update(summarize(seconds, dumped_shapes(dump_dir.name, seconds), a.top))
    record.update(load_after=round(os.getloadavg()[0], 2), roofline=bench.roofline(), jax=jax.__version__)
    line = json.dumps(record)
    print(line)
    if a.out:
        with open(a.out, "w") as f:
            f.write(json.dumps(record, indent=1) + "\n")


if __name__ == "__main__":
    cli.rerun_with_huge_pages()
    main()
