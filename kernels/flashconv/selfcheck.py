"""The check that decides H3_FLASHCONV=auto: the Triton kernels against the fp32 reference, forward
and backward, at the shapes and dtype a run will use.

Both sides get the same inputs (rounded to the run's dtype); the reference computes in fp32 through
torch.fft, the kernels accumulate in fp32. What may differ:
- fp32 inputs: the kernels' dots are IEEE fp32, only the summation order differs (~1e-6 of the
  output's scale): tolerance 1e-4.
- bf16/fp16 inputs: the kernels' dots run in tf32 (unit roundoff 2^-11, about 5e-4 per product)
  and their outputs and input gradients are rounded to the input dtype (bf16: 2^-9, about 2e-3):
  a few 1e-3 of the output's scale; tolerance 2e-2. An indexing or chunking error, the failures
  this catches, is of the order of the output itself.
Errors are max |kernel - reference| / max |reference| per tensor: the output, dq, dk, dv, and the
gradients of the shift taps, both skips and the diagonal SSM's dA, dB, C.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 2e-2, torch.float16: 2e-2}


@dataclass
class CheckResult:
    passed: bool
    shapes: dict
    errors: dict[str, float] = field(default_factory=dict)
    tolerance: float = 0.0
    failure: str = ""  # what failed, one line (empty when passed)


def _inputs(batch: int, length: int, channels: int, head_dim: int, d_state: int, dtype: torch.dtype,
            device: torch.device, seed: int) -> dict[str, torch.Tensor]:
    """Random inputs of the run's shapes, from a private generator (the run's RNG is not touched);
    the diagonal SSM from the S4D-Lin initialisation, bilinear discretisation."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    heads, n = channels // head_dim, d_state // 2

    def randn(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen) * scale).to(device)

    dt = torch.exp(torch.rand(heads, 1, generator=gen) * (math.log(0.1) - math.log(1e-3)) + math.log(1e-3))
    A = torch.complex(torch.full((heads, n), -0.5), math.pi * torch.arange(n, dtype=torch.float32).repeat(heads, 1))
    denom = 1 - dt * A / 2
    return {"q": randn(batch, length, channels).to(dtype), "k": randn(batch, length, channels).to(dtype),
            "v": randn(batch, length, channels).to(dtype),
            "taps": randn(channels, d_state, scale=d_state ** -0.5), "shift_skip": randn(channels),
            "dA": ((1 + dt * A / 2) / denom).to(device), "dB": (dt / denom).to(device),
            "C": torch.complex(randn(heads, n), randn(heads, n)), "ssm_skip": randn(heads),
            "dout": randn(batch, length, channels).to(dtype)}


def _run(conv, x: dict[str, torch.Tensor], head_dim: int, upcast: bool) -> dict[str, torch.Tensor]:
    leaves = {k: (v.float() if upcast and not v.is_complex() else v).detach().requires_grad_()
              for k, v in x.items() if k != "dout"}
    out = conv(leaves, head_dim)
    out.backward(x["dout"].to(out.dtype))
    grads = {f"d{k}": v.grad for k, v in leaves.items()}
    return {"out": out.detach(), **grads}


def check(triton_conv, reference_conv, *, batch: int, length: int, channels: int, head_dim: int, d_state: int,
          dtype: torch.dtype, device: torch.device, seed: int = 0) -> CheckResult:
    """triton_conv / reference_conv(tensors, head_dim) -> out: the two implementations of h3_conv."""
    shapes = {"batch": batch, "length": length, "channels": channels, "head_dim": head_dim, "d_state": d_state,
              "dtype": str(dtype).replace("torch.", ""), "device": str(device)}
    tol = TOLERANCE[dtype]
    try:
        x = _inputs(batch, length, channels, head_dim, d_state, dtype, device, seed)
        got = _run(triton_conv, x, head_dim, upcast=False)
        want = _run(reference_conv, x, head_dim, upcast=True)
    except Exception as err:  # noqa: BLE001 - any failure of the kernels means "do not use them"
        return CheckResult(False, shapes, tolerance=tol, failure=f"raised {type(err).__name__}: {str(err)[:300]}")
    errors, bad = {}, []
    for name, ref in want.items():
        value = got[name]
        if value is None or ref is None:
            bad.append(f"{name} missing")
            continue
        scale = ref.abs().max().item() or 1.0
        err = ((value.to(ref.dtype) - ref).abs().max().item()) / scale
        errors[name] = err
        if not math.isfinite(err) or err > tol:
            bad.append(f"{name} off by {err:.3g} of its scale (tolerance {tol:g})")
    failure = "; ".join(bad)
    return CheckResult(not bad, shapes, errors, tol, failure)
