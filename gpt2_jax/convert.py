"""Convert between gpt2_jax run directories and Hugging Face GPT-2 folders.

    python -m gpt2_jax.convert --from_hf=gpt2 --run_dir=runs/gpt2             # import as a run (step 0)
    python -m gpt2_jax.convert --run_dir=runs/small --to_hf=hf/small [--step=best]   # export

An import writes a run directory (step 0) that sample and evaluate read like any other. An export
writes config.json, model.safetensors and the tokenizer, which ``transformers``' ``from_pretrained``
loads. Neither direction overwrites anything that exists.
"""

from __future__ import annotations

import pathlib
from typing import Sequence

from absl import flags

from gpt2_jax import hf, pretrained, rundir
from gpt2_jax.cli import folder_flag, parse_flags, run
from gpt2_jax.config import param_count
from gpt2_jax.errors import UserError


def define_flags() -> flags.FlagValues:
    fv = flags.FlagValues()
    flags.DEFINE_string("from_hf", None, "Import: Hugging Face GPT-2 folder to read (config.json, "
                        "model.safetensors or pytorch_model.bin, tokenizer).", flag_values=fv)
    flags.DEFINE_string("to_hf", None, "Export: folder to write the run's model into as a Hugging Face GPT-2 "
                        "(created; existing files are never overwritten).", flag_values=fv)
    flags.DEFINE_string("run_dir", None, "Run directory: written by an import (must be new), read by an export.",
                        flag_values=fv)
    flags.DEFINE_string("step", None, "Export only: checkpoint to export, a step number, 'latest' (default) "
                        "or 'best' (lowest validation loss).", flag_values=fv)
    return fv


def main(argv: Sequence[str]) -> int:
    fv = parse_flags(define_flags(), argv, __doc__)
    if bool(fv.from_hf) == bool(fv.to_hf):
        raise UserError("give exactly one of --from_hf=DIR (import) or --to_hf=DIR (export), with --run_dir=DIR")
    if not fv.run_dir:
        raise UserError("--run_dir=DIR is required: the run to write (--from_hf) or to read (--to_hf)")

    if fv.from_hf:
        if fv.step is not None:
            raise UserError("--step only applies to --to_hf; an imported model is saved as step 0")
        # Both folders checked before gigabytes of weights are read.
        folder_flag(fv.from_hf, "from_hf", "a Hugging Face GPT-2 folder",
                    "pass the folder holding config.json, model.safetensors and the tokenizer")
        folder_flag(fv.run_dir, "run_dir", "a run directory", "choose a new --run_dir", may_be_new=True)
        cfg, params, tokenizer = hf.load_hf_with_tokenizer(fv.from_hf)
        source = f"hf:{pathlib.Path(fv.from_hf).resolve()}"
        pretrained.save_params_as_run(fv.run_dir, cfg, params, tokenizer, step=0, source=source)
        print(f"imported {fv.from_hf} ({cfg.n_layer} layers, d_model {cfg.d_model}, {cfg.n_head} heads, "
              f"vocab {cfg.vocab_size}, n_ctx {cfg.n_ctx}, {param_count(cfg):,} parameters) "
              f"into run {fv.run_dir} at step 0")
        return 0

    folder_flag(fv.to_hf, "to_hf", "a folder", "choose a new folder to export into", may_be_new=True)
    loaded = pretrained.load_run(fv.run_dir, rundir.parse_step(fv.step))
    folder = hf.save_hf(loaded.cfg, loaded.params, fv.to_hf, loaded.tokenizer)
    print(f"exported {loaded.run_dir} step {loaded.step} ({param_count(loaded.cfg):,} parameters) to {folder}")
    return 0


if __name__ == "__main__":
    run(main)
