"""The sampling CLI: load a run (or a Hugging Face folder), decode with ``gpt2_jax.decode``, print.

    python -m gpt2_jax.sample --run_dir=runs/small --method=nucleus --prompt="The man jumped"

One sequence is streamed as it is produced, several are printed one by one, ``--method=all``
prints greedy, top-k and nucleus side by side. ``--help`` lists the flags.
"""

from __future__ import annotations

import dataclasses
import itertools
import shutil
import sys
import textwrap
from typing import Any, Callable, Sequence

import jax
import numpy as np
from absl import flags

from gpt2_jax import pretrained, tokenizer
from gpt2_jax.cli import check, define_dtype_flag, define_quantize_flag, parse_flags, resolve_dtype, run
from gpt2_jax.config import GPT2Config
from gpt2_jax.decode import (METHODS, check_sampling_args, generate, inference_config, inference_params,
                             stream_generate)
from gpt2_jax.errors import UserError

DESCRIPTION = """Sample text from a trained run: greedy, top-k, nucleus (or all three side by side).

  python -m gpt2_jax.sample --run_dir=runs/small --method=nucleus --prompt="The man jumped" \\
      --max_new_tokens=60 --top_p=0.9 --temperature=1.0 --num_samples=3 --seed=0
"""

ALL_METHODS = ("greedy", "top_k", "nucleus")  # what --method=all compares, as the report does
STREAM_CHUNK = 8  # tokens per streamed print: one host round trip per chunk
# Rows are split into calls that fit, so what is left to lower is one row's length or the rows.
OUT_OF_MEMORY = "lower --max_new_tokens or --num_samples"


def define_flags() -> flags.FlagValues:
    """The sampler's flags on a private FlagValues (a tool extending the CLI adds its own)."""
    fv = flags.FlagValues()
    pretrained.define_model_flags(fv, "sample from")
    define_dtype_flag(fv)
    define_quantize_flag(fv)
    flags.DEFINE_enum("method", "nucleus", METHODS + ("all",), "Decoding method; 'all' prints "
                      "greedy, top_k and nucleus side by side; top_k_nucleus applies top-k then "
                      "top-p.", flag_values=fv)
    flags.DEFINE_multi_string("prompt", None, "Prompt text (UTF-8); repeat the flag for several "
                              "prompts.", flag_values=fv)
    flags.DEFINE_integer("max_new_tokens", 60, "Tokens to generate after each prompt.",
                         lower_bound=1, flag_values=fv)
    flags.DEFINE_integer("top_k", 50, "top_k: sample among the k most likely tokens (at most the "
                         "vocabulary).", lower_bound=1, flag_values=fv)
    flags.DEFINE_float("top_p", 0.9, "nucleus: sample among the smallest set of most likely tokens "
                       "whose probability reaches p (the token crossing p included); in (0, 1].",
                       flag_values=fv)
    check(fv, "top_p", lambda p: 0 < p <= 1, "must be in (0, 1]")
    flags.DEFINE_float("temperature", 1.0, "Divides the logits before any filtering; 0 means "
                       "greedy.", lower_bound=0.0, flag_values=fv)
    flags.DEFINE_integer("num_samples", 1, "Samples per prompt (and method).", lower_bound=1,
                         flag_values=fv)
    # jax.random.PRNGKey keeps 32 bits: a larger seed would silently repeat a smaller one's text.
    flags.DEFINE_integer("seed", 0, "Random seed; the same seed gives the same text.",
                         lower_bound=0, upper_bound=2**32 - 1, flag_values=fv)
    flags.DEFINE_bool("stop_at_eos", True, "Stop a sample at the end-of-text token.",
                      flag_values=fv)
    flags.DEFINE_integer("slide_keep", None, "Beyond the context, tokens a sliding window keeps "
                         "(default n_ctx // 2; n_ctx = exact sliding window, slowest).",
                         lower_bound=1, flag_values=fv)
    return fv


