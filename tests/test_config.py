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


def test_every_field_has_a_docstring_that_info_prints(capsys):
    import dataclasses

    from h3pretrain.cli import main
    from h3pretrain.config import Config, SyntheticSettings, field_docs

    from h3pretrain import config as module

    for cls in (Config, module.ModelConfig, module.DataConfig, module.TrainConfig, module.ParallelConfig,
                module.SlurmConfig, SyntheticSettings):
        docs = field_docs(cls)
        missing = [f.name for f in dataclasses.fields(cls) if len(docs.get(f.name, "")) < 8]
        assert not missing, (cls.__name__, missing)
    assert main(["info", "--config", "launch/configs/tiny.yaml", "--set", "train.steps=7"]) == 0
    out = capsys.readouterr().out
    assert "  train.steps = 7\n      Optimizer steps of the whole run" in out
    assert "  parallel.sequence_parallel = False\n      Shard the LayerNorm" in out


@pytest.mark.parametrize("key, value, message", [
    ("train.precision", "fp8", "train.precision must be one of bf16, fp32, not 'fp8'"),
    ("train.zero_stage", "4", "train.zero_stage must be one of 1, 2, 3, not 4"),
    ("train.compile", "maybe", "train.compile must be true or false or auto, not 'maybe'"),
    ("model.mixer", "mamba", "model.mixer must be one of h3, attention, s4d, not 'mamba'"),
    ("train.optimizer", "sgd", "train.optimizer must be one of auto, torch, apex, deepspeed, not 'sgd'"),
    ("train.spike", "revert", "train.spike must be one of off, warn, rollback, not 'revert'"),
])
def test_choices_are_literal_types_checked_when_read(key, value, message):
    from h3pretrain.config import Config, ConfigError, apply_overrides

    with pytest.raises(ConfigError) as err:
        apply_overrides(Config(), [f"{key}={value}"])
    assert str(err.value) == message


def test_config_validate_is_the_one_place_that_checks_everything():
    """A config built in Python (nothing coerced its values) is still checked by Config.validate."""
    from h3pretrain.config import Config, ConfigError

    cfg = Config()
    cfg.validate()
    cfg.train.precision = "fp8"
    cfg.train.steps = 0
    cfg.parallel.tp = 0
    cfg.model.d_model = 30
    with pytest.raises(ConfigError) as err:
        cfg.validate()
    text = str(err.value)
    for part in ("train.precision must be one of bf16, fp32", "train.steps must be >= 1", "parallel.tp must be >= 1",
                 "d_model 30 is not a multiple of attn_num_heads"):
        assert part in text, text


@pytest.mark.parametrize("settings, message", [
    ({"spike": "rollback", "ckpt_every": 0},
     "train.spike=rollback needs checkpoints to roll back to: set train.ckpt_every > 0"),
    ({"spike_window": 1}, "train.spike_window must be >= 2, not 1"),
    ({"spike_z": 0.0}, "train.spike_z must be > 0, not 0.0"),
    ({"spike_skip_batches": -1}, "train.spike_skip_batches must be >= 0 and train.spike_max_rollbacks >= 1, not -1 and 3"),
])
def test_spike_settings_are_checked(settings, message):
    from h3pretrain.config import Config, ConfigError

    cfg = Config()
    for key, value in settings.items():
        setattr(cfg.train, key, value)
    with pytest.raises(ConfigError) as err:
        cfg.validate()
    assert str(err.value) == message
