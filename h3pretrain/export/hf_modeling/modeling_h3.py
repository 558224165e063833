"""Hybrid H3 + attention language model for transformers (written by `h3pretrain export-hf`).

Standalone on purpose: pure torch + transformers, no import from the training code. The math is the
released H3 layer (H3 paper; channels head-major, c = h * head_dim + d):
    q, k, v = Linear(u); k' = shift-SSM(k) + D_k * k (a learned causal FIR of N taps);
    kv[h, d1, d2] = k'[h, d1] v[h, d2]; y = diag-SSM(kv) + D * kv (S4D-Lin, bilinear, N/2 complex
    modes per head); out[h, d2] = sum_d1 q[h, d1] y[h, d1, d2]; Linear.
Full sequences use FFT convolutions in fp32; with a cache, every later token is one recurrent step:
O(1) state per H3 layer (the shift register's last N inputs and the diagonal SSM's complex state)
in transformers' LinearAttentionLayer cache slots, key/value caches for the attention layers.
Left-padded batches (transformers' and lm-eval's convention for generation) give every row what it
gives alone: H3 / S4D inputs are zero at the pads (their states stay zero), attention never reads a
pad's key, and rotary positions count from each row's first real token. Right padding is refused.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.cache_utils import Cache, DynamicLayer, LinearAttentionLayer
from transformers.modeling_outputs import CausalLMOutputWithPast

from .configuration_h3 import H3Config

# ---------------------------------------------------------------------------------------------
# convolutions and SSM kernels


def fft_size(length: int) -> int:
    """Smallest power of two >= 2 * length: the FFT convolution is then the causal linear one."""
    return 1 << max(1, (2 * length - 1).bit_length())


def causal_conv(u: torch.Tensor, kernel: torch.Tensor, skip: torch.Tensor | None = None) -> torch.Tensor:
    """y[..., t] = sum_{s<=t} kernel[..., s] u[..., t-s] (+ skip * u), in fp32."""
    L = u.shape[-1]
    u, kernel = u.float(), kernel.float()[..., :L]
    n = fft_size(L)
    y = torch.fft.irfft(torch.fft.rfft(u, n=n) * torch.fft.rfft(kernel, n=n), n=n)[..., :L]
    if skip is not None:
        y = y + u * skip.float()
    return y


class KernelHolder(nn.Module):
    """The released checkpoints nest each SSM kernel one module deeper (`...kernel.kernel.B`)."""

    def __init__(self, kernel: nn.Module):
        super().__init__()
        self.kernel = kernel


class ShiftSSMKernel(nn.Module):
    """Shift register x_t = shift(x_{t-1}) + B u_t, y_t = <C, x_t>: taps[j] = sum_m B[m] C[m + j]."""

    def __init__(self, channels: int, d_state: int):
        super().__init__()
        self.d_state = d_state
        B = torch.zeros(channels, d_state)
        B[:, 0] = 1.0
        self.B = nn.Parameter(B)
        bound = 1.0 / math.sqrt(d_state)
        self.C = nn.Parameter(torch.empty(1, channels, d_state).uniform_(-bound, bound))

    def taps(self) -> torch.Tensor:
        N = self.d_state
        windows = F.pad(self.C[0].float(), (0, N)).unfold(-1, N, 1)[:, :N]  # windows[c, j, m] = C[c, m + j]
        return torch.einsum("cm,cjm->cj", self.B.float(), windows)


class DiagSSMKernel(nn.Module):
    """S4D-Lin, bilinear: dt = exp(log_dt), A = -exp(inv_A_real) + i A_imag,
    dA = (1 + dt A/2) / (1 - dt A/2), dB = B dt / (1 - dt A/2); K[l] = 2 Re sum_n C_n dB_n dA_n^l."""

    def __init__(self, num_heads: int, d_state: int):
        super().__init__()
        n = d_state // 2
        self.log_dt = nn.Parameter(torch.rand(num_heads) * (math.log(0.1) - math.log(0.001)) + math.log(0.001))
        self.inv_A_real = nn.Parameter(torch.full((num_heads, n), math.log(0.5)))
        self.A_imag = nn.Parameter(math.pi * torch.arange(n, dtype=torch.float32).repeat(num_heads, 1))
        self.B = nn.Parameter(torch.view_as_real(torch.ones(num_heads, n, dtype=torch.cfloat)).clone())
        self.C = nn.Parameter(torch.view_as_real(torch.randn(1, num_heads, n, dtype=torch.cfloat)).clone())

    def discretize(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        dt = torch.exp(self.log_dt.float())[:, None]
        A = torch.complex(-torch.exp(self.inv_A_real.float()), self.A_imag.float())
        denom = 1.0 - dt * A / 2
        dA = (1.0 + dt * A / 2) / denom
        dB = torch.view_as_complex(self.B.float()) * dt / denom
        return dA, dB, torch.view_as_complex(self.C.float())[0]

    def kernel(self, length: int) -> torch.Tensor:
        """(H, length) fp32; dA^l = exp(l log dA) with l split as a*T + b (memory H*N*(L/T + T))."""
        dA, dB, C = self.discretize()
        log_dA = torch.log(dA)
        T = max(1, math.isqrt(length))
        blocks = -(-length // T)
        inner = torch.exp(log_dA[:, :, None] * torch.arange(T, device=dA.device))
        outer = torch.exp(log_dA[:, :, None] * (T * torch.arange(blocks, device=dA.device)))
        coeff = (C * dB)[:, None, :] * outer.transpose(1, 2)
        K = 2 * torch.matmul(coeff, inner).real
        return K.reshape(K.shape[0], -1)[:, :length]

    def final_state(self, u: torch.Tensor, chunk: int = 512) -> torch.Tensor:
        """x = sum_j dA^(L-1-j) dB u_j; u (B, H, *inner, L) real -> (B, H, *inner, N/2) complex.
        Chunk by chunk x <- dA^T x + sum_tau dA^(T-1-tau) u_tau, the sum a real matmul per head
        (nothing of size B * H * L * N/2 is formed)."""
        dA, dB, _ = self.discretize()
        log_dA = torch.log(dA)
        B, H, L = u.shape[0], u.shape[1], u.shape[-1]
        inner, n = u.shape[2:-1], dA.shape[-1]
        rows = u.float().reshape(B, H, -1, L).transpose(0, 1).reshape(H, -1, L)  # (H, B*inner, L)
        T = min(chunk, L)
        powers = torch.exp(log_dA[:, :, None] * torch.arange(T - 1, -1, -1, device=u.device))  # dA^(T-1-tau)
        table = torch.cat([powers.real, powers.imag], dim=1).transpose(1, 2)  # (H, T, 2n)
        state = None
        for start in range(0, L, T):
            size = min(T, L - start)
            part = torch.bmm(rows[..., start:start + size], table[:, T - size:])
            part = torch.complex(part[..., :n], part[..., n:])
            state = part if state is None else torch.exp(log_dA * size)[:, None] * state + part
        return (state * dB[:, None]).reshape(H, B, *inner, n).movedim(0, 1)

    def step(self, u: torch.Tensor, state: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """u (B, H, *inner) real, state (B, H, *inner, N/2) -> (2 Re sum_n C_n x_n, new state)."""
        dA, dB, C = self.discretize()
        shape = (dA.shape[0],) + (1,) * (u.dim() - 2) + (dA.shape[1],)
        state = dA.view(shape) * state + dB.view(shape) * u.to(torch.cfloat)[..., None]
        return 2 * (C.view(shape) * state).sum(-1).real, state


class S4DKernel(DiagSSMKernel):
    """The S4D baseline's kernel: S4D-Inv initialisation, A (1, N/2) shared by all channels, B folded
    into C, zero-order hold: dA = exp(dt A), dB = (exp(dt A) - 1) / A."""

    def __init__(self, channels: int, d_state: int):
        nn.Module.__init__(self)
        n = d_state // 2
        self.log_dt = nn.Parameter(torch.zeros(channels))
        self.inv_A_real = nn.Parameter(torch.zeros(1, n))
        self.A_imag = nn.Parameter(torch.zeros(1, n))
        self.C = nn.Parameter(torch.zeros(1, channels, n, 2))

    def discretize(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        dt = torch.exp(self.log_dt.float())[:, None]
        A = torch.complex(-torch.exp(self.inv_A_real.float()), self.A_imag.float())
        dA = torch.exp(dt * A)
        return dA, (dA - 1.0) / A, torch.view_as_complex(self.C.float())[0]


def _in_fp32(fn):
    fn = torch.autocast("cuda", enabled=False)(fn)
    return torch.autocast("cpu", enabled=False)(fn)


@dataclass
class Padding:
    """Left padding of a batch: `real` (B, L) the current tokens that are not pads, `keys` (B, S)
    the same for every token so far (what attention may read), `positions` (B, L) each current
    token's index counted from its row's first real token."""
    real: torch.Tensor
    keys: torch.Tensor
    positions: torch.Tensor

    @classmethod
    def from_mask(cls, attention_mask: torch.Tensor | None, length: int) -> "Padding | None":
        if attention_mask is None or bool(attention_mask.all()):
            return None
        mask = attention_mask.to(torch.bool)
        if bool((mask[:, :-1] & ~mask[:, 1:]).any()):
            raise ValueError("H3 models take left padding only (a 0 after a 1 in attention_mask): set "
                             "tokenizer.padding_side = 'left'")
        positions = (mask.long().cumsum(-1) - 1).clamp_min(0)[:, -length:]
        return cls(real=mask[:, -length:], keys=mask, positions=positions)


def _recurrent(cache: Cache | None) -> bool:
    """True once the prompt has been consumed: every later token is a recurrent step."""
    return cache is not None and cache.get_seq_length() > 0


# ---------------------------------------------------------------------------------------------
# mixers


class H3Mixer(nn.Module):
    def __init__(self, config: H3Config, layer_idx: int):
        super().__init__()
        D, N, hd = config.d_model, config.ssm_d_state, config.ssm_head_dim
        self.layer_idx, self.head_dim, self.num_heads, self.d_state = layer_idx, hd, D // hd, N
        self.q_proj, self.k_proj, self.v_proj = nn.Linear(D, D), nn.Linear(D, D), nn.Linear(D, D)
        self.ssm_k_kernel = KernelHolder(ShiftSSMKernel(D, N))
        self.ssm_k_D = nn.Parameter(torch.randn(D))
        self.kernel = KernelHolder(DiagSSMKernel(self.num_heads, N))
        self.D = nn.Parameter(torch.randn(self.num_heads))
        self.output_linear = nn.Linear(D, D)

    def forward(self, x: torch.Tensor, cache: Cache | None, padding: Padding | None = None) -> torch.Tensor:
        q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        if _recurrent(cache):
            y = torch.stack([self._step(q[:, t], k[:, t], v[:, t], cache) for t in range(x.shape[1])], dim=1)
        else:
            if padding is not None:  # zero inputs at the pads keep the states at zero
                real = padding.real[..., None].to(k.dtype)
                k, v = k * real, v * real
            y = self._conv(q, k, v, cache)
        return self.output_linear(y.to(q.dtype))

    def _kv(self, k_shifted: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """(B, C, ...) x (B, C, ...) -> (B, H, d1, d2, ...): the per-head outer product."""
        B, H, hd, rest = k_shifted.shape[0], self.num_heads, self.head_dim, k_shifted.shape[2:]
        return k_shifted.reshape(B, H, hd, 1, *rest) * v.reshape(B, H, 1, hd, *rest)

    @_in_fp32
    def _conv(self, q, k, v, cache: Cache | None) -> torch.Tensor:
        B, L, C = q.shape
        k, v = k.transpose(1, 2).float(), v.transpose(1, 2).float()  # (B, C, L)
        k_shifted = causal_conv(k, self.ssm_k_kernel.kernel.taps(), self.ssm_k_D[:, None])
        kv = self._kv(k_shifted, v)  # (B, H, d1, d2, L)
        y = causal_conv(kv, self.kernel.kernel.kernel(L)[:, None, None, :], self.D[:, None, None, None])
        out = (q.transpose(1, 2).float().view(B, self.num_heads, self.head_dim, 1, L) * y).sum(dim=2)
        if cache is not None:  # the prompt leaves the exact recurrent state behind
            cache.update_conv_state(k, self.layer_idx, conv_kernel_size=self.d_state)
            cache.update_recurrent_state(self.kernel.kernel.final_state(kv), self.layer_idx)
        return out.reshape(B, C, L).transpose(1, 2)

    @_in_fp32
    def _step(self, q, k, v, cache: Cache) -> torch.Tensor:
        """One token: q, k, v (B, C) -> (B, C) fp32."""
        q, k, v = q.float(), k.float(), v.float()
        window = cache.update_conv_state(k[..., None], self.layer_idx)[..., -self.d_state:]  # oldest first
        taps = self.ssm_k_kernel.kernel.taps().flip(-1)  # taps[j] weighs the input j steps back
        kv = self._kv((window * taps).sum(-1) + self.ssm_k_D * k, v)  # (B, H, d1, d2)
        y, state = self.kernel.kernel.step(kv, cache.layers[self.layer_idx].recurrent_states[0])
        cache.update_recurrent_state(state, self.layer_idx)
        y = y + self.D.view(-1, 1, 1) * kv
        return (q.view(*kv.shape[:3], 1) * y).sum(dim=2).reshape(q.shape)


class S4DMixer(nn.Module):
    """The diagonal SSM alone (the paper's S4D baseline): y = K * u + D u per channel, GELU, Linear."""

    def __init__(self, config: H3Config, layer_idx: int):
        super().__init__()
        D = config.d_model
        self.layer_idx = layer_idx
        self.kernel = KernelHolder(S4DKernel(D, config.ssm_d_state))
        self.D = nn.Parameter(torch.randn(D))
        self.output_linear = nn.Linear(D, D)

    def forward(self, x: torch.Tensor, cache: Cache | None, padding: Padding | None = None) -> torch.Tensor:
        if padding is not None and not _recurrent(cache):
            x = x * padding.real[..., None].to(x.dtype)
        return self.output_linear(F.gelu(self._mix(x, cache)).to(x.dtype))

    @_in_fp32
    def _mix(self, x: torch.Tensor, cache: Cache | None) -> torch.Tensor:
        ssm = self.kernel.kernel
        if _recurrent(cache):
            ys = []
            for t in range(x.shape[1]):
                u = x[:, t].float()
                y, state = ssm.step(u, cache.layers[self.layer_idx].recurrent_states[0])
                cache.update_recurrent_state(state, self.layer_idx)
                ys.append(y + self.D * u)
            return torch.stack(ys, dim=1)
        u = x.transpose(1, 2)
        y = causal_conv(u, ssm.kernel(u.shape[-1]), self.D[:, None]).transpose(1, 2)
        if cache is not None:
            cache.update_recurrent_state(ssm.final_state(u.float()), self.layer_idx)
        return y


class Rotary(nn.Module):
    """GPT-NeoX rotary embedding on the first `dim` dims of each head, base 10000."""

    def __init__(self, dim: int, base: float = 10000.0):
        super().__init__()
        self.dim, self.base = dim, base

    def forward(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """positions: (L,), or (B, L) for rows counted from different first tokens."""
        inv_freq = 1.0 / self.base ** (torch.arange(0, self.dim, 2, device=x.device, dtype=torch.float32) / self.dim)
        freqs = positions.float()[..., None] * inv_freq
        freqs = freqs if freqs.dim() == 3 else freqs[None]
        cos, sin = freqs.cos()[:, :, None, :], freqs.sin()[:, :, None, :]
        rot, rest = x[..., : self.dim].float(), x[..., self.dim:]
        x1, x2 = rot.chunk(2, dim=-1)
        return torch.cat([torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).to(x.dtype), rest], dim=-1)


class Attention(nn.Module):
    """Causal multi-head attention, fused Wqkv (layout: three, heads, head_dim), no positional
    encoding unless attn_rotary_dim > 0."""

    def __init__(self, config: H3Config, layer_idx: int):
        super().__init__()
        D = config.d_model
        self.layer_idx, self.num_heads = layer_idx, config.attn_num_heads
        self.head_dim = D // self.num_heads
        self.dropout = config.attn_dropout
        self.Wqkv = nn.Linear(D, 3 * D)
        self.out_proj = nn.Linear(D, D)
        self.rotary = Rotary(config.attn_rotary_dim) if config.attn_rotary_dim else None

    def forward(self, x: torch.Tensor, cache: Cache | None, padding: Padding | None = None) -> torch.Tensor:
        B, L, _ = x.shape
        q, k, v = self.Wqkv(x).view(B, L, 3, self.num_heads, self.head_dim).unbind(dim=2)
        offset = cache.get_seq_length() if cache is not None else 0
        if self.rotary is not None:
            positions = padding.positions if padding is not None else torch.arange(offset, offset + L, device=x.device)
            q, k = self.rotary(q, positions), self.rotary(k, positions)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        if cache is not None:
            k, v = cache.update(k, v, self.layer_idx)
        dropout = self.dropout if self.training else 0.0
        if padding is None and (cache is None or offset == 0):  # a whole sequence (or the prompt) attends to itself
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, is_causal=True)
        else:
            # query t (absolute offset + t) sees keys 0..offset + t, never a pad's (a pad sees itself:
            # no empty row)
            S = k.shape[2]
            mask = torch.ones(L, S, dtype=torch.bool, device=q.device).tril(diagonal=offset)
            if padding is not None:
                own = torch.arange(S, device=q.device)[None, :] == (offset + torch.arange(L, device=q.device))[:, None]
                mask = ((mask[None] & padding.keys[:, None, -S:]) | own[None])[:, None]  # (B, 1, L, S)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout)
        return self.out_proj(y.transpose(1, 2).reshape(B, L, -1))


