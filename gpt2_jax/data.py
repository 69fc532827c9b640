"""WikiText-2 as token streams and packed batches.

A TFDS builder (read back with ``as_data_source``, so no TensorFlow) gives one example per line,
newline kept: ``"".join(lines)`` is the source file, so its known-good hash checks every read.
Each line is encoded on its own and the encodings concatenated, with no token between lines or
articles (WikiText marks them with `` = Title = `` lines); one ``<|endoftext|>`` in front is only
ever an input. So the scored targets ``stream[1:]`` encode exactly the split's text, and word
perplexity over ``count_words`` (the Merity et al. ``<eos>`` convention) is exact. Training windows
of ``seq_len + 1`` tokens tile the stream, shuffled per epoch from ``(seed, epoch)``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import math
import os
import pathlib
import shutil
import sys
import time
import urllib.error
import urllib.request
import zipfile
from typing import Callable, Iterator, Sequence

import numpy as np
import tensorflow_datasets as tfds
from absl import flags
from etils import epath
from tokenizers import Tokenizer

from gpt2_jax import files
from gpt2_jax import tokenizer as tokenizer_lib
from gpt2_jax.cli import parse_flags, run
from gpt2_jax.errors import UserError

SPLITS = ("train", "validation", "test")
_FILE_STEM = {"train": "train", "validation": "valid", "test": "test"}
DATA_DIR_ENV = "GPT2_JAX_DATA_DIR"
CACHE_ENV = "GPT2_JAX_CACHE"
# Some hosts reject Python's default User-Agent.
_USER_AGENT = "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/124.0 Safari/537.36"


class DataError(UserError):
    """The dataset is missing or corrupt; the message says how to provide it offline."""


@dataclasses.dataclass(eq=False)
class WikiTextConfig(tfds.core.BuilderConfig):
    """One WikiText-2 variant: where its archive lives and the known-good hash of each file."""

    archive_url: str = ""
    suffix: str = "tokens"  # wiki.<split>.<suffix>
    hashes: dict = dataclasses.field(default_factory=dict)  # file name -> (algorithm, hex digest)

    def file_name(self, split: str) -> str:
        return f"wiki.{_FILE_STEM[split]}.{self.suffix}"

    @property
    def archive_name(self) -> str:
        return self.archive_url.rsplit("/", 1)[-1]


_V1 = WikiTextConfig(
    name="wikitext-2-v1",
    description="Tokenized WikiText-2 (rare words replaced by <unk>): the standard benchmark.",
    archive_url="https://wikitext.smerity.com/wikitext-2-v1.zip",
    suffix="tokens",
    hashes={  # SHA-256 of the released files (their SHA-1 match GluonNLP's dataset registry)
        "wiki.train.tokens": ("sha256", "9e9fa1ad55b1c2c95b08e37dd8e653f638fac2c6de904b79e813611eefbc985f"),
        "wiki.valid.tokens": ("sha256", "f0737ed31fc1329026e95cb8b98e19c2a182c39c240ab909dc31abf2f8af58e8"),
        "wiki.test.tokens": ("sha256", "d790b833ef8cf03a90db7bf1271b7520b83c45ce07ba3c1a9699df81e239eca0"),
    },
)
_RAW_V1 = WikiTextConfig(
    name="wikitext-2-raw-v1",
    description="Raw WikiText-2 (original words, no <unk>).",
    archive_url="https://wikitext.smerity.com/wikitext-2-raw-v1.zip",
    suffix="raw",
    hashes={  # only SHA-1 is published for the raw files (GluonNLP's registry, which matches v1 above)
        "wiki.train.raw": ("sha1", "d33faf256327882db0edc7c67cd098d1051a2112"),
        "wiki.valid.raw": ("sha1", "db78d4db83700cba1b1bf4a9381087043db2876d"),
        "wiki.test.raw": ("sha1", "6f1fe2054a940eebfc76b284b09680763b37f5ea"),
    },
)
VARIANTS = {c.name: c for c in (_V1, _RAW_V1)}


def default_cache_dir() -> pathlib.Path:
    """``$GPT2_JAX_CACHE`` or ``~/.cache/gpt2_jax``: prepared dataset, tokenizers, token streams."""
    return pathlib.Path(os.environ.get(CACHE_ENV) or pathlib.Path.home() / ".cache" / "gpt2_jax")


def _variant(variant: str) -> WikiTextConfig:
    if variant not in VARIANTS:
        raise UserError(f"unknown dataset variant {variant!r}; choose one of: {', '.join(VARIANTS)}")
    return VARIANTS[variant]


def _offline_hint(cfg: WikiTextConfig) -> str:
    files = ", ".join(cfg.file_name(s) for s in SPLITS)
    return (f"to work offline, put {files} (or {cfg.archive_name} from {cfg.archive_url}) in a folder and "
            f"pass --data_dir=FOLDER or set {DATA_DIR_ENV}=FOLDER")


# ----------------------------------------------------------------------------- source files

def _files_in(location: pathlib.Path, cfg: WikiTextConfig) -> dict[str, bytes] | None:
    """The three files' bytes from a folder (loose files or the archive) or an archive; None if absent."""
    names = [cfg.file_name(s) for s in SPLITS]
    if location.is_dir():
        if all((location / n).is_file() for n in names):
            return {n: (location / n).read_bytes() for n in names}
        archive = location / cfg.archive_name
        if not archive.is_file():
            return None
        location = archive
    if not location.is_file():
        return None
    try:
        with zipfile.ZipFile(location) as zf:
            members = {pathlib.PurePosixPath(m).name: m for m in zf.namelist() if not m.endswith("/")}
            missing = [n for n in names if n not in members]
            if missing:
                raise DataError(f"archive {location} lacks {', '.join(missing)}; {_offline_hint(cfg)}")
            return {n: zf.read(members[n]) for n in names}
    except (zipfile.BadZipFile, OSError) as e:
        raise DataError(f"{location} is not a readable zip archive ({_first_line(e)}); {_offline_hint(cfg)}") from None


