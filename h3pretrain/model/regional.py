"""Applied to a built model from outside, block by block (as torchtitan does): activation recompute
and torch.compile. Neither changes a parameter's name, so checkpoints do not see them.

Recompute (`train.recompute`):
- "none": every activation the backward needs is kept.
- "block": each block (norms, mixer, MLP, residual adds) keeps only its input; its forward runs
  again inside the backward.
- "selective": each block keeps the outputs of the operations that are expensive to run again
  (`saved_ops()`: matrix products, i.e. every linear layer and torch's math attention, the fused
  attention kernels, the fused FlashConv kernels, and the in-place all-reduce of tensor
  parallelism) and recomputes everything else (the gathers of sequence and context parallelism
  run again): LayerNorm,
  GELU, dropout, the bf16 casts, rotary, and in the reference convolution its FFTs (memory-bound,
  O(L log L) per channel: a few percent of a block's matmul FLOPs, but their complex spectra are
  the largest activations an H3 block has), the outer product k*v, the q gating, skip terms and
  residual adds.
Dropout replays identically in the recomputation (torch.utils.checkpoint restores the RNG state).

Compile (`train.compile`): every block is compiled on its own (`nn.Module.compile`, in place);
blocks of one kind share one compiled graph. The FlashConv kernels are custom ops, so an H3 block
compiles without a graph break around its convolution.
"""
from __future__ import annotations

import functools
import logging
from typing import Iterable

import torch
from torch import nn
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

from ..config import RECOMPUTE_MODES

log = logging.getLogger("h3pretrain.train")


def _saved_ops() -> set:
    aten = torch.ops.aten
    ops = {aten.mm.default, aten.addmm.default, aten.bmm.default, aten.baddbmm.default}
    for name in ("_scaled_dot_product_flash_attention", "_scaled_dot_product_efficient_attention",
                 "_scaled_dot_product_cudnn_attention", "_scaled_dot_product_flash_attention_for_cpu"):
        if hasattr(aten, name):
            ops.add(getattr(aten, name).default)
    # Collectives that reduce in place (megatron's tensor-parallel all-reduce works on a matmul's
    # kept output, which a recomputation would reduce twice) and out-of-place functional ones are
    # kept. Gathers and reduce-scatters into buffers the caller allocates (sequence and context
    # parallelism) are run again: the caller reads its own new buffer, not a kept result.
    for namespace, names in (("c10d", ("allreduce_", "broadcast_")),
                             ("_c10d_functional", ("all_reduce", "all_gather_into_tensor", "reduce_scatter_tensor"))):
        for name in names:
            try:
                ops.add(getattr(getattr(torch.ops, namespace), name).default)
            except (AttributeError, RuntimeError):
                pass
    import flashconv.shift_fir  # noqa: F401 - registers the custom ops
    import flashconv.ssm_scan  # noqa: F401

    ops |= {torch.ops.flashconv.shift_fir.default, torch.ops.flashconv.ssm_scan.default}
    try:  # flash-attn's own custom op, where it is installed
        ops.add(torch.ops.flash_attn._flash_attn_forward.default)
    except (AttributeError, RuntimeError):
        pass
    return ops


@functools.cache
def saved_ops() -> frozenset:
    """The operations whose outputs `selective` recompute keeps."""
    return frozenset(_saved_ops())


def _policy(ctx, op, *args, **kwargs) -> CheckpointPolicy:
    return CheckpointPolicy.MUST_SAVE if op in saved_ops() else CheckpointPolicy.PREFER_RECOMPUTE


def _selective_contexts():
    return create_selective_checkpoint_contexts(_policy)


def apply_recompute(blocks: Iterable[nn.Module], mode: str) -> None:
    """Wrap each block's forward in activation checkpointing (see the module docstring)."""
    if mode not in RECOMPUTE_MODES:
        raise ValueError(f"recompute mode {mode!r}: expected one of {', '.join(RECOMPUTE_MODES)}")
    if mode == "none":
        return
    extra = {"context_fn": _selective_contexts} if mode == "selective" else {}
    for block in blocks:
        forward = block.forward

        def recomputed(*args, _forward=forward, **kwargs):
            if not torch.is_grad_enabled():  # evaluation, generation: nothing is kept anyway
                return _forward(*args, **kwargs)
            return checkpoint(_forward, *args, use_reentrant=False, **extra, **kwargs)

        block.forward = recomputed


def compile_wanted(setting: bool | str, device: torch.device) -> bool:
    """train.compile: True, False, or "auto" (on when training on CUDA)."""
    return device.type == "cuda" if setting == "auto" else bool(setting)


def apply_compile(blocks: Iterable[nn.Module]) -> None:
    """torch.compile each block in place (parameter names unchanged). Random operations (dropout)
    keep torch's own generator, so a compiled block draws the same masks as in eager mode and a
    checkpoint's RNG state replays them exactly."""
    import torch._inductor.config as inductor_config

    inductor_config.fallback_random = True
    for block in blocks:
        block.compile()


def compile_errors() -> tuple[type[BaseException], ...]:
    """What torch.compile raises when tracing or code generation fails (inductor's errors derive
    from dynamo's BackendCompilerFailed, itself a TorchDynamoException)."""
    from torch._dynamo.exc import TorchDynamoException

    return (TorchDynamoException,)


class CompiledBlocks:
    """Blocks compiled in place (apply_compile). strict=False (train.compile=auto): the first compile
    error in any block's call turns every block back to eager, with one warning, and that call runs
    eager; `failure` then says why. The backward graphs are compiled with their forward (not at the
    first backward), so a failure never surfaces halfway through a backward pass."""

    def __init__(self, blocks: Iterable[nn.Module], strict: bool):
        self.blocks, self.strict = list(blocks), strict
        self.failure: str | None = None
        apply_compile(self.blocks)
        if not strict:
            import torch._functorch.config as functorch_config

            functorch_config.force_non_lazy_backward_lowering = True
            for block in self.blocks:
                self._guard(block)

    @property
    def active(self) -> bool:
        return self.failure is None

    def _guard(self, block: nn.Module) -> None:
        compiled = block._compiled_call_impl

        def call(*args, **kwargs):
            if self.failure is None:
                try:
                    return compiled(*args, **kwargs)
                except compile_errors() as err:
                    self.fall_back(err)
            return block._call_impl(*args, **kwargs)

        block._compiled_call_impl = call

    def fall_back(self, err: BaseException) -> None:
        def first_line(e: BaseException) -> str:
            return f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0][:300]}"

        cause = getattr(err, "inner_exception", None)  # the backend's own error
        self.failure = f"{type(err).__name__} ({first_line(cause)})" if cause is not None else first_line(err)
        log.warning("torch.compile failed (%s); continuing without it (train.compile=auto: set "
                    "train.compile=false to skip compiling, true to stop on such an error)", self.failure)
        for block in self.blocks:
            block._compiled_call_impl = None
