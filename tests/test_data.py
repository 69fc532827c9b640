"""WikiText-2 through the TFDS builder, token streams that encode exactly the counted text, and batches."""

import hashlib

import chex
import numpy as np
import pytest

from gpt2_jax import data
from gpt2_jax import tokenizer as tokenizer_lib
from gpt2_jax.errors import UserError

SHA256 = {  # ../shared/data/wikitext-2/SHA256SUMS
    "train": "9e9fa1ad55b1c2c95b08e37dd8e653f638fac2c6de904b79e813611eefbc985f",
    "validation": "f0737ed31fc1329026e95cb8b98e19c2a182c39c240ab909dc31abf2f8af58e8",
    "test": "d790b833ef8cf03a90db7bf1271b7520b83c45ce07ba3c1a9699df81e239eca0",
}


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def lines(wikitext_dir, cache_dir):
    return {s: data.load_split_lines(s, wikitext_dir, tfds_dir=cache_dir / "tfds") for s in data.SPLITS}


@pytest.fixture(scope="module")
def corpus(wikitext_dir, cache_dir, lines):
    return data.prepare_corpus(wikitext_dir, cache_dir)


# ---------------------------------------------------------------------------------------------
# The builder and the counts.


def test_builder_has_one_example_per_line_in_file_order(lines):
    assert {s: len(v) for s, v in lines.items()} == {"train": 36_718, "validation": 3_760, "test": 4_358}
    for split, split_lines in lines.items():
        # Joined back, the examples are the released file byte for byte: no line lost, moved or altered.
        assert hashlib.sha256("".join(split_lines).encode("utf-8")).hexdigest() == SHA256[split]
    assert lines["train"][:2] == [" \n", " = Valkyria Chronicles III = \n"]


def test_word_counts_are_the_literature_counts(lines):
    assert {s: data.count_words(v) for s, v in lines.items()} == {
        "train": 2_088_628, "validation": 217_646, "test": 245_569}


def test_count_words_is_whitespace_words_plus_one_end_of_line_per_line():
    assert data.count_words([" = Title = \n", " \n", "a  b\tc\n"]) == (3 + 1) + (0 + 1) + (3 + 1)


def test_split_lines_breaks_only_at_newline_and_keeps_it():
    # str.splitlines would also break at U+2028 and \x0c, which would change line and word counts.
    assert data.split_lines("a\u2028b\x0c c\n\nd") == ["a\u2028b\x0c c\n", "\n", "d"]
    assert data.split_lines("x\n") == ["x\n"]


def test_unknown_split_or_variant_is_a_user_error(wikitext_dir, cache_dir):
    with pytest.raises(UserError, match="unknown split 'valid'; choose one of: train, validation, test"):
        data.load_split_lines("valid", wikitext_dir, tfds_dir=cache_dir / "tfds")
    with pytest.raises(UserError, match="unknown dataset variant 'wikitext-103'"):
        data.load_split_lines("train", wikitext_dir, variant="wikitext-103", tfds_dir=cache_dir / "tfds")


# ---------------------------------------------------------------------------------------------
# Token streams.


@pytest.mark.slow
def test_each_stream_is_eot_then_exactly_the_split_text(corpus, lines):
    tok = corpus.tokenizer
    assert tokenizer_lib.num_tokens(tok) == 32_000
    for split in data.SPLITS:
        stream = corpus.tokens[split]
        assert stream.dtype == np.int32 and stream.ndim == 1
        assert stream[0] == tokenizer_lib.eot_id(tok)
        assert np.count_nonzero(stream == tokenizer_lib.eot_id(tok)) == 1  # never inside the text
        # The scored targets stream[1:] decode to the split's text, whose words and bytes are counted.
        text = tok.decode(stream[1:].tolist(), skip_special_tokens=False)
        assert text == "".join(lines[split])
        assert corpus.bytes[split] == len(text.encode("utf-8"))
        assert corpus.words[split] == data.count_words(lines[split])
    assert corpus.bytes == {"train": 10_797_148, "validation": 1_121_681, "test": 1_256_449}  # the file sizes