def _first_line(e: object) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def _digest(cfg: WikiTextConfig, name: str, data: bytes) -> tuple[str, str, str]:
    """(algorithm, digest of ``data``, known-good digest) for the source file ``name``."""
    algorithm, want = cfg.hashes[name]
    return algorithm, hashlib.new(algorithm, data).hexdigest(), want


def _verify(files: dict[str, bytes], cfg: WikiTextConfig, where: pathlib.Path | str) -> None:
    for name, data in files.items():
        algorithm, got, want = _digest(cfg, name, data)
        if got != want:
            raise DataError(f"{name} from {where} has {algorithm.upper()} {got}, not the known-good {want} "
                            f"of {cfg.name}; {_offline_hint(cfg)}")


def _download(url: str, dest: pathlib.Path, cfg: WikiTextConfig) -> None:
    """Fetch ``url`` to ``dest`` (atomically: a failed download leaves nothing behind)."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.tmp-{os.getpid()}")
    request = urllib.request.Request(url, headers={"User-Agent": _USER_AGENT})
    try:
        with urllib.request.urlopen(request, timeout=60) as response, open(tmp, "wb") as f:
            while chunk := response.read(1 << 20):
                f.write(chunk)
        os.replace(tmp, dest)
    except (urllib.error.URLError, OSError, ValueError) as e:
        tmp.unlink(missing_ok=True)
        reason = _first_line(getattr(e, "reason", None) or e)
        raise DataError(f"WikiText-2 is not available locally and downloading {url} failed ({reason}); "
                        f"{_offline_hint(cfg)}") from None


def _read_data_dir(cfg: WikiTextConfig, source: str | os.PathLike, given: str) -> dict[str, bytes]:
    """The verified bytes of the three files in ``source``, given by the user as ``given`` (flag=path)."""
    path = pathlib.Path(source).expanduser()
    if not path.exists():
        raise DataError(f"{given} does not exist; {_offline_hint(cfg)}")
    try:
        files = _files_in(path, cfg)
    except DataError as e:
        raise DataError(f"{given}: {e}") from None
    if files is None:
        raise DataError(f"{given} holds neither {', '.join(cfg.file_name(s) for s in SPLITS)} nor "
                        f"{cfg.archive_name}; {_offline_hint(cfg)}")
    _verify(files, cfg, given)
    return files


def _read_manual_or_download(cfg: WikiTextConfig, manual_dir: pathlib.Path | None, download_dir: pathlib.Path,
                             url: str | None = None) -> tuple[str, dict[str, bytes]]:
    """(where from, the verified bytes of the three files): TFDS's ``manual_dir``, else a download."""
    if manual_dir is not None and (files := _files_in(manual_dir, cfg)) is not None:
        _verify(files, cfg, manual_dir)
        return str(manual_dir), files
    url = url or cfg.archive_url
    archive = download_dir / cfg.archive_name
    if not archive.is_file():
        _download(url, archive, cfg)
    try:
        files = _files_in(archive, cfg)
        assert files is not None, archive
        _verify(files, cfg, url)
    except DataError:
        archive.unlink(missing_ok=True)  # never keep a bad download around to fail again
        raise
    return url, files


