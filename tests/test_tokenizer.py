"""The 32k byte-level BPE: exact size, lossless on every line, trained on train only, cached, checked against the model."""

import re

import pytest
from tokenizers import Tokenizer, models, pre_tokenizers

from gpt2_jax import data
from gpt2_jax import tokenizer as tokenizer_lib
from gpt2_jax.errors import UserError
from gpt2_jax.config import GPT2Config


@pytest.fixture(scope="module")
def lines(wikitext_dir, tmp_path_factory):
    tfds_dir = tmp_path_factory.mktemp("tfds")
    return {s: data.load_split_lines(s, wikitext_dir, tfds_dir=tfds_dir) for s in data.SPLITS}


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("tokenizers")


@pytest.fixture(scope="module")
def tok(lines, cache_dir):
    return tokenizer_lib.load_or_train_tokenizer(lines["train"], cache_dir, vocab_size=32000)


def test_has_exactly_32000_entries_including_endoftext(tok):
    assert tokenizer_lib.num_tokens(tok) == 32000
    assert len(tok.get_vocab(with_added_tokens=True)) == 32000
    eot = tokenizer_lib.eot_id(tok)
    assert tok.id_to_token(eot) == "<|endoftext|>"
    assert tok.encode("<|endoftext|>").ids == [eot]  # one special token, not its characters
    # All 256 bytes are tokens, so nothing is ever unknown.
    assert all(tok.token_to_id(symbol) is not None for symbol in pre_tokenizers.ByteLevel.alphabet())


def test_round_trip_is_lossless_on_every_line_of_every_split(tok, lines):
    for split, split_lines in lines.items():
        ids = [e.ids for e in tok.encode_batch_fast(split_lines, add_special_tokens=False)]
        decoded = tok.decode_batch(ids, skip_special_tokens=False)
        mismatches = [i for i, (a, b) in enumerate(zip(decoded, split_lines)) if a != b]
        assert not mismatches, f"{split}: first lossy line {mismatches[0]}: {split_lines[mismatches[0]]!r}"


def test_round_trip_is_lossless_on_text_never_seen_in_training(tok):
    text = "Ünïcödé 🙂 \t tabs  double  spaces\r\nand <unk> and \x00 bytes\n"
    assert tok.decode(tok.encode(text).ids) == text


def test_learns_wikitext_words_as_single_tokens(tok):
    # GPT-2 pre-tokenisation keeps the leading space with the word.
    assert len(tok.encode(" the").ids) == 1
    # GPT-2's regex separates punctuation from letters, so <unk> is three pieces (each one token).
    assert tok.encode(" <unk>").tokens == ["Ġ<", "unk", ">"]


@pytest.mark.slow
def test_trained_on_the_train_split_only(tok, lines, tmp_path):
    # Training again on train alone (fresh cache) gives the identical tokenizer; adding the
    # validation and test text would not.
    again = tokenizer_lib.load_or_train_tokenizer(lines["train"], tmp_path, vocab_size=32000)
    assert tokenizer_lib.tokenizer_fingerprint(again) == tokenizer_lib.tokenizer_fingerprint(tok)
    leaky = tokenizer_lib.train_tokenizer(lines["train"] + lines["validation"] + lines["test"], 32000)
    assert tokenizer_lib.tokenizer_fingerprint(leaky) != tokenizer_lib.tokenizer_fingerprint(tok)


def test_training_is_cached_same_data_and_settings_same_file(lines, tmp_path, monkeypatch):
    sample = lines["validation"]
    first = tokenizer_lib.load_or_train_tokenizer(sample, tmp_path, vocab_size=1000)
    files = sorted(tmp_path.iterdir())
    assert [f.suffix for f in files] == [".json", ".sha256"]  # the tokenizer and the hash that verifies it

    def no_training(*args, **kwargs):
        raise AssertionError("retrained although the same data and settings are cached")

    monkeypatch.setattr(tokenizer_lib, "train_tokenizer", no_training)
    second = tokenizer_lib.load_or_train_tokenizer(sample, tmp_path, vocab_size=1000)
    assert tokenizer_lib.tokenizer_fingerprint(second) == tokenizer_lib.tokenizer_fingerprint(first)
    assert sorted(tmp_path.iterdir()) == files
    monkeypatch.undo()

    # Other settings or other data are other entries.
    tokenizer_lib.load_or_train_tokenizer(sample, tmp_path, vocab_size=1200)
    tokenizer_lib.load_or_train_tokenizer(sample[:-1], tmp_path, vocab_size=1000)
    assert len(list(tmp_path.iterdir())) == 3 * 2


