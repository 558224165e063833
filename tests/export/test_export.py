"""Hugging Face export (logits, greedy generate, O(1) recurrent cache, tokenizer, standalone code),
checkpoint consolidation (ZeRO-1 and two-rank ZeRO-3), and the generate / eval commands."""
import json
import os
import pickle
import re
import shutil
import subprocess
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything here is local files

import pytest
import torch

from conftest import tiny_config
from h3pretrain.cli import main
from h3pretrain.checkpoint import load_checkpoint_model, load_model_source
from h3pretrain.export.hf import export_hf
from h3pretrain.generate import generate, left_pad
from h3pretrain.model import HybridLM
from h3pretrain.checkpoint import load_model_dir, model_from_state

REPO = Path(__file__).resolve().parents[2]


def _random_model(**overrides) -> HybridLM:
    model = HybridLM(tiny_config(**overrides)).eval()
    with torch.no_grad():  # a non-trivial shift-SSM B, so that the taps are not just C
        for layer in model.backbone.layers.values():
            if hasattr(layer.mixer, "shift_kernel"):
                layer.mixer.shift_kernel.B.add_(0.3 * torch.randn_like(layer.mixer.shift_kernel.B))
    return model


def _load_hf(path, **kw):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True, **kw).eval()


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


CONFIGS = {
    "h3-hd1": dict(ssm_head_dim=1),
    "h3-hd8-rotary": dict(ssm_head_dim=8, attn_rotary_dim=4),
    "s4d": dict(mixer="s4d"),
}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_hf_logits_and_greedy_generate_equal_ours(name, tmp_path):
    ours = _random_model(vocab_size=90, **CONFIGS[name])  # 90 -> 96 rows: padding must never be generated
    export_hf(ours.config, ours.state_dict(), tmp_path / "hf")
    hf = _load_hf(tmp_path / "hf")
    assert type(hf).__name__ == "H3ForCausalLM" and hf.config.model_type == "h3"
    ids = torch.randint(0, 90, (3, 45))
    with torch.no_grad():
        a, b = ours(ids), hf(ids).logits
    diff = _max_diff(a, b)
    print(f"{name}: max |logit difference| {diff:.3g}")
    assert diff <= 1e-5
    prompt = ids[:, :13]
    mine = generate(ours, prompt, max_new_tokens=24, eos_id=2)  # generation_config.json: eos 2
    theirs = hf.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=24, do_sample=False)
    assert torch.equal(mine, theirs)
    # labels give the usual shifted LM loss
    with torch.no_grad():
        loss = hf(ids, labels=ids).loss
    ref = torch.nn.functional.cross_entropy(a[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
    assert loss.item() == pytest.approx(ref.item(), rel=1e-5)


def test_hf_generate_keeps_constant_state_per_h3_layer(tmp_path):
    ours = _random_model(ssm_head_dim=8)  # layers: H3, attention, H3
    export_hf(ours.config, ours.state_dict(), tmp_path / "hf")
    hf = _load_hf(tmp_path / "hf")
    calls = []
    hf.register_forward_pre_hook(lambda mod, args, kw: calls.append(kw["input_ids"].shape[1]), with_kwargs=True)
    shapes = {}
    for L in (5, 70):
        calls.clear()
        prompt = torch.randint(0, 97, (2, L))
        out = hf.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=6, do_sample=False,
                          return_dict_in_generate=True)
        assert calls == [L] + [1] * 5  # the prompt once, then one token per step
        cache = out.past_key_values
        assert type(cache).__name__ == "H3Cache" and cache.get_seq_length() == L + 5
        h3 = [(tuple(cache.layers[i].conv_states[0].shape), tuple(cache.layers[i].recurrent_states[0].shape))
              for i in (0, 2)]
        assert h3[0] == ((2, 32, 64), (2, 4, 8, 8, 32))  # last 64 inputs of k; (B, H, hd, hd, N/2) complex
        assert cache.layers[1].keys.shape[2] == L + 5  # the attention layer's cache grows
        shapes[L] = h3
    assert shapes[5] == shapes[70]


def test_hf_beam_search_and_sampling_with_the_recurrent_cache(tmp_path):
    ours = _random_model(ssm_head_dim=2, attn_rotary_dim=4)
    export_hf(ours.config, ours.state_dict(), tmp_path / "hf")
    hf = _load_hf(tmp_path / "hf")
    prompt = torch.randint(0, 97, (2, 9))
    kw = dict(attention_mask=torch.ones_like(prompt), max_new_tokens=10)
    # beams reorder the cache (H3 states and keys/values); recomputing everything per step must agree
    beams = hf.generate(prompt, num_beams=3, do_sample=False, **kw)
    assert torch.equal(beams, hf.generate(prompt, num_beams=3, do_sample=False, use_cache=False, **kw))
    torch.manual_seed(1)
    sampled = hf.generate(prompt, do_sample=True, top_p=0.9, num_return_sequences=2, **kw)
    assert sampled.shape == (4, 19) and torch.equal(sampled[:, :9], prompt.repeat_interleave(2, 0))
    with pytest.raises(ValueError, match="left padding only"):  # right padding
        hf(prompt, attention_mask=torch.tensor([[1] * 6 + [0] * 3, [1] * 9]))


@pytest.mark.parametrize("name", list(CONFIGS))
def test_a_left_padded_batch_gives_every_row_what_it_gives_alone(name, tmp_path):
    """Prompts of 1 to 11 tokens as one left-padded batch: greedy tokens of every row equal that
    row's alone, in our generate() and in the export's generate() (attention masks the pads' keys,
    H3 / S4D states stay zero through them, rotary counts from each row's first token)."""
    ours = _random_model(vocab_size=90, **CONFIGS[name])
    export_hf(ours.config, ours.state_dict(), tmp_path / "hf")
    hf = _load_hf(tmp_path / "hf")
    prompts = [torch.randint(3, 90, (n,)) for n in (7, 1, 11, 4)]
    ids, mask = left_pad([p.tolist() for p in prompts], pad_id=2)
    mine = generate(ours, ids, 8, attention_mask=mask)
    theirs = hf.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False, min_new_tokens=8)
    for i, p in enumerate(prompts):
        alone = generate(ours, p[None], 8)[0, len(p):]
        assert torch.equal(mine[i, ids.shape[1]:], alone), (name, i)
        assert torch.equal(theirs[i, ids.shape[1]:], alone), (name, i)
    # scoring a padded batch: the real positions' logits are those of each row alone
    with torch.no_grad():
        batch = hf(ids, attention_mask=mask).logits
        for i, p in enumerate(prompts):
            torch.testing.assert_close(batch[i, ids.shape[1] - len(p):], hf(p[None]).logits[0], rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="right padding"):
        generate(ours, ids.flip(1), 2, attention_mask=mask.flip(1))


