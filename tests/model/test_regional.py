"""Activation recompute and regional torch.compile (h3pretrain/model/regional.py) on CPU: recompute
gives the gradients of no recompute bit for bit (dropout included); compiled blocks have no graph
break and match eager to 1e-5; the plan's memory estimate follows the recompute mode."""
import pytest
import torch

from conftest import tiny_config
from h3pretrain.config import Config, preset
from h3pretrain.model import HybridLM
from h3pretrain.model.layers import LayerFactory
from h3pretrain.model.lm import Block
from h3pretrain.model.regional import apply_compile, apply_recompute, saved_ops

CFG = dict(n_layer=4, attn_layer_idx=[1], ssm_head_dim=2, embed_dropout=0.1, attn_dropout=0.1, resid_dropout=0.1)


def loss_and_grads(recompute: str, compiled: bool = False):
    torch.manual_seed(0)
    model = HybridLM(tiny_config(**CFG))
    blocks = list(model.backbone.layers.values())
    apply_recompute(blocks, recompute)
    if compiled:
        apply_compile(blocks)
    ids = torch.randint(0, 97, (3, 49), generator=torch.Generator().manual_seed(1))
    torch.manual_seed(2)  # the dropout masks
    loss = model.loss(model(ids[:, :-1]), ids[:, 1:])
    loss.backward()
    return loss.detach(), {name: p.grad for name, p in model.named_parameters()}


@pytest.fixture(scope="module")
def eager():
    return loss_and_grads("none")


@pytest.mark.parametrize("mode", ["block", "selective"])
def test_recompute_gives_bitwise_equal_gradients(eager, mode):
    loss, grads = loss_and_grads(mode)
    assert torch.equal(loss, eager[0])
    assert grads.keys() == eager[1].keys()
    for name, g in grads.items():
        assert torch.equal(g, eager[1][name]), name


def test_selective_recompute_keeps_matmuls_and_kernels():
    names = {str(op) for op in saved_ops()}
    assert {"aten.mm.default", "aten.addmm.default", "aten.bmm.default", "flashconv.ssm_scan.default",
            "flashconv.shift_fir.default"} <= names
    assert not {n for n in names if "fft" in n or "layer_norm" in n or "gelu" in n or "dropout" in n}


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["h3", "attention"])
def test_a_block_compiles_as_one_graph(kind):
    torch.manual_seed(0)
    block = Block(tiny_config(ssm_head_dim=2, attn_rotary_dim=4), 0, kind, LayerFactory())
    x = torch.randn(2, 24, 32)
    explained = torch._dynamo.explain(block)(x)
    assert (explained.graph_count, explained.graph_break_count) == (1, 0), explained.break_reasons
    torch.testing.assert_close(torch.compile(block, fullgraph=True)(x), block(x), rtol=1e-5, atol=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("recompute", ["none", "selective"])
def test_compiled_model_matches_eager(eager, recompute):
    """fp32, dropout on (the compiled blocks draw their masks from torch's generator)."""
    loss, grads = loss_and_grads(recompute, compiled=True)
    assert abs(loss.item() - eager[0].item()) <= 1e-5 * abs(eager[0].item())
    for name, g in grads.items():
        ref = eager[1][name]
        rel = ((g - ref).abs().max() / ref.abs().max().clamp_min(1e-30)).item()
        assert rel <= 1e-5, f"{name}: relative difference {rel:.2e}"


def test_plan_memory_follows_recompute():
    from h3pretrain.parallel.plan import layer_activation_bytes, plan

    activations = {}
    for mode in ("none", "block", "selective"):
        cfg = Config(model=preset("125m"))
        cfg.train.recompute, cfg.train.micro_batch, cfg.train.global_batch = mode, 4, 32
        (_, (stage,), _) = plan(cfg, 8, 2048)
        activations[mode] = stage.activation_bytes
    assert activations["none"] > activations["selective"] > activations["block"]
    m, tokens = preset("125m"), 4 * 2048
    kinds = m.layer_kinds()
    logits = 16 * tokens * m.padded_vocab_size  # fp32 logits, log-softmax and both gradients
    largest = max(layer_activation_bytes(m, k, 2048, 1, "none") for k in kinds) * tokens
    assert activations["block"] == pytest.approx(len(kinds) * 4 * m.d_model * tokens + largest + logits)
    h3_selective = 4 * m.d_model + 18 * m.d_model
    assert layer_activation_bytes(m, "h3", 2048, 1, "selective") == h3_selective


def _failing_backend(monkeypatch, where: str):
    """inductor raises while compiling the forward graph ("forward") or the backward one ("backward")."""
    import torch._inductor.compile_fx as compile_fx

    def broken(*args, **kwargs):
        raise RuntimeError(f"planted {where} failure")

    monkeypatch.setattr(compile_fx, "compile_fx" if where == "forward" else "compile_fx_backward", broken)


@pytest.mark.parametrize("where", ["forward", pytest.param("backward", marks=pytest.mark.slow)])
def test_auto_compile_that_fails_falls_back_to_eager_with_one_warning(eager, monkeypatch, caplog, where):
    """train.compile=auto semantics (strict=False): a compile error turns every block back to eager, the
    call that hit it runs eager, and the results are eager's bit for bit. The backward graph is
    compiled with the forward, so its failure is caught there too, before any backward runs."""
    from h3pretrain.model.regional import CompiledBlocks

    torch._dynamo.reset()
    _failing_backend(monkeypatch, where)
    torch.manual_seed(0)
    model = HybridLM(tiny_config(**CFG))
    blocks = list(model.backbone.layers.values())
    compiling = CompiledBlocks(blocks, strict=False)
    ids = torch.randint(0, 97, (3, 49), generator=torch.Generator().manual_seed(1))
    torch.manual_seed(2)
    with caplog.at_level("WARNING", logger="h3pretrain.train"):
        loss = model.loss(model(ids[:, :-1]), ids[:, 1:])
    loss.backward()
    assert not compiling.active and f"RuntimeError: planted {where} failure" in compiling.failure
    assert compiling.failure.startswith("BackendCompilerFailed")
    assert [r.getMessage().count("torch.compile failed") for r in caplog.records] == [1]
    assert all(b._compiled_call_impl is None for b in blocks)
    assert torch.equal(loss.detach(), eager[0])
    for name, p in model.named_parameters():
        assert torch.equal(p.grad, eager[1][name]), name


def test_strict_compile_raises(monkeypatch):
    from h3pretrain.model.regional import CompiledBlocks, compile_errors

    torch._dynamo.reset()
    _failing_backend(monkeypatch, "forward")
    model = HybridLM(tiny_config(**CFG))
    CompiledBlocks(list(model.backbone.layers.values()), strict=True)
    with pytest.raises(compile_errors()):
        model(torch.zeros(1, 8, dtype=torch.long))
