"""The data's sharp edges: a wrong --data_dir is refused even when the data is cached, a damaged prepared
split is rebuilt with one warning, and preparing prints one line of ours, not TensorFlow Datasets' output."""

import hashlib
import re
import shutil
import socket
import subprocess
import sys

import jax
import pytest

from gpt2_jax import data, evaluate, loop, train
from gpt2_jax.pretrained import save_params_as_run
from gpt2_jax.config import GPT2Config
from gpt2_jax.model import init_params
from gpt2_jax.tokenizer import train_tokenizer

from conftest import REPO

FILES = {"train": "wiki.train.tokens", "validation": "wiki.valid.tokens", "test": "wiki.test.tokens"}
HINT = ("to work offline, put wiki.train.tokens, wiki.valid.tokens, wiki.test.tokens (or wikitext-2-v1.zip from "
        "https://wikitext.smerity.com/wikitext-2-v1.zip) in a folder and pass --data_dir=FOLDER or set "
        "GPT2_JAX_DATA_DIR=FOLDER")
TRAIN_RECORDS = "gpt2_jax_wikitext2-train.array_record-00000-of-00001"


@pytest.fixture(autouse=True)
def _no_data_dir_env(monkeypatch):
    """These tests choose the source themselves; CI's GPT2_JAX_DATA_DIR must not leak in."""
    monkeypatch.delenv(data.DATA_DIR_ENV, raising=False)


@pytest.fixture(scope="module")
def originals(wikitext_dir) -> dict:
    return {s: data.split_lines((wikitext_dir / name).read_bytes().decode("utf-8")) for s, name in FILES.items()}


@pytest.fixture(scope="module")
def prepared(wikitext_dir, tmp_path_factory):
    """A cache with the TFDS data prepared; tests damage copies of it, never this one."""
    cache = tmp_path_factory.mktemp("prepared")
    data.load_splits(data_dir=wikitext_dir, tfds_dir=cache / "tfds")
    return cache


@pytest.fixture
def cache(prepared, tmp_path):
    shutil.copytree(prepared, tmp_path / "cache")
    return tmp_path / "cache"


@pytest.fixture(scope="module")
def micro_run(tmp_path_factory, wikitext_dir):
    lines = (wikitext_dir / "wiki.valid.tokens").read_text(encoding="utf-8").splitlines()[:500]
    cfg = GPT2Config(vocab_size=300, n_ctx=16, n_layer=1, d_model=16, n_head=2, d_ff=32)
    return save_params_as_run(tmp_path_factory.mktemp("run") / "run", cfg, init_params(cfg, jax.random.PRNGKey(0)),
                              train_tokenizer(lines, vocab_size=300), step=0)


def _version_dir(cache):
    return cache / "tfds" / data.WikiText2.name / "wikitext-2-v1" / "1.0.0"


def _closed_port_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/wikitext-2-v1.zip"  # nothing listens there any more


def _data_cli(cli_env, *flags):
    return subprocess.run([sys.executable, "-m", "gpt2_jax.data", *flags], capture_output=True, text=True,
                          env=cli_env, cwd=REPO, timeout=300)


def _warnings(err: str) -> list[str]:
    assert "Traceback" not in err, err
    return [line for line in err.splitlines() if line.startswith("warning:")]


# ---------------------------------------------------------------------------------------------
# Item 1: a --data_dir (or GPT2_JAX_DATA_DIR) that is wrong is refused even when the data is cached.


@pytest.mark.parametrize("given", ["--data_dir", data.DATA_DIR_ENV])
def test_data_dir_that_does_not_exist_is_refused_although_the_data_is_cached(cache, tmp_path, monkeypatch, given):
    missing = tmp_path / "no" / "such"
    if given == data.DATA_DIR_ENV:
        monkeypatch.setenv(data.DATA_DIR_ENV, str(missing))
    with pytest.raises(data.DataError) as e:
        data.load_splits(data_dir=missing if given == "--data_dir" else None, tfds_dir=cache / "tfds")
    assert str(e.value) == f"{given}={missing} does not exist; {HINT}"