def _check_prompts_are_utf8(prompts: Sequence[str]) -> None:
    """Refuse prompt bytes that are not UTF-8 (Python hands them over as lone surrogates)."""
    for i, p in enumerate(prompts):
        try:
            p.encode("utf-8")
        except UnicodeEncodeError as e:
            byte = ord(p[e.start]) - 0xDC00 if 0xDC80 <= ord(p[e.start]) <= 0xDCFF else None
            what = f"byte 0x{byte:02x}" if byte is not None else "an unpaired surrogate"
            which = f" of prompt {i + 1}" if len(prompts) > 1 else ""
            raise UserError(f"--prompt is not valid UTF-8 ({what} at character {e.start}{which}); "
                            f"give the text in UTF-8") from None


@dataclasses.dataclass(frozen=True)
class LoadedModel:
    cfg: GPT2Config
    params: Any
    tokenizer: Any  # tokenizers.Tokenizer
    eos_id: int | None  # the end-of-text token, if the tokenizer has one
    description: str  # shown in the header: where the weights came from


def _load_model(fv: flags.FlagValues) -> LoadedModel:
    """Weights, config and tokenizer named by the flags (a run at --step, or --hf_dir)."""
    loaded = pretrained.load_model(fv.run_dir, fv.hf_dir, fv.step)  # checks vocab sizes match
    where = f"{fv.hf_dir} (Hugging Face)" if fv.hf_dir else f"{loaded.run_dir} step {loaded.step}"
    cfg = inference_config(loaded.cfg.replace(dtype=resolve_dtype(fv.dtype, "decode")[0]), fv.quantize)
    weights = cfg.dtype if fv.quantize == "none" else f"{fv.quantize} weights, {cfg.dtype}"
    return LoadedModel(cfg, inference_params(loaded.params, cfg, fv.quantize), loaded.tokenizer,
                       loaded.tokenizer.token_to_id(tokenizer.EOT), f"{where}, {weights}")


def _decode(tok, ids: Sequence[int]) -> str:
    return tok.decode([int(i) for i in ids], skip_special_tokens=False)


def _trim(new_N: np.ndarray, eos_id: int | None) -> np.ndarray:
    """The continuation up to (not including) the first end-of-text."""
    stops = np.flatnonzero(new_N == eos_id) if eos_id is not None else []
    return new_N[:stops[0]] if len(stops) else new_N


def _method_label(method: str, fv: flags.FlagValues) -> str:
    settings = {"greedy": "", "top_k": f"k={fv.top_k}", "nucleus": f"p={fv.top_p}",
                "top_k_nucleus": f"k={fv.top_k}, p={fv.top_p}"}[method]
    return f"{method} ({settings}, T={fv.temperature})" if settings else method


