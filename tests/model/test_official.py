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


def test_output_channel_layouts_of_the_two_official_paths():
    """head_dim 2: the official PyTorch path flattens the output (b, d2, h) as d2·H + h, the CUDA
    fftconv path (and ours) (b, h, d2) as h·hd + d2. A file of either layout imported with its
    --layout gives the source model's logits exactly; the wrong layout gives others."""
    from h3pretrain.model.released import to_our_output_layout

    H, hd, rows = 4, 2, 3
    w_ours = torch.randn(rows, H * hd)
    w_pytorch = w_ours.reshape(rows, H, hd).transpose(1, 2).reshape(rows, H * hd)  # column d2·H + h
    y = torch.randn(5, H, hd)  # (b, h, d2)
    official_pytorch = y.transpose(1, 2).reshape(5, H * hd) @ w_pytorch.T  # 'b d h -> b (d h)'
    ours = y.reshape(5, H * hd) @ w_ours.T  # 'b h d -> b (h d)'
    torch.testing.assert_close(official_pytorch, ours)
    key = "backbone.layers.0.mixer.output_linear.weight"
    assert torch.equal(to_our_output_layout({key: w_pytorch}, "pytorch", hd)[key], w_ours)
    assert torch.equal(to_our_output_layout({key: w_ours}, "cuda", hd)[key], w_ours)

    src = HybridLM(tiny_config(ssm_head_dim=2))
    sd = src.official_state_dict()
    pytorch_file = dict(sd)
    for k, w in sd.items():
        if k.endswith(".mixer.output_linear.weight"):
            r, c = w.shape
            pytorch_file[k] = w.reshape(r, c // 2, 2).transpose(1, 2).reshape(r, c)
    ids = torch.randint(0, 97, (2, 12))
    for file, layout, same in ((sd, "cuda", True), (pytorch_file, "pytorch", True), (pytorch_file, "cuda", False)):
        dst = HybridLM(tiny_config(ssm_head_dim=2))
        dst.load_official_state_dict(file, layout)
        assert torch.equal(_logits(src, ids), _logits(dst, ids)) == same, layout
    # head_dim 1: both layouts are the same
    one = HybridLM(tiny_config()).official_state_dict()
    assert all(torch.equal(v, to_our_output_layout(one, "pytorch", 1)[k]) for k, v in one.items())


def test_import_h3_layout_and_model_overrides(tmp_path, capsys):
    from h3pretrain.config import preset

    cfg = preset("tiny")
    cfg.ssm_head_dim = 2
    src = HybridLM(cfg)
    sd = src.official_state_dict()
    for k, w in list(sd.items()):
        if k.endswith(".mixer.output_linear.weight"):
            r, c = w.shape
            sd[k] = w.reshape(r, c // 2, 2).transpose(1, 2).reshape(r, c)
    torch.save(sd, tmp_path / "model.pt")
    args = ["import-h3", str(tmp_path / "model.pt"), "--preset", "tiny", "--layout", "pytorch"]
    assert main(args + ["--set", "model.ssm_head_dim=2", "--out", str(tmp_path / "a")]) == 0
    ids = torch.randint(0, 4096, (1, 10))
    assert torch.equal(_logits(src, ids), _logits(load_model_dir(tmp_path / "a"), ids))
    assert main(args + ["--set", "ssm_head_dim=2", "--out", str(tmp_path / "b")]) == 0  # the bare key too
    capsys.readouterr()
    assert main(args + ["--set", "train.lr=1", "--out", str(tmp_path / "c")]) == 2
    assert "import-h3 sets model fields only" in capsys.readouterr().err
    assert main(args + ["--set", "model.nope=1", "--out", str(tmp_path / "d")]) == 2
    assert "no key 'nope'" in capsys.readouterr().err


def test_lightning_checkpoint_with_plain_config_hyper_parameters_loads(tmp_path, monkeypatch):
    """Lightning stores hyper_parameters as argparse.Namespace or its AttributeDict: read as data,
    whether or not Lightning is installed; anything else in the file is still refused."""
    import argparse
    import sys
    import types

    from h3pretrain.model.released import load_file

    module = types.ModuleType("pytorch_lightning.utilities.parsing")

    class AttributeDict(dict):
        pass

    AttributeDict.__module__, AttributeDict.__qualname__ = module.__name__, "AttributeDict"
    module.AttributeDict = AttributeDict
    names = ("pytorch_lightning", "pytorch_lightning.utilities", module.__name__)
    for name in names:
        monkeypatch.setitem(sys.modules, name, module if name == module.__name__ else types.ModuleType(name))
    src = HybridLM(tiny_config())
    ckpt = {"state_dict": {f"model.{k}": v for k, v in src.official_state_dict().items()},
            "hyper_parameters": AttributeDict(lr=0.1, model=argparse.Namespace(d_model=32, n_layer=3)), "epoch": 1}
    torch.save(ckpt, tmp_path / "last.ckpt")
    for name in names:  # Lightning is not installed where it is read
        monkeypatch.delitem(sys.modules, name)
    loaded = load_file(tmp_path / "last.ckpt")
    assert loaded["hyper_parameters"] == {"lr": 0.1, "model": argparse.Namespace(d_model=32, n_layer=3)}
    dst = HybridLM(tiny_config())
    dst.load_official_state_dict(loaded)
    ids = torch.randint(0, 97, (1, 9))
    assert torch.equal(_logits(src, ids), _logits(dst, ids))
