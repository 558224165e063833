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

GPT2_VOCAB_SIZE, GPT2_EOS_ID = 50257, 50256  # the released H3 models' tokenizer: <|endoftext|> is BOS and EOS


def special_ids(cfg: ModelConfig, tokenizer=None) -> tuple[int | None, int]:
    """(BOS, EOS): the tokenizer's; without one, GPT-2's for its vocabulary size (an imported
    released model), else those of the SentencePiece models `h3pretrain prep` trains."""
    if tokenizer is not None:
        return tokenizer.bos_id, tokenizer.eos_id
    if cfg.vocab_size == GPT2_VOCAB_SIZE:
        return GPT2_EOS_ID, GPT2_EOS_ID
    from data_prep.tokenizer import BOS_ID, EOS_ID

    return BOS_ID, EOS_ID


def hf_config(cfg: ModelConfig, bos_id: int | None, eos_id: int):
    from .hf_modeling.configuration_h3 import H3Config

    return H3Config(
        vocab_size=cfg.padded_vocab_size, token_vocab_size=cfg.vocab_size, d_model=cfg.d_model,
        n_layer=cfg.n_layer, mixer=cfg.mixer, attn_layer_idx=list(cfg.attn_layer_idx),
        attn_num_heads=cfg.attn_num_heads, attn_rotary_dim=cfg.attn_rotary_dim, ssm_d_state=cfg.ssm_d_state,
        ssm_head_dim=cfg.ssm_head_dim, mlp_ratio=cfg.mlp_ratio, embed_dropout=cfg.embed_dropout,
        resid_dropout=cfg.resid_dropout, attn_dropout=cfg.attn_dropout, layer_norm_eps=cfg.layer_norm_eps,
        initializer_range=cfg.initializer_range, bos_token_id=bos_id, eos_token_id=eos_id)


def hf_model(cfg: ModelConfig, state: dict[str, torch.Tensor], bos_id: int | None, eos_id: int):
    """The exported class holding `state` (HybridLM names)."""
    from transformers import GenerationConfig

    from .hf_modeling.configuration_h3 import H3Config
    from .hf_modeling.modeling_h3 import H3ForCausalLM

    H3Config.register_for_auto_class()
    H3ForCausalLM.register_for_auto_class("AutoModelForCausalLM")
    config = hf_config(cfg, bos_id, eos_id)
    with torch.device("meta"):
        model = H3ForCausalLM(config)
    model.load_state_dict(to_official(state), strict=True, assign=True)
    model.tie_weights()
    # never generate the embedding's padding rows (ours slices them off the logits)
    padding = list(range(cfg.vocab_size, cfg.padded_vocab_size))
    model.generation_config = GenerationConfig(bos_token_id=bos_id, eos_token_id=eos_id, pad_token_id=eos_id,
                                               suppress_tokens=padding or None)
    return model.eval()


def hf_tokenizer(tokenizer):
    """A data_prep.tokenizer.Tokenizer for transformers: a tokenizer.json as it is, with its EOS / BOS
    named; our SentencePiece BPE converted (the same pieces, merges and byte fallback)."""
    from transformers import PreTrainedTokenizerFast

    if tokenizer.kind == "huggingface":
        return PreTrainedTokenizerFast(tokenizer_file=str(tokenizer.path), eos_token=tokenizer.specials["eos_token"],
                                       bos_token=tokenizer.specials["bos_token"], clean_up_tokenization_spaces=False)
    return _sentencepiece_as_hf(tokenizer.path)


def _sentencepiece_as_hf(spm_model: Path):
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
    """tokenizer: a SentencePiece .model or a tokenizer.json (its EOS / BOS go into the config)."""
    from data_prep.tokenizer import load_tokenizer

    out = Path(out)
    ours = load_tokenizer(tokenizer) if tokenizer is not None else None
    tok = hf_tokenizer(ours) if ours is not None else None
    if tok is not None and len(tok) != cfg.vocab_size:
        raise InputFileError(f"{tokenizer} has {len(tok)} tokens, the model {cfg.vocab_size}")
    out.mkdir(parents=True, exist_ok=True)
    if tok is not None:
        tok.save_pretrained(out)
    hf_model(cfg, state, *special_ids(cfg, ours)).save_pretrained(out)
    return out
