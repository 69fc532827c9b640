"""Decoding speed of ``gpt2_jax.decode.generate``: new tokens/s and compile time.

    python experiments/generate_speed.py --size=tiny --new_tokens=100 --long_tokens=512
    python experiments/generate_speed.py --run_dir=runs/tiny     # trained weights instead

Random weights give a nearly uniform next-token distribution (nucleus sets of ~28k tokens); the
samplers never sort, so their cost does not depend on it (``gpt2_jax.decode._keep_first``).

Rows: batch 1 and 8 × greedy and nucleus, within the context; then one long greedy generation per
sliding-window setting (``slide_keep`` = n_ctx // 2, the default, vs n_ctx, the exact window).
"""

import json
import platform

import jax
from absl import flags

from gpt2_jax.cli import parse_flags, run
from gpt2_jax.config import PRESETS
from gpt2_jax.bench import time_generate
from gpt2_jax.model import init_params


def main(argv):
    fv = flags.FlagValues()
    flags.DEFINE_enum("size", "tiny", list(PRESETS), "model preset", flag_values=fv)
    flags.DEFINE_integer("prompt_len", 16, "prompt tokens", flag_values=fv)
    flags.DEFINE_integer("new_tokens", 100, "new tokens per row, within the context", flag_values=fv)
    flags.DEFINE_integer("long_tokens", 512, "new tokens of the sliding-window rows (0 = skip them)", flag_values=fv)
    flags.DEFINE_integer("repeats", 3, "timed runs per row; the fastest counts", flag_values=fv)
    flags.DEFINE_string("run_dir", None, "time a trained run's newest checkpoint instead of random weights",
                        flag_values=fv)
    parse_flags(fv, argv, __doc__)
    if fv.run_dir:
        from gpt2_jax.pretrained import load_run
        loaded = load_run(fv.run_dir)
        cfg, params, name = loaded.cfg, loaded.params, f"{fv.run_dir} step {loaded.step}"
    else:
        cfg, name = PRESETS[fv.size], f"{fv.size}, random weights"
        params = init_params(cfg, jax.random.PRNGKey(0))
    print(f"# {name}: {platform.processor() or platform.machine()}, {jax.devices()[0].device_kind}, "
          f"jax {jax.__version__}", flush=True)
    rows = [dict(batch_size=b, method=m, max_new_tokens=fv.new_tokens) for b in (1, 8) for m in ("greedy", "nucleus")]
    if fv.long_tokens:
        rows += [dict(batch_size=1, method="greedy", max_new_tokens=fv.long_tokens, slide_keep=k)
                 for k in (cfg.n_ctx // 2, cfg.n_ctx)]
    for row in rows:
        t = time_generate(params, cfg, prompt_length=fv.prompt_len, repeats=fv.repeats, **row)
        print(json.dumps({**row, "new_tokens_per_s": round(t["new_tokens_per_s"], 1),
                          "compile_s": round(t["compile_s"], 2), "run_s": round(t["run_s"], 3)}), flush=True)


if __name__ == "__main__":
    run(main)