def test_a_damaged_cached_tokenizer_is_trained_again_not_used(lines, tmp_path, capsys):
    sample = lines["validation"]
    first = tokenizer_lib.load_or_train_tokenizer(sample, tmp_path, vocab_size=1000)
    cached = next(tmp_path.glob("*.json"))
    text = cached.read_text()
    assert '"add_prefix_space":false' in text
    cached.write_text(text.replace('"add_prefix_space":false', '"add_prefix_space":true', 1))  # valid, but not it
    assert tokenizer_lib.tokenizer_fingerprint(tokenizer_lib.load_tokenizer(cached)) != \
        tokenizer_lib.tokenizer_fingerprint(first)
    again = tokenizer_lib.load_or_train_tokenizer(sample, tmp_path, vocab_size=1000)
    assert tokenizer_lib.tokenizer_fingerprint(again) == tokenizer_lib.tokenizer_fingerprint(first)
    assert cached.read_text() == text  # repaired
    assert capsys.readouterr().err == f"warning: cached file {cached} is damaged (its SHA-256 does not match); " \
                                      f"rebuilding it\n"


def test_training_is_deterministic(lines):
    a = tokenizer_lib.train_tokenizer(lines["test"], vocab_size=800)
    b = tokenizer_lib.train_tokenizer(lines["test"], vocab_size=800)
    assert tokenizer_lib.tokenizer_fingerprint(a) == tokenizer_lib.tokenizer_fingerprint(b)


def test_save_and_load_keep_the_tokenizer(tok, tmp_path):
    path = tmp_path / "run" / "tokenizer.json"
    tokenizer_lib.save_tokenizer(tok, path)
    loaded = tokenizer_lib.load_tokenizer(path)
    assert tokenizer_lib.tokenizer_fingerprint(loaded) == tokenizer_lib.tokenizer_fingerprint(tok)
    text = " = Valkyria Chronicles III = \n"
    assert loaded.encode(text).ids == tok.encode(text).ids
    assert [p.name for p in path.parent.iterdir()] == ["tokenizer.json"]  # no temporary file left


def test_loading_a_missing_or_broken_file_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match=r"tokenizer file .*nope\.json does not exist"):
        tokenizer_lib.load_tokenizer(tmp_path / "nope.json")
    broken = tmp_path / "tokenizer.json"
    broken.write_text('{"version": "1.0", "model": ')
    with pytest.raises(UserError, match=r"tokenizer\.json is not a readable tokenizers JSON file") as e:
        tokenizer_lib.load_tokenizer(broken)
    assert "\n" not in str(e.value)


def test_vocab_mismatch_with_the_model_is_a_clear_error(tok):
    tokenizer_lib.check_vocab_matches(tok, GPT2Config(vocab_size=32000))
    with pytest.raises(UserError, match="tokenizer has 32000 tokens but the model expects 50257"):
        tokenizer_lib.check_vocab_matches(tok, GPT2Config(vocab_size=50257))


def test_vocab_larger_than_the_data_supports_is_a_user_error():
    with pytest.raises(UserError, match=r"only supports \d+ BPE tokens, fewer than vocab_size=5000"):
        tokenizer_lib.train_tokenizer(["ab ab ab\n"] * 3, vocab_size=5000)


def test_tokenizer_without_endoftext_is_a_user_error():
    with pytest.raises(UserError, match=re.escape("this tokenizer has no <|endoftext|> token")):
        tokenizer_lib.eot_id(Tokenizer(models.BPE()))