# ---------------------------------------------------------------------------------------------
# the language model


class H3Cache(Cache):
    """Per layer: LinearAttentionLayer (H3/S4D: shift register as conv state, complex SSM state as
    recurrent state) or DynamicLayer (attention keys/values). Counts the tokens it has seen, so
    that its length is known also without attention layers."""

    def __init__(self, config: H3Config):
        layers = [DynamicLayer() if kind == "attention" else LinearAttentionLayer() for kind in config.layer_kinds()]
        super().__init__(layers=layers)
        self.seen_tokens = 0

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.seen_tokens


class MLP(nn.Module):
    def __init__(self, config: H3Config):
        super().__init__()
        self.fc1 = nn.Linear(config.d_model, config.mlp_ratio * config.d_model)
        self.fc2 = nn.Linear(config.mlp_ratio * config.d_model, config.d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class Block(nn.Module):
    def __init__(self, config: H3Config, layer_idx: int, kind: str):
        super().__init__()
        self.norm1 = nn.LayerNorm(config.d_model, eps=config.layer_norm_eps)
        self.mixer = {"attention": Attention, "s4d": S4DMixer, "h3": H3Mixer}[kind](config, layer_idx)
        self.norm2 = nn.LayerNorm(config.d_model, eps=config.layer_norm_eps)
        self.mlp = MLP(config)
        self.dropout1, self.dropout2 = nn.Dropout(config.resid_dropout), nn.Dropout(config.resid_dropout)

    def forward(self, x: torch.Tensor, cache: Cache | None, padding: Padding | None = None) -> torch.Tensor:
        x = x + self.dropout1(self.mixer(self.norm1(x), cache, padding))
        return x + self.dropout2(self.mlp(self.norm2(x)))


class Embeddings(nn.Module):
    def __init__(self, config: H3Config):
        super().__init__()
        self.word_embeddings = nn.Embedding(config.vocab_size, config.d_model)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.word_embeddings(input_ids)


class H3PreTrainedModel(PreTrainedModel):
    config_class = H3Config
    base_model_prefix = "backbone"
    _no_split_modules = ["Block"]
    # The SSM parameters stay fp32 when the model is loaded in bf16/fp16 (their math runs in fp32).
    _keep_in_fp32_modules_strict = ["ssm_k_kernel", "kernel.kernel", "ssm_k_D", "mixer.D"]

    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        from transformers import initialization as init

        if isinstance(module, (Attention, MLP)):  # GPT-2 rescaling of the residual writers
            layer = module.out_proj if isinstance(module, Attention) else module.fc2
            init.normal_(layer.weight, mean=0.0, std=self.config.initializer_range / math.sqrt(2 * self.config.n_layer))


class H3Model(H3PreTrainedModel):
    def __init__(self, config: H3Config):
        super().__init__(config)
        self.embeddings = Embeddings(config)
        self.drop = nn.Dropout(config.embed_dropout)
        self.layers = nn.ModuleList(Block(config, i, kind) for i, kind in enumerate(config.layer_kinds()))
        self.ln_f = nn.LayerNorm(config.d_model, eps=config.layer_norm_eps)
        self.post_init()

    def get_input_embeddings(self) -> nn.Module:
        return self.embeddings.word_embeddings

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.embeddings.word_embeddings = value

    def forward(self, input_ids: torch.Tensor | None = None, inputs_embeds: torch.Tensor | None = None,
                cache: Cache | None = None, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        x = self.embeddings(input_ids) if inputs_embeds is None else inputs_embeds
        padding = Padding.from_mask(attention_mask, x.shape[1])
        x = self.drop(x)
        for layer in self.layers:
            x = layer(x, cache, padding)
        if cache is not None:
            cache.seen_tokens += x.shape[1]
        return self.ln_f(x)


class H3ForCausalLM(H3PreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "backbone.embeddings.word_embeddings.weight"}

    def __init__(self, config: H3Config):
        super().__init__(config)
        self.backbone = H3Model(config)
        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        self.post_init()

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        return False  # forward() creates its H3Cache (a DynamicCache has no length without attention layers)

    def get_input_embeddings(self) -> nn.Module:
        return self.backbone.embeddings.word_embeddings

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.backbone.embeddings.word_embeddings = value

    def get_output_embeddings(self) -> nn.Module:
        return self.lm_head

    def forward(self, input_ids: torch.LongTensor | None = None, attention_mask: torch.Tensor | None = None,
                past_key_values: Cache | None = None, inputs_embeds: torch.Tensor | None = None,
                labels: torch.LongTensor | None = None, use_cache: bool | None = None,
                return_dict: bool | None = None, logits_to_keep: int | torch.Tensor = 0,
                **kwargs) -> CausalLMOutputWithPast | tuple:
        # The recurrent state costs a pass over the prompt of its own: it is built when asked for
        # (generate() passes use_cache=True), not for every scoring call.
        if use_cache and past_key_values is None and not self.training:
            past_key_values = H3Cache(self.config)
        elif use_cache is False:
            past_key_values = None
        hidden = self.backbone(input_ids, inputs_embeds=inputs_embeds, cache=past_key_values,
                               attention_mask=attention_mask)
        keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        logits = self.lm_head(hidden[:, keep])
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten().to(logits.device),
                                   ignore_index=-100)
        if return_dict is False:
            return tuple(t for t in (loss, logits, past_key_values) if t is not None)
        return CausalLMOutputWithPast(loss=loss, logits=logits, past_key_values=past_key_values)


__all__ = ["H3Cache", "H3ForCausalLM", "H3Model", "H3PreTrainedModel"]
