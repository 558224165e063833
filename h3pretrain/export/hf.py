"""Export to a Hugging Face model directory: weights (official names) + config + modeling code +
tokenizer, loadable offline with

    AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True)
    AutoTokenizer.from_pretrained(out)

The modeling code is `hf_modeling/` (standalone: torch + transformers only), copied by
transformers' own save_pretrained for classes registered with an auto class.
"""
from __future__ import annotations

from pathlib import Path

import torch

from ..config import ModelConfig
from ..errors import InputFileError
from ..model.released import to_official

BOS_ID, EOS_ID = 1, 2  # data_prep.tokenizer's ids


def hf_config(cfg: ModelConfig):
    from .hf_modeling.configuration_h3 import H3Config

    return H3Config(
        vocab_size=cfg.padded_vocab_size, token_vocab_size=cfg.vocab_size, d_model=cfg.d_model,
        n_layer=cfg.n_layer, mixer=cfg.mixer, attn_layer_idx=list(cfg.attn_layer_idx),
        attn_num_heads=cfg.attn_num_heads, attn_rotary_dim=cfg.attn_rotary_dim, ssm_d_state=cfg.ssm_d_state,
        ssm_head_dim=cfg.ssm_head_dim, mlp_ratio=cfg.mlp_ratio, embed_dropout=cfg.embed_dropout,
        resid_dropout=cfg.resid_dropout, attn_dropout=cfg.attn_dropout, layer_norm_eps=cfg.layer_norm_eps,
        initializer_range=cfg.initializer_range, bos_token_id=BOS_ID, eos_token_id=EOS_ID)


def hf_model(cfg: ModelConfig, state: dict[str, torch.Tensor]):
    """The exported class holding `state` (HybridLM names)."""
    from transformers import GenerationConfig

    from .hf_modeling.configuration_h3 import H3Config
    from .hf_modeling.modeling_h3 import H3ForCausalLM

    H3Config.register_for_auto_class()
    H3ForCausalLM.register_for_auto_class("AutoModelForCausalLM")
    config = hf_config(cfg)
    with torch.device("meta"):
        model = H3ForCausalLM(config)
    model.load_state_dict(to_official(state), strict=True, assign=True)
    model.tie_weights()
    # never generate the embedding's padding rows (ours slices them off the logits)
    padding = list(range(cfg.vocab_size, cfg.padded_vocab_size))
    model.generation_config = GenerationConfig(bos_token_id=BOS_ID, eos_token_id=EOS_ID, pad_token_id=EOS_ID,
                                               suppress_tokens=padding or None)
    return model.eval()


def hf_tokenizer(spm_model: str | Path):
    """Our SentencePiece BPE as a `tokenizers` BPE with the same pieces, merges and byte fallback."""
    from sentencepiece import sentencepiece_model_pb2
    from tokenizers import Tokenizer, decoders, models, normalizers
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import SentencePieceExtractor

    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(Path(spm_model).read_bytes())
    spec, norm = proto.trainer_spec, proto.normalizer_spec
    # the settings data_prep.tokenizer trains with; others would need more than this mapping
    if spec.model_type != spec.BPE or not spec.byte_fallback or norm.add_dummy_prefix or \
            norm.remove_extra_whitespaces or norm.precompiled_charsmap:
        raise ValueError(f"{spm_model}: only byte-fallback BPE models with identity normalisation, no dummy "
                         "prefix and whitespace kept (as `h3pretrain prep` trains them) can be converted")
    kw = SentencePieceExtractor(str(spm_model)).extract(models.BPE)
    unk, bos, eos = (proto.pieces[i].piece for i in (spec.unk_id, spec.bos_id, spec.eos_id))
    tok = Tokenizer(models.BPE(vocab=kw["vocab"], merges=kw["merges"], unk_token=unk, fuse_unk=True,
                               byte_fallback=True))
    tok.normalizer = normalizers.Replace(" ", "▁")
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    # SentencePiece reads "</s>" in text as characters, never as the control token: so do we.
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token=unk, bos_token=bos, eos_token=eos,
                                   split_special_tokens=True, clean_up_tokenization_spaces=False)


def export_hf(cfg: ModelConfig, state: dict[str, torch.Tensor], out: str | Path,
              tokenizer: str | Path | None = None) -> Path:
    out = Path(out)
    tok = hf_tokenizer(tokenizer) if tokenizer is not None else None
    if tok is not None and len(tok) != cfg.vocab_size:
        raise InputFileError(f"{tokenizer} has {len(tok)} tokens, the model {cfg.vocab_size}")
    out.mkdir(parents=True, exist_ok=True)
    if tok is not None:
        tok.save_pretrained(out)
    hf_model(cfg, state).save_pretrained(out)
    return out
