import dataclasses

import jax
import pytest

from gpt2_jax import GPT2, PRESETS, GPT2Config, param_count
from gpt2_jax.model import count_params

# The table: exact counts with the LM head tied to the token embedding.
EXPECTED = {
    "tiny": 11_384_320,
    "small": 109_730_304,
    "medium": 335_210_496,
    "gpt2": 124_439_808,
    "gpt2-medium": 354_823_168,
}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_preset_param_count_matches_table(name):
    assert param_count(GPT2Config.preset(name)) == EXPECTED[name]


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_analytic_count_equals_initialised_model(name):
    cfg = GPT2Config.preset(name)
    shapes = jax.eval_shape(lambda r: GPT2(cfg).init(r, jax.numpy.zeros((1, 4), "int32"))["params"],
                            jax.random.PRNGKey(0))
    assert count_params(shapes) == param_count(cfg)
    embeddings = shapes["wte"]["embedding"].size + shapes["wpe"]["embedding"].size
    assert param_count(cfg, embeddings=False) == param_count(cfg) - embeddings


def test_report_shapes():
    small, medium = GPT2Config.preset("small"), GPT2Config.preset("medium")
    assert (small.n_layer, small.d_model, small.n_head, small.d_ff, small.n_ctx) == (12, 768, 12, 3072, 128)
    assert (medium.n_layer, medium.d_model, medium.n_head, medium.d_ff, medium.n_ctx) == (24, 1024, 16, 4096, 128)


def test_config_is_frozen_and_round_trips():
    cfg = GPT2Config.preset("tiny", dropout=0.2)
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.n_layer = 3
    assert GPT2Config.from_dict(cfg.to_dict()) == cfg
    assert cfg.dropout == 0.2 and PRESETS["tiny"].dropout == 0.1


@pytest.mark.parametrize("bad", [dict(d_model=30, n_head=4), dict(dropout=1.0), dict(dtype="float16"),
                                 dict(n_layer=0), dict(attention="flash")])
def test_invalid_config_rejected(bad):
    with pytest.raises(ValueError):
        GPT2Config(**bad)


def test_unknown_preset_names_choices():
    with pytest.raises(ValueError, match="tiny"):
        GPT2Config.preset("huge")


def test_config_cli_prints_table(capsys):
    from gpt2_jax.config import main
    main()
    out = capsys.readouterr().out
    assert "109,730,304" in out and "335,210,496" in out and "85,056,000" in out