@pytest.mark.parametrize("inner", [(), (2, 2)])
def test_hf_final_state_equals_ours_over_several_chunks(inner):
    """The exported code's prompt state (its own copy: it may not import h3pretrain) equals
    flashconv's, with the sequence split into chunks."""
    from h3pretrain.export.hf_modeling.modeling_h3 import DiagSSMKernel as HFKernel
    from h3pretrain.model.ssm import DiagSSMKernel

    torch.manual_seed(0)
    ours, theirs = DiagSSMKernel(3, 16), HFKernel(3, 16)
    theirs.load_state_dict(ours.state_dict())
    u = torch.randn(2, 3, *inner, 50)
    torch.testing.assert_close(theirs.final_state(u, chunk=16), ours.final_state(u, chunk=512), rtol=1e-4, atol=1e-5)


def test_exported_code_does_not_import_h3pretrain(tmp_path):
    ours = _random_model(ssm_head_dim=2)
    export_hf(ours.config, ours.state_dict(), tmp_path / "hf")
    code = [p for p in (tmp_path / "hf").iterdir() if p.suffix == ".py"]
    assert sorted(p.name for p in code) == ["configuration_h3.py", "modeling_h3.py"]
    imports = re.compile(r"^\s*(from|import)\s+(h3pretrain|flashconv|data_prep)\b", re.M)
    assert not any(imports.search(p.read_text()) for p in code)
    ids = torch.randint(0, 97, (1, 9))
    with torch.no_grad():
        ref = ours(ids)
    torch.save(ids, tmp_path / "ids.pt")
    # a fresh interpreter in which importing the training code fails
    script = ("import sys, torch; sys.modules['h3pretrain'] = None; sys.modules['flashconv'] = None\n"
              "from transformers import AutoModelForCausalLM\n"
              f"m = AutoModelForCausalLM.from_pretrained({str(tmp_path / 'hf')!r}, trust_remote_code=True)\n"
              f"torch.save(m(torch.load({str(tmp_path / 'ids.pt')!r})).logits, {str(tmp_path / 'out.pt')!r})\n")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    subprocess.run([sys.executable, "-c", script], check=True, cwd=tmp_path, env=env, timeout=300)
    assert _max_diff(torch.load(tmp_path / "out.pt"), ref) <= 1e-5