@pytest.mark.slow
def test_streams_are_cached_by_tokenizer_fingerprint(corpus, wikitext_dir, cache_dir, lines, monkeypatch):
    fingerprint = tokenizer_lib.tokenizer_fingerprint(corpus.tokenizer)
    stream_dir = cache_dir / "streams" / f"wikitext-2-v1-{fingerprint}"
    assert sorted(p.name for p in stream_dir.iterdir()) == [f"{s}.npy{h}" for s in ("test", "train", "validation")
                                                            for h in ("", ".sha256")]

    def no_encoding(*args):
        raise AssertionError("a cached stream was tokenized again")

    monkeypatch.setattr(data, "encode_stream", no_encoding)
    again = data.prepare_corpus(wikitext_dir, cache_dir)
    assert tokenizer_lib.tokenizer_fingerprint(again.tokenizer) == fingerprint
    for split in data.SPLITS:
        np.testing.assert_array_equal(again.tokens[split], corpus.tokens[split])
    monkeypatch.undo()

    # A damaged stream (one byte changed, or cut short) is encoded again, never used.
    train_file = stream_dir / "train.npy"
    raw = bytearray(train_file.read_bytes())
    raw[len(raw) // 2] ^= 0x01
    train_file.write_bytes(bytes(raw))
    (stream_dir / "test.npy").write_bytes((stream_dir / "test.npy").read_bytes()[:1000])
    repaired = data.prepare_corpus(wikitext_dir, cache_dir)
    for split in data.SPLITS:
        np.testing.assert_array_equal(repaired.tokens[split], corpus.tokens[split])
    np.testing.assert_array_equal(np.load(train_file), corpus.tokens["train"])

    # Another tokenizer gets its own streams, never the first one's.
    small = tokenizer_lib.train_tokenizer(lines["validation"], vocab_size=600)
    other = data.prepare_corpus(wikitext_dir, cache_dir, tokenizer=small)
    assert other.tokenizer is small
    assert small.decode(other.tokens["test"][1:].tolist(), skip_special_tokens=False) == "".join(lines["test"])
    assert len(other.tokens["test"]) > len(corpus.tokens["test"])  # fewer merges, more tokens
    assert (cache_dir / "streams" / f"wikitext-2-v1-{tokenizer_lib.tokenizer_fingerprint(small)}").is_dir()


# ---------------------------------------------------------------------------------------------
# Training batches. A stream of 0, 1, 2, ... makes every token equal to its own index.


def _take(iterator, n):
    return [next(iterator) for _ in range(n)]


def test_training_windows_are_seq_len_plus_one_tokens_shifted_by_one():
    stream = np.arange(1000, dtype=np.int32)
    _, batch = next(data.train_batches(stream, seq_len=8, global_batch=4, seed=0))
    chex.assert_shape([batch["inputs"], batch["targets"], batch["mask"]], (1, 4, 8))
    chex.assert_type([batch["inputs"], batch["targets"], batch["mask"]], [np.int32, np.int32, np.float32])
    np.testing.assert_array_equal(batch["inputs"], batch["inputs"][..., :1] + np.arange(8))
    np.testing.assert_array_equal(batch["targets"], batch["inputs"] + 1)
    np.testing.assert_array_equal(batch["mask"], 1.0)


def test_an_epoch_reads_every_window_once_in_an_order_set_by_seed_and_epoch():
    seq_len, batch = 10, 4
    stream = np.arange(10 * 8 * 4 + 1 + 5, dtype=np.int32)  # 32 windows and 5 leftover tokens
    assert data.steps_per_epoch(len(stream), seq_len, batch) == 8
    seen = {}
    for epoch in range(3):
        batches = _take(data.train_batches(stream, seq_len=seq_len, global_batch=batch, seed=7,
                                           start=data.DataPosition(epoch, 0)), 8)
        starts = np.concatenate([b["inputs"][0, :, 0] for _, b in batches])
        offset = starts.min()
        assert 0 <= offset <= 5
        np.testing.assert_array_equal(np.sort(starts), offset + seq_len * np.arange(32))
        seen[epoch] = starts
    assert not np.array_equal(seen[0], seen[1]) and not np.array_equal(seen[1], seen[2])
    other_seed = _take(data.train_batches(stream, seq_len=seq_len, global_batch=batch, seed=8), 8)
    assert not np.array_equal(np.concatenate([b["inputs"][0, :, 0] for _, b in other_seed]), seen[0])


def test_positions_count_batches_and_roll_over_to_the_next_epoch():
    stream = np.arange(3 * 2 * 5 + 1, dtype=np.int32)  # exactly 3 steps of 2 windows of 5
    positions = [p for p, _ in _take(data.train_batches(stream, seq_len=5, global_batch=2, seed=0), 7)]
    assert positions == [data.DataPosition(0, 1), data.DataPosition(0, 2), data.DataPosition(1, 0),
                         data.DataPosition(1, 1), data.DataPosition(1, 2), data.DataPosition(2, 0),
                         data.DataPosition(2, 1)]


@pytest.mark.parametrize("stop_after", [1, 5, 7, 8, 13])  # mid-epoch, at the boundary, later epochs
def test_resuming_from_a_saved_position_yields_exactly_the_uninterrupted_batches(stop_after):
    stream = np.random.default_rng(0).integers(0, 32000, 7 * 4 * 16 + 9, dtype=np.int32)  # 7 steps/epoch
    kwargs = dict(seq_len=16, global_batch=4, seed=3)
    uninterrupted = _take(data.train_batches(stream, **kwargs), 20)
    saved_position = uninterrupted[stop_after - 1][0]
    resumed = _take(data.train_batches(stream, start=saved_position, **kwargs), 20 - stop_after)
    for (p_ref, b_ref), (p, b) in zip(uninterrupted[stop_after:], resumed):
        assert p == p_ref
        chex.assert_trees_all_equal(b, b_ref)


def test_position_round_trips_through_a_dict():
    p = data.DataPosition(epoch=3, step=17)
    assert data.DataPosition.from_dict(p.to_dict()) == p


def test_device_axis_splits_the_global_batch_in_order():
    stream = np.arange(5000, dtype=np.int32)
    _, one = next(data.train_batches(stream, seq_len=8, global_batch=8, seed=1))
    _, four = next(data.train_batches(stream, seq_len=8, global_batch=8, seed=1, num_devices=4))
    chex.assert_shape(four["inputs"], (4, 2, 8))
    for key in one:
        np.testing.assert_array_equal(four[key].reshape(8, 8), one[key].reshape(8, 8))


def test_process_shards_together_are_the_single_process_global_batch():
    stream = np.arange(9000, dtype=np.int32)
    kwargs = dict(seq_len=8, global_batch=8, seed=5, start=data.DataPosition(1, 3))
    reference = _take(data.train_batches(stream, **kwargs), 3)
    shards = [_take(data.train_batches(stream, num_devices=2, process_index=p, process_count=2, **kwargs), 3)
              for p in range(2)]
    for step, (position, ref) in enumerate(reference):
        assert shards[0][step][0] == shards[1][step][0] == position
        for key in ref:
            chex.assert_shape(shards[0][step][1][key], (2, 2, 8))
            union = np.concatenate([shards[p][step][1][key].reshape(-1, 8) for p in range(2)])
            np.testing.assert_array_equal(union, ref[key].reshape(-1, 8))


def test_indivisible_batch_and_bad_resume_position_are_user_errors():
    stream = np.arange(5000, dtype=np.int32)
    with pytest.raises(UserError, match="global batch size 6 is not divisible by 4 local devices x 1 processes; "
                                        "use a multiple of 4"):
        data.train_batches(stream, seq_len=8, global_batch=6, seed=0, num_devices=4)
    with pytest.raises(UserError, match="eval batch size 6 is not divisible by 2 local devices x 2 processes"):
        data.eval_batches(stream, seq_len=8, batch_size=6, num_devices=2, process_count=2)
    with pytest.raises(UserError, match="outside an epoch of 78 steps.*resume with the batch size"):
        data.train_batches(stream, seq_len=8, global_batch=8, seed=0, start=data.DataPosition(0, 79))
    with pytest.raises(UserError, match="fewer than one batch of 64"):
        data.train_batches(np.arange(100, dtype=np.int32), seq_len=8, global_batch=64, seed=0)


# ---------------------------------------------------------------------------------------------
# Evaluation batches.


def _score_counts(n_tokens, **kwargs):
    """How many times each token index is scored as a target (stream = its own indices)."""
    counts = np.zeros(n_tokens, np.int64)
    batches = list(data.eval_batches(np.arange(n_tokens, dtype=np.int32), **kwargs))
    for batch in batches:
        scored = batch["mask"] == 1.0
        np.add.at(counts, batch["targets"][scored], 1)
        # Every scored target follows its own input: the window is contiguous text.
        np.testing.assert_array_equal(batch["targets"][scored], batch["inputs"][scored] + 1)
    return counts, batches


@pytest.mark.parametrize("n_tokens", [2, 7, 9, 17, 100, 1001])
@pytest.mark.parametrize("stride", [None, 1, 3, 8])
def test_eval_scores_every_target_exactly_once(n_tokens, stride):
    counts, batches = _score_counts(n_tokens, seq_len=8, batch_size=4, stride=stride)
    assert counts[0] == 0  # the leading EOT is context only
    np.testing.assert_array_equal(counts[1:], 1)
    assert len(batches) == data.num_eval_batches(n_tokens, seq_len=8, batch_size=4, stride=stride)


def test_eval_last_window_is_padded_and_masked_not_dropped():
    counts, batches = _score_counts(2 * 8 + 3 + 1, seq_len=8, batch_size=4)  # 19 targets: 8 + 8 + 3
    assert len(batches) == 1
    mask = batches[0]["mask"][0]
    np.testing.assert_array_equal(mask.sum(axis=1), [8, 8, 3, 0])  # last row: batch padding
    np.testing.assert_array_equal(batches[0]["targets"][0, 2], [17, 18, 19, 0, 0, 0, 0, 0])


def test_sliding_windows_give_every_scored_target_all_the_context_that_fits():
    seq_len, stride = 8, 3
    _, batches = _score_counts(50, seq_len=seq_len, batch_size=4, stride=stride)
    rows = [(b["inputs"][0, r], b["mask"][0, r]) for b in batches for r in range(4) if b["mask"][0, r].any()]
    first_inputs, first_mask = rows[0]
    np.testing.assert_array_equal(first_mask, 1.0)  # the first window scores all of its targets
    for inputs, mask in rows[1:]:
        # Full windows; only the last `stride` (or fewer, at the end) positions are scored, so each
        # scored target sees at least seq_len - stride + 1 tokens.
        assert inputs[0] >= 1 and np.all(np.diff(inputs) == 1)
        scored = np.flatnonzero(mask)
        assert scored.min() >= seq_len - stride and scored.max() == seq_len - 1


def test_eval_process_shards_together_cover_the_split_once():
    n_tokens = 203
    counts = np.zeros(n_tokens, np.int64)
    reference = list(data.eval_batches(np.arange(n_tokens, dtype=np.int32), seq_len=8, batch_size=8))
    shards = [list(data.eval_batches(np.arange(n_tokens, dtype=np.int32), seq_len=8, batch_size=8, num_devices=2,
                                     process_index=p, process_count=2)) for p in range(2)]
    assert len(shards[0]) == len(shards[1]) == len(reference) == 4  # 26 windows -> 4 batches of 8
    for step, ref in enumerate(reference):
        for key in ref:
            chex.assert_shape(shards[0][step][key], (2, 2, 8))
            union = np.concatenate([shards[p][step][key].reshape(-1, 8) for p in range(2)])
            np.testing.assert_array_equal(union, ref[key].reshape(-1, 8))
        np.add.at(counts, ref["targets"][ref["mask"] == 1.0], 1)
    np.testing.assert_array_equal(counts[1:], 1)


@pytest.mark.slow
def test_eval_on_validation_scores_every_text_token_once(corpus):
    stream = corpus.tokens["validation"]
    scored = sum(float(b["mask"].sum()) for b in data.eval_batches(stream, seq_len=128, batch_size=16,
                                                                     num_devices=2))
    assert scored == len(stream) - 1


def test_bad_eval_stride_is_a_user_error():
    with pytest.raises(UserError, match=r"eval stride must be in \[1, seq_len=8\], got 9"):
        data.num_eval_batches(100, seq_len=8, batch_size=4, stride=9)


@pytest.mark.slow
def test_prepare_cli_prints_the_sizes_of_what_it_prepared(corpus, wikitext_dir, cache_dir, capsys):
    data.main(["data", f"--data_dir={wikitext_dir}", f"--cache_dir={cache_dir}"])
    out = capsys.readouterr().out
    assert f"fingerprint {tokenizer_lib.tokenizer_fingerprint(corpus.tokenizer)}" in out
    for split in data.SPLITS:
        assert f"{len(corpus.tokens[split]) - 1:,} text tokens" in out
        assert f"{corpus.words[split]:,} words" in out
