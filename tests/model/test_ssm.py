"""The SSM kernels against their definitions (docs/design.md section 1), in float64 where possible."""
import math

import torch

from flashconv.reference import causal_conv, h3_conv_reference
from h3pretrain.model.ssm import DiagSSMKernel, ShiftSSMKernel


def test_causal_conv_matches_direct_sum():
    u, k = torch.randn(3, 37), torch.randn(3, 37)
    skip = torch.randn(3, 1)
    direct = torch.stack([torch.stack([(k[c, : t + 1].flip(0) * u[c, : t + 1]).sum() for t in range(37)])
                          for c in range(3)]) + skip * u
    torch.testing.assert_close(causal_conv(u, k, skip), direct, rtol=1e-5, atol=1e-5)


def test_shift_taps_equal_the_shift_register():
    """Run x_t = shift(x_{t-1}) + B u_t, y_t = <C, x_t> step by step with a non-trivial B."""
    kern = ShiftSSMKernel(channels=3, d_state=8)
    with torch.no_grad():
        kern.B.normal_()
    u = torch.randn(3, 20)
    x = torch.zeros(3, 8)
    ys = []
    for t in range(20):
        x = torch.cat([torch.zeros(3, 1), x[:, :-1]], dim=1) + kern.B * u[:, t : t + 1]
        ys.append((kern.C[0] * x).sum(-1))
    torch.testing.assert_close(causal_conv(u, kern.taps()), torch.stack(ys, dim=1), rtol=1e-5, atol=1e-5)


def test_shift_taps_are_C_when_B_is_e1():
    kern = ShiftSSMKernel(channels=5, d_state=64)
    torch.testing.assert_close(kern.taps(), kern.C[0].detach())
    bound = 1 / math.sqrt(64)
    assert kern.C.abs().max() <= bound and kern.B.sum() == 5


def _bilinear_kernel_f64(kern: DiagSSMKernel, L: int) -> torch.Tensor:
    dt = torch.exp(kern.log_dt.double())[:, None]
    A = torch.complex(-torch.exp(kern.inv_A_real.double()), kern.A_imag.double())
    dA = (1 + dt * A / 2) / (1 - dt * A / 2)
    Ct = torch.view_as_complex(kern.B.double()) * torch.view_as_complex(kern.C.double())[0] * dt / (1 - dt * A / 2)
    powers = dA[:, :, None] ** torch.arange(L, dtype=torch.float64)
    return 2 * (Ct[:, :, None] * powers).sum(1).real


def test_diag_kernel_is_bilinear_s4d():
    kern = DiagSSMKernel(num_heads=6, d_state=64)
    with torch.no_grad():  # move away from the init so every parameter matters
        kern.inv_A_real.add_(0.1 * torch.randn_like(kern.inv_A_real))
        kern.B.add_(0.1 * torch.randn_like(kern.B))
    for L in (1, 7, 64, 1000):
        torch.testing.assert_close(kern.kernel(L).double(), _bilinear_kernel_f64(kern, L), rtol=1e-4, atol=2e-5)


def test_diag_init_is_s4d_lin():
    kern = DiagSSMKernel(num_heads=4, d_state=64, dt_min=0.001, dt_max=0.1)
    assert kern.inv_A_real.shape == (4, 32) and torch.allclose(kern.inv_A_real, torch.tensor(math.log(0.5)))
    torch.testing.assert_close(kern.A_imag[2], math.pi * torch.arange(32.0))
    assert kern.B.shape == (4, 32, 2) and kern.C.shape == (1, 4, 32, 2)
    assert torch.all(kern.B[..., 0] == 1) and torch.all(kern.B[..., 1] == 0)
    dt = kern.log_dt.exp()
    assert torch.all((dt >= 0.001) & (dt <= 0.1))


def test_diag_recurrence_equals_convolution():
    kern = DiagSSMKernel(num_heads=3, d_state=16)
    u = torch.randn(2, 3, 50)
    conv = causal_conv(u, kern.kernel(50))
    state = torch.zeros(2, 3, 8, dtype=torch.cfloat)
    ys = []
    for t in range(50):
        y, state = kern.step(u[..., t], state)
        ys.append(y)
    torch.testing.assert_close(torch.stack(ys, -1), conv, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(kern.final_state(u, chunk=16), state, rtol=1e-5, atol=1e-5)


def test_h3_conv_head_dim_two_by_hand():
    """Outer-product form for head_dim 2 against explicit loops over (h, d1, d2)."""
    B, L, H, hd = 2, 9, 3, 2
    D = H * hd
    q, k, v = (torch.randn(B, L, D) for _ in range(3))
    taps, k_skip = torch.randn(D, 4), torch.randn(D)
    kernel, skip = torch.randn(H, L), torch.randn(H)
    out = h3_conv_reference(q, k, v, taps, k_skip, kernel, skip, hd)
    ks = causal_conv(k.transpose(1, 2), taps, k_skip[:, None])  # (B, D, L)
    expect = torch.zeros(B, D, L)
    for h in range(H):
        for d2 in range(hd):
            for d1 in range(hd):
                kv = ks[:, h * hd + d1] * v.transpose(1, 2)[:, h * hd + d2]
                y = causal_conv(kv, kernel[h], skip[h])
                expect[:, h * hd + d2] += q.transpose(1, 2)[:, h * hd + d1] * y
    torch.testing.assert_close(out, expect.transpose(1, 2), rtol=1e-5, atol=1e-5)
