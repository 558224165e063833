"""Released-H3 checkpoint import/export (docs/design.md section 2 key names)."""
import collections

import pytest
import torch

from conftest import tiny_config
from h3pretrain.cli import main
from h3pretrain.model.released import CheckpointMismatchError
from h3pretrain.model import HybridLM
from h3pretrain.checkpoint import load_model_dir

OFFICIAL_H3_KEYS = [
    "backbone.layers.0.mixer.q_proj.weight", "backbone.layers.0.mixer.output_linear.bias",
    "backbone.layers.0.mixer.ssm_k_kernel.kernel.B", "backbone.layers.0.mixer.ssm_k_kernel.kernel.C",
    "backbone.layers.0.mixer.ssm_k_D", "backbone.layers.0.mixer.kernel.kernel.log_dt",
    "backbone.layers.0.mixer.kernel.kernel.inv_A_real", "backbone.layers.0.mixer.kernel.kernel.A_imag",
    "backbone.layers.0.mixer.kernel.kernel.B", "backbone.layers.0.mixer.kernel.kernel.C",
    "backbone.layers.0.mixer.D", "backbone.layers.1.mixer.Wqkv.weight", "backbone.layers.1.mixer.out_proj.bias",
    "backbone.layers.0.norm1.weight", "backbone.layers.2.norm2.bias", "backbone.layers.2.mlp.fc1.weight",
    "backbone.layers.2.mlp.fc2.bias", "backbone.embeddings.word_embeddings.weight", "backbone.ln_f.weight",
    "lm_head.weight",
]


def _logits(model, ids):
    with torch.no_grad():
        return model.eval()(ids)


def test_official_names_and_round_trip():
    src = HybridLM(tiny_config(ssm_head_dim=2))
    sd = src.official_state_dict()
    assert set(OFFICIAL_H3_KEYS) <= set(sd)
    assert sd["backbone.layers.0.mixer.kernel.kernel.C"].shape == (1, 16, 32, 2)
    assert sd["backbone.layers.0.mixer.ssm_k_kernel.kernel.B"].shape == (32, 64)
    dst = HybridLM(tiny_config(ssm_head_dim=2))
    dst.load_official_state_dict(sd)
    ids = torch.randint(0, 97, (2, 20))
    assert torch.equal(_logits(src, ids), _logits(dst, ids))


def test_accepts_lightning_older_names_and_rotary_buffers():
    src = HybridLM(tiny_config(attn_rotary_dim=4))
    sd = src.official_state_dict()
    older = {k.replace("backbone.", "s4seq.encoder.", 1): v for k, v in sd.items()}
    older["s4seq.encoder.layers.1.mixer.rotary_emb.inv_freq"] = torch.ones(2)
    lightning = {"state_dict": collections.OrderedDict((f"model.{k}", v) for k, v in older.items()),
                 "epoch": 3}
    dst = HybridLM(tiny_config(attn_rotary_dim=4))
    dst.load_official_state_dict(lightning)
    ids = torch.randint(0, 97, (1, 9))
    assert torch.equal(_logits(src, ids), _logits(dst, ids))


def test_bad_checkpoint_lists_every_problem():
    sd = HybridLM(tiny_config()).official_state_dict()
    del sd["backbone.layers.0.mixer.D"]
    sd["backbone.layers.0.mixer.extra.weight"] = torch.zeros(1)
    sd["backbone.layers.2.mlp.fc1.weight"] = torch.zeros(3, 3)
    with pytest.raises(CheckpointMismatchError) as err:
        HybridLM(tiny_config()).load_official_state_dict(sd)
    msg = str(err.value)
    assert "1 missing key(s)" in msg and "backbone.layers.0.mixer.D" in msg
    assert "1 unexpected key(s)" in msg and "mixer.extra.weight" in msg
    assert "1 mis-shaped key(s)" in msg and "mlp.fc1.weight: released checkpoint (3, 3) vs model (128, 32)" in msg


def test_untied_head_is_refused():
    sd = HybridLM(tiny_config()).official_state_dict()
    sd["lm_head.weight"] = sd["lm_head.weight"] + 1
    with pytest.raises(CheckpointMismatchError, match="tied"):
        HybridLM(tiny_config()).load_official_state_dict(sd)


def test_import_h3_cli(tmp_path, capsys):
    from h3pretrain.config import preset

    src = HybridLM(preset("tiny"))
    torch.save(src.official_state_dict(), tmp_path / "model.pt")
    assert main(["import-h3", str(tmp_path / "model.pt"), "--preset", "tiny", "--out", str(tmp_path / "out")]) == 0
    loaded = load_model_dir(tmp_path / "out")
    ids = torch.randint(0, 4096, (2, 16))
    assert torch.equal(_logits(src, ids), _logits(loaded, ids))
    assert "imported 1,441,664 parameters" in capsys.readouterr().out
    # wrong preset: a clear error, exit code 2
    assert main(["import-h3", str(tmp_path / "model.pt"), "--preset", "125m", "--out", str(tmp_path / "x")]) == 2
    assert "mis-shaped" in capsys.readouterr().err
    assert main(["import-h3", str(tmp_path / "nope.pt"), "--preset", "tiny", "--out", str(tmp_path / "y")]) == 2
    assert "no checkpoint file" in capsys.readouterr().err


class _Evil:
    def __reduce__(self):
        return (print, ("pwned",))


def test_pickled_code_is_refused(tmp_path, capsys):
    torch.save({"x": _Evil()}, tmp_path / "evil.pt")
    assert main(["import-h3", str(tmp_path / "evil.pt"), "--preset", "tiny", "--out", str(tmp_path / "o")]) == 2
    captured = capsys.readouterr()
    assert "weights_only" in captured.err and "pwned" not in captured.out
