import pytest
import torch

from h3pretrain.config import Config, ConfigError, apply_overrides, load_yaml, preset, save_yaml
from h3pretrain.model import HybridLM

# docs/design.md section 3: parameter counts of the released shapes.
RELEASED = {"125m": 126_387_456, "355m": 361_058_304, "1.3b": 1_326_096_384, "2.7b": 2_670_307_840}


@pytest.mark.parametrize("name,count", RELEASED.items())
def test_preset_parameter_counts(name, count):
    cfg = preset(name)
    with torch.device("meta"):
        model = HybridLM(cfg)
    assert cfg.padded_vocab_size == 50264
    assert model.num_parameters() == count


def test_preset_layer_patterns():
    assert preset("125m").layer_kinds().count("attention") == 1
    assert [i for i, k in enumerate(preset("2.7b").layer_kinds()) if k == "attention"] == [8, 16, 24]
    assert preset("2.7b").initializer_range == pytest.approx((2 / (5 * 2560)) ** 0.5)


def test_overrides_are_typed():
    cfg = Config(model=preset("125m"))
    apply_overrides(cfg, ["model.attn_layer_idx=[2, 5]", "model.embed_dropout=0", "model.d_model=512"])
    assert cfg.model.attn_layer_idx == [2, 5]
    assert cfg.model.embed_dropout == 0.0 and isinstance(cfg.model.embed_dropout, float)
    assert cfg.model.d_model == 512
    with pytest.raises(ConfigError, match="no key 'd_modle'"):
        apply_overrides(cfg, ["model.d_modle=3"])
    with pytest.raises(ConfigError, match="expected int"):
        apply_overrides(cfg, ["model.n_layer=many"])
    with pytest.raises(ConfigError, match="section.key=value"):
        apply_overrides(cfg, ["model.n_layer"])


def test_yaml_round_trip_and_preset_key(tmp_path):
    cfg = Config(model=preset("355m"))
    save_yaml(cfg, tmp_path / "a.yaml")
    assert load_yaml(tmp_path / "a.yaml") == cfg
    (tmp_path / "b.yaml").write_text("model:\n  preset: 1.3b\n  attn_dropout: 0.0\n")
    loaded = load_yaml(tmp_path / "b.yaml", ["model.n_layer=12"])
    assert loaded.model.d_model == 2048 and loaded.model.attn_dropout == 0.0 and loaded.model.n_layer == 12
    (tmp_path / "c.yaml").write_text("model:\n  d_model: 64\n  bogus: 1\n")
    with pytest.raises(ConfigError, match="unknown key"):
        load_yaml(tmp_path / "c.yaml")


def test_invalid_model_config_is_explained():
    cfg = preset("125m")
    cfg.attn_layer_idx = [12]
    cfg.ssm_head_dim = 5
    with pytest.raises(ConfigError) as err:
        HybridLM(cfg)
    assert "attn_layer_idx [12]" in str(err.value) and "ssm_head_dim 5" in str(err.value)
