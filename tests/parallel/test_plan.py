"""`h3pretrain plan` for long context: per-layer-kind activations per rank, the ring attention's
footprint, and the verdict for a 1M-token sequence on 8 GPUs of 80 GB."""
import pytest

from h3pretrain.config import Config, preset
from h3pretrain.parallel.plan import layer_activation_bytes, plan, report


def test_ring_attention_keeps_no_scores_and_the_math_path_does():
    m = preset("125m")
    ring = [layer_activation_bytes(m, "attention", L, 1, "none", cp=8) for L in (8192, 1 << 20)]
    assert ring[0] == ring[1]  # per token, whatever the sequence's length
    m.attn_dropout = 0.1
    math = [layer_activation_bytes(m, "attention", L, 1, "none", cp=1, precision="fp32") for L in (8192, 16384)]
    assert math[1] - math[0] == pytest.approx(2 * 5 * m.attn_num_heads * 8192)  # fp32 scores, softmax, mask
    m.attn_dropout = 0.0
    assert layer_activation_bytes(m, "attention", 16384, 1, "none", cp=1, precision="fp32") == \
        layer_activation_bytes(m, "attention", 8192, 1, "none", cp=1, precision="fp32")  # the flash kernel
    assert layer_activation_bytes(m, "h3", 4096, 1, "none", precision="fp32") > layer_activation_bytes(
        m, "h3", 4096, 1, "none", precision="bf16")


def _long(name: str, recompute: str) -> Config:
    cfg = Config()
    cfg.model = preset(name)
    cfg.parallel.cp = 8
    cfg.train.micro_batch = cfg.train.global_batch = 1
    cfg.train.recompute = recompute
    return cfg


@pytest.mark.parametrize("name, recompute, seq_len, verdict", [
    ("125m", "block", 1 << 18, "fits"), ("125m", "block", 1 << 20, "does not fit"),
    ("125m", "none", 1 << 19, "does not fit"), ("1.3b", "block", 1 << 20, "does not fit")])
def test_long_sequences_on_eight_gpus(name, recompute, seq_len, verdict):
    cfg = _long(name, recompute)
    text = report(cfg, 8, seq_len, gpu_memory_gb=80)
    assert (f"activations per rank, one micro-batch ({seq_len // 8:,} tokens of {seq_len:,} per rank; GiB; bf16):"
            in text)
    assert f"{verdict} on GPUs of 80 GB with train.recompute={recompute}: the largest stage needs " in text
    _, stages, _ = plan(cfg, 8, seq_len)
    need = max(s.total_gib for s in stages) * 2**30 / 1e9
    assert (need <= 80) == (verdict == "fits")
    logits = 16 * cfg.model.padded_vocab_size * seq_len / 8 / 1e9  # fp32 logits, log-softmax, both gradients
    assert f"needs {need:.1f} GB (before allocator fragmentation and kernel workspaces), of which the last stage's " \
           f"logits {logits:.1f} GB" in text
    for kind in ("h3 (x", "attention (x", "ring backward", "logits (last)"):
        assert kind in text
