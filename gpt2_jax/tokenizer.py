"""GPT-2-style byte-level BPE tokenizer (Hugging Face ``tokenizers``), trained on WikiText-2's train split.

GPT-2's recipe: UTF-8 bytes mapped to 256 printable symbols, GPT-2's pre-tokenisation regex with no
prefix space, then BPE merges. Every byte has a token, so any text encodes and
``decode(encode(text)) == text``. A run saves its tokenizer as ``tokenizer.json`` and always loads it
from there, so a model never meets a tokenizer it was not trained with.
"""

from __future__ import annotations

import hashlib
import json
import os
import pathlib
from typing import Iterable, Sequence

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from gpt2_jax import files
from gpt2_jax.errors import UserError
from gpt2_jax.config import GPT2Config

EOT = "<|endoftext|>"

# Bump when the recipe below changes: cached tokenizers of an older recipe are then not reused.
_RECIPE_VERSION = 1


def train_tokenizer(lines: Iterable[str], vocab_size: int = 32000) -> Tokenizer:
    """Train a byte-level BPE with exactly ``vocab_size`` entries (bytes + ``EOT`` + merges) on ``lines``."""
    if vocab_size < 257 + 1:
        raise UserError(f"vocab_size={vocab_size} is too small: a byte-level BPE needs 256 byte tokens, "
                        f"{EOT} and at least one merge (use >= 258)")
    tok = Tokenizer(models.BPE())
    # add_prefix_space=False: no space is invented in front of a line, so decoding is lossless.
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOT],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # all 256 bytes, seen in the data or not
        show_progress=False,
    )
    tok.train_from_iterator(lines, trainer=trainer)
    n = tok.get_vocab_size(with_added_tokens=True)
    if n != vocab_size:
        raise UserError(f"the training text only supports {n} BPE tokens, fewer than vocab_size={vocab_size}; "
                        f"use a smaller --vocab_size or more training text")
    return tok


def _training_key(lines: Sequence[str], vocab_size: int) -> str:
    """SHA-256 of the settings and every line (length-prefixed, so line boundaries count)."""
    h = hashlib.sha256(json.dumps({"recipe": _RECIPE_VERSION, "vocab_size": vocab_size}).encode())
    for line in lines:
        b = line.encode("utf-8")
        h.update(len(b).to_bytes(8, "little"))
        h.update(b)
    return h.hexdigest()


def load_or_train_tokenizer(lines: Sequence[str], cache_dir: str | os.PathLike,
                            vocab_size: int = 32000) -> Tokenizer:
    """The tokenizer trained on ``lines`` with ``vocab_size``, from ``cache_dir`` if trained before."""
    path = pathlib.Path(cache_dir) / f"bpe-{vocab_size}-{_training_key(lines, vocab_size)[:20]}.json"
    cached = files.read_verified(path)  # None: never trained, or damaged since
    if cached is not None:
        return Tokenizer.from_str(cached.decode("utf-8"))
    tok = train_tokenizer(lines, vocab_size)
    files.write_verified(path, tok.to_str().encode("utf-8"))
    return tok


def save_tokenizer(tok: Tokenizer, path: str | os.PathLike) -> None:
    """Write ``tok`` as JSON at ``path`` atomically."""
    files.write_atomic(path, tok.to_str())


def load_tokenizer(path: str | os.PathLike) -> Tokenizer:
    """Load a tokenizer saved by ``save_tokenizer`` (or any ``tokenizers`` JSON file)."""
    path = pathlib.Path(path)
    if not path.is_file():
        raise UserError(f"tokenizer file {path} does not exist; "
                        "pass the run directory that holds tokenizer.json")
    try:
        return Tokenizer.from_file(str(path))
    except Exception as e:  # the Rust side raises bare Exceptions for malformed JSON
        first_line = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise UserError(f"tokenizer file {path} is not a readable tokenizers JSON file "
                        f"({first_line})") from None


def tokenizer_fingerprint(tok: Tokenizer) -> str:
    """A short hash of the tokenizer's JSON: equal fingerprints encode text identically."""
    return hashlib.sha256(tok.to_str().encode("utf-8")).hexdigest()[:16]


def eot_id(tok: Tokenizer) -> int:
    """The id of ``<|endoftext|>``."""
    i = tok.token_to_id(EOT)
    if i is None:
        raise UserError(f"this tokenizer has no {EOT} token; use a tokenizer.json written by gpt2_jax")
    return i


def num_tokens(tok: Tokenizer) -> int:
    """Number of entries, special tokens included (= the model's embedding rows)."""
    return tok.get_vocab_size(with_added_tokens=True)


def check_vocab_matches(tok: Tokenizer, cfg: GPT2Config) -> None:
    """UserError unless the tokenizer has exactly as many entries as the model has embedding rows."""
    n = num_tokens(tok)
    if n != cfg.vocab_size:
        raise UserError(f"tokenizer has {n} tokens but the model expects {cfg.vocab_size}; "
                        f"use the tokenizer.json saved with this model's run")