def side_by_side(columns: dict[str, str], width: int) -> str:
    """Texts as wrapped columns under their titles, separated by ' │ '."""
    col_w = max(20, (width - 3 * (len(columns) - 1)) // len(columns))
    # Control characters (newlines included) become spaces: they would break the table's rows.
    printable = ["".join(c if c.isprintable() else " " for c in text) for text in columns.values()]
    wrapped = [textwrap.wrap(text, col_w, break_long_words=False) or [""] for text in printable]
    lines = [" │ ".join(title.ljust(col_w) for title in columns),
             "─┼─".join("─" * col_w for _ in columns)]
    for row in itertools.zip_longest(*wrapped, fillvalue=""):
        lines.append(" │ ".join(cell.ljust(col_w) for cell in row).rstrip())
    return "\n".join(lines)


def _settings(fv: flags.FlagValues, model: LoadedModel, method: str, rng) -> dict:
    """The decode keyword arguments the flags give."""
    return dict(max_new_tokens=fv.max_new_tokens, method=method, top_k=fv.top_k, top_p=fv.top_p,
                temperature=fv.temperature, rng=rng, slide_keep=fv.slide_keep,
                eos_id=model.eos_id if fv.stop_at_eos else None)


def _generate_rows(model: LoadedModel, prompts_ids: list[list[int]], fv, method: str,
                   rng) -> list[np.ndarray]:
    """Each prompt × num_samples as one padded batch; each row's trimmed continuation."""
    rows = [ids for ids in prompts_ids for _ in range(fv.num_samples)]
    lengths_B = np.array([len(r) for r in rows])
    prompt_BP = np.zeros((len(rows), lengths_B.max()), np.int32)
    for b, r in enumerate(rows):
        prompt_BP[b, :len(r)] = r
    kwargs = _settings(fv, model, method, rng)
    out_BS = np.asarray(generate(model.params, model.cfg, prompt_BP, prompt_lengths_B=lengths_B,
                                 **kwargs))
    return [_trim(out_BS[b, n:n + fv.max_new_tokens], kwargs["eos_id"])
            for b, n in enumerate(lengths_B)]


def _stream_one(model: LoadedModel, ids: list[int], fv, method: str, rng, out) -> None:
    """Print the prompt, then the continuation chunk by chunk as it is decoded."""
    kwargs = _settings(fv, model, method, rng)
    shown = text = _decode(model.tokenizer, ids)
    out.write(shown)
    out.flush()
    new: list[int] = []
    for chunk_1C in stream_generate(model.params, model.cfg, np.asarray([ids]),
                                    chunk_size=STREAM_CHUNK, **kwargs):
        new.extend(chunk_1C[0].tolist())
        trimmed = _trim(np.asarray(new), kwargs["eos_id"])
        text = _decode(model.tokenizer, ids + trimmed.tolist())
        # A byte-level token may end inside a UTF-8 character: hold it back until it completes.
        if not text.endswith("\ufffd"):
            out.write(text[len(shown):])
            out.flush()
            shown = text
        if len(trimmed) < len(new):
            break
    out.write(text[len(shown):] + "\n")  # what was held back
    out.flush()


def main(argv: Sequence[str], *, define: Callable[[], flags.FlagValues] = define_flags,
         load: Callable[[flags.FlagValues], LoadedModel] = _load_model, out=None) -> int:
    out = sys.stdout if out is None else out
    fv = parse_flags(define(), argv, DESCRIPTION)
    if not fv.prompt:
        raise UserError('give at least one --prompt="text" (repeat the flag for several prompts)')
    _check_prompts_are_utf8(fv.prompt)
    model = load(fv)
    if fv.stop_at_eos and model.eos_id is None:
        raise UserError("this tokenizer has no end-of-text token to stop at; pass --nostop_at_eos")
    methods = ALL_METHODS if fv.method == "all" else (fv.method,)
    for m in methods:  # before any work: fail on bad flags at once, naming the flag
        try:
            check_sampling_args(model.cfg, method=m, max_new_tokens=fv.max_new_tokens,
                                temperature=fv.temperature, top_k=fv.top_k, top_p=fv.top_p,
                                slide_keep=fv.slide_keep)
        except UserError as e:
            raise UserError(f"--{e}") from None
    prompts_ids = [model.tokenizer.encode(p).ids for p in fv.prompt]
    for p, ids in zip(fv.prompt, prompts_ids):
        if not ids:
            raise UserError(
                f"--prompt={p!r} is empty after tokenization; give some text to continue")
    key = jax.random.PRNGKey(fv.seed)
    rngs = {m: jax.random.fold_in(key, i) for i, m in enumerate(METHODS)}
    out.write(f"# {model.description} · {model.cfg.n_layer} layers, d_model {model.cfg.d_model}, "
              f"n_ctx {model.cfg.n_ctx}\n")

    if len(methods) == 1 and len(prompts_ids) == 1 and fv.num_samples == 1:
        out.write(f"## {_method_label(methods[0], fv)}\n")
        _stream_one(model, prompts_ids[0], fv, methods[0], rngs[methods[0]], out)
        return 0

    results = {m: _generate_rows(model, prompts_ids, fv, m, rngs[m]) for m in methods}
    width = shutil.get_terminal_size((150, 24)).columns
    for i, ids in enumerate(prompts_ids):
        for s in range(fv.num_samples):
            row = i * fv.num_samples + s
            texts = {_method_label(m, fv): _decode(model.tokenizer, ids + results[m][row].tolist())
                     for m in methods}
            title = f"prompt {i + 1}/{len(prompts_ids)}, sample {s + 1}/{fv.num_samples}"
            if len(methods) == 1:
                [(label, text)] = texts.items()
                out.write(f"\n## {title} · {label}\n{text}\n")
            else:
                out.write(f"\n## {title}\n{side_by_side(texts, width)}\n")
    out.flush()
    return 0


if __name__ == "__main__":
    run(main, out_of_memory=OUT_OF_MEMORY)
