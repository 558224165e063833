"""Third-party messages that every run would print and that say nothing to our users: filtered by
their exact text and origin, so that any other warning (ours above all) still shows.

- megatron-core, four times at import: "Transformer Engine and Apex are not installed ..." (we
  do not use its fused optimizers or multi-tensor kernels);
- DeepSpeed, at the first learning-rate read: "Attempting to get learning rate from scheduler
  before it has started" (the trainer starts the schedule itself, see the training engine);
- DeepSpeed ZeRO-3, at every gather: torch's FutureWarning that `all_gather_into_tensor` is
  deprecated (DeepSpeed's call, not ours);
- torch inductor, per compiled H3 block: "does not support code generation for complex operators"
  (the reference convolution's kernel generation stays in eager kernels, as intended);
- torch, with selective recompute under torch.compile: "context_fn is passed to
  torch.utils.checkpoint" (the recomputed regions have no in-place operations).
"""
from __future__ import annotations

import logging
import warnings

_WARNINGS = (
    (r"Transformer Engine and Apex are not installed", UserWarning),
    (r"Torchinductor does not support code generation for complex operators", UserWarning),
    (r"`torch\.distributed\.all_gather_into_tensor` is deprecated", FutureWarning),
)
_LOG_RECORDS = {
    "DeepSpeed": "Attempting to get learning rate from scheduler before it has started",
    "torch._higher_order_ops.wrap": "Detected that context_fn is passed to torch.utils.checkpoint",
}


class _DropMessage(logging.Filter):
    def __init__(self, text: str):
        super().__init__()
        self.text = text

    def filter(self, record: logging.LogRecord) -> bool:
        return self.text not in record.getMessage()


def silence_third_party_noise() -> None:
    """Idempotent; call before megatron-core or DeepSpeed is imported."""
    for message, category in _WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category)
    for name, text in _LOG_RECORDS.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropMessage) and f.text == text for f in logger.filters):
            logger.addFilter(_DropMessage(text))