def split_lines(text: str) -> list[str]:
    """Lines of ``text`` split at ``"\\n"`` only (``str.splitlines`` also splits at U+2028), newlines kept."""
    pieces = text.split("\n")
    lines = [p + "\n" for p in pieces[:-1]]
    if pieces[-1]:
        lines.append(pieces[-1])
    return lines


# ----------------------------------------------------------------------------- the TFDS builder

class WikiText2(tfds.core.GeneratorBasedBuilder):
    """One example ``{"text": line}`` per line of each split file, in file order."""

    name = "gpt2_jax_wikitext2"
    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "One example per line (newline kept), file order, hash-verified sources."}
    BUILDER_CONFIGS = list(VARIANTS.values())
    MANUAL_DOWNLOAD_INSTRUCTIONS = (
        "Optional: put wiki.{train,valid,test}.tokens or wikitext-2-v1.zip (raw config: wiki.*.raw or "
        "wikitext-2-raw-v1.zip) in the manual dir to prepare the dataset without a download.")
    tfds_messages = True  # TFDS's "Downloading and preparing ..." on stdout; quiet_tfds turns it off
    # TFDS 4.9.10 finds this file through the importlib_resources backport, which etils no longer installs.
    code_path = epath.Path(__file__)

    def __init__(self, *, source: tuple[str, dict[str, bytes]] | None = None, download_url: str | None = None,
                 **kwargs):
        """``source``: (where from, verified bytes of the three files); None: manual dir or download."""
        self.source = source
        self._download_url = download_url
        super().__init__(**kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description="WikiText-2 language-modelling corpus (Merity et al., 2016), one example per line.",
            features=tfds.features.FeaturesDict({"text": tfds.features.Text()}),
            homepage="https://blog.salesforceairesearch.com/the-wikitext-long-term-dependency-language-modeling-dataset/",
            citation="@article{merity2016pointer, title={Pointer Sentinel Mixture Models}, "
                     "author={Merity, Stephen and Xiong, Caiming and Bradbury, James and Socher, Richard}, "
                     "journal={arXiv preprint arXiv:1609.07843}, year={2016}}",
            disable_shuffling=True,  # keep file order: the splits are read back as continuous text
        )

    def _split_generators(self, dl_manager):
        if self.source is None:
            try:
                manual_dir = dl_manager.manual_dir
            except AssertionError:  # TFDS: manual dir missing or empty
                manual_dir = None
            self.source = _read_manual_or_download(self.builder_config, manual_dir,
                                                   pathlib.Path(dl_manager.download_dir), self._download_url)
        files = self.source[1]
        return {split: self._generate_examples(files[self.builder_config.file_name(split)]) for split in SPLITS}

    def _generate_examples(self, data: bytes):
        for i, line in enumerate(split_lines(data.decode("utf-8"))):
            yield i, {"text": line}

    def _log_download_bytes(self) -> None:
        if self.tfds_messages:
            super()._log_download_bytes()

    def _log_download_done(self) -> None:
        if self.tfds_messages:
            super()._log_download_done()


def quiet_tfds() -> None:
    """Keep TFDS's own progress bars and messages off the terminal (for the CLIs, unless --verbose)."""
    tfds.disable_progress_bar()
    WikiText2.tfds_messages = False


class _Damaged(Exception):
    """The prepared data cannot be read, or is not the source text byte for byte."""


