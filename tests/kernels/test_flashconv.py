"""FlashConv kernels under TRITON_INTERPRET=1 (CPU, small sizes) against the torch references."""
import os

import pytest
import torch

from flashconv.reference import causal_conv

_before = os.environ.get("TRITON_INTERPRET")
os.environ["TRITON_INTERPRET"] = "1"  # while the kernels are defined: triton.jit reads it then
from flashconv import shift_fir as fir_module  # noqa: E402
from flashconv.shift_fir import kernels_available, shift_fir_kernel, shift_fir, shift_fir_reference  # noqa: E402
from flashconv.ssm_scan import h3_ssm_reference, h3_ssm_scan  # noqa: E402
from flashconv import reference, step  # noqa: E402

if _before is None:  # the rest of the test session (and its subprocesses) keep their environment
    del os.environ["TRITON_INTERPRET"]
else:
    os.environ["TRITON_INTERPRET"] = _before



@pytest.fixture(autouse=True)
def _interpret(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # triton also reads it at every launch


TOL = {torch.float32: (1e-5, 1e-5), torch.bfloat16: (2e-2, 2e-2), torch.float16: (5e-3, 5e-3)}


@pytest.mark.parametrize("L", [1, 7, 63, 64, 65, 200])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_shift_fir_forward_and_backward_match_reference(L, dtype):
    assert kernels_available(torch.device("cpu"))
    torch.manual_seed(L)
    B, C, N = 2, 40, 16
    u = torch.randn(B, L, C).to(dtype).requires_grad_()
    taps = torch.randn(C, N, requires_grad=True)
    skip = torch.randn(C, requires_grad=True)
    y = shift_fir_kernel(u, taps, skip)
    u_ref = u.detach().float().requires_grad_()
    taps_ref, skip_ref = taps.detach().clone().requires_grad_(), skip.detach().clone().requires_grad_()
    y_ref = shift_fir_reference(u_ref, taps_ref, skip_ref)
    assert y.dtype == torch.float32
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)  # fp32 accumulation of the same inputs
    dy = torch.randn_like(y_ref)
    y.backward(dy)
    y_ref.backward(dy)
    rtol, atol = TOL[dtype]
    torch.testing.assert_close(u.grad.float(), u_ref.grad, rtol=rtol, atol=atol)
    torch.testing.assert_close(taps.grad, taps_ref.grad, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(skip.grad, skip_ref.grad, rtol=1e-4, atol=1e-4)


def test_shift_fir_with_64_taps_and_fallback(monkeypatch):
    torch.manual_seed(0)
    u, taps, skip = torch.randn(1, 130, 33), torch.randn(33, 64), torch.randn(33)
    torch.testing.assert_close(shift_fir(u, taps, skip), shift_fir_reference(u, taps, skip), rtol=1e-5, atol=1e-5)
    monkeypatch.setattr(fir_module, "INTERPRETED", False)  # without a GPU or the interpreter: the reference
    assert not kernels_available(torch.device("cpu"))
    assert torch.equal(shift_fir(u, taps, skip), shift_fir_reference(u, taps, skip))


@pytest.fixture
def ssm():
    from h3pretrain.model.ssm import DiagSSMKernel

    torch.manual_seed(0)
    kernel = DiagSSMKernel(num_heads=3, d_state=8)
    with torch.no_grad():  # slower decay than the init so that states matter over a few chunks
        kernel.log_dt.fill_(-4.0)
    return kernel


@pytest.mark.parametrize("L", [1, 5, 15, 16, 17, 56])
@pytest.mark.parametrize("head_dim", [1, 4])
def test_state_passing_equals_single_shot(ssm, L, head_dim):
    from flashconv.state_passing import chunked_ssm_conv

    chunk = 16
    u = torch.randn(2, 3, head_dim, head_dim, L, requires_grad=True)  # (B, H, d1, d2, L) like k' (x) v
    dA, dB, C = ssm.discretize()
    y, state = chunked_ssm_conv(u, dA, dB, C, chunk)
    full = causal_conv(u, ssm.kernel(L).view(3, 1, 1, L))
    torch.testing.assert_close(y, full, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(state, ssm.final_state(u), rtol=1e-4, atol=1e-5)
    g = torch.randn_like(y)
    wrt = [u, ssm.log_dt, ssm.inv_A_real, ssm.C]
    grads = torch.autograd.grad(y, wrt, g)
    grads_full = torch.autograd.grad(full, wrt, g)
    for name, a, b in zip(["u", "log_dt", "inv_A_real", "C"], grads, grads_full):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4 * b.abs().max().item(), msg=lambda m, n=name: f"{n}: {m}")


def test_context_parallel_pieces_combine_to_the_whole(ssm):
    """Four pieces computed independently from zero state, corrected with the combined states."""
    from flashconv.state_passing import chunked_ssm_conv, combine_states, state_correction

    lengths = [12, 7, 20, 9]
    u = torch.randn(2, 3, sum(lengths))
    dA, dB, C = ssm.discretize()
    pieces = list(u.split(lengths, dim=-1))
    local = [chunked_ssm_conv(p, dA, dB, C, chunk=8) for p in pieces]
    entering = combine_states([s for _, s in local], lengths, dA)
    out = [y if x is None else y + state_correction(x, dA, C, y.shape[-1]) for (y, _), x in zip(local, entering)]
    full = causal_conv(u, ssm.kernel(u.shape[-1]).view(3, 1, -1)[:, 0])
    torch.testing.assert_close(torch.cat(out, -1), full, rtol=1e-4, atol=1e-5)



@pytest.mark.parametrize("head_dim", [1, 2])
def test_h3_conv_pieces_equal_the_whole_sequence(head_dim):
    """What each context-parallel rank computes: its piece with the k history before it (shorter
    pieces than the FIR's reach included) and the combined entering state; values and gradients."""
    from flashconv.reference import h3_conv_reference
    from flashconv.state_passing import combine_states, h3_conv_piece
    from h3pretrain.model.ssm import DiagSSMKernel

    torch.manual_seed(head_dim)
    B, D, N, lengths = 2, 8, 8, [5, 3, 9, 6]
    H = D // head_dim
    diag = DiagSSMKernel(H, N)
    with torch.no_grad():
        diag.log_dt.fill_(-3.0)
    q, k, v = (torch.randn(B, sum(lengths), D, requires_grad=True) for _ in range(3))
    taps, skip, D_skip = torch.randn(D, N), torch.randn(D), torch.randn(H)
    whole = h3_conv_reference(q, k, v, taps, skip, diag.kernel(sum(lengths)), D_skip, head_dim)

    discrete = diag.discretize()
    local_states: dict[int, torch.Tensor] = {}
    starts = [sum(lengths[:i]) for i in range(len(lengths))]
    # pass 1: each piece's final state from zero (what the all-gather collects)
    for i, (s, T) in enumerate(zip(starts, lengths)):
        h3_conv_piece(q[:, s:s + T], k[:, s:s + T], v[:, s:s + T], taps, skip, discrete, D_skip, head_dim,
                      k[:, max(0, s - N + 1):s], lambda x, i=i: local_states.update({i: x}))
    entering = combine_states([local_states[i] for i in range(len(lengths))], lengths, discrete[0])
    pieces = [h3_conv_piece(q[:, s:s + T], k[:, s:s + T], v[:, s:s + T], taps, skip, discrete, D_skip, head_dim,
                            k[:, max(0, s - N + 1):s] if s else None, lambda x, i=i: entering[i])
              for i, (s, T) in enumerate(zip(starts, lengths))]
    got = torch.cat(pieces, dim=1)
    torch.testing.assert_close(got, whole, rtol=1e-4, atol=1e-5)
    g = torch.randn_like(whole)
    wrt = [q, k, v, diag.log_dt, diag.C]
    for name, a, b in zip("q k v log_dt C".split(), torch.autograd.grad(got, wrt, g), torch.autograd.grad(whole, wrt, g)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4 * b.abs().max().item(), msg=lambda m, n=name: f"{n}: {m}")
    # without the entering state the later pieces are wrong: the test can tell
    alone = h3_conv_piece(q[:, 8:17], k[:, 8:17], v[:, 8:17], taps, skip, discrete, D_skip, head_dim,
                          k[:, 1:8], lambda x: None)
    assert (alone - whole[:, 8:17]).abs().max() > 1e-2


@pytest.mark.parametrize("L", [1, 15, 16, 17, 50])
@pytest.mark.parametrize("head_dim", [1, 2, 4, 8])
def test_ssm_scan_kernel_matches_reference(L, head_dim):
    """The fused chunked-scan kernel (chunks of 16) vs torch.fft: output and the gradients of q, k',
    v, the SSM parameters and D, for L below, at and across chunk boundaries."""
    from h3pretrain.model.ssm import DiagSSMKernel

    torch.manual_seed(10 * L + head_dim)
    B, D, N = 3, 8, 32
    H = D // head_dim
    ssm = DiagSSMKernel(H, N)
    with torch.no_grad():
        ssm.log_dt.fill_(-3.0)  # slow decay: the state carried between chunks matters
    skip = torch.randn(H, requires_grad=True)
    q, k, v = (torch.randn(B, L, D, requires_grad=True) for _ in range(3))
    got = h3_ssm_scan(q, k, v, ssm.discretize(), skip, head_dim, chunk=16)
    ref = h3_ssm_reference(q, k, v, ssm.discretize(), skip, head_dim)
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-5)
    g = torch.randn_like(ref)
    wrt = [q, k, v, skip, ssm.log_dt, ssm.inv_A_real, ssm.A_imag, ssm.B, ssm.C]
    names = "q k v D log_dt inv_A_real A_imag B C".split()
    for name, a, b in zip(names, torch.autograd.grad(got, wrt, g), torch.autograd.grad(ref, wrt, g)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4 * b.abs().max().item() + 1e-6,
                                   msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("head_dim", [1, 8])
def test_ssm_scan_kernel_half_precision_inputs(dtype, head_dim):
    """bf16/fp16 q, k', v: the kernel computes in fp32 from the rounded inputs (output as close as in
    fp32), and returns their gradients in the input dtype (within that dtype's rounding)."""
    from h3pretrain.model.ssm import DiagSSMKernel

    torch.manual_seed(head_dim)
    B, L, D, N = 2, 41, 16, 32
    H = D // head_dim
    ssm = DiagSSMKernel(H, N)
    with torch.no_grad():
        ssm.log_dt.fill_(-3.0)
    skip = torch.randn(H)
    q, k, v = (torch.randn(B, L, D).to(dtype).requires_grad_() for _ in range(3))
    got = h3_ssm_scan(q, k, v, ssm.discretize(), skip, head_dim, chunk=16)
    q32, k32, v32 = (x.detach().float().requires_grad_() for x in (q, k, v))
    ref = h3_ssm_reference(q32, k32, v32, ssm.discretize(), skip, head_dim)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-5)
    g = torch.randn_like(ref)
    got.backward(g)
    ref.backward(g)
    rtol, atol = TOL[dtype]
    for name, a, b in (("q", q, q32), ("k", k, k32), ("v", v, v32)):
        assert a.grad.dtype == dtype
        torch.testing.assert_close(a.grad.float(), b.grad, rtol=rtol, atol=atol * b.grad.abs().max().item(),
                                   msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.parametrize("head_dim", [1, 4])
def test_h3_conv_triton_implementation_matches_reference(head_dim):
    """flashconv.h3_conv with H3_FLASHCONV=triton (FIR kernel + fused scan) vs the torch.fft path,
    through a whole H3 mixer: outputs and parameter gradients."""
    import flashconv
    from h3pretrain.model.h3 import H3

    torch.manual_seed(head_dim)
    mixer = H3(16, d_state=32, head_dim=head_dim)
    with torch.no_grad():
        mixer.diag_kernel.log_dt.fill_(-3.0)
    x = torch.randn(2, 70, 16)
    outs, grads = [], []
    for impl in ("reference", "triton"):
        flashconv.set_implementation(impl)
        try:
            assert flashconv.implementation(x.device) == impl
            y = mixer(x)
        finally:
            flashconv.set_implementation("reference")
        outs.append(y)
        grads.append(torch.autograd.grad(y.square().sum(), list(mixer.parameters())))
    torch.testing.assert_close(outs[1], outs[0], rtol=1e-4, atol=1e-5)
    for (name, _), a, b in zip(mixer.named_parameters(), grads[1], grads[0]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4 * b.abs().max().item() + 1e-6,
                                   msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.parametrize("position", [0, 5, 15, 16, 37, 130])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_shift_step_kernel_matches_reference(position, dtype):
    torch.manual_seed(position)
    B, C, N = 3, 40, 16  # 40 channels: a partial block of 32
    ring = torch.randn(B, C, N)
    taps, skip, k = torch.randn(C, N), torch.randn(C), torch.randn(B, C).to(dtype)
    pos = torch.tensor(position)
    assert step.kernels_apply(ring, N)
    ring_ref = ring.clone()
    y_ref = reference.shift_step(ring_ref, taps, skip, k, pos)
    y = step.shift_step(ring, taps, skip, k, pos)
    torch.testing.assert_close(ring, ring_ref, rtol=0, atol=0)  # the new k in slot position mod N
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)


def test_shift_steps_follow_the_fir_over_a_sequence():
    """Stepping token by token through the ring buffer gives the shift SSM's causal FIR."""
    torch.manual_seed(0)
    B, C, N, L = 2, 8, 16, 40
    u, taps, skip = torch.randn(B, L, C), torch.randn(C, N), torch.randn(C)
    ring = torch.zeros(B, C, N)
    ys = torch.stack([step.shift_step(ring, taps, skip, u[:, t], torch.tensor(t)) for t in range(L)], dim=1)
    torch.testing.assert_close(ys, shift_fir_reference(u, taps, skip), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("inner", [(), (2, 2)])
@pytest.mark.parametrize("with_skip", [True, False])
def test_ssm_step_kernel_matches_reference(inner, with_skip):
    torch.manual_seed(len(inner))
    B, H, n = 2, 5, 8
    discrete = tuple(torch.randn(H, n, dtype=torch.cfloat) * 0.5 for _ in range(3))
    state = torch.randn(B, H, *inner, n, dtype=torch.cfloat)
    u = torch.randn(B, H, *inner)
    skip = torch.randn(H) if with_skip else None
    state_ref = state.clone()
    y_ref = reference.ssm_step(state_ref, discrete, u, skip)
    assert step.kernels_apply(state, n)
    y = step.ssm_step(state, discrete, u, skip)
    torch.testing.assert_close(state, state_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("head_dim", [1, 2])
def test_generation_with_triton_steps_matches_the_full_forward(head_dim, monkeypatch):
    """With H3_FLASHCONV=triton the decode steps run the step kernels; pinned host counts emulate a
    CUDA graph replay (see test_model.test_decode_steps_replay_like_a_cuda_graph)."""
    import flashconv
    from conftest import tiny_config
    from h3pretrain.generate import Decoder
    from h3pretrain.model import HybridLM

    torch.manual_seed(head_dim)
    model = HybridLM(tiny_config(ssm_head_dim=head_dim, ssm_d_state=16, attn_rotary_dim=4)).eval()
    ids = torch.randint(0, 97, (2, 30))
    with torch.no_grad():
        full = model(ids)
    def unfused(*args, **kw):
        raise AssertionError("a decode step fell back to the torch reference")

    flashconv.set_implementation("triton")
    try:
        decoder = Decoder(model, 2, 30)
        decoder.cache.static_shapes = True
        monkeypatch.setattr(flashconv.reference, "shift_step", unfused)
        monkeypatch.setattr(flashconv.reference, "ssm_step", unfused)
        logits = [decoder.prefill(ids[:, :20])]
        pinned = decoder.cache.seqlen_offset
        for t in range(20, 30):
            decoder.cache.seqlen_offset = pinned
            logits.append(decoder.step(ids[:, t]))
    finally:
        flashconv.set_implementation("reference")
    scale = full.abs().max()
    torch.testing.assert_close(torch.stack(logits, 1) / scale, full[:, 19:] / scale, rtol=0, atol=1e-5)


def test_scan_launch_retries_with_one_stage_when_shared_memory_runs_out():
    """ssm_scan._launch: an OutOfResources launch is repeated without software pipelining, and the
    choice is remembered for that kernel and configuration."""
    from triton.runtime.errors import OutOfResources

    from flashconv import ssm_scan

    calls = []

    class FakeKernel:
        fn = type("fn", (), {"__name__": "fake_kernel"})

        def __getitem__(self, grid):
            def launch(*args, **kw):
                calls.append(kw.get("num_stages"))
                if "num_stages" not in kw:
                    raise OutOfResources(253952, 232448, "shared memory")
            return launch

    x = torch.zeros(1)
    ssm_scan._launch(FakeKernel(), (1,), x, HD=8, IEEE=True)
    ssm_scan._launch(FakeKernel(), (1,), x, HD=8, IEEE=True)
    assert calls == [None, 1, 1]  # the second launch goes straight to one stage
    ssm_scan._launch(FakeKernel(), (1,), x, HD=1, IEEE=True)
    assert calls[-2:] == [None, 1]  # another configuration tries the default first


@pytest.fixture
def restore_choice():
    import flashconv

    before, checked = flashconv.chosen(), dict(flashconv._checked)
    yield flashconv
    flashconv.set_implementation(before)
    flashconv._checked.clear()
    flashconv._checked.update(checked)


@pytest.mark.slow
def test_h3_block_with_the_kernels_compiles_without_a_graph_break(restore_choice):
    """The kernels are custom ops with fake implementations: dynamo captures an H3 block whole, and
    the compiled block (inductor, CPU) computes what the eager one does."""
    from conftest import tiny_config
    from h3pretrain.model.layers import LayerFactory
    from h3pretrain.model.lm import Block

    flashconv = restore_choice
    flashconv.set_implementation("triton")
    torch.manual_seed(0)
    block = Block(tiny_config(ssm_head_dim=2), 0, "h3", LayerFactory())
    x = torch.randn(2, 40, 32, requires_grad=True)
    explained = torch._dynamo.explain(block)(x)
    assert (explained.graph_count, explained.graph_break_count) == (1, 0), explained.break_reasons
    ops = {str(n.target) for g in explained.graphs for n in g.graph.nodes if n.op == "call_function"}
    assert {"flashconv.shift_fir.default", "flashconv.ssm_scan.default"} <= ops, ops
    compiled = torch.compile(block, fullgraph=True)
    y = compiled(x)
    (gx,) = torch.autograd.grad(y.square().sum(), x)
    y_ref = block(x)
    (gx_ref,) = torch.autograd.grad(y_ref.square().sum(), x)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gx, gx_ref, rtol=1e-5, atol=1e-6)


SHAPES = dict(batch=2, length=70, channels=16, head_dim=2, d_state=32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_self_check_passes_for_the_kernels(restore_choice, dtype):
    flashconv = restore_choice
    result = flashconv.self_check(torch.device("cpu"), **SHAPES, dtype=dtype)
    assert result.passed, result.failure
    assert set(result.errors) == {"out", "dq", "dk", "dv", "dtaps", "dshift_skip", "ddA", "ddB", "dC", "dssm_skip"}
    assert max(result.errors.values()) < result.tolerance


def test_self_check_fails_for_a_broken_kernel_and_auto_keeps_the_reference(restore_choice, monkeypatch):
    flashconv = restore_choice
    flashconv.set_implementation("auto")
    flashconv._checked.clear()
    assert flashconv.implementation(torch.device("cpu")) == "reference"  # unchecked: reference
    good = flashconv.self_check(torch.device("cpu"), **SHAPES, dtype=torch.float32)
    flashconv.mark_checked(torch.device("cpu"), good.passed)
    assert flashconv.implementation(torch.device("cpu")) == "triton"

    from flashconv import ssm_scan

    real = ssm_scan.h3_ssm_scan
    monkeypatch.setattr(ssm_scan, "h3_ssm_scan", lambda *a, **k: real(*a, **k) * 1.1)  # 10% off
    bad = flashconv.self_check(torch.device("cpu"), **SHAPES, dtype=torch.bfloat16)
    assert not bad.passed and "out off by" in bad.failure

    def raising(*a, **k):
        raise RuntimeError("PTX not supported")

    monkeypatch.setattr(ssm_scan, "h3_ssm_scan", raising)
    broken = flashconv.self_check(torch.device("cpu"), **SHAPES, dtype=torch.float32)
    assert not broken.passed and broken.failure == "raised RuntimeError: PTX not supported"
    flashconv.mark_checked(torch.device("cpu"), broken.passed)
    assert flashconv.implementation(torch.device("cpu")) == "reference"
    unsupported = flashconv.self_check(torch.device("cpu"), **{**SHAPES, "head_dim": 3, "channels": 15},
                                       dtype=torch.float32)
    assert not unsupported.passed and "do not cover head_dim 3" in unsupported.failure
