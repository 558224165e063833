"""The two state-space kernels of H3 (docs/design.md section 1), convolution and recurrent views.

ShiftSSMKernel: a state-N shift register, i.e. a learned causal FIR filter of N taps per channel.
DiagSSMKernel:  S4D-Lin diagonal SSM with N/2 complex modes per head, bilinear discretisation.
S4DKernel:      the synthetic tasks' S4D baseline (S4D-Inv, zero-order hold, A shared by channels).

Parameters are stored with the shapes and names of the released checkpoints and stay fp32.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from flashconv.reference import ssm_step
from flashconv.state_passing import final_state, ssm_kernel

# Parameters that get weight decay 0 (docs/design.md section 1); C and D are decayed.
NO_WEIGHT_DECAY = ("log_dt", "inv_A_real", "A_imag", "B")


class ShiftSSMKernel(nn.Module):
    """x_t = shift(x_{t-1}) + B u_t, y_t = <C, x_t>: taps[j] = sum_m B[m] C[m + j] for j < N."""

    def __init__(self, channels: int, d_state: int):
        super().__init__()
        self.d_state = d_state
        B = torch.zeros(channels, d_state)
        B[:, 0] = 1.0
        self.B = nn.Parameter(B)
        bound = 1.0 / math.sqrt(d_state)
        self.C = nn.Parameter(torch.empty(1, channels, d_state).uniform_(-bound, bound))

    def taps(self) -> torch.Tensor:
        """(channels, N) FIR taps, computed directly (no FFT) in fp32."""
        N = self.d_state
        B, C = self.B.float(), self.C[0].float()
        # windows[c, j, m] = C[c, m + j] (zero past N)
        windows = F.pad(C, (0, N)).unfold(-1, N, 1)[:, :N]
        return torch.einsum("cm,cjm->cj", B, windows)


class DiagSSMKernel(nn.Module):
    """S4D-Lin, bilinear: K[l] = 2 Re sum_n C~_n dA_n^l, with
    dt = exp(log_dt), A = -exp(inv_A_real) + i A_imag, dA = (1 + dt A/2) / (1 - dt A/2),
    dB = B dt / (1 - dt A/2), C~ = C dB."""

    def __init__(self, num_heads: int, d_state: int, dt_min: float = 0.001, dt_max: float = 0.1):
        super().__init__()
        n = d_state // 2
        self.log_dt = nn.Parameter(torch.rand(num_heads) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
        self.inv_A_real = nn.Parameter(torch.full((num_heads, n), math.log(0.5)))
        self.A_imag = nn.Parameter(math.pi * torch.arange(n, dtype=torch.float32).repeat(num_heads, 1))
        self.B = nn.Parameter(torch.view_as_real(torch.ones(num_heads, n, dtype=torch.cfloat)).clone())
        self.C = nn.Parameter(torch.view_as_real(torch.randn(1, num_heads, n, dtype=torch.cfloat)).clone())

    def discretize(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(dA, dB, C), each (H, N/2) complex64."""
        dt = torch.exp(self.log_dt.float())[:, None]
        A = torch.complex(-torch.exp(self.inv_A_real.float()), self.A_imag.float())
        denom = 1.0 - dt * A / 2
        dA = (1.0 + dt * A / 2) / denom
        dB = torch.view_as_complex(self.B.float()) * dt / denom
        C = torch.view_as_complex(self.C.float())[0]
        return dA, dB, C

    def kernel(self, length: int) -> torch.Tensor:
        """(H, length) fp32 convolution kernel (no (H, n, L) Vandermonde: see flashconv.state_passing)."""
        return ssm_kernel(self.discretize(), length)

    def final_state(self, u: torch.Tensor, chunk: int = 512) -> torch.Tensor:
        """State after a sequence: x = sum_j dA^(L-1-j) dB u_j.

        u: (B, H, *inner, L) real; returns (B, H, *inner, n) complex64.
        """
        dA, dB, _ = self.discretize()
        return final_state(u, dA, dB, chunk)

    def allocate_state(self, batch_size: int, inner: tuple[int, ...] = ()) -> dict[str, torch.Tensor]:
        """Zeroed generation state: "ssm" (B, H, *inner, n) complex and the step constants "dA",
        "dB", "C" (H, n), which `write_state` fills."""
        H, n = self.log_dt.shape[0], self.C.shape[-2]
        zeros = {"ssm": (batch_size, H, *inner, n), "dA": (H, n), "dB": (H, n), "C": (H, n)}
        return {name: torch.zeros(shape, device=self.C.device, dtype=torch.cfloat) for name, shape in zeros.items()}

    def write_state(self, state: dict[str, torch.Tensor], u: torch.Tensor,
                    discrete: tuple[torch.Tensor, torch.Tensor, torch.Tensor]) -> None:
        """After a prompt u (B, H, *inner, L): its final state and the constants, in place."""
        dA, dB, C = discrete
        state["ssm"].copy_(final_state(u, dA, dB))
        for name, value in zip(("dA", "dB", "C"), discrete):
            state[name].copy_(value)

    def step(self, u: torch.Tensor, state: torch.Tensor,
             discrete: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """One recurrent step, updating `state` in place. u: (B, H, *inner) real; state (B, H, *inner, n)
        complex; `discrete`: this kernel's discretize(), when the caller keeps it. Returns
        y = 2 Re sum_n C_n x_n (without the D skip) and the (same) state tensor."""
        y = ssm_step(state, discrete if discrete is not None else self.discretize(), u)
        return y, state


class S4DKernel(DiagSSMKernel):
    """The S4D layer of the paper's synthetic baseline, as the reference code builds it (safari
    `ssm/s4d.py`): S4D-Inv initialisation (A_n = -1/2 + i N/pi (N/(2n+1) - 1)), A shared by all
    channels, a random B (normalised so that a random C gives unit kernel variance) folded into C,
    and zero-order hold: dA = exp(dt A), dB = (exp(dt A) - 1) / A. Only the parameters differ from
    DiagSSMKernel: kernel, final state and recurrent step are the same functions of (dA, dB, C)."""

    def __init__(self, channels: int, d_state: int, dt_min: float = 0.001, dt_max: float = 0.1):
        nn.Module.__init__(self)
        n = d_state // 2
        modes = torch.arange(n, dtype=torch.float32)
        A = torch.complex(torch.full((n,), -0.5), d_state / math.pi * (d_state / (1 + 2 * modes) - 1))
        B = torch.randn(n, dtype=torch.cfloat)
        B = B / (2 * (B / A).abs().square().sum()).sqrt()
        self.log_dt = nn.Parameter(torch.rand(channels) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
        self.inv_A_real = nn.Parameter(torch.log(-A.real)[None].clone())  # (1, n): shared by all channels
        self.A_imag = nn.Parameter(A.imag[None].clone())
        self.C = nn.Parameter(torch.view_as_real(torch.randn(1, channels, n, dtype=torch.cfloat) * B).clone())

    def discretize(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        dt = torch.exp(self.log_dt.float())[:, None]
        A = torch.complex(-torch.exp(self.inv_A_real.float()), self.A_imag.float())
        dtA = dt * A  # (H, n)
        dA = torch.exp(dtA)
        return dA, (dA - 1.0) / A, torch.view_as_complex(self.C.float())[0]
