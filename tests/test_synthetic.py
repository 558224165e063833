"""The paper's synthetic tasks: data generators checked against their definitions, the S4D baseline
mixer, and (slow) trained accuracies per mixer with bars set from measured runs."""
import json
import math

import numpy as np
import pytest
import torch

from h3pretrain.cli import main
from h3pretrain.synthetic import (TRIGGER, SyntheticSettings, assoc_recall_examples, induction_examples,
                                  make_dataset, run)


def test_induction_examples():
    x, y = induction_examples(2000, 20, 31, np.random.default_rng(0))
    assert x.shape == (2000, 31) and y.shape == (2000,)
    assert (x[:, -1] == TRIGGER).all() and ((x == TRIGGER).sum(1) == 2).all()
    first = (x == TRIGGER).argmax(1)
    assert (first <= 27).all() and (x[np.arange(2000), first + 1] == y).all()
    assert y.min() >= 1 and y.max() == 19 and x.max() == 19
    assert len(np.unique(first)) == 28  # like the reference: the first trigger at 0 .. 27 of 30 tokens


def test_assoc_recall_examples():
    x, y = assoc_recall_examples(2000, 20, 42, np.random.default_rng(0))
    assert x.shape == (2000, 42)
    keys, values, sep, query = x[:, :-2:2], x[:, 1:-2:2], x[:, -2], x[:, -1]
    assert keys.shape[1] == 20 and (sep == TRIGGER).all()
    assert keys.min() == 1 and keys.max() == 9 and values.min() == 10 and values.max() == 18  # 9 keys, 9 values
    for k, v, q, target in zip(keys, values, query, y):
        pairs = dict(zip(k, v))
        assert all(pairs[a] == b for a, b in zip(k, v))  # one value per key within an example
        assert q in pairs and pairs[q] == target


def test_dataset_is_distinct_and_test_is_unseen():
    s = SyntheticSettings(task="assoc_recall", vocab_size=11, seq_len=6, n_train=400, n_test=100)
    data = make_dataset(s)
    rows = lambda x: {r.tobytes() for r in x.numpy()}  # noqa: E731
    train, test = rows(data["train"][0]), rows(data["test"][0])
    assert len(train) == 400 and len(test) == 100 and not train & test
    again = make_dataset(s)
    assert torch.equal(again["train"][0], data["train"][0]) and torch.equal(again["test"][1], data["test"][1])
    with pytest.raises(ValueError, match="distinct"):
        make_dataset(SyntheticSettings(task="assoc_recall", vocab_size=5, seq_len=4, n_train=100, n_test=10))
    with pytest.raises(ValueError, match="even"):
        make_dataset(SyntheticSettings(task="assoc_recall", seq_len=21))


def test_s4d_mixer_is_the_diagonal_ssm_alone():
    from h3pretrain.synthetic import build_model

    model = build_model(SyntheticSettings(mixer="s4d"))
    names = {n.split("mixer.", 1)[1] for n, _ in model.named_parameters() if "layers.0.mixer." in n}
    assert names == {"diag_kernel.log_dt", "diag_kernel.inv_A_real", "diag_kernel.A_imag", "diag_kernel.C", "D",
                     "output_linear.weight", "output_linear.bias"}
    mixer = model.backbone.layers["0"].mixer
    ssm = mixer.diag_kernel
    # the reference's S4D: S4D-Inv, A shared by the 32 channels, zero-order hold
    N, n = 64, torch.arange(32, dtype=torch.float64)
    assert ssm.A_imag.shape == ssm.inv_A_real.shape == (1, 32)
    torch.testing.assert_close(ssm.A_imag[0], (N / math.pi * (N / (2 * n + 1) - 1)).float())
    torch.testing.assert_close(torch.exp(ssm.inv_A_real), torch.full((1, 32), 0.5))
    with torch.no_grad():
        dt = torch.exp(ssm.log_dt.double())[:, None]
        A = torch.complex(-torch.exp(ssm.inv_A_real.double()), ssm.A_imag.double())
        C = torch.view_as_complex(ssm.C.double())[0]
        l = torch.arange(40, dtype=torch.float64)
        zoh = 2 * (C[..., None] * ((dt * A).exp() - 1)[..., None] / A[..., None]
                   * torch.exp(dt[..., None] * A[..., None] * l)).sum(1).real
        torch.testing.assert_close(ssm.kernel(40).double(), zoh, rtol=1e-4, atol=1e-5 * zoh.abs().max().item())
        u = torch.randn(2, 32, 40)  # the recurrent view gives the same outputs as the convolution
        state, ys = torch.zeros(2, 32, 32, dtype=torch.cfloat), []
        for t in range(40):
            y, state = ssm.step(u[..., t], state)
            ys.append(y)
        conv = torch.stack([(ssm.kernel(40)[:, :t + 1].flip(-1) * u[..., :t + 1]).sum(-1) for t in range(40)], -1)
        torch.testing.assert_close(torch.stack(ys, -1), conv, rtol=1e-4, atol=1e-4)
    x = torch.randn(2, 17, 32)
    with torch.no_grad():  # y = GELU(K * u + D u) through output_linear, K from the SSM's definition
        K = mixer.diag_kernel.kernel(17)
        u = x.transpose(1, 2).double()
        conv = torch.stack([sum(K[:, s].double() * u[..., t - s] for s in range(t + 1)) for t in range(17)], -1)
        ref = mixer.output_linear(torch.nn.functional.gelu(conv + mixer.D.double()[:, None] * u).transpose(1, 2).float())
        torch.testing.assert_close(mixer(x), ref, rtol=1e-4, atol=1e-5)


def test_synthetic_command(tmp_path, capsys):
    out = tmp_path / "r.json"
    assert main(["synthetic", "--task", "assoc_recall", "--mixer", "s4d", "--n-train", "64", "--n-test", "32",
                 "--epochs", "2", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["task"] == "assoc_recall" and result["mixer"] == "s4d" and len(result["history"]) == 2
    assert (result["vocab_size"], result["seq_len"], result["epochs"]) == (10, 22, 2)  # the paper's shape
    assert 0.0 <= result["test_accuracy"] <= 1.0
    assert f"test accuracy {result['test_accuracy']:.3f}" in capsys.readouterr().out


# The reference setup (400 epochs, loss at every position) takes ~40 min per run on CPU; these runs
# train on the answer only at lr 3e-3 without dropout. Measured on this repository's 2-core CPU
# machine (seed 0, one thread): induction test accuracy h3 1.000 (8 epochs, 35 s), attention 0.906
# (20 epochs, 49 s), s4d 0.134 (6 epochs, 33 s beside two other runs; 0.092 before s4d used the
# reference S4D kernel).
INDUCTION = {"h3": (8, 0.95, 1.0), "attention": (20, 0.8, 1.0), "s4d": (6, 0.0, 0.3)}
FAST = dict(lr=3e-3, dropout=0.0, loss="answer")


@pytest.fixture
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the measured runs used one thread: same arithmetic, same result
    yield
    torch.set_num_threads(threads)


@pytest.mark.slow
@pytest.mark.parametrize("mixer", list(INDUCTION))
def test_induction_accuracy(mixer, one_thread):
    epochs, low, high = INDUCTION[mixer]
    result = run(SyntheticSettings(task="induction", mixer=mixer, epochs=epochs, seed=0, **FAST), log=print)
    print(f"induction {mixer}: test accuracy {result['test_accuracy']:.3f} in {result['seconds']:.0f} s")
    assert low <= result["test_accuracy"] <= high
