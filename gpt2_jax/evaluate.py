"""Honest perplexities: every token of a split scored exactly once.

    python -m gpt2_jax.evaluate --run_dir=runs/tiny --split=test [--step=N|best] [--stride=64]

One JSON line (last on stdout, also saved in the run dir): ``mean_nll`` (nats per token),
``token_ppl`` (the report's measure; tokenizer-dependent), ``word_ppl`` (total NLL over
whitespace words plus one end-of-line per line, as WikiText-2 papers report), ``bits_per_byte``,
and ``windows``: "disjoint" or "sliding" (``stride`` new tokens per window, each with up to
``seq_len - 1`` tokens of left context).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import pathlib
import sys
import time
from typing import Callable, Sequence

import jax
import numpy as np
from absl import flags
from tqdm import tqdm

from gpt2_jax import cli, data, decode, memory, parallel, pretrained, rundir
from gpt2_jax.config import GPT2Config
from gpt2_jax.core import AXIS, make_eval_step
from gpt2_jax.errors import UserError
from gpt2_jax.model import quantize_int8

SPLIT_ALIASES = {"train": "train", "valid": "validation", "validation": "validation", "test": "test"}


@dataclasses.dataclass(frozen=True)
class EvalResult:
    split: str
    nll_sum: float
    tokens: int
    words: int
    bytes: int
    seq_len: int
    stride: int | None

    @property
    def mean_nll(self) -> float:
        return self.nll_sum / self.tokens

    @property
    def token_ppl(self) -> float:
        return math.exp(self.mean_nll)

    @property
    def word_ppl(self) -> float:
        return math.exp(self.nll_sum / self.words)

    @property
    def bits_per_byte(self) -> float:
        return self.nll_sum / (math.log(2) * self.bytes)

    def to_dict(self) -> dict:
        return {
            "split": self.split, "mean_nll": self.mean_nll, "token_ppl": self.token_ppl,
            "word_ppl": self.word_ppl, "bits_per_byte": self.bits_per_byte, "nll_sum": self.nll_sum,
            "tokens": self.tokens, "words": self.words, "bytes": self.bytes, "seq_len": self.seq_len,
            "windows": "disjoint" if self.stride is None else "sliding", "stride": self.stride,
        }


@functools.lru_cache(maxsize=8)
def _pmapped_eval_step(cfg: GPT2Config, devices: tuple):
    return jax.pmap(make_eval_step(cfg), axis_name=AXIS, in_axes=(None, 0), devices=devices)


def score_tokens(params, cfg: GPT2Config, tokens: np.ndarray, *, seq_len: int | None = None,
                 batch_size: int = 32, stride: int | None = None, progress=None,
                 devices: Sequence[jax.Device] | None = None,
                 warn: Callable[[str], None] | None = None) -> tuple[float, int]:
    """Total NLL (summed in float64) and count over every target token of ``tokens``.

    The same pmapped ``eval_step`` as training's validation, over all local devices by default.
    ``batch_size`` is an upper bound: a batch holds at most every window of ``tokens`` (more would
    only be padding), and fewer windows when a batch would not fit in free memory (``warn`` is told).
    A smaller batch changes only the order of the float32 sums: the result moves in its last digits,
    as between any two batch sizes (2e-8 relative on WikiText-2 validation, 32 vs 4162 windows).
    """
    devices = tuple(jax.local_devices() if devices is None else devices)
    if batch_size % len(devices):
        raise UserError(f"--batch_size={batch_size} is not divisible by the {len(devices)} local devices")
    seq_len = cfg.n_ctx if seq_len is None else seq_len
    windows = len(data.eval_windows(len(tokens), seq_len, stride)[0])
    requested, batch_size = batch_size, min(batch_size, math.ceil(windows / len(devices)) * len(devices))
    p_eval_step, params_on_devices = _pmapped_eval_step(cfg, devices), parallel.replicate(params, devices)

    def compile_for(rows: int):
        shape = (len(devices), rows // len(devices), seq_len)
        batch = {"inputs": jax.ShapeDtypeStruct(shape, np.int32), "targets": jax.ShapeDtypeStruct(shape, np.int32),
                 "mask": jax.ShapeDtypeStruct(shape, np.float32)}
        return p_eval_step.lower(params_on_devices, batch).compile()

    fitting = memory.rows_that_fit(compile_for, batch_size, devices, multiple=len(devices))
    if fitting < batch_size and warn is not None:
        warn(f"a batch of {batch_size} windows does not fit in free memory (--batch_size={requested}); "
             f"scoring {fitting} windows per batch instead")
    batch_size = fitting
    batches = data.eval_batches(tokens, seq_len=seq_len, batch_size=batch_size, stride=stride, num_devices=len(devices))
    if progress is not None:
        batches = progress(batches, total=data.num_eval_batches(len(tokens), seq_len=seq_len, batch_size=batch_size,
                                                           num_devices=len(devices), stride=stride))
    nll, count = parallel.evaluate(p_eval_step, params_on_devices, batches)
    return nll, int(round(count))


def evaluate_split(params, cfg: GPT2Config, corpus, split: str, *, seq_len: int | None = None,
                   batch_size: int = 32, stride: int | None = None, progress=None,
                   warn: Callable[[str], None] | None = None) -> EvalResult:
    """Score one split of a ``data.Corpus`` and return its perplexities (``score_tokens`` on its tokens)."""
    split = SPLIT_ALIASES[split]
    tokens = corpus.tokens[split]
    seq_len = cfg.n_ctx if seq_len is None else seq_len
    nll_sum, count = score_tokens(params, cfg, tokens, seq_len=seq_len, batch_size=batch_size, stride=stride,
                                  progress=progress, warn=warn)
    # The stream is EOT + the split's text: every token after the first is scored exactly once.
    assert count == len(tokens) - 1, (count, len(tokens))
    return EvalResult(split=split, nll_sum=nll_sum, tokens=count, words=corpus.words[split],
                      bytes=corpus.bytes[split], seq_len=seq_len, stride=stride)


# ----------------------------------------------------------------------------------------- CLI

DESCRIPTION = __doc__
OUT_OF_MEMORY = "lower --batch_size or --seq_len"  # batches are split to fit: this is for one too big alone


def _define_flags() -> flags.FlagValues:
    fv = flags.FlagValues()
    pretrained.define_model_flags(fv, "evaluate")
    # float32 unless asked: perplexities comparable across machines and with the training curves
    cli.define_dtype_flag(fv, "float32")
    cli.define_quantize_flag(fv)
    flags.DEFINE_enum("split", "test", list(SPLIT_ALIASES), "Split to score (valid is an alias of validation).",
                      flag_values=fv)
    flags.DEFINE_string("data_dir", None,
                        "Folder with wiki.{train,valid,test}.tokens or the archive (default $GPT2_JAX_DATA_DIR).",
                        flag_values=fv)
    flags.DEFINE_integer("stride", None, "Sliding-window evaluation: score this many new tokens per window, each "
                         "with up to seq_len-1 tokens of context; at most seq_len. Default: disjoint windows.",
                         lower_bound=1, flag_values=fv)
    flags.DEFINE_integer("seq_len", None, "Window length, at most the model's context (default: the context).",
                         lower_bound=2, flag_values=fv)
    flags.register_multi_flags_validator(
        ["stride", "seq_len"], lambda f: None in (f["stride"], f["seq_len"]) or f["stride"] <= f["seq_len"],
        message="--stride must not exceed --seq_len, the window it moves in", flag_values=fv)
    flags.DEFINE_integer("batch_size", 32, "Windows per forward pass.", lower_bound=1, flag_values=fv)
    flags.DEFINE_string("output", None, "Where to save the JSON (default: <run_dir>/eval_<split>_<step>.json).",
                        flag_values=fv)
    flags.DEFINE_bool("quiet", False, "No progress bar.", flag_values=fv)
    flags.DEFINE_bool("verbose", False, "Show TensorFlow Datasets' own messages and progress bars while the data "
                      "is prepared.", flag_values=fv)
    return fv


def main(argv: Sequence[str]) -> int:
    fv = cli.parse_flags(_define_flags(), argv, DESCRIPTION)
    model = pretrained.load_model(fv.run_dir, fv.hf_dir, fv.step)
    cfg = model.cfg.replace(dtype=cli.resolve_dtype(fv.dtype, "batched")[0])
    params, tokenizer = model.params, model.tokenizer
    if fv.quantize == "int8":
        params = quantize_int8(params)
    elif fv.quantize == "int8_dynamic":  # int8 x int8 products read the (out, in) kernels of inference_params
        cfg = decode.inference_config(cfg, fv.quantize)
        params = decode.inference_params(params, cfg, fv.quantize)
    step, out_dir = ("hf" if fv.hf_dir else model.step), model.run_dir
    seq_len = fv.seq_len or cfg.n_ctx
    if not 2 <= seq_len <= cfg.n_ctx:
        raise UserError(f"--seq_len must be between 2 and the model's context {cfg.n_ctx}, got {seq_len}")
    if fv.stride is not None and fv.stride > seq_len:
        raise UserError(f"--stride={fv.stride} must not exceed the window length {seq_len}")
    if not fv.verbose:
        data.quiet_tfds()
    log = None if fv.quiet else functools.partial(print, file=sys.stderr)  # stdout is the JSON line
    corpus = data.prepare_corpus(fv.data_dir, tokenizer=tokenizer, log=log)
    progress = None
    if not fv.quiet:
        progress = functools.partial(tqdm, desc=f"eval {fv.split}", unit="batch", file=sys.stderr)
    t0 = time.time()
    result = evaluate_split(params, cfg, corpus, fv.split, seq_len=seq_len, batch_size=fv.batch_size,
                            stride=fv.stride, progress=progress, warn=rundir.print_warning)
    record = {"step": step, **result.to_dict(), "seconds": round(time.time() - t0, 2),
              "source": str(fv.run_dir or fv.hf_dir), "dtype": cfg.dtype,
              "quantize": fv.quantize}
    suffix = "" if fv.stride is None else f"_stride{fv.stride}"
    out = pathlib.Path(fv.output) if fv.output else out_dir / f"eval_{result.split}_{step}{suffix}.json"
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(record, indent=2) + "\n")
    except OSError as e:
        print(f"warning: could not save {out}: {e}", file=sys.stderr)
    print(json.dumps(record))
    return 0


if __name__ == "__main__":
    cli.rerun_with_huge_pages()
    cli.run(main, out_of_memory=OUT_OF_MEMORY)
