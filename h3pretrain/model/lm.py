"""The hybrid language model: word embedding, pre-norm blocks (H3 or attention mixer + MLP),
final LayerNorm, LM head tied to the embedding. No position embeddings (docs/design.md section 2).

Module names follow the released checkpoints, except that the two SSM kernels are called
`shift_kernel` and `diag_kernel` (released: `ssm_k_kernel.kernel`, `kernel.kernel`);
h3pretrain.export.official translates.
"""
from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ModelConfig
from .attention import CausalSelfAttention
from .cache import InferenceCache
from .h3 import H3
from .s4d import S4D
from .layers import LayerFactory, residual_init_std


class MLP(nn.Module):
    def __init__(self, d_model: int, hidden: int, factory: LayerFactory, init_std: float, out_init_std: float):
        super().__init__()
        self.fc1 = factory.linear(d_model, hidden, role="column", init_std=init_std)
        self.fc2 = factory.linear(hidden, d_model, role="row", init_std=out_init_std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int, kind: str, factory: LayerFactory):
        super().__init__()
        std = cfg.initializer_range
        out_std = residual_init_std(std, cfg.n_layer)
        self.norm1 = nn.LayerNorm(cfg.d_model, eps=cfg.layer_norm_eps)
        if kind == "attention":
            self.mixer = CausalSelfAttention(cfg.d_model, cfg.attn_num_heads, rotary_dim=cfg.attn_rotary_dim,
                                             dropout=cfg.attn_dropout, layer_idx=layer_idx, factory=factory,
                                             init_std=std, out_init_std=out_std)
        elif kind == "s4d":
            self.mixer = S4D(cfg.d_model, d_state=cfg.ssm_d_state, dt_min=cfg.ssm_dt_min, dt_max=cfg.ssm_dt_max,
                             layer_idx=layer_idx, factory=factory, init_std=std)
        else:
            self.mixer = H3(cfg.d_model, d_state=cfg.ssm_d_state, head_dim=cfg.ssm_head_dim, dt_min=cfg.ssm_dt_min,
                            dt_max=cfg.ssm_dt_max, layer_idx=layer_idx, factory=factory, init_std=std)
        self.norm2 = nn.LayerNorm(cfg.d_model, eps=cfg.layer_norm_eps)
        self.mlp = MLP(cfg.d_model, cfg.mlp_ratio * cfg.d_model, factory, std, out_std)
        self.dropout1 = nn.Dropout(cfg.resid_dropout)
        self.dropout2 = nn.Dropout(cfg.resid_dropout)

    def forward(self, x: torch.Tensor, cache: InferenceCache | None = None) -> torch.Tensor:
        x = x + self.dropout1(self.mixer(self.norm1(x), cache=cache))
        return x + self.dropout2(self.mlp(self.norm2(x)))


class Embeddings(nn.Module):
    def __init__(self, cfg: ModelConfig, factory: LayerFactory):
        super().__init__()
        self.word_embeddings = factory.embedding(cfg.padded_vocab_size, cfg.d_model, init_std=cfg.initializer_range)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.word_embeddings(input_ids)


@contextlib.contextmanager
def _seeded(seed: int | None, part: int):
    """Each part (embedding, layer i) draws its initial weights from its own seed, so that any
    pipeline stage builds the same weights as the whole model does."""
    if seed is None:
        yield
        return
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed * 1_000_003 + part)
        yield


class Backbone(nn.Module):
    """All layers, or the pipeline stage `layer_ids` (with the embedding if it is the first stage,
    and ln_f if it is the last). Layers keep their global index in their names."""

    def __init__(self, cfg: ModelConfig, factory: LayerFactory, layer_ids: list[int], pre_process: bool,
                 post_process: bool, init_seed: int | None):
        super().__init__()
        self.pre_process, self.post_process = pre_process, post_process
        self.factory = factory
        kinds = cfg.layer_kinds()
        if pre_process or post_process:  # the last stage holds the tied head's copy
            with _seeded(init_seed, 0):
                self.embeddings = Embeddings(cfg, factory)
        self.drop = nn.Dropout(cfg.embed_dropout)
        layers = {}
        for i in layer_ids:
            with _seeded(init_seed, i + 1):
                layers[str(i)] = Block(cfg, i, kinds[i], factory)
        self.layers = nn.ModuleDict(layers)
        if post_process:
            self.ln_f = nn.LayerNorm(cfg.d_model, eps=cfg.layer_norm_eps)

    def forward(self, input_ids: torch.Tensor | None, cache: InferenceCache | None = None,
                hidden: torch.Tensor | None = None) -> torch.Tensor:
        x = self.drop(self.factory.to_residual(self.embeddings(input_ids))) if self.pre_process else hidden
        for layer in self.layers.values():
            x = layer(x, cache=cache)
        return self.ln_f(x) if self.post_process else x


