"""Every bad input, for every subcommand: exit code 2, one line `h3pretrain <command>: error: ...`
naming the offending value or file, no traceback, and nothing created or changed on disk.

Commands run in this process through `h3pretrain.cli.main` (fast), except `train`, which runs as
a subprocess (it installs signal handlers and leaves through os._exit). The workspace holds a
prepared data set, a trained run with a checkpoint, damaged copies and odd files; its content is
compared (paths and sha256) before and after each case.
"""
import hashlib
import json
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import tiny_config

pytestmark = pytest.mark.slow

TINY = {"model.vocab_size": 1000, "model.d_model": 32, "model.n_layer": 3, "model.attn_layer_idx": "[1]",
        "model.attn_num_heads": 2, "model.ssm_head_dim": 2, "train.steps": 2, "train.global_batch": 4,
        "train.micro_batch": 2, "train.precision": "fp32", "train.eval_every": 0, "train.ckpt_every": 2,
        "train.mlflow": "false"}


def _env():
    return dict(os.environ, DS_ACCELERATOR="cpu", MLFLOW_DISABLE_TELEMETRY="true", OMP_NUM_THREADS="1")


def _train_argv(ws: Path, config: str = "", **sets) -> list[str]:
    merged = {**TINY, "data.path": str(ws / "data"), "train.run_dir": str(ws / "run"), **sets}
    return ["train", *(["--config", config] if config else []),
            *[x for k, v in merged.items() for x in ("--set", f"{k}={v}")]]


