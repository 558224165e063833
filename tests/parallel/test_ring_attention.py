"""Ring attention: its blocks against autograd of plain attention (with dropout too), and over 2 and 4
gloo ranks against one process's causal attention of the whole sequence."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from h3pretrain.parallel import ring_attention as ring

PROBE = Path(__file__).with_name("ring_probe.py")


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("p", [0.0, 0.25])
def test_a_math_block_and_its_backward_match_autograd(causal, p):
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, 6, 4, generator=gen, requires_grad=True) for _ in range(3))
    if not causal:
        k, v = (torch.randn(2, 3, 9, 4, generator=gen, requires_grad=True) for _ in range(2))
    out, lse = ring.math_forward(q, k, v, causal, p, seed=5)
    grad = torch.randn(out.shape, generator=gen)
    out.backward(grad)
    dq, dk, dv = ring.math_backward(grad, q.detach(), k.detach(), v.detach(), out.detach(), lse.detach(), causal, p,
                                    seed=5)
    for got, want in ((dq, q.grad), (dk, k.grad), (dv, v.grad)):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    if not p:
        reference = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
        torch.testing.assert_close(out, reference, rtol=1e-5, atol=1e-6)


def test_dropout_masks_differ_between_seeds_and_keep_the_mean():
    keep = ring._dropout_keep((64, 64), 0.25, seed=1, device="cpu")
    assert torch.equal(keep, ring._dropout_keep((64, 64), 0.25, seed=1, device="cpu"))
    assert not torch.equal(keep, ring._dropout_keep((64, 64), 0.25, seed=2, device="cpu"))
    assert keep.unique().tolist() == pytest.approx([0.0, 1 / 0.75]) and abs(keep.mean().item() - 1.0) < 0.05


def test_merging_two_halves_of_a_row_is_the_softmax_of_the_whole():
    gen = torch.Generator().manual_seed(1)
    q, k, v = torch.randn(1, 2, 5, 4, generator=gen), torch.randn(1, 2, 10, 4, generator=gen), torch.randn(
        1, 2, 10, 4, generator=gen)
    a, b = ring.math_forward(q, k[:, :, :4], v[:, :, :4], False), ring.math_forward(q, k[:, :, 4:], v[:, :, 4:], False)
    out, lse = ring.merge(*a, *b)
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(lse, ring.math_forward(q, k, v, False)[1])


@pytest.mark.slow
@pytest.mark.parametrize("cp", [2, 4])
def test_ring_attention_over_ranks_equals_one_process(tmp_path, cp):
    out = tmp_path / "errors.json"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={cp}",
                           str(PROBE), str(out)], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]
    errors = json.loads(out.read_text())
    assert sorted(errors) == sorted(f"{k} {n}" for k in ("fused", "math") for n in ("out", "dq", "dk", "dv"))
    assert max(errors.values()) < 1e-5, errors