def test_bf16_load_keeps_ssm_parameters_fp32(tmp_path):
    ours = _random_model()
    export_hf(ours.config, ours.state_dict(), tmp_path / "hf")
    hf = _load_hf(tmp_path / "hf", dtype=torch.bfloat16)
    dtypes = {n: p.dtype for n, p in hf.named_parameters() if ".layers.0." in n}
    for n, dt in dtypes.items():
        ssm = "kernel." in n or n.endswith((".D", "ssm_k_D"))
        assert dt == (torch.float32 if ssm else torch.bfloat16), n
    ids = torch.randint(0, 97, (2, 30))
    with torch.no_grad():
        ref, low = ours(ids), hf(ids).logits.float()
    assert _max_diff(low, ref) < 0.05 * ref.abs().max()


EDGE_TEXTS = ["hello  world\t\ttabs   3 spaces 12345 ünïcödé 日本語 🙂", "  leading", "trailing  \n\n",
              "</s> and <s> and <unk> are plain text", "x" * 300, ""]


def test_tokenizer_matches_sentencepiece(prepared, corpus, tmp_path):
    import zstandard
    from transformers import AutoTokenizer

    from data_prep.tokenizer import load_tokenizer
    from h3pretrain.export.hf import hf_tokenizer

    data, _ = prepared
    sp = load_tokenizer(data / "tokenizer.model")
    hf_tokenizer(sp).save_pretrained(tmp_path / "tok")
    tok = AutoTokenizer.from_pretrained(tmp_path / "tok")
    texts = list(EDGE_TEXTS)
    for f in sorted(Path(corpus).glob("*.jsonl.zst")):
        with zstandard.open(f, "rt") as fh:
            texts += [json.loads(line)["text"] for line in fh]
    assert len(texts) > 100
    for text in texts:
        ids = sp.encode(text)
        assert tok(text)["input_ids"] == ids  # no BOS/EOS added, like our data
        assert tok.decode(ids) == text == sp.decode(ids)
    assert (tok.unk_token_id, tok.bos_token_id, tok.eos_token_id) == (0, 1, 2) and len(tok) == sp.vocab_size


