import pytest
import torch

from conftest import tiny_config
from h3pretrain.generate import CUDAGraphDecoder, Decoder, generate
from h3pretrain.model import HybridLM
from h3pretrain.model.ssm import NO_WEIGHT_DECAY


def _model(**overrides) -> HybridLM:
    model = HybridLM(tiny_config(**overrides)).eval()
    with torch.no_grad():  # non-trivial shift B and SSM parameters so that every term matters
        for layer in model.backbone.layers.values():
            if hasattr(layer.mixer, "shift_kernel"):
                layer.mixer.shift_kernel.B.add_(0.3 * torch.randn_like(layer.mixer.shift_kernel.B))
    return model


@pytest.mark.parametrize("head_dim", [1, 8])
def test_causal(head_dim):
    model = _model(ssm_head_dim=head_dim)
    ids = torch.randint(0, 97, (2, 40))
    t = 23
    changed = ids.clone()
    changed[:, t] = (changed[:, t] + 1) % 97
    with torch.no_grad():
        a, b = model(ids), model(changed)
    # FFT convolution mixes rounding noise of later inputs into earlier outputs; nothing more.
    torch.testing.assert_close(a[:, :t], b[:, :t], rtol=0, atol=1e-5)
    assert (a[:, t:] - b[:, t:]).abs().amax(dim=-1).min() > 1e-3  # every later position reacts


@pytest.mark.parametrize("head_dim", [1, 8])
def test_convolution_mode_equals_recurrent_mode(head_dim):
    model = _model(ssm_head_dim=head_dim, attn_rotary_dim=4)
    ids = torch.randint(0, 97, (3, 48))
    prompt = 17
    with torch.no_grad():
        full = model(ids)
        cache = model.allocate_cache(3, 48)
        parts = [model(ids[:, :prompt], cache=cache)]
        for t in range(prompt, 48):
            parts.append(model(ids[:, t : t + 1], cache=cache))
    stepped = torch.cat(parts, dim=1)
    assert cache.seqlen_offset == 48
    scale = full.abs().max()
    torch.testing.assert_close(stepped / scale, full / scale, rtol=0, atol=1e-5)


def test_recurrent_state_is_constant_size_and_stays_in_place():
    model = _model()
    sizes = []
    for L in (5, 60):
        decoder = Decoder(model, 1, L + 2)
        before = {(i, k): (t.data_ptr(), t.shape) for i, state in decoder.cache.layers.items() for k, t in state.items()}
        ids = torch.randint(0, 97, (1, L + 1))
        decoder.prefill(ids[:, :L])
        decoder.step(ids[:, L])
        assert {(i, k): (t.data_ptr(), t.shape) for i, state in decoder.cache.layers.items()
                for k, t in state.items()} == before  # prompt and step write into the allocated tensors
        sizes.append({i: sum(t.numel() for t in s.values()) for i, s in decoder.cache.layers.items()})
    assert sizes[0][0] == sizes[1][0] and sizes[0][2] == sizes[1][2]  # H3 layers: independent of context
    assert sizes[1][1] > sizes[0][1]  # the attention layer's keys and values grow with it


@pytest.mark.parametrize("head_dim", [1, 8])
def test_greedy_decoding_equals_argmax_of_full_forward(head_dim):
    model = _model(ssm_head_dim=head_dim, vocab_size=90)  # 90 -> padded 96: padding never sampled
    prompt = torch.randint(0, 90, (2, 11))
    out = generate(model, prompt, max_new_tokens=12)
    assert out.shape == (2, 23) and torch.equal(out[:, :11], prompt)
    with torch.no_grad():
        logits = model(out)[:, :, :90]
    assert torch.equal(out[:, 11:], logits[:, 10:-1].argmax(-1))