def test_data_dir_without_the_files_or_with_other_files_is_refused_although_cached(cache, wikitext_dir, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(data.DataError) as e:
        data.load_splits(data_dir=empty, tfds_dir=cache / "tfds")
    assert str(e.value) == (f"--data_dir={empty} holds neither wiki.train.tokens, wiki.valid.tokens, "
                            f"wiki.test.tokens nor wikitext-2-v1.zip; {HINT}")
    other = tmp_path / "other"
    shutil.copytree(wikitext_dir, other)
    with open(other / "wiki.valid.tokens", "ab") as f:
        f.write(b" extra \n")
    got = hashlib.sha256((other / "wiki.valid.tokens").read_bytes()).hexdigest()
    with pytest.raises(data.DataError) as e:
        data.load_splits(data_dir=other, tfds_dir=cache / "tfds")
    assert str(e.value) == (f"wiki.valid.tokens from --data_dir={other} has SHA256 {got}, not the known-good "
                            f"f0737ed31fc1329026e95cb8b98e19c2a182c39c240ab909dc31abf2f8af58e8 of wikitext-2-v1; "
                            f"{HINT}")


@pytest.mark.slow
def test_prepare_corpus_verifies_the_data_dir_once_even_when_the_data_is_cached(cache, wikitext_dir, originals,
                                                                               monkeypatch):
    verified = []
    real_verify = data._verify
    monkeypatch.setattr(data, "_verify", lambda files, cfg, where: (verified.append((sorted(files), where)),
                                                                    real_verify(files, cfg, where)))
    corpus = data.prepare_corpus(wikitext_dir, cache, tokenizer=train_tokenizer(originals["validation"], 300))
    assert verified == [(sorted(FILES.values()), f"--data_dir={wikitext_dir}")]
    assert corpus.bytes == {"train": 10_797_148, "validation": 1_121_681, "test": 1_256_449}


@pytest.mark.slow
def test_data_cli_with_a_data_dir_that_does_not_exist_exits_2_with_one_line(cache, tmp_path, cli_env):
    missing = tmp_path / "no_such"
    proc = _data_cli(cli_env, f"--data_dir={missing}", f"--cache_dir={cache}", "--vocab_size=258")
    assert (proc.returncode, proc.stdout) == (2, "")
    assert proc.stderr == f"error: --data_dir={missing} does not exist; {HINT}\n"


def test_train_and_evaluate_refuse_a_data_dir_that_does_not_exist(cache, tmp_path, micro_run, monkeypatch):
    def no_work(*args, **kwargs):
        raise AssertionError("training or evaluation started on the cached data")

    monkeypatch.setattr(loop, "start", no_work)
    monkeypatch.setattr(evaluate, "evaluate_split", no_work)
    monkeypatch.setenv(data.CACHE_ENV, str(cache))  # evaluate reads the default cache
    missing = tmp_path / "no_such"
    run_dir = tmp_path / "run"
    train_argv = ["train", "--size=tiny", f"--run_dir={run_dir}", f"--cache_dir={cache}", "--vocab_size=258"]
    with pytest.raises(data.DataError, match=f"^--data_dir={re.escape(str(missing))} does not exist; to work"):
        train.main([*train_argv, f"--data_dir={missing}"])
    with pytest.raises(data.DataError, match=f"^--data_dir={re.escape(str(missing))} does not exist; to work"):
        evaluate.main(["evaluate", f"--run_dir={micro_run}", f"--data_dir={missing}"])
    monkeypatch.setenv(data.DATA_DIR_ENV, str(missing))
    with pytest.raises(data.DataError, match=f"^GPT2_JAX_DATA_DIR={re.escape(str(missing))} does not exist; "):
        train.main(train_argv)
    with pytest.raises(data.DataError, match=f"^GPT2_JAX_DATA_DIR={re.escape(str(missing))} does not exist; "):
        evaluate.main(["evaluate", f"--run_dir={micro_run}"])
    assert not run_dir.exists()


# ---------------------------------------------------------------------------------------------
# Item 5: one line of ours when the data is prepared; TFDS's own output only with --verbose.


@pytest.mark.slow
def test_first_preparation_prints_one_line_of_ours_and_nothing_of_tfds(wikitext_dir, tmp_path, cli_env):
    cache = tmp_path / "cache"
    flags = (f"--data_dir={wikitext_dir}", f"--cache_dir={cache}", "--vocab_size=258")
    first = _data_cli(cli_env, *flags)
    assert (first.returncode, first.stderr) == (0, "")  # TFDS drew its progress bars on stderr
    lines = first.stdout.splitlines()
    assert re.fullmatch(rf"prepared WikiText-2 wikitext-2-v1 \(36,718 train, 3,760 validation, 4,358 test lines\) "
                        rf"from --data_dir={re.escape(str(wikitext_dir))} in {re.escape(str(_version_dir(cache)))} "
                        rf"in \d+\.\d s", lines[0]), lines[0]
    assert lines[1].startswith("tokenizer: 258 tokens, fingerprint ") and len(lines) == 6  # + 3 splits, the time
    again = _data_cli(cli_env, *flags)  # nothing left to prepare: no line about it
    assert (again.returncode, again.stderr) == (0, "")
    assert again.stdout.splitlines()[:-1] == lines[1:-1]


@pytest.mark.slow
def test_verbose_shows_what_tensorflow_datasets_prints(wikitext_dir, tmp_path, cli_env):
    proc = _data_cli(cli_env, f"--data_dir={wikitext_dir}", f"--cache_dir={tmp_path / 'cache'}", "--vocab_size=258",
                     "--verbose")
    assert proc.returncode == 0, proc.stderr
    assert "Downloading and preparing dataset Unknown size" in proc.stdout
    assert "Generating splits..." in proc.stderr
    assert proc.stdout.startswith("Downloading and preparing")
    assert "\nprepared WikiText-2 wikitext-2-v1 (" in proc.stdout  # ours as well


@pytest.mark.parametrize("verbose", [False, True])
def test_train_and_evaluate_quiet_tfds_unless_verbose_and_log_to_stderr(tmp_path, micro_run, monkeypatch, capsys,
                                                                         verbose):
    class Prepared(Exception):
        pass

    quieted, logs = [], []

    def prepare_corpus(*args, log=None, **kwargs):
        logs.append(log)
        raise Prepared

    monkeypatch.setattr(data, "quiet_tfds", lambda: quieted.append(True))
    monkeypatch.setattr(data, "prepare_corpus", prepare_corpus)
    verbose_flag = ["--verbose"] if verbose else []
    with pytest.raises(Prepared):
        train.main(["train", f"--run_dir={tmp_path / 'run'}", f"--cache_dir={tmp_path / 'cache'}", *verbose_flag])
    with pytest.raises(Prepared):
        evaluate.main(["evaluate", f"--run_dir={micro_run}", *verbose_flag])
    assert quieted == ([] if verbose else [True, True])
    capsys.readouterr()
    for log in logs:
        log("prepared X")
    assert capsys.readouterr() == ("", "prepared X\nprepared X\n")  # evaluate's stdout is its JSON line


# ---------------------------------------------------------------------------------------------
# Item 6: prepared splits are checked when read; a damaged one is rebuilt with one warning.


def _flip_a_bit(path):
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2] ^= 0x01
    path.write_bytes(bytes(raw))