def test_import_h3_then_export_hf_equals_imported_model(tmp_path, capsys):
    sets = ["d_model=64", "n_layer=3", "attn_layer_idx=[1]", "attn_num_heads=4", "vocab_size=500"]
    cfg = tiny_config(d_model=64, n_layer=3, attn_layer_idx=[1], attn_num_heads=4, vocab_size=500)
    src = HybridLM(cfg)
    torch.save(src.official_state_dict(), tmp_path / "model.pt")
    args = ["import-h3", str(tmp_path / "model.pt"), "--preset", "tiny", "--out", str(tmp_path / "imported")]
    assert main(args + sum((["--set", s] for s in sets), [])) == 0
    assert main(["export-hf", "--checkpoint", str(tmp_path / "imported"), "--out", str(tmp_path / "hf")]) == 0
    assert "without tokenizer files" in capsys.readouterr().err
    imported, hf = load_model_dir(tmp_path / "imported"), _load_hf(tmp_path / "hf")
    ids = torch.randint(0, 500, (2, 37))
    with torch.no_grad():
        diff = _max_diff(imported(ids), hf(ids).logits)
    print(f"import-h3 -> export-hf: max |logit difference| {diff:.3g}")
    assert diff <= 1e-5
    # the weights file holds the released names, lm_head tied (stored once)
    from safetensors import safe_open

    with safe_open(str(tmp_path / "hf" / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert set(src.official_state_dict()) - keys <= {"lm_head.weight"}
    assert "backbone.layers.0.mixer.kernel.kernel.log_dt" in keys


# ---------------------------------------------------------------------------------------------
# trained checkpoints (slow: DeepSpeed training runs through the CLI)


def _cli(*args, timeout=300) -> subprocess.CompletedProcess:
    env = dict(os.environ, DS_ACCELERATOR="cpu", MLFLOW_DISABLE_TELEMETRY="true", OMP_NUM_THREADS="1")
    out = subprocess.run([sys.executable, "-m", "h3pretrain.cli", *map(str, args)], capture_output=True, text=True,
                         env=env, timeout=timeout, cwd=REPO)
    assert out.returncode == 0, out.stderr[-3000:]
    return out


@pytest.fixture(scope="module")
def trained(prepared, tmp_path_factory):
    """One rank, ZeRO-1, 4 steps, eval (2 batches of 4) and checkpoints at steps 2 and 4."""
    from test_train import run

    data, _ = prepared
    run_dir = tmp_path_factory.mktemp("export-one") / "run"
    assert run(data, run_dir, steps=4, eval_every=4, eval_batches=2, ckpt_every=2) == 0
    return data, run_dir


@pytest.fixture(scope="module")
def trained_gathered(prepared, tmp_path_factory):
    """The same run as `trained`, writing the gathered format (full tensors per pipeline stage)."""
    from test_train import run

    data, _ = prepared
    run_dir = tmp_path_factory.mktemp("export-gathered") / "run"
    assert run(data, run_dir, steps=4, eval_every=4, eval_batches=2, ckpt_every=2,
               **{"train.checkpoint_format": "gathered"}) == 0
    return data, run_dir


@pytest.fixture(scope="module")
def trained_tp2_pp2(prepared, tmp_path_factory):
    """Four ranks: tensor parallel 2 x pipeline parallel 2 (ZeRO-1)."""
    from test_train import run

    data, _ = prepared
    run_dir = tmp_path_factory.mktemp("export-tp2pp2") / "run"
    assert run(data, run_dir, nproc=4, steps=4, eval_every=4, eval_batches=2, ckpt_every=4, zero_stage=1,
               **{"parallel.tp": 2, "parallel.pp": 2, "model.attn_num_heads": 2}) == 0
    return data, run_dir


def _eval_loss(run_dir) -> float:
    from test_train import losses

    return losses(run_dir, "eval")[4]


@pytest.mark.slow
def test_load_checkpoint_model_forms_and_exact_weights(trained, trained_gathered):
    """One reader for both formats: the sharded checkpoint (DCP boxes) and the gathered one (full
    safetensors per stage) of the same run give the same weights, bit for bit."""
    from safetensors.torch import load_file

    from h3pretrain.checkpoint import sharded

    _, run_dir = trained
    step = run_dir / "checkpoints" / "step-00000004"
    cfg, sd = load_checkpoint_model(run_dir)
    for other in (run_dir / "checkpoints", step):
        cfg2, sd2 = load_checkpoint_model(other)
        assert cfg2 == cfg and sd2.keys() == sd.keys() and all(torch.equal(sd[k], sd2[k]) for k in sd)
    assert cfg.model.d_model == 32 and cfg.train.steps == 4
    assert set(sd) == set(HybridLM(cfg.model).state_dict()) and all(v.dtype == torch.float32 for v in sd.values())
    assert sharded.is_sharded(step) and not (step / "model").exists()
    assert sharded.stored_keys(step) == sorted([*sd, *(f"{k}::{m}" for k in sd for m in ("exp_avg", "exp_avg_sq"))])
    gathered = trained_gathered[1] / "checkpoints" / "step-00000004"
    stored = load_file(gathered / "model" / "stage-000-of-001.safetensors")
    assert not sharded.is_sharded(gathered)
    assert stored.keys() == sd.keys() and all(torch.equal(sd[k], stored[k]) for k in sd)
    _, sd_gathered = load_checkpoint_model(gathered)
    assert sd_gathered.keys() == sd.keys() and all(torch.equal(sd[k], sd_gathered[k]) for k in sd)
    _, earlier = load_checkpoint_model(run_dir / "checkpoints" / "step-00000002")
    assert not torch.equal(earlier["backbone.ln_f.weight"], sd["backbone.ln_f.weight"])


@pytest.mark.slow
def test_torn_or_malicious_checkpoints_are_refused(trained, tmp_path):
    _, run_dir = trained
    torn = tmp_path / "step-00000004"
    shutil.copytree(run_dir / "checkpoints" / "step-00000004", torn)
    (torn / "manifest.json").rename(tmp_path / "manifest.json")
    with pytest.raises(ValueError, match="incomplete"):
        load_checkpoint_model(torn)
    (tmp_path / "manifest.json").rename(torn / "manifest.json")
    # a tensor file or the metadata replaced by a pickle carrying code, the manifest rewritten to
    # match: refused without running it (DCP reads tensors with weights_only, .metadata goes
    # through a restricted unpickler)
    import hashlib

    marker = tmp_path / "pwned"
    for rel in ("state/__0_0.distcp", "state/.metadata"):
        victim = torn / rel
        saved, saved_manifest = victim.read_bytes(), (torn / "manifest.json").read_text()
        if rel.endswith(".distcp"):
            torch.save({"weights": _Evil(str(marker))}, victim)
        else:
            victim.write_bytes(pickle.dumps(_Evil(str(marker))))
        manifest = json.loads((torn / "manifest.json").read_text())
        manifest["files"][rel] = {"bytes": victim.stat().st_size, "sha256": hashlib.sha256(victim.read_bytes()).hexdigest()}
        (torn / "manifest.json").write_text(json.dumps(manifest))
        with pytest.raises(Exception) as caught:
            load_checkpoint_model(torn)
        assert not marker.exists(), rel
        if rel == "state/.metadata":
            assert "is not checkpoint metadata this program wrote" in str(caught.value)
        victim.write_bytes(saved)
        (torn / "manifest.json").write_text(saved_manifest)


class _Evil:
    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


@pytest.mark.slow
def test_export_hf_of_trained_checkpoint(trained, tmp_path):
    from transformers import AutoTokenizer

    from data_prep.tokenizer import load_tokenizer

    data, run_dir = trained
    out = _cli("export-hf", "--checkpoint", run_dir, "--out", tmp_path / "hf")
    assert "tokenizer.model" in out.stdout
    cfg, sd = load_checkpoint_model(run_dir)
    ours, hf = model_from_state(cfg.model, sd), _load_hf(tmp_path / "hf")
    tok = AutoTokenizer.from_pretrained(tmp_path / "hf")
    sp = load_tokenizer(data / "tokenizer.model")
    text = "The function returns a list of the keys in the dictionary."
    ids = torch.tensor([tok(text)["input_ids"]])
    assert ids[0].tolist() == sp.encode(text)
    with torch.no_grad():
        diff = _max_diff(ours(ids), hf(ids).logits)
    print(f"trained checkpoint: max |logit difference| {diff:.3g}")
    assert diff <= 1e-5
    theirs = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=20, do_sample=False)
    mine = generate(ours, ids, max_new_tokens=20, eos_id=2)
    assert torch.equal(mine, theirs[:, : mine.shape[1]])
    assert tok.decode(theirs[0, ids.shape[1]:]) == sp.decode(mine[0, ids.shape[1]:].tolist())


@pytest.mark.slow
def test_eval_command_reproduces_the_runs_eval_loss(trained, tmp_path):
    data, run_dir = trained
    # the run evaluated 2 batches of micro_batch 4 = the first 8 validation samples, in order
    _cli("eval", "--checkpoint", run_dir, "--data", data, "--batch-size", 4, "--batches", 2, "--json",
         tmp_path / "eval.json")
    result = json.loads((tmp_path / "eval.json").read_text())
    print(f"eval command {result['loss']!r} vs the run's eval loss {_eval_loss(run_dir)!r}")
    assert result["samples"] == 8 and result["tokens"] == 8 * 64
    assert result["loss"] == pytest.approx(_eval_loss(run_dir), rel=1e-5)
    assert result["perplexity"] == pytest.approx(torch.tensor(result["loss"]).exp().item(), rel=1e-6)


@pytest.mark.slow
def test_generate_command_streams_greedy_text(trained, capsys, tmp_path):
    from data_prep.tokenizer import load_tokenizer

    data, run_dir = trained
    prompt = "The function"
    gen = ["generate", "--checkpoint", str(run_dir), "--prompt", prompt, "--max-new-tokens", "12", "--ignore-eos"]
    capsys.readouterr()
    assert main(gen + ["--temperature", "0"]) == 0
    out = capsys.readouterr().out
    cfg, sd = load_checkpoint_model(run_dir)
    sp = load_tokenizer(data / "tokenizer.model")
    ids = generate(model_from_state(cfg.model, sd), torch.tensor([sp.encode(prompt)]), 12)
    assert out == prompt + sp.decode(ids[0, len(sp.encode(prompt)):].tolist()) + "\n"
    # sampling (top-k, top-p): reproducible per seed, different across seeds
    sampled = []
    for seed in (1, 1, 2):
        assert main(gen + ["--top-k", "50", "--top-p", "0.9", "--seed", str(seed)]) == 0
        sampled.append(capsys.readouterr().out)
    assert sampled[0] == sampled[1] != sampled[2] and all(s.startswith(prompt) for s in sampled)
    assert main(gen + ["--cuda-graph", "--device", "cpu"]) == 2
    assert "--cuda-graph needs a CUDA device, not --device cpu" in capsys.readouterr().err
    # several prompts as one left-padded batch: each completion is the one its prompt gets alone
    prompts = ["The function", "x", "import os and then"]
    (tmp_path / "prompts.txt").write_text("\n".join([prompts[0], "", *prompts[1:]]) + "\n")
    batch = ["generate", "--checkpoint", str(run_dir), "--prompts", str(tmp_path / "prompts.txt"),
             "--max-new-tokens", "12", "--temperature", "0", "--ignore-eos"]
    assert main(batch) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["prompt"] for r in rows] == prompts
    for row in rows:
        alone = generate(model_from_state(cfg.model, sd), torch.tensor([sp.encode(row["prompt"])]), 12)
        assert row["completion"] == sp.decode(alone[0, len(sp.encode(row["prompt"])):].tolist())