@pytest.fixture(scope="module")
def ws(prepared, tmp_path_factory):
    """The workspace: data/ (prepared), run/ (2 steps, one checkpoint) and damaged or odd files."""
    from data_prep.tokenizer import train_tokenizer
    from safetensors.torch import save_file

    data, _ = prepared
    ws = tmp_path_factory.mktemp("ws")
    shutil.copytree(data, ws / "data")
    argv = _train_argv(ws)
    done = subprocess.run([sys.executable, "-m", "h3pretrain.cli", *argv], env=_env(), capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    step = ws / "run" / "checkpoints" / "step-00000002"
    shutil.copytree(step, ws / "flipped" / "step-00000002")
    victim = ws / "flipped" / "step-00000002" / "state" / "__0_0.distcp"
    blob = bytearray(victim.read_bytes())
    blob[-7] ^= 0x20
    victim.write_bytes(bytes(blob))
    # names that lead out of a checkpoint: a `latest` naming a checkpoint elsewhere, a manifest entry
    # naming a file outside, a listed file that is a symbolic link to one outside
    shutil.copytree(step, ws / "elsewhere" / "step-00000002")
    (ws / "escaped" / "checkpoints").mkdir(parents=True)
    (ws / "escaped" / "checkpoints" / "latest").write_text("../../elsewhere/step-00000002\n")
    shutil.copytree(step, ws / "escmanifest" / "step-00000002")
    manifest_path = ws / "escmanifest" / "step-00000002" / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    outside = ws / "escmanifest" / "outside.txt"
    outside.write_text("not part of the checkpoint\n")
    manifest["files"]["../outside.txt"] = {"bytes": outside.stat().st_size,
                                           "sha256": hashlib.sha256(outside.read_bytes()).hexdigest()}
    manifest_path.write_text(json.dumps(manifest))
    shutil.copytree(step, ws / "symlinked" / "step-00000002")
    linked = ws / "symlinked" / "step-00000002" / "trainer_state.json"
    shutil.copy(linked, ws / "symlinked" / "trainer_state.json")
    linked.unlink()
    linked.symlink_to(ws / "symlinked" / "trainer_state.json")
    shutil.copytree(ws / "data", ws / "baddata")
    shard = ws / "baddata" / "val-000000.tar"
    blob = bytearray(shard.read_bytes())
    blob[len(blob) // 2] ^= 0x01
    shard.write_bytes(bytes(blob))
    text = [f"other words {i} " + "zebra quartz " * (i % 5) for i in range(400)]
    train_tokenizer(text, ws / "tok300.model", 300)
    train_tokenizer([t[::-1] for t in _corpus_texts(ws / "data")], ws / "tok1000.model", 1000)
    save_file({"x": torch.zeros(3)}, str(ws / "small.safetensors"))
    model = __import__("h3pretrain.model", fromlist=["HybridLM"]).HybridLM(tiny_config())
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(ws / "tiny.safetensors"))
    (ws / "pickle.safetensors").write_bytes(pickle.dumps({"x": [1, 2, 3]}))
    (ws / "random.pt").write_bytes(os.urandom(256))
    (ws / "random.model").write_bytes(os.urandom(256))
    (ws / "afile").write_text("a file, not a directory\n")
    (ws / "syntax.yaml").write_text("train:\n  steps: [1, 2\n")
    (ws / "list.yaml").write_text("- 1\n- 2\n")
    (ws / "latin1.yaml").write_bytes(b"train:\n  run_dir: caf\xe9\n")
    (ws / "notes.csv").write_text("a,b\n")
    (ws / "empty.jsonl").write_bytes(b"")
    (ws / "corpus").mkdir()
    (ws / "corpus" / "a.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in text))
    (ws / "norun").mkdir()
    (ws / "pickledir").mkdir()
    (ws / "pickledir" / "model.safetensors").write_bytes(pickle.dumps({"x": [1, 2, 3]}))
    (ws / "pickledir" / "config.json").write_text(json.dumps({"model": {"d_model": 32}}))
    (ws / "badconfigdir").mkdir()
    shutil.copy(ws / "tiny.safetensors", ws / "badconfigdir" / "model.safetensors")
    (ws / "badconfigdir" / "config.json").write_bytes(os.urandom(40))
    return ws


def _corpus_texts(data: Path) -> list[str]:
    """Text for a second tokenizer of the same vocabulary size: the data's shards decoded."""
    import sentencepiece as spm

    from h3pretrain.data import Manifest, ShardReader

    sp = spm.SentencePieceProcessor(model_file=str(data / "tokenizer.model"))
    reader = ShardReader(Manifest.load(data), "train")
    return [sp.decode(reader.shard_samples(i).ravel().tolist()) for i in range(len(reader.shards))]


def _changes(before: dict, after: dict) -> list[str]:
    return sorted(k for k in set(before) | set(after) if before.get(k) != after.get(k))


def _snapshot(roots: list[Path]) -> dict[str, str]:
    out = {}
    for root in roots:
        for p in sorted(root.rglob("*")):
            out[str(p)] = hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
    return out


# (command line with {ws} for the workspace, text the error line must contain)
CASES = [
    # import-h3
    ("import-h3 {ws}/missing.pt --preset 125m --out {ws}/out", "missing.pt"),
    ("import-h3 {ws}/random.pt --preset 125m --out {ws}/out", "random.pt"),
    ("import-h3 {ws}/pickle.safetensors --preset 125m --out {ws}/out", "pickle.safetensors"),
    ("import-h3 {ws}/small.safetensors --preset 125m --out {ws}/out", "small.safetensors"),
    ("import-h3 {ws}/tiny.safetensors --preset 9b --out {ws}/out", "9b"),
    ("import-h3 {ws}/tiny.safetensors --preset 125m --set nope=1 --out {ws}/out", "nope"),
    ("import-h3 {ws}/tiny.safetensors --preset 125m --out {ws}/afile", "afile"),
    # prep
    ("prep {ws}/corpus --out {ws}/out --vocab-size 10", "--vocab-size 10"),
    ("prep {ws}/corpus --out {ws}/out --workers 0", "--workers 0"),
    ("prep {ws}/corpus --out {ws}/out --val-fraction 1.5", "--val-fraction 1.5"),
    ("prep {ws}/corpus --out {ws}/out --val-fraction -0.5", "--val-fraction -0.5"),
    ("prep {ws}/corpus --out {ws}/out --seq-len 0", "--seq-len 0"),
    ("prep {ws}/corpus --out {ws}/out --samples-per-shard 0", "--samples-per-shard 0"),
    ("prep {ws}/corpus --out {ws}/out --tokenizer-sample-mb 0", "--tokenizer-sample-mb 0"),
    ("prep {ws}/nothing-here --out {ws}/out", "nothing-here"),
    ("prep {ws}/notes.csv --out {ws}/out", "notes.csv"),
    ("prep {ws}/empty.jsonl --out {ws}/out", "empty"),
    ("prep {ws}/corpus --out {ws}/out --tokenizer {ws}/missing.model", "missing.model"),
    ("prep {ws}/corpus --out {ws}/out --tokenizer {ws}/random.model", "random.model"),
    ("prep {ws}/corpus --out {ws}/afile", "afile"),
    ("prep {ws}/corpus --out {ws}/data", "other settings"),
    ("prep {ws}/corpus --out {ws}/out --vocab-size 50000", "--vocab-size 50000"),
    # plan
    ("plan --gpus 3 --set parallel.tp=3 --set model.attn_num_heads=4", "parallel.tp"),
    ("plan --gpus 0", "--gpus 0"),
    ("plan --preset 9b", "9b"),
    ("plan --config {ws}/missing.yaml", "missing.yaml"),
    ("plan --config {ws}/syntax.yaml", "syntax.yaml"),
    ("plan --seq-len 0", "--seq-len 0"),
    ("plan --gpus 8 --set parallel.pp=99", "parallel.pp"),
    ("plan --set train.nope=1", "nope"),
    # slurm
    ("slurm render --config {ws}/missing.yaml", "missing.yaml"),
    ("slurm render --config {ws}/list.yaml", "list.yaml"),
    ("slurm submit --config {ws}/syntax.yaml", "syntax.yaml"),
    ("slurm resume {ws}/nowhere", "nowhere"),
    ("slurm resume {ws}/norun", "norun"),
    ("slurm status {ws}/nowhere", "nowhere"),
    # consolidate
    ("consolidate --checkpoint {ws}/nowhere --out {ws}/out", "nowhere"),
    ("consolidate --checkpoint {ws}/flipped/step-00000002 --out {ws}/out", "sha256"),
    ("consolidate --checkpoint {ws}/run --out {ws}/data", "data"),
    ("consolidate --checkpoint {ws}/escaped --out {ws}/out", "'../../elsewhere/step-00000002', which is not a checkpoint"),
    ("consolidate --checkpoint {ws}/escmanifest/step-00000002 --out {ws}/out", "'../outside.txt' leads outside"),
    ("consolidate --checkpoint {ws}/symlinked/step-00000002 --out {ws}/out", "'trainer_state.json' leads outside"),
    ("eval --checkpoint {ws}/escaped --data {ws}/data", "'../../elsewhere/step-00000002', which is not a checkpoint"),
    ("export-hf --checkpoint {ws}/escmanifest/step-00000002 --out {ws}/out", "'../outside.txt' leads outside"),
    # export-hf
    ("export-hf --checkpoint {ws}/nowhere --out {ws}/out", "nowhere"),
    ("export-hf --checkpoint {ws}/norun --out {ws}/out", "norun"),
    ("export-hf --checkpoint {ws}/flipped/step-00000002 --out {ws}/out", "sha256"),
    ("export-hf --checkpoint {ws}/run --out {ws}/afile", "afile"),
    ("export-hf --checkpoint {ws}/run --out {ws}/data", "data"),
    ("export-hf --checkpoint {ws}/run --out {ws}/out --tokenizer {ws}/missing.model", "missing.model"),
    ("export-hf --checkpoint {ws}/run --out {ws}/out --tokenizer {ws}/tok300.model", "tok300.model"),
    ("export-hf --checkpoint {ws}/run --out {ws}/out --tokenizer {ws}/tok1000.model", "tok1000.model"),
    ("export-hf --checkpoint {ws}/run --out {ws}/out --tokenizer {ws}/random.model", "random.model"),
    ("export-hf --checkpoint {ws}/pickledir --out {ws}/out", "pickledir/model.safetensors"),
    ("export-hf --checkpoint {ws}/badconfigdir --out {ws}/out", "badconfigdir/config.json"),
    ("generate --checkpoint {ws}/pickledir --prompt hi", "pickledir/model.safetensors"),
    # generate
    ("generate --checkpoint {ws}/run --prompt hi --max-new-tokens -3", "--max-new-tokens -3"),
    ("generate --checkpoint {ws}/run --prompt hi --top-p 0", "--top-p 0"),
    ("generate --checkpoint {ws}/run --prompt hi --top-p 1.5", "--top-p 1.5"),
    ("generate --checkpoint {ws}/run --prompt hi --temperature -1", "--temperature -1"),
    ("generate --checkpoint {ws}/run --prompt hi --top-k -2", "--top-k -2"),
    ("generate --checkpoint {ws}/run --prompt hi --device cuda:7", "cuda:7"),
    ("generate --checkpoint {ws}/run --prompt hi --device tpu", "tpu"),
    ("generate --checkpoint {ws}/run --prompt hi --cuda-graph --device cpu", "--cuda-graph"),
    ("generate --checkpoint {ws}/run --prompt ''", "prompt"),
    ("generate --checkpoint {ws}/run --prompts {ws}/nowhere.txt", "nowhere.txt"),
    ("generate --checkpoint {ws}/run --prompts {ws}/empty.jsonl", "empty.jsonl"),
    ("generate --checkpoint {ws}/run --prompts {ws}/latin1.yaml", "latin1.yaml"),
    ("generate --checkpoint {ws}/run --prompts {ws}/afile --cuda-graph --device cpu", "--cuda-graph"),
    ("generate --checkpoint {ws}/nowhere --prompt hi", "nowhere"),
    ("generate --checkpoint {ws}/flipped/step-00000002 --prompt hi", "sha256"),
    ("generate --checkpoint {ws}/run --prompt hi --tokenizer {ws}/tok300.model", "tok300.model"),
    ("generate --checkpoint {ws}/run --prompt hi --tokenizer {ws}/tok1000.model", "tok1000.model"),
    # eval
    ("eval --checkpoint {ws}/run --data {ws}/data --split test", "test"),
    ("eval --checkpoint {ws}/run --data {ws}/data --batch-size 0", "--batch-size 0"),
    ("eval --checkpoint {ws}/run --data {ws}/data --batches -1", "--batches -1"),
    ("eval --checkpoint {ws}/run --data {ws}/nowhere", "nowhere"),
    ("eval --checkpoint {ws}/run --data {ws}/baddata", "val-000000.tar"),
    ("eval --checkpoint {ws}/nowhere --data {ws}/data", "nowhere"),
    ("eval --checkpoint {ws}/flipped/step-00000002 --data {ws}/data", "sha256"),
    ("eval --checkpoint {ws}/run --data {ws}/data --device cuda:7", "cuda:7"),
    ("eval --checkpoint {ws}/run --data {ws}/data --json {ws}/nowhere/result.json", "result.json"),
    # synthetic
    ("synthetic --task induction --n-train 0", "--n-train 0"),
    ("synthetic --task induction --batch-size 0", "--batch-size 0"),
    ("synthetic --task induction --lr -1", "--lr -1"),
    ("synthetic --task induction --d-model 0", "--d-model 0"),
    ("synthetic --task induction --vocab-size 2", "vocab_size"),
    ("synthetic --task assoc_recall --seq-len 7", "seq_len"),
    ("synthetic --task induction --dropout 1.5", "--dropout 1.5"),
    # info
    ("info --preset 9b", "9b"),
    ("info --set model.nope=1", "nope"),
    ("info --set model.d_model=abc", "abc"),
    ("info --set model.attn_num_heads=5", "attn_num_heads"),
    # summary
    ("summary {ws}/missing-run", "missing-run"),
    ("summary {ws}/data", "not a run directory"),
]

TRAIN_CASES = [
    (dict(**{"train.steps": -5}), "train.steps must be >= 1, not -5"),
    (dict(**{"train.micro_batch": 0}), "train.micro_batch"),
    (dict(**{"train.eval_every": 1, "train.eval_batches": 0}), "train.eval_batches"),
    (dict(**{"train.eval_every": 1, "data.eval_split": "test"}), "data.eval_split 'test'"),
    (dict(**{"train.resume": "/nope"}), "train.resume=/nope"),
    (dict(**{"train.global_batch": 3}), "train.global_batch 3"),
    (dict(**{"train.precision": "fp8"}), "fp8"),
    (dict(**{"train.recompute": "all"}), "all"),
    (dict(**{"train.nope": 1}), "nope"),
    (dict(**{"train.steps": "abc"}), "abc"),
    (dict(**{"data.path": "{ws}/nowhere"}), "nowhere"),
    (dict(**{"model.vocab_size": 512}), "model.vocab_size"),
    (dict(**{"data.tokenizer": "{ws}/tok1000.model"}), "tok1000.model"),
    (dict(**{"model.d_model": 48, "train.steps": 4}), "step-00000002"),  # the run's checkpoint has d_model 32
    (dict(**{"train.resume": "{ws}/flipped/step-00000002", "train.steps": 4}), "sha256"),
    (dict(**{"parallel.tp": 3}), "parallel.tp"),
    (dict(config="{ws}/syntax.yaml"), "syntax.yaml"),
    (dict(config="{ws}/list.yaml"), "list.yaml"),
    (dict(config="{ws}/latin1.yaml"), "latin1.yaml"),
    (dict(config="{ws}/missing.yaml"), "missing.yaml"),
]


@pytest.mark.parametrize("line, named", CASES, ids=[c[0].split(" --")[0][:40] + f"-{i}" for i, c in enumerate(CASES)])
def test_bad_input_is_one_line_exit_2_and_writes_nothing(ws, prepared, line, named, capsys, monkeypatch):
    import shlex

    from h3pretrain.cli import main

    monkeypatch.chdir(ws / "norun")
    roots = [ws, Path(prepared[0])]
    before = _snapshot(roots)
    argv = shlex.split(line.format(ws=ws))
    code = main(argv)
    out, err = capsys.readouterr()
    assert code == 2, (out + err)[-3000:]
    assert "Traceback" not in out + err
    lines = err.strip().splitlines()
    assert lines and len(lines) <= 3, err
    assert lines[-1].startswith(f"h3pretrain {argv[0]}") and ": error: " in lines[-1], err
    assert named in lines[-1], lines[-1]
    assert not _changes(before, _snapshot(roots))


@pytest.mark.parametrize("sets, named", TRAIN_CASES, ids=[next(iter(c[0])) + f"-{i}" for i, c in enumerate(TRAIN_CASES)])
def test_bad_training_input_is_one_line_exit_2_and_writes_nothing(ws, sets, named):
    before = _snapshot([ws])
    argv = _train_argv(ws, **{k: str(v).format(ws=ws) for k, v in sets.items()})
    done = subprocess.run([sys.executable, "-m", "h3pretrain.cli", *argv], env=_env(), capture_output=True,
                          text=True, timeout=300, cwd=ws / "norun")
    assert done.returncode == 2, (done.stdout + done.stderr)[-3000:]
    assert "Traceback" not in done.stdout + done.stderr
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("h3pretrain train: error: ") and named in last.format(ws=ws), last
    assert not _changes(before, _snapshot([ws]))


def test_the_tables_cover_every_subcommand():
    from h3pretrain.cli import build_parser

    commands = set(build_parser()._subparsers._group_actions[0].choices)
    covered = {line.split()[0] for line, _ in CASES} | {"train"}
    assert covered == commands
    assert len(CASES) + len(TRAIN_CASES) >= 60


def test_a_corrupt_shard_met_during_training_is_one_line_and_recorded(ws, tmp_path):
    """Shards are verified when first read, so a damaged one can surface after training started:
    one line naming it, exit 2, and status.json says failed (with the error) instead of running."""
    data = tmp_path / "data"
    shutil.copytree(ws / "data", data)
    for shard in data.glob("train-*.tar"):
        blob = bytearray(shard.read_bytes())
        blob[len(blob) // 2] ^= 0x01
        shard.write_bytes(bytes(blob))
    run_dir = tmp_path / "run"
    argv = _train_argv(ws, **{"data.path": str(data), "train.run_dir": str(run_dir)})
    done = subprocess.run([sys.executable, "-m", "h3pretrain.cli", *argv], env=_env(), capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 2, done.stderr[-3000:]
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("h3pretrain train: error: shard ") and "train-0" in last and "corrupt" in last
    assert "Traceback" not in done.stderr
    status = json.loads((run_dir / "status.json").read_text())
    assert status["state"] == "failed" and "corrupt" in status["error"]