def _prepared_lines(cfg: WikiTextConfig, tfds_dir: pathlib.Path, splits: Sequence[str],
                    source: tuple[str, dict[str, bytes]] | None, download_url: str | None,
                    log: Callable[[str], None] | None) -> dict[str, list[str]]:
    """The lines of ``splits`` from the prepared data, preparing it first if absent; ``_Damaged`` if damaged."""
    try:
        builder = WikiText2(config=cfg.name, data_dir=os.fspath(tfds_dir), source=source, download_url=download_url)
    except Exception as e:  # a damaged dataset_info.json: TFDS raises json or protobuf errors
        raise _Damaged(_first_line(e)) from None
    # TFDS prepares aside and renames at the end: the folder exists only when complete (is_prepared() warns).
    if not builder.data_path.exists():
        t0 = time.perf_counter()
        builder.download_and_prepare(file_format="array_record",
                                     download_config=tfds.download.DownloadConfig(try_download_gcs=False))
        if log is not None:
            counts = ", ".join(f"{builder.info.splits[s].num_examples:,} {s}" for s in SPLITS)
            log(f"prepared WikiText-2 {cfg.name} ({counts} lines) from {builder.source[0]} in {builder.data_dir} "
                f"in {time.perf_counter() - t0:.1f} s")
    lines = {}
    for split in splits:
        try:
            ds = builder.as_data_source(split=split)
            texts = [r["text"] for r in ds.__getitems__(range(len(ds)))]
        except Exception as e:  # a truncated, emptied or missing array_record file: riegeli raises RuntimeError
            raise _Damaged(f"split {split}: {_first_line(e)}") from None
        # The lines joined are the source file byte for byte, so its known-good hash checks them all.
        algorithm, got, want = _digest(cfg, cfg.file_name(split), b"".join(texts))
        if got != want:
            raise _Damaged(f"split {split} has {algorithm.upper()} {got}, not the source file's {want}")
        lines[split] = [t.decode("utf-8") for t in texts]
    return lines


def load_splits(splits: Sequence[str] = SPLITS, data_dir: str | os.PathLike | None = None, *,
                variant: str = "wikitext-2-v1", tfds_dir: str | os.PathLike | None = None,
                download_url: str | None = None, log: Callable[[str], None] | None = None) -> dict[str, list[str]]:
    """Every line (newline kept) of ``splits``, via the TFDS builder prepared in ``tfds_dir`` on first use.

    Sources, in order: ``data_dir`` or ``$GPT2_JAX_DATA_DIR`` (verified on every call, even when the
    data is prepared), TFDS's manual dir, a download. Damaged prepared data is rebuilt with one warning;
    ``log`` receives one line when the data is prepared.
    """
    for split in splits:
        if split not in SPLITS:
            raise UserError(f"unknown split {split!r}; choose one of: {', '.join(SPLITS)}")
    cfg = _variant(variant)
    # A data dir that points nowhere or at other files is reported, not ignored in favour of the cache.
    source = None
    if data_dir is not None:
        given = f"--data_dir={os.fspath(data_dir)}"
        source = given, _read_data_dir(cfg, data_dir, given)
    elif os.environ.get(DATA_DIR_ENV):
        given = f"{DATA_DIR_ENV}={os.environ[DATA_DIR_ENV]}"
        source = given, _read_data_dir(cfg, os.environ[DATA_DIR_ENV], given)
    tfds_dir = pathlib.Path(tfds_dir) if tfds_dir is not None else default_cache_dir() / "tfds"
    try:
        return _prepared_lines(cfg, tfds_dir, splits, source, download_url, log)
    except _Damaged as e:
        version_dir = tfds_dir / WikiText2.name / cfg.name / str(WikiText2.VERSION)
        print(f"warning: the prepared WikiText-2 in {version_dir} is damaged ({e}); rebuilding it", file=sys.stderr)
        shutil.rmtree(version_dir, ignore_errors=True)
    try:
        return _prepared_lines(cfg, tfds_dir, splits, source, download_url, log)
    except _Damaged as e:
        raise AssertionError(f"freshly prepared from verified files, yet damaged: {e}") from None


def load_split_lines(split: str, data_dir: str | os.PathLike | None = None, *, variant: str = "wikitext-2-v1",
                     tfds_dir: str | os.PathLike | None = None, download_url: str | None = None) -> list[str]:
    """Every line of ``split`` (newline kept); see ``load_splits``."""
    return load_splits((split,), data_dir, variant=variant, tfds_dir=tfds_dir, download_url=download_url)[split]