class HybridLM(nn.Module):
    """The whole model, or one pipeline stage of it (`layer_ids`, `pre_process`, `post_process`).

    init_seed: if given, every part is initialised from its own seed (layout-independent weights);
    else from the current torch RNG."""

    def __init__(self, cfg: ModelConfig, factory: LayerFactory | None = None, *, layer_ids: list[int] | None = None,
                 pre_process: bool = True, post_process: bool = True, init_seed: int | None = None):
        super().__init__()
        cfg.validate()
        self.config = cfg
        self.factory = factory or LayerFactory()
        self.pre_process, self.post_process = pre_process, post_process
        ids = list(range(cfg.n_layer)) if layer_ids is None else list(layer_ids)
        self.backbone = Backbone(cfg, self.factory, ids, pre_process, post_process, init_seed)

    def forward(self, input_ids: torch.Tensor | None, cache: InferenceCache | None = None,
                hidden: torch.Tensor | None = None, logits_to_keep: int = 0) -> torch.Tensor:
        """input_ids (B, L) -> logits (B, L, padded_vocab). With a cache: the first call is the
        prompt (convolution mode, fills the cache); later calls advance token by token.
        A stage without the embedding takes `hidden`, one without the head returns it, in the
        residual stream's layout ((B, L, D); see LayerFactory.to_residual).
        logits_to_keep > 0: only the last that many positions' logits (a prompt needs one; all of
        them would take B * L * vocab memory), for (B, L, D) residual layouts only."""
        if cache is not None:
            tokens = input_ids if input_ids is not None else hidden
            if tokens.shape[0] != cache.batch_size:
                raise ValueError(f"batch of {tokens.shape[0]} rows for a cache of {cache.batch_size}")
            cache.check_room(tokens.shape[1])
        hidden = self.backbone(input_ids, cache=cache, hidden=hidden)
        if not self.post_process:
            return hidden
        if logits_to_keep:
            hidden = hidden[:, -logits_to_keep:]
        logits = self.factory.lm_logits(hidden, self.backbone.embeddings.word_embeddings)
        if cache is not None:
            cache.advance(input_ids.shape[1])
        return logits

    def loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return self.factory.loss(logits, targets)

    def allocate_cache(self, batch_size: int, max_seqlen: int, dtype: torch.dtype | None = None) -> InferenceCache:
        """Every layer's state, zeroed, for `batch_size` rows of up to `max_seqlen` tokens. Attention
        keys and values take `dtype`: by default the autocast dtype when autocast is on, else the
        dtype of the residual stream (the LayerNorm weights)."""
        norm = next(iter(self.backbone.layers.values())).norm1.weight
        if dtype is None:
            on = torch.is_autocast_enabled(norm.device.type)
            dtype = torch.get_autocast_dtype(norm.device.type) if on else norm.dtype
        cache = InferenceCache(batch_size, max_seqlen, position=torch.zeros((), dtype=torch.long, device=norm.device))
        for i, block in self.backbone.layers.items():
            cache.layers[int(i)] = block.mixer.allocate_state(batch_size, max_seqlen, dtype)
        return cache

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    # Released-checkpoint names (h3pretrain.export.official does the work).
    def official_state_dict(self) -> dict[str, torch.Tensor]:
        from .released import to_official

        return to_official(self.state_dict())

    def load_official_state_dict(self, state_dict: dict, layout: str = "cuda") -> None:
        """A released (official-code) state dict; `layout`: its H3 output channel order, "cuda"
        (the fftconv path's and ours) or "pytorch" (see h3pretrain.model.released)."""
        from .released import load_official

        load_official(self, state_dict, layout)