@pytest.mark.parametrize("mixer", ["h3", "s4d"])
def test_decode_steps_replay_like_a_cuda_graph(mixer):
    """A captured CUDA graph replays the step with the host-side state of capture time: emulated on
    CPU by pinning `seqlen_offset` before every step. Positions must come from the cache's device
    tensor and every state must be updated in place for the logits to stay right."""
    model = _model(mixer=mixer, ssm_d_state=8, ssm_head_dim=2 if mixer == "h3" else 1, attn_rotary_dim=4)
    ids = torch.randint(0, 97, (2, 40))
    with torch.no_grad():
        full = model(ids)
    decoder = Decoder(model, 2, 40)
    decoder.cache.static_shapes = True  # as CUDAGraphDecoder sets it
    prompt = 13  # > d_state and not a multiple of it: the shift ring buffer starts mid-way
    logits = [decoder.prefill(ids[:, :prompt])]
    addresses = {(i, k): t.data_ptr() for i, state in decoder.cache.layers.items() for k, t in state.items()}
    pinned = decoder.cache.seqlen_offset
    for t in range(prompt, 40):
        decoder.cache.seqlen_offset = pinned
        logits.append(decoder.step(ids[:, t]))
    assert int(decoder.cache.position) == 40
    assert {(i, k): t.data_ptr() for i, state in decoder.cache.layers.items() for k, t in state.items()} == addresses
    scale = full.abs().max()
    torch.testing.assert_close(torch.stack(logits, 1) / scale, full[:, prompt - 1:] / scale, rtol=0, atol=1e-5)


def test_decoder_is_reusable_and_guards_its_cache():
    model = _model(attn_rotary_dim=4)
    decoder = Decoder(model, 2, 30)
    for prompt in (torch.randint(0, 97, (2, 25)), torch.randint(0, 97, (2, 9))):  # long, then short
        out = generate(model, prompt, 5, decoder=decoder)
        torch.testing.assert_close(out, generate(model, prompt, 5), rtol=0, atol=0)
    with pytest.raises(ValueError, match="holds 2 rows of 30 tokens: too few for 2 rows of 28 \\+ 5 new"):
        generate(model, torch.randint(0, 97, (2, 28)), 5, decoder=decoder)
    with pytest.raises(ValueError, match="exceeds the cache's max_seqlen 30"):
        decoder.prefill(torch.randint(0, 97, (2, 31)))
    with pytest.raises(ValueError, match="batch of 3 rows for a cache of 2"):
        decoder.prefill(torch.randint(0, 97, (3, 4)))
    with pytest.raises(ValueError, match="CUDA graphs need a CUDA model"):
        CUDAGraphDecoder(model, 2, 30)


def test_every_parameter_gets_a_gradient():
    model = _model(ssm_head_dim=2).train()
    ids = torch.randint(0, 97, (2, 30))
    logits = model(ids)
    torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten()).backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not torch.any(p.grad != 0)]
    assert missing == []


def test_ssm_parameters_stay_fp32_under_bf16_autocast():
    model = _model().train()
    ids = torch.randint(0, 97, (2, 30))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(ids)
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten())
    assert logits.dtype == torch.bfloat16  # the matmuls did run in bf16
    loss.backward()
    ssm = [(n, p) for n, p in model.named_parameters() if "_kernel." in n or n.endswith((".D", "ssm_k_D"))]
    assert len(ssm) == 2 * 9  # two H3 layers x (shift B, C, ssm_k_D, log_dt, inv_A_real, A_imag, B, C, D)
    for name, p in ssm:
        assert p.dtype == torch.float32 and p.grad.dtype == torch.float32, name
    # and the bf16 result stays close to fp32
    with torch.no_grad():
        ref = model.eval()(ids)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = model(ids)
    assert (low.float() - ref).abs().max() < 0.05 * ref.abs().max()


def test_no_weight_decay_names_cover_the_ssm_parameters():
    model = _model()
    names = [n for n, _ in model.named_parameters() if n.rsplit(".", 1)[-1] in NO_WEIGHT_DECAY
             and "_kernel." in n]
    # per H3 layer: shift B, diag log_dt, inv_A_real, A_imag, B
    assert len(names) == 2 * 5