def count_words(lines: Sequence[str]) -> int:
    """Whitespace-separated words per line plus one end-of-line per line (the ``<eos>`` convention)."""
    return sum(len(line.split()) + 1 for line in lines)


# ----------------------------------------------------------------------------- token streams

@dataclasses.dataclass(frozen=True)
class Corpus:
    """The three splits as token streams, with the word and byte counts of the text they encode."""

    tokenizer: Tokenizer
    tokens: dict  # split -> int32 (n,) stream: EOT, then the split's text
    words: dict  # split -> words (count_words) of the split's text
    bytes: dict  # split -> UTF-8 bytes of the split's text (for bits per byte)


def encode_stream(tok: Tokenizer, lines: Sequence[str]) -> np.ndarray:
    """``EOT`` followed by the concatenated encodings of ``lines`` (int32)."""
    encodings = tok.encode_batch_fast(list(lines), add_special_tokens=False)
    ids = [np.asarray(e.ids, np.int32) for e in encodings]
    return np.concatenate([np.asarray([tokenizer_lib.eot_id(tok)], np.int32), *ids])


def prepare_corpus(data_dir: str | os.PathLike | None = None, cache_dir: str | os.PathLike | None = None, *,
                   vocab_size: int = 32000, variant: str = "wikitext-2-v1", tokenizer: Tokenizer | None = None,
                   download_url: str | None = None, log: Callable[[str], None] | None = None) -> Corpus:
    """Lines -> tokenizer (trained on train only, cached) -> token streams (cached by tokenizer fingerprint)."""
    cache = pathlib.Path(cache_dir) if cache_dir is not None else default_cache_dir()
    lines = load_splits(SPLITS, data_dir, variant=variant, tfds_dir=cache / "tfds", download_url=download_url,
                        log=log)
    tok = tokenizer if tokenizer is not None else tokenizer_lib.load_or_train_tokenizer(
        lines["train"], cache / "tokenizers", vocab_size)
    stream_dir = cache / "streams" / f"{variant}-{tokenizer_lib.tokenizer_fingerprint(tok)}"
    tokens = {}
    for s in SPLITS:
        path = stream_dir / f"{s}.npy"
        cached = files.read_verified(path)  # None: never made, or damaged since
        if cached is not None:
            tokens[s] = np.load(io.BytesIO(cached))
        else:
            tokens[s] = encode_stream(tok, lines[s])
            buffer = io.BytesIO()
            np.save(buffer, tokens[s])
            files.write_verified(path, buffer.getvalue())
        assert tokens[s].dtype == np.int32 and tokens[s].ndim == 1, (path, tokens[s].dtype, tokens[s].shape)
    words = {s: count_words(lines[s]) for s in SPLITS}
    n_bytes = {s: sum(len(line.encode("utf-8")) for line in lines[s]) for s in SPLITS}
    return Corpus(tokenizer=tok, tokens=tokens, words=words, bytes=n_bytes)


# ----------------------------------------------------------------------------- batches

@dataclasses.dataclass(frozen=True)
class DataPosition:
    """Where the training stream stands: ``step`` batches of epoch ``epoch`` already consumed."""

    epoch: int = 0
    step: int = 0

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "DataPosition":
        return cls(epoch=int(d["epoch"]), step=int(d["step"]))


def _check_layout(batch: int, num_devices: int, process_index: int, process_count: int, what: str) -> None:
    if num_devices < 1 or process_count < 1 or not 0 <= process_index < process_count:
        raise UserError(f"bad device layout: num_devices={num_devices}, process {process_index} of {process_count}")
    if batch < 1 or batch % (num_devices * process_count):
        raise UserError(f"{what} {batch} is not divisible by {num_devices} local devices x {process_count} "
                        f"processes; use a multiple of {num_devices * process_count}")


def _as_stream(tokens) -> np.ndarray:
    tokens = np.asarray(tokens)
    assert tokens.ndim == 1 and np.issubdtype(tokens.dtype, np.integer), (tokens.shape, tokens.dtype)
    return tokens.astype(np.int32, copy=False)