@pytest.mark.slow
def test_tp2_pp2_checkpoint_consolidates(trained_tp2_pp2, tmp_path):
    from h3pretrain.evaluate import evaluate_shards

    data, run_dir = trained_tp2_pp2
    stored = sorted(p.name for p in (run_dir / "checkpoints" / "step-00000004" / "state").iterdir())
    assert stored == [".metadata"] + [f"__{rank}_0.distcp" for rank in range(4)]  # every rank wrote its share
    cfg, sd = load_checkpoint_model(run_dir)
    assert (cfg.parallel.tp, cfg.parallel.pp) == (2, 2)
    model = model_from_state(cfg.model, sd)
    # the run's eval: 2 batches of micro_batch 4 x 1 data-parallel rank = the first 8 validation samples
    result = evaluate_shards(model, str(data), batch_size=4, max_batches=2)
    print(f"TP2·PP2 consolidated: eval {result['loss']!r} vs the run's {_eval_loss(run_dir)!r}")
    assert result["loss"] == pytest.approx(_eval_loss(run_dir), rel=1e-5)
    # consolidated to one safetensors file: the same tensors, bit for bit
    assert main(["consolidate", "--checkpoint", str(run_dir), "--out", str(tmp_path / "one")]) == 0
    _, one = load_model_source(tmp_path / "one")
    assert one.keys() == sd.keys() and all(torch.equal(one[k], sd[k]) for k in sd)
    export_hf(cfg.model, sd, tmp_path / "hf")
    ids = torch.randint(0, cfg.model.vocab_size, (2, 33))
    with torch.no_grad():
        assert _max_diff(model(ids), _load_hf(tmp_path / "hf")(ids).logits) <= 1e-5
    assert load_model_source(run_dir)[0] == cfg