def test_init_follows_gpt2_rescaling():
    cfg = tiny_config(n_layer=8, attn_layer_idx=[3], d_model=256)
    model = HybridLM(cfg)
    std = lambda n: dict(model.named_parameters())[n].std().item()  # noqa: E731
    assert std("backbone.layers.0.mlp.fc2.weight") == pytest.approx(0.02 / 4, rel=0.05)
    assert std("backbone.layers.3.mixer.out_proj.weight") == pytest.approx(0.02 / 4, rel=0.05)
    assert std("backbone.layers.0.mixer.output_linear.weight") == pytest.approx(0.02, rel=0.05)
    assert std("backbone.layers.0.mixer.q_proj.weight") == pytest.approx(0.02, rel=0.05)
    assert std("backbone.embeddings.word_embeddings.weight") == pytest.approx(0.02, rel=0.05)
    assert dict(model.named_parameters())["backbone.layers.0.mixer.q_proj.bias"].abs().max() == 0
    assert not any("position" in n for n, _ in model.named_parameters())


class _FakeGraphDecoder(Decoder):
    """Stands in for CUDAGraphDecoder on a CPU: eager decoding whose steps from `wrong_from` on are off."""
    wrong_from = None

    def __init__(self, model, batch_size, max_seqlen):
        super().__init__(model, batch_size, max_seqlen)
        self.steps = 0

    def step(self, token):
        self.steps += 1
        logits = super().step(token)
        return logits.roll(1, -1) if self.wrong_from is not None and self.steps >= self.wrong_from else logits


@pytest.mark.parametrize("wrong_from", [None, 2, 9])
def test_cuda_graph_decoding_is_checked_against_eager_and_falls_back(monkeypatch, caplog, wrong_from):
    """generate(cuda_graph=True): the graph's first 4 steps are compared with eager decoding. A graph
    that agrees is trusted from then on (the eager cache is freed); one that differs gives one warning
    and eager decoding, so the tokens are eager's either way. Steps after the check are not compared."""
    import h3pretrain.generate as gen

    model = _model(attn_rotary_dim=4)
    prompt = torch.randint(0, 97, (2, 7), generator=torch.Generator().manual_seed(3))
    expected = generate(model, prompt, 12)
    monkeypatch.setattr(gen, "CUDAGraphDecoder", type("Fake", (_FakeGraphDecoder,), {"wrong_from": wrong_from}))
    decoder = gen.CheckedGraphDecoder(model, 2, 7 + 12)
    with caplog.at_level("WARNING", logger="h3pretrain.generate"):
        out = generate(model, prompt, 12, decoder=decoder)
    warnings = [r.getMessage() for r in caplog.records]
    if wrong_from == 2:
        assert torch.equal(out, expected)
        assert len(warnings) == 1 and "step 2 differs from eager decoding" in warnings[0]
        assert decoder.graph is None
    else:
        assert warnings == [] and decoder.eager is None and decoder.checked == 4
        if wrong_from is None:
            assert torch.equal(out, expected)
        else:  # a graph that goes wrong after the check is not caught (the check is for the capture)
            assert not torch.equal(out, expected)


def test_a_cuda_graph_that_cannot_be_captured_decodes_eagerly(caplog):
    model = _model(attn_rotary_dim=4)  # on the CPU: the capture fails
    prompt = torch.randint(0, 97, (2, 7), generator=torch.Generator().manual_seed(3))
    with caplog.at_level("WARNING", logger="h3pretrain.generate"):
        out = generate(model, prompt, 6, cuda_graph=True)
    assert torch.equal(out, generate(model, prompt, 6))
    assert [r.getMessage() for r in caplog.records] == [
        "CUDA-graph decoding is off (the capture failed: ValueError: CUDA graphs need a CUDA model, this one is on "
        "cpu): decoding eagerly"]
