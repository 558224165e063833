"""Recurrent generation: the prompt runs once in convolution mode, then one O(1) step per token."""
from __future__ import annotations

import logging
import math
from typing import Callable

import torch

from .model import HybridLM

log = logging.getLogger("h3pretrain.generate")


def sample_next(logits: torch.Tensor, *, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """logits (B, V) -> token ids (B,). temperature 0 means greedy."""
    if temperature <= 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.shape[-1])).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        # drop tokens once the mass before them already reaches top_p (the first is always kept)
        drop = probs.cumsum(-1) - probs >= top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    return torch.multinomial(logits.softmax(-1), 1, generator=generator).squeeze(-1)


def left_pad(prompts: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Prompts of different lengths -> (B, L) token ids and attention mask (0 at the pads), padded
    on the left: what generate(..., attention_mask=...) takes."""
    width = max(map(len, prompts))
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, p in enumerate(prompts):
        ids[row, width - len(p):] = torch.as_tensor(p, dtype=torch.long)
        mask[row, width - len(p):] = 1
    return ids, mask


class Decoder:
    """The prompt in convolution mode, then one token per step, over a cache allocated once for
    `batch_size` rows of up to `max_seqlen` tokens (reusable: each prompt starts it afresh)."""

    @torch.inference_mode()
    def __init__(self, model: HybridLM, batch_size: int, max_seqlen: int):
        self.model = model.eval()
        self.cache = model.allocate_cache(batch_size, max_seqlen)

    @torch.inference_mode()
    def prefill(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """(B, L) prompt -> (B, padded_vocab) logits of its last position. attention_mask (B, L):
        1 for real tokens, 0 for left padding (each row then decodes as it would alone)."""
        self.cache.reset()
        self.cache.set_padding(attention_mask)
        return self.model(input_ids, cache=self.cache, logits_to_keep=1)[:, -1]

    @torch.inference_mode()
    def step(self, token: torch.Tensor) -> torch.Tensor:
        """(B,) token ids -> (B, padded_vocab) logits of the next position."""
        return self.model(token[:, None], cache=self.cache)[:, -1]


def _autocast_state() -> tuple[bool, torch.dtype]:
    return torch.is_autocast_enabled("cuda"), torch.get_autocast_dtype("cuda")


class CUDAGraphDecoder(Decoder):
    """A Decoder whose step is one CUDA graph, captured at construction and replayed per token: the
    step's hundreds of small kernels cost one launch (as in the H3 paper's generation benchmark,
    which used flash-attn's CUDA-graph decoding). Valid because every cache tensor keeps its address
    and the layers read positions from `cache.position` on the device, which the step advances."""

    @torch.inference_mode()
    def __init__(self, model: HybridLM, batch_size: int, max_seqlen: int, warmup: int = 2):
        super().__init__(model, batch_size, max_seqlen)
        device = self.cache.position.device
        if device.type != "cuda":
            raise ValueError(f"CUDA graphs need a CUDA model, this one is on {device}")
        # The graph replays the precision it was captured in; autocast's weight cache cannot be
        # captured (its casts are freed when the autocast region ends), so it is off in here.
        self.autocast = _autocast_state()
        self.cache.static_shapes = True
        self.token = torch.zeros(batch_size, 1, dtype=torch.long, device=device)
        with torch.autocast("cuda", dtype=self.autocast[1], enabled=self.autocast[0], cache_enabled=False):
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):  # allocator and library warm-up, outside the capture
                for _ in range(warmup):
                    self._at_first_step()
                    model(self.token, cache=self.cache)
            torch.cuda.current_stream().wait_stream(side)
            self._at_first_step()  # what capture and warm-up wrote at position 0 the prompt overwrites
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):
                self.logits = model(self.token, cache=self.cache)[:, -1]
        self.cache.reset()

    def _at_first_step(self) -> None:
        self.cache.seqlen_offset = 1  # any value > 0: the layers take their one-token path
        self.cache.position.zero_()

    def prefill(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        self._check_autocast()
        if attention_mask is not None and not bool(attention_mask.all()):
            raise ValueError("CUDA-graph decoding takes prompts without padding (the graph has no pad mask)")
        return super().prefill(input_ids)

    def _check_autocast(self) -> None:
        if _autocast_state() != self.autocast:
            raise ValueError(f"this CUDA graph was captured with CUDA autocast (enabled, dtype) = {self.autocast}, "
                             f"now it is {_autocast_state()}")

    @torch.inference_mode()
    def step(self, token: torch.Tensor) -> torch.Tensor:
        self._check_autocast()
        self.cache.check_room(1)
        self.token.copy_(token[:, None])
        self.graph.replay()  # advances cache.position on the device
        self.cache.seqlen_offset += 1
        return self.logits


class CheckedGraphDecoder(Decoder):
    """CUDA-graph decoding that trusts the graph only once its first `check_steps` steps have matched
    eager decoding (the same tokens through a second cache; freed after the check). A capture that
    fails, or a step whose logits differ from eager's by more than `tolerance` (max |difference|
    over max |logit|) or are not finite, gives one warning and eager decoding from there on: the
    tokens are those eager decoding gives."""

    def __init__(self, model: HybridLM, batch_size: int, max_seqlen: int, check_steps: int = 4,
                 tolerance: float = 1e-2):
        self.model, self.check_steps, self.tolerance = model.eval(), check_steps, tolerance
        self.eager: Decoder | None = Decoder(model, batch_size, max_seqlen)
        self.graph: CUDAGraphDecoder | None = None
        self.checked = 0
        try:
            self.graph = CUDAGraphDecoder(model, batch_size, max_seqlen)
        except (RuntimeError, ValueError) as err:
            self._fall_back(f"the capture failed: {type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}")

    @property
    def cache(self):
        return (self.eager or self.graph).cache

    def _fall_back(self, why: str) -> None:
        log.warning("CUDA-graph decoding is off (%s): decoding eagerly", why)
        self.graph = None

    def prefill(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        if self.graph is None:
            return self.eager.prefill(input_ids, attention_mask)
        logits = self.graph.prefill(input_ids, attention_mask)
        if self.eager is not None:
            self.eager.prefill(input_ids, attention_mask)
        return logits

    @torch.inference_mode()
    def step(self, token: torch.Tensor) -> torch.Tensor:
        if self.graph is None:
            return self.eager.step(token)
        if self.eager is None:
            return self.graph.step(token)
        logits, expected = self.graph.step(token), self.eager.step(token)
        error = ((logits.float() - expected.float()).abs().max() / expected.float().abs().max().clamp_min(1e-30)).item()
        if not math.isfinite(error) or error > self.tolerance:
            self._fall_back(f"step {self.checked + 1} differs from eager decoding by {error:.3g} (tolerance "
                            f"{self.tolerance:g})")
            return expected
        self.checked += 1
        if self.checked >= self.check_steps:
            self.eager = None  # checked: the second cache is freed
        return logits


@torch.inference_mode()
def generate(model: HybridLM, input_ids: torch.Tensor, max_new_tokens: int, *, temperature: float = 0.0,
             top_k: int = 0, top_p: float = 1.0, eos_id: int | None = None,
             generator: torch.Generator | None = None,
             on_token: Callable[[torch.Tensor], None] | None = None,
             decoder: Decoder | None = None, cuda_graph: bool = False,
             attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Returns (B, prompt + new) token ids. Stops early once every row has produced `eos_id`.
    attention_mask (B, L): prompts of different lengths, left-padded (0 for the pads); every row
    gets exactly the tokens it gets alone.
    `decoder`: one to reuse (its batch size must match, its max_seqlen suffice); otherwise a Decoder,
    or with `cuda_graph` a CheckedGraphDecoder (CUDA graphs, checked against eager decoding), is made
    for this call."""
    B, L = input_ids.shape
    if decoder is None:
        decoder = (CheckedGraphDecoder if cuda_graph else Decoder)(model, B, L + max_new_tokens)
    elif decoder.cache.batch_size != B or decoder.cache.max_seqlen < L + max_new_tokens - 1:
        raise ValueError(f"the decoder holds {decoder.cache.batch_size} rows of {decoder.cache.max_seqlen} tokens: "
                         f"too few for {B} rows of {L} + {max_new_tokens} new")
    vocab = model.config.vocab_size  # never sample the padding rows of the embedding
    logits = decoder.prefill(input_ids, attention_mask)[:, :vocab]
    out, done = [input_ids], torch.zeros(B, dtype=torch.bool, device=input_ids.device)
    for i in range(max_new_tokens):
        if i:
            logits = decoder.step(token)[:, :vocab]
        token = sample_next(logits, temperature=temperature, top_k=top_k, top_p=top_p, generator=generator)
        if eos_id is not None:
            token = token.masked_fill(done, eos_id)
            done |= token == eos_id
        out.append(token[:, None])
        if on_token is not None:
            on_token(token)
        if eos_id is not None and bool(done.all()):
            break
    return torch.cat(out, dim=1)


class TextStream:
    """on_token callback for one row: decodes the tokens so far and writes the new text, holding
    back an incomplete UTF-8 character (byte-fallback pieces arrive one byte at a time)."""

    def __init__(self, decode: Callable[[list[int]], str], write: Callable[[str], None]):
        self.decode, self.write = decode, write
        self.ids: list[int] = []
        self.shown = ""

    def __call__(self, token: torch.Tensor) -> None:
        self.ids.append(int(token[0]))
        self.flush(final=False)

    def flush(self, final: bool = True) -> None:
        text = self.decode(self.ids)
        if (final or not text.endswith("\ufffd")) and text.startswith(self.shown):
            self.write(text[len(self.shown):])
            self.shown = text
