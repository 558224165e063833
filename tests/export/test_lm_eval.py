"""lm-eval-harness as a real client of the export: its `hf` model on a tiny export, with local tasks
of each output type (tests/export/lm_eval_tasks: jsonl data, --include_path), batch size 4. Its
numbers must be our own model's: loglikelihoods of the multiple-choice task and of the rolling
task against HybridLM's log-probs, generate_until (prompts of different lengths, left-padded into
one batch) against our own greedy generation of each prompt alone."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.slow
TASKS = Path(__file__).with_name("lm_eval_tasks")


@pytest.fixture(scope="module")
def export(prepared, tmp_path_factory):
    from conftest import tiny_config
    from data_prep.tokenizer import load_tokenizer
    from h3pretrain.export.hf import export_hf
    from h3pretrain.model import HybridLM

    import lm_eval  # noqa: F401 - the `eval` extra, which `make setup` installs
    data, manifest = prepared
    torch.manual_seed(0)
    model = HybridLM(tiny_config(vocab_size=manifest["tokenizer"]["vocab_size"], attn_rotary_dim=4)).eval()
    out = tmp_path_factory.mktemp("lm-eval") / "hf"
    export_hf(model.config, model.state_dict(), out, data / "tokenizer.model")
    return model, load_tokenizer(data / "tokenizer.model"), out


def _samples(results: Path, task: str) -> list[dict]:
    (path,) = list(results.rglob(f"samples_{task}_*.jsonl"))
    return [json.loads(line) for line in path.read_text().splitlines()]


def _logprob(model, ids: list[int], first: int) -> float:
    """Sum of log p(ids[t] | ids[:t]) for t >= first, over the whole (padded) vocabulary as lm-eval does."""
    with torch.no_grad():
        logits = model(torch.tensor([ids[:-1]])).float().log_softmax(-1)[0]
    targets = torch.tensor(ids[1:])
    return float(logits[torch.arange(len(targets)), targets][first - 1:].sum())


def test_lm_eval_runs_every_output_type_on_the_export_and_agrees_with_our_model(export, tmp_path):
    from h3pretrain.generate import generate

    model, tok, hf_dir = export
    results = tmp_path / "results"
    env = dict(os.environ, HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               TOKENIZERS_PARALLELISM="false", HF_DATASETS_CACHE=str(tmp_path / "datasets"))
    cmd = [sys.executable, "-m", "lm_eval", "--model", "hf",
           "--model_args", f"pretrained={hf_dir},trust_remote_code=True,dtype=float32",
           "--include_path", str(TASKS), "--tasks", "h3_mc,h3_rolling,h3_gen", "--batch_size", "4",
           "--device", "cpu", "--log_samples", "--output_path", str(results)]
    done = subprocess.run(cmd, cwd=TASKS, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]

    # multiple choice: each choice's loglikelihood is ours (context and continuation encoded as lm-eval does)
    checked = 0
    for sample in _samples(results, "h3_mc"):
        for args, resp in zip(sample["arguments"].values(), sample["resps"]):
            context, continuation = args["arg_0"], args["arg_1"]
            whole, ctx = tok.encode(context + continuation), tok.encode(context)
            ours = _logprob(model, whole, len(ctx))
            assert float(resp[0][0]) == pytest.approx(ours, rel=1e-4, abs=1e-4), (context, continuation)
            checked += 1
    assert checked == 12  # 3 + 2 + 2 + 2 + 3 choices
    # rolling: the whole text after the prefix token (lm-eval's: the tokenizer's BOS)
    for sample in _samples(results, "h3_rolling"):
        text = sample["doc"]["text"]
        ours = _logprob(model, [tok.bos_id] + tok.encode(text), 1)
        assert float(sample["resps"][0][0]) == pytest.approx(ours, rel=1e-4), text[:30]
    # generate_until, 6 prompts of 1 to 10 tokens in batches of 4: what each prompt gives alone
    gens = _samples(results, "h3_gen")
    assert len(gens) == 6
    for sample in gens:
        prompt = sample["arguments"]["gen_args_0"]["arg_0"]
        ids = tok.encode(prompt)
        alone = generate(model, torch.tensor([ids]), 6)[0, len(ids):].tolist()
        text = tok.decode(alone).split("\n")[0]
        assert sample["resps"][0][0] == text, prompt