def steps_per_epoch(n_tokens: int, seq_len: int, global_batch: int) -> int:
    """Full batches of ``seq_len + 1``-token windows in one pass over a stream of ``n_tokens``."""
    if seq_len < 1:
        raise UserError(f"seq_len must be >= 1, got {seq_len}")
    windows = max(n_tokens - 1, 0) // seq_len
    steps = windows // global_batch
    if steps < 1:
        raise UserError(f"the training stream has {n_tokens} tokens, {windows} windows of {seq_len}+1, "
                        f"fewer than one batch of {global_batch}; lower the batch size or the sequence length")
    return steps


def epoch_window_starts(n_tokens: int, seq_len: int, seed: int, epoch: int) -> np.ndarray:
    """Start of every training window of ``epoch``, in the order they are consumed.

    A random offset in [0, leftover] keeps the tokens past the last whole window from always being left out.
    """
    windows = (n_tokens - 1) // seq_len
    rng = np.random.default_rng([seed, epoch])
    offset = rng.integers(0, (n_tokens - 1) - windows * seq_len + 1)
    return offset + rng.permutation(windows) * seq_len


def _windows(tokens: np.ndarray, starts: np.ndarray, seq_len: int) -> np.ndarray:
    return tokens[starts[:, None] + np.arange(seq_len + 1)]


def train_batches(tokens, *, seq_len: int, global_batch: int, seed: int, start: DataPosition = DataPosition(),
                  num_devices: int = 1, process_index: int = 0,
                  process_count: int = 1) -> Iterator[tuple[DataPosition, dict]]:
    """Shuffled training batches forever from ``start``; yields (position AFTER the batch, batch).

    ``inputs``/``targets`` int32 and ``mask`` float32 (ones), each ``(num_devices, R // num_devices,
    seq_len)``: process ``p`` gets rows ``[p * R, (p + 1) * R)`` of the global batch (``R = global_batch //
    process_count``), so the processes' batches stacked are the single-process batch.
    """
    tokens = _as_stream(tokens)
    _check_layout(global_batch, num_devices, process_index, process_count, "global batch size")
    if seed < 0:
        raise UserError(f"seed must be >= 0, got {seed}")
    steps = steps_per_epoch(len(tokens), seq_len, global_batch)
    if start.epoch < 0 or not 0 <= start.step <= steps:
        raise UserError(f"data position {start} is outside an epoch of {steps} steps at batch size {global_batch} "
                        f"and seq_len {seq_len}; resume with the batch size and sequence length the run was "
                        "started with")
    rows = global_batch // process_count
    per_device = rows // num_devices

    def generate():
        epoch, step = (start.epoch + 1, 0) if start.step == steps else (start.epoch, start.step)
        while True:
            starts = epoch_window_starts(len(tokens), seq_len, seed, epoch)
            for s in range(step, steps):
                first = s * global_batch + process_index * rows
                w = _windows(tokens, starts[first:first + rows], seq_len).reshape(num_devices, per_device, seq_len + 1)
                batch = {"inputs": w[..., :-1], "targets": w[..., 1:],
                         "mask": np.ones((num_devices, per_device, seq_len), np.float32)}
                yield (DataPosition(epoch, s + 1) if s + 1 < steps else DataPosition(epoch + 1, 0)), batch
            epoch, step = epoch + 1, 0

    return generate()