DAMAGE = {
    "truncated": lambda d: (d / TRAIN_RECORDS).write_bytes((d / TRAIN_RECORDS).read_bytes()[:100_000]),
    "bit flipped": lambda d: _flip_a_bit(d / TRAIN_RECORDS),
    "emptied": lambda d: (d / TRAIN_RECORDS).write_bytes(b""),
    "removed": lambda d: (d / TRAIN_RECORDS).unlink(),
    "dataset_info.json garbled": lambda d: (d / "dataset_info.json").write_text("{garbage"),
    "dataset_info.json removed": lambda d: (d / "dataset_info.json").unlink(),
}


@pytest.mark.slow
@pytest.mark.parametrize("damage", DAMAGE)
def test_damaged_prepared_data_is_rebuilt_with_one_warning(cache, wikitext_dir, originals, capsys, damage):
    DAMAGE[damage](_version_dir(cache))
    capsys.readouterr()
    assert data.load_splits(data_dir=wikitext_dir, tfds_dir=cache / "tfds") == originals
    warnings = _warnings(capsys.readouterr().err)
    assert len(warnings) == 1, warnings
    assert warnings[0].startswith(f"warning: the prepared WikiText-2 in {_version_dir(cache)} is damaged (")
    assert warnings[0].endswith("); rebuilding it")
    # Rebuilt for good: read again, the data passes its check.
    assert data.load_splits(data_dir=wikitext_dir, tfds_dir=cache / "tfds") == originals
    assert _warnings(capsys.readouterr().err) == []


@pytest.mark.slow
def test_prepared_split_that_reads_but_is_not_the_source_text_is_rebuilt(wikitext_dir, originals, tmp_path,
                                                                         monkeypatch, capsys):
    other = tmp_path / "other"
    shutil.copytree(wikitext_dir, other)
    (other / "wiki.train.tokens").write_bytes((wikitext_dir / "wiki.train.tokens").read_bytes().replace(
        b"Valkyria", b"Valkyrie"))
    altered = hashlib.sha256((other / "wiki.train.tokens").read_bytes()).hexdigest()
    with monkeypatch.context() as m:
        m.setattr(data, "_verify", lambda *args: None)  # valid array_record files of other text
        data.load_split_lines("validation", other, tfds_dir=tmp_path / "tfds")
    capsys.readouterr()
    assert data.load_splits(data_dir=wikitext_dir, tfds_dir=tmp_path / "tfds") == originals
    assert _warnings(capsys.readouterr().err) == [
        f"warning: the prepared WikiText-2 in {_version_dir(tmp_path)} is damaged (split train has SHA256 {altered}, "
        f"not the source file's 9e9fa1ad55b1c2c95b08e37dd8e653f638fac2c6de904b79e813611eefbc985f); rebuilding it"]


def test_damaged_data_without_a_source_to_rebuild_from_is_the_usual_data_error(cache, capsys):
    (_version_dir(cache) / TRAIN_RECORDS).write_bytes(b"")
    url = _closed_port_url()
    with pytest.raises(data.DataError) as e:
        data.load_splits(tfds_dir=cache / "tfds", download_url=url)
    assert str(e.value).startswith(f"WikiText-2 is not available locally and downloading {url} failed (")
    assert str(e.value).endswith(HINT)
    assert len(_warnings(capsys.readouterr().err)) == 1