def eval_windows(n_tokens: int, seq_len: int, stride: int | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(start, first, last) per window: it reads tokens[start : start + seq_len + 1] and scores targets
    first..last (target i = token i given tokens < i).

    stride=None: disjoint windows. stride=s: windows end s targets apart, each scoring its last s
    targets with up to seq_len - 1 tokens of context (the first window scores all of its own).
    """
    if seq_len < 1:
        raise UserError(f"seq_len must be >= 1, got {seq_len}")
    if stride is not None and not 1 <= stride <= seq_len:
        raise UserError(f"eval stride must be in [1, seq_len={seq_len}], got {stride}")
    n_targets = n_tokens - 1
    if n_targets < 1:
        raise UserError(f"a stream of {n_tokens} tokens has nothing to score")
    if stride is None:
        starts = np.arange(0, n_targets, seq_len)
        return starts, starts + 1, np.minimum(starts + seq_len, n_targets)
    count = 1 + math.ceil(max(n_targets - seq_len, 0) / stride)
    last = np.minimum(seq_len + stride * np.arange(count), n_targets)
    first = np.concatenate([[1], last[:-1] + 1])
    return np.maximum(last - seq_len, 0), first, last


def num_eval_batches(n_tokens: int, *, seq_len: int, batch_size: int, num_devices: int = 1,
                     stride: int | None = None, process_count: int = 1) -> int:
    """How many batches ``eval_batches`` yields."""
    _check_layout(batch_size, num_devices, 0, process_count, "eval batch size")
    return math.ceil(len(eval_windows(n_tokens, seq_len, stride)[0]) / batch_size)


def eval_batches(tokens, *, seq_len: int, batch_size: int, num_devices: int = 1, stride: int | None = None,
                 process_index: int = 0, process_count: int = 1) -> Iterator[dict]:
    """Batches scoring every target exactly once over all processes; dicts and rows as ``train_batches``.

    The last window is padded (token 0, mask 0) and the last batch filled with all-masked rows.
    """
    tokens = _as_stream(tokens)
    _check_layout(batch_size, num_devices, process_index, process_count, "eval batch size")
    starts, first, last = eval_windows(len(tokens), seq_len, stride)
    rows = batch_size // process_count
    per_device = rows // num_devices
    padded = np.concatenate([tokens, np.zeros(seq_len + 1, np.int32)])
    target_index = np.arange(1, seq_len + 1)

    def generate():
        for b in range(math.ceil(len(starts) / batch_size)):
            i = np.arange(b * batch_size + process_index * rows, b * batch_size + (process_index + 1) * rows)
            real = i < len(starts)
            i = np.where(real, i, 0)
            w = _windows(padded, starts[i], seq_len)
            t = starts[i][:, None] + target_index
            mask = real[:, None] & (t >= first[i][:, None]) & (t <= last[i][:, None])
            w = np.where(real[:, None], w, 0)
            shape = (num_devices, per_device, seq_len)
            yield {"inputs": w[:, :-1].reshape(shape), "targets": w[:, 1:].reshape(shape),
                   "mask": mask.astype(np.float32).reshape(shape)}

    return generate()


# ----------------------------------------------------------------------------- CLI: prepare ahead of training

def _define_flags():
    fv = flags.FlagValues()
    flags.DEFINE_string("data_dir", None, f"folder with wiki.*.tokens or the zip archive, or the archive itself "
                        f"(default ${DATA_DIR_ENV}, then TFDS's manual dir, then a download)", flag_values=fv)
    flags.DEFINE_string("cache_dir", None, f"where the prepared dataset, tokenizer and token streams are kept "
                        f"(default ${CACHE_ENV} or ~/.cache/gpt2_jax)", flag_values=fv)
    # 258: the smallest byte-level BPE train_tokenizer makes (256 bytes, <|endoftext|>, one merge).
    flags.DEFINE_integer("vocab_size", 32000, "BPE vocabulary size, <|endoftext|> included", lower_bound=258,
                         flag_values=fv)
    flags.DEFINE_enum("variant", "wikitext-2-v1", list(VARIANTS), "WikiText-2 variant", flag_values=fv)
    flags.DEFINE_boolean("verbose", False, "show TensorFlow Datasets' own messages and progress bars",
                         flag_values=fv)
    return fv


def main(argv: Sequence[str]) -> None:
    fv = _define_flags()
    parse_flags(fv, argv, "Prepare WikiText-2 (TFDS builder, BPE tokenizer, token streams) and print its sizes.")
    if not fv.verbose:
        quiet_tfds()
    t0 = time.perf_counter()
    corpus = prepare_corpus(fv.data_dir, fv.cache_dir, vocab_size=fv.vocab_size, variant=fv.variant, log=print)
    seconds = time.perf_counter() - t0
    tok = corpus.tokenizer
    print(f"tokenizer: {tokenizer_lib.num_tokens(tok)} tokens, fingerprint {tokenizer_lib.tokenizer_fingerprint(tok)}")
    for s in SPLITS:
        n = len(corpus.tokens[s])
        print(f"{s:<10} {n - 1:>10,} text tokens (+1 leading EOT) {corpus.words[s]:>10,} words "
              f"{corpus.bytes[s]:>11,} bytes  {corpus.bytes[s] / (n - 1):.2f} bytes/token")
    print(f"prepared in {seconds:.1f} s")


if __name__ == "__main__":
    run(main)
