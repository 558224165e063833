"""`h3pretrain` command line: one entry point, one subcommand per job.

Heavy imports (torch, deepspeed, megatron) happen inside the subcommands, so `--help` is instant.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from . import jsonio
from .errors import EXIT_USAGE, InputFileError, UserError


def _output_dir(path: str, flag: str, reusable) -> Path:
    """An output directory that may be written: new, empty, or `reusable(path)` (an earlier output
    of the same command, which is replaced)."""
    out = Path(path)
    if out.exists() and not out.is_dir():
        raise InputFileError(f"{flag} {out}: exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not reusable(out):
        raise InputFileError(f"{flag} {out}: the directory holds other files; give a new or empty directory")
    return out


def _import_h3(args: argparse.Namespace) -> int:
    import torch

    from .config import apply_overrides, preset
    from .model.released import CheckpointMismatchError, load_file
    from .model import HybridLM
    from .checkpoint import is_model_dir, save_model_dir

    _output_dir(args.out, "--out", is_model_dir)
    overrides = []
    for item in args.set:  # model.KEY=VALUE (the form --help shows) or KEY=VALUE
        key = item.split("=", 1)[0]
        if "." in key and not key.startswith("model."):
            raise UserError(f"--set {item}: import-h3 sets model fields only (model.KEY=VALUE)")
        overrides.append(item[len("model."):] if key.startswith("model.") else item)
    cfg = apply_overrides(preset(args.preset), overrides)
    print(f"reading {args.checkpoint}", flush=True)
    state = load_file(args.checkpoint)
    with torch.device("meta"):
        model = HybridLM(cfg)
    try:
        model.load_official_state_dict(state, args.layout)
    except CheckpointMismatchError as err:
        raise CheckpointMismatchError(f"{args.checkpoint} (preset {args.preset}): {err}") from None
    tok = None
    if args.tokenizer:
        from data_prep.tokenizer import load_tokenizer

        from .data.tokenizer import check_tokenizer_vocab

        tok = load_tokenizer(args.tokenizer)
        check_tokenizer_vocab(cfg, tok.vocab_size, f"--tokenizer {tok.path}")
    out = save_model_dir(model, args.out)
    if tok is not None:  # kept beside the model: export-hf and generate find it there
        import shutil

        for src, name in tok.files():
            shutil.copyfile(src, out / name)
    print(f"imported {model.num_parameters():,} parameters ({args.preset}) -> {out}"
          + (f", tokenizer {tok.path.name}" if tok else ""))
    return 0


def _info(args: argparse.Namespace) -> int:
    import torch

    from .config import apply_overrides, describe, load_yaml, preset, to_dict
    from .model import HybridLM

    if args.config:  # the whole config with each setting's meaning
        full = load_yaml(args.config, args.set)
        full.validate()
        print("\n".join(describe(full)))
        with torch.device("meta"):
            print(f"model parameters: {HybridLM(full.model).num_parameters():,}")
        return 0
    cfg = apply_overrides(preset(args.preset), args.set)
    with torch.device("meta"):
        model = HybridLM(cfg)
    for key, value in to_dict(cfg).items():
        print(f"  {key:20s} {value}")
    print(f"  layers: {' '.join({'attention': 'A', 's4d': 'S'}.get(k, 'H') for k in cfg.layer_kinds())}")
    print(f"  parameters: {model.num_parameters():,}")
    return 0


def _prep(args: argparse.Namespace) -> int:
    import logging

    from data_prep.prep import PrepError, PrepSettings, prepare

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    settings = PrepSettings(inputs=args.inputs, out=args.out, seq_len=args.seq_len, vocab_size=args.vocab_size,
                            tokenizer=args.tokenizer, tokenizer_sample_mb=args.tokenizer_sample_mb,
                            val_fraction=args.val_fraction, samples_per_shard=args.samples_per_shard,
                            pile_sets=args.pile_set or None, workers=args.workers)
    try:
        prepare(settings, progress=not args.quiet)
    except PrepError as err:
        print(f"h3pretrain prep: error: {err}", file=sys.stderr)
        return 2
    return 0


def _train(args: argparse.Namespace) -> int:
    from .train.signals import StopRequest

    stop = StopRequest().install()  # before torch is imported: a preemption in start-up is honoured
    from .config import Config, apply_overrides, load_yaml
    from .train.loop import train

    from .checkpoint import CheckpointSpaceError

    cfg = load_yaml(args.config, args.set) if args.config else apply_overrides(Config(), args.set)
    try:
        code = train(cfg, stop)  # an unexpected exception propagates as usual (a failure)
    except CheckpointSpaceError as err:  # status.json says failed; a restart may find space again
        print(f"h3pretrain train: error: {err}", file=sys.stderr, flush=True)
        code = 1
    _leave(code)


def _leave(code: int) -> None:
    """Everything is written (checkpoint, status.json, mlflow closed). Interpreter shutdown still
    aborted finished runs now and then (SIGABRT, "terminate called without an active exception":
    a C++ thread of gloo or an extension destroyed while joinable), which a launcher or the SLURM
    job reads as a crash. Leave without running finalizers."""
    import logging

    if "torch.distributed" in sys.modules:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _slurm(args: argparse.Namespace) -> int:

    from . import slurm
    from .config import load_yaml
    from .slurm.jobs import preflight

    try:
        if args.slurm_command == "status":
            st = slurm.status(args.run_dir)
            print(jsonio.dumps(st, indent=1) if args.json else slurm.format_status(st))
            return 0
        if args.slurm_command == "resume":
            p = slurm.resume_plan(args.run_dir, args.set)
            print(slurm.describe(p, slurm.submit(p, new_run=False)))
            return 0
        p = slurm.plan(load_yaml(args.config, args.set), args.config)
        if args.slurm_command == "render":
            try:
                preflight(p)
            except slurm.SlurmError as err:
                print(f"warning: {err}", file=sys.stderr)
            print(slurm.render(p), end="")
            return 0
        print(slurm.describe(p, slurm.submit(p)))
        return 0
    except slurm.SlurmError as err:
        print(f"h3pretrain slurm {args.slurm_command}: error: {err}", file=sys.stderr)
        return 2


def _plan(args: argparse.Namespace) -> int:
    from .config import Config, apply_overrides, load_yaml
    from .parallel.plan import report

    from .config import preset

    cfg = load_yaml(args.config) if args.config else Config()
    if args.preset:
        cfg.model = preset(args.preset)
    apply_overrides(cfg, args.set)
    try:
        if not args.gpu_memory_gb > 0:
            raise ValueError(f"--gpu-memory-gb {args.gpu_memory_gb}: must be > 0")
        print(report(cfg, args.gpus, args.seq_len, args.gpu_memory_gb))
    except ValueError as err:
        print(f"h3pretrain plan: error: {err}", file=sys.stderr)
        return 2
    return 0


def _device(name: str):
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"--device {name}: not a device (auto, cpu, cuda or cuda:N)") from None
    if device.type not in ("cpu", "cuda"):
        raise UserError(f"--device {name}: only cpu and cuda are supported")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError(f"--device {name}: CUDA is not available on this machine")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UserError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return device


def _export_hf(args: argparse.Namespace) -> int:
    from .checkpoint import load_model_source
    from .data.tokenizer import find_tokenizer
    from .export.hf import export_hf

    _output_dir(args.out, "--out", lambda p: (p / "config.json").is_file() and (p / "model.safetensors").is_file())
    cfg, state = load_model_source(args.checkpoint)
    tokenizer = find_tokenizer(cfg, args.tokenizer, args.checkpoint)
    if tokenizer is None:
        print(f"warning: no tokenizer found (no {cfg.data_sources()[0][0]}/manifest.json, no --tokenizer): exporting the "
              "model without tokenizer files", file=sys.stderr)
    out = export_hf(cfg.model, state, args.out, tokenizer)
    print(f"exported {sum(t.numel() for t in state.values()):,} parameters"
          f"{' and ' + str(tokenizer) if tokenizer else ''} -> {out}")
    return 0


def _consolidate(args: argparse.Namespace) -> int:
    from .checkpoint import load_checkpoint_model, model_from_state, save_model_dir

    _output_dir(args.out, "--out", lambda p: (p / "config.json").is_file() and (p / "model.safetensors").is_file())
    cfg, state = load_checkpoint_model(args.checkpoint)
    out = save_model_dir(model_from_state(cfg.model, state, args.checkpoint), args.out)
    print(f"consolidated {sum(t.numel() for t in state.values()):,} parameters -> {out / 'model.safetensors'}")
    return 0


def _tokenizer_for(cfg, override: str | None, source: str):
    from data_prep.tokenizer import load_tokenizer

    from .data.tokenizer import check_tokenizer_vocab, find_tokenizer

    path = find_tokenizer(cfg, override, source)
    if path is None:
        raise InputFileError(f"no tokenizer: {cfg.data_sources()[0][0]}/manifest.json does not exist and {source} holds none; "
                             "pass --tokenizer (a SentencePiece .model or a tokenizer.json)")
    tok = load_tokenizer(path)
    check_tokenizer_vocab(cfg.model, tok.vocab_size, str(path))
    return tok


def _generate(args: argparse.Namespace) -> int:
    from contextlib import nullcontext

    import torch

    from .checkpoint import load_model
    from .generate import TextStream, generate

    for flag, value, ok, rule in (("--max-new-tokens", args.max_new_tokens, args.max_new_tokens >= 1, ">= 1"),
                                  ("--temperature", args.temperature, args.temperature >= 0, ">= 0 (0 = greedy)"),
                                  ("--top-k", args.top_k, args.top_k >= 0, ">= 0 (0 = all)"),
                                  ("--top-p", args.top_p, 0 < args.top_p <= 1, "in (0, 1]")):
        if not ok:
            raise UserError(f"{flag} {value}: must be {rule}")
    device = _device(args.device)
    if args.cuda_graph and device.type != "cuda":
        raise UserError(f"--cuda-graph needs a CUDA device, not --device {args.device}")
    if args.prompts is not None:
        if not Path(args.prompts).is_file():
            raise InputFileError(f"--prompts {args.prompts}: no such file")
        try:
            prompts = [line for line in Path(args.prompts).read_text(encoding="utf-8").splitlines() if line.strip()]
        except UnicodeDecodeError as err:
            raise InputFileError(f"--prompts {args.prompts}: not UTF-8 text ({err})") from None
        if not prompts:
            raise UserError(f"--prompts {args.prompts}: no prompt in it (every line is empty)")
        if args.cuda_graph:
            raise UserError("--cuda-graph decodes one prompt (--prompt), not a padded batch (--prompts)")
    prompt = None if args.prompts is not None else sys.stdin.read() if args.prompt == "-" else args.prompt
    if prompt is not None and not prompt:
        raise UserError("--prompt is empty")
    cfg, model = load_model(args.checkpoint, device)
    tok = _tokenizer_for(cfg, args.tokenizer, args.checkpoint)
    if prompt is None:
        return _generate_batch(args, model, tok, prompts, device)
    ids = tok.encode(prompt)
    generator = torch.Generator(device=device).manual_seed(args.seed)
    sys.stdout.write(prompt)
    stream = TextStream(tok.decode, lambda text: (sys.stdout.write(text), sys.stdout.flush()))
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if args.bf16 else nullcontext()
    with autocast:
        generate(model, torch.tensor([ids], device=device), args.max_new_tokens, temperature=args.temperature,
                 top_k=args.top_k, top_p=args.top_p, eos_id=None if args.ignore_eos else tok.eos_id,
                 generator=generator, on_token=stream, cuda_graph=args.cuda_graph)
    stream.flush()
    sys.stdout.write("\n")
    return 0


def _generate_batch(args: argparse.Namespace, model, tok, prompts: list[str], device) -> int:
    import json
    from contextlib import nullcontext

    import torch

    from .generate import generate, left_pad

    encoded = [tok.encode(p) for p in prompts]
    if not all(encoded):
        raise UserError(f"--prompts {args.prompts}: a prompt encodes to no tokens")
    ids, mask = left_pad(encoded, tok.eos_id)  # the pads are masked out of every layer
    width = ids.shape[1]
    generator = torch.Generator(device=device).manual_seed(args.seed)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if args.bf16 else nullcontext()
    eos = None if args.ignore_eos else tok.eos_id
    with autocast:
        out = generate(model, ids.to(device), args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                       top_p=args.top_p, eos_id=eos, generator=generator, attention_mask=mask.to(device))
    for prompt, row in zip(prompts, out[:, width:].tolist()):
        if eos is not None and eos in row:
            row = row[:row.index(eos)]
        print(json.dumps({"prompt": prompt, "completion": tok.decode(row)}, ensure_ascii=False), flush=True)
    return 0


def _eval(args: argparse.Namespace) -> int:
    import math

    from .data import Manifest
    from .evaluate import evaluate_shards
    from .checkpoint import load_model
    from .data.tokenizer import check_tokenizer_vocab

    if args.batch_size < 1:
        raise UserError(f"--batch-size {args.batch_size}: must be >= 1")
    if args.batches < 0:
        raise UserError(f"--batches {args.batches}: must be >= 0 (0 = the whole split)")
    if args.json and (Path(args.json).is_dir() or not Path(args.json).parent.is_dir()):
        raise UserError(f"--json {args.json}: cannot be written (a directory, or its directory does not exist)")
    device = _device(args.device)
    cfg, model = load_model(args.checkpoint, device)
    own_path = cfg.data_sources()[0][0]
    own = Manifest.load(own_path) if (Path(own_path) / "manifest.json").is_file() else None
    paths = args.data or [p for p, _ in cfg.data_sources()]  # default: the run's own data (every source)
    for path in paths:
        data = Manifest.load(path)
        data.shards(args.split)  # names the splits there are
        check_tokenizer_vocab(cfg.model, data.vocab_size, f"{path}'s tokenizer")
        if own is not None and own.tokenizer_sha256 != data.tokenizer_sha256:
            raise InputFileError(f"{path} was tokenized with another tokenizer than the model's data ({own_path})")
    results = []
    for path in paths:
        result = evaluate_shards(model, path, split=args.split, batch_size=args.batch_size,
                                 max_batches=args.batches, bf16=args.bf16)
        where = f"{path} " if len(paths) > 1 else ""
        print(f"{where}{result['split']}: {result['samples']:,} samples, {result['tokens']:,} tokens | loss "
              f"{result['loss']:.4f} | perplexity {result['perplexity']:.2f}", flush=True)
        results.append({"data": str(path), **result})
    out = {"checkpoint": str(args.checkpoint), **results[0]}
    if len(results) > 1:  # every source, and their token-weighted mean
        tokens = sum(r["tokens"] for r in results)
        loss = sum(r["loss"] * r["tokens"] for r in results) / tokens
        print(f"all {len(results)} sources: {tokens:,} tokens | loss {loss:.4f} | perplexity {math.exp(min(loss, 50)):.2f}")
        out = {"checkpoint": str(args.checkpoint), "sources": results, "tokens": tokens, "loss": loss,
               "perplexity": math.exp(min(loss, 50))}
    if args.json:
        Path(args.json).write_text(jsonio.dumps(out, indent=1) + "\n")
    return 0


def _synthetic(args: argparse.Namespace) -> int:
    import dataclasses

    import torch

    from .synthetic import SyntheticSettings, run

    if args.threads:
        torch.set_num_threads(args.threads)
    fields = [f.name for f in dataclasses.fields(SyntheticSettings)]
    s = SyntheticSettings(**{k: v for k, v in vars(args).items() if k in fields})
    s.validate()
    result = run(s, log=lambda line: print(line, flush=True))
    print(f"{args.task} / {args.mixer}: test accuracy {result['test_accuracy']:.3f} "
          f"({result['parameters']:,} parameters, {result['seconds']:.0f} s)")
    if args.json:
        Path(args.json).write_text(jsonio.dumps(result, indent=1) + "\n")
    return 0


def _summary(args: argparse.Namespace) -> int:
    from .summary import main as summary

    return summary(args.run_dir)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="h3pretrain", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("import-h3", help="convert a released H3 checkpoint (model.pt) to a model directory")
    p.add_argument("checkpoint", help="released file: .pt / .ckpt (Lightning) / .safetensors")
    p.add_argument("--preset", required=True, help="model shape: 125m, 355m, 1.3b, 2.7b")
    p.add_argument("--out", required=True, help="output directory (model.safetensors + config.json)")
    p.add_argument("--set", action="append", default=[], metavar="model.KEY=VALUE",
                   help="override a model field, e.g. --set model.attn_rotary_dim=64 (repeatable)")
    p.add_argument("--tokenizer", help="the model's tokenizer, kept beside it: a tokenizer.json (e.g. GPT-2's, which "
                                       "the released models use), a SentencePiece .model, or a directory holding one")
    p.add_argument("--layout", choices=["cuda", "pytorch"], default="cuda",
                   help="H3 output channel order of the file when head_dim > 1: cuda (default; the official "
                        "fftconv path, h*head_dim + d2) or pytorch (the official PyTorch path, d2*H + h); "
                        "head_dim 1 is the same either way")
    p.set_defaults(func=_import_h3)

    p = sub.add_parser("prep", help="Pile-format text -> tokenizer + webdataset token shards (resumable)")
    p.add_argument("inputs", nargs="+", help="*.jsonl.zst / *.jsonl / *.txt files or directories")
    p.add_argument("--out", required=True, help="output directory (shards, manifest.json, tokenizer.model)")
    p.add_argument("--seq-len", type=int, default=2048, help="tokens per sample (+1 stored for the target)")
    p.add_argument("--vocab-size", type=int, default=32000, help="BPE vocabulary size when training one")
    p.add_argument("--tokenizer", help="use this tokenizer instead of training one: a SentencePiece .model, a Hugging "
                                       "Face tokenizer.json (e.g. GPT-2's) or a directory holding one")
    p.add_argument("--tokenizer-sample-mb", type=float, default=200.0, help="text to train the tokenizer on")
    p.add_argument("--val-fraction", type=float, default=0.005, help="documents hashed into the val split")
    p.add_argument("--samples-per-shard", type=int, default=8192)
    p.add_argument("--pile-set", action="append", help="keep only this meta.pile_set_name (repeatable)")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="tokenizer processes")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_prep)

    p = sub.add_parser("train", help="train (or resume) a model; launch with torchrun for several processes")
    p.add_argument("--config", help="YAML config (launch/configs/*.yaml); fields not given keep their defaults")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override any config field, e.g. --set train.lr=3e-4 (repeatable)")
    p.set_defaults(func=_train)

    p = sub.add_parser("plan", help="a layout's pipeline partition and per-GPU memory estimate (meta device, no GPU)")
    p.add_argument("--config", help="YAML config (launch/configs/*.yaml)")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE")
    p.add_argument("--preset", help="model preset (instead of, or over, the config's model)")
    p.add_argument("--gpus", type=int, default=8, help="GPUs in the job (TP x PP x DP)")
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--gpu-memory-gb", type=float, default=80.0, help="memory of one GPU, for the verdict")
    p.set_defaults(func=_plan)

    p = sub.add_parser("slurm", help="SLURM jobs: render/submit an sbatch job from a config, status, resume")
    slurm_sub = p.add_subparsers(dest="slurm_command", required=True, metavar="ACTION")
    for name, text in (("submit", "render the job into run_dir/slurm and sbatch it"),
                       ("render", "print the sbatch script (a dry run: nothing is written or submitted)")):
        q = slurm_sub.add_parser(name, help=text)
        q.add_argument("--config", required=True, help="YAML config (launch/configs/*.yaml)")
        q.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                       help="override any config field, e.g. --set slurm.nodes=2 (repeatable)")
    q = slurm_sub.add_parser("resume", help="submit a new job for a run directory (from its saved config)")
    q.add_argument("run_dir")
    q.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="e.g. --set slurm.time=12:00:00 --set slurm.partition=long")
    q = slurm_sub.add_parser("status", help="job state, last step and loss, latest checkpoint of a run directory")
    q.add_argument("run_dir")
    q.add_argument("--json", action="store_true")
    p.set_defaults(func=_slurm)

    p = sub.add_parser("export-hf", help="checkpoint -> Hugging Face directory (transformers, trust_remote_code)")
    p.add_argument("--checkpoint", required=True,
                   help="run dir, its checkpoints/ dir, a step-NNNNNNNN dir, or an import-h3 model dir")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--tokenizer", help="SentencePiece .model or tokenizer.json (default: the one beside the model or "
                                       "in the run's data directory)")
    p.set_defaults(func=_export_hf)

    p = sub.add_parser("consolidate", help="training checkpoint (any format, any layout) -> one model.safetensors "
                                          "+ config.json (a model directory)")
    p.add_argument("--checkpoint", required=True, help="run dir, its checkpoints/ dir or a step-NNNNNNNN dir")
    p.add_argument("--out", required=True, help="output directory")
    p.set_defaults(func=_consolidate)

    p = sub.add_parser("generate", help="sample text from a checkpoint (recurrent H3 generation, streamed)")
    p.add_argument("--checkpoint", required=True, help="as for export-hf")
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--prompt", help="prompt text ('-' reads stdin); the completion is streamed")
    which.add_argument("--prompts", metavar="FILE", help="a file of prompts, one per line (empty lines skipped), "
                                                         "decoded as one left-padded batch; prints one JSON line "
                                                         "{prompt, completion} per prompt")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=1.0, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=0, help="keep the k most likely tokens (0 = all)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--ignore-eos", action="store_true", help="keep going after the end-of-document token")
    p.add_argument("--tokenizer", help="SentencePiece .model or tokenizer.json (default: the one beside the model or "
                                       "in the run's data directory)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--bf16", action="store_true", help="bf16 autocast (SSMs stay fp32)")
    p.add_argument("--cuda-graph", action="store_true",
                   help="replay each decode step as one CUDA graph (CUDA only; fewer kernel launches)")
    p.set_defaults(func=_generate)

    p = sub.add_parser("eval", help="loss and perplexity of a checkpoint on prepared shards")
    p.add_argument("--checkpoint", required=True, help="as for export-hf")
    p.add_argument("--data", action="append", help="a directory written by `h3pretrain prep` (repeatable: one loss "
                                                   "per directory; default: the run's data, every source of a mixture)")
    p.add_argument("--split", default="val")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--batches", type=int, default=0, help="evaluate this many batches (0 = the whole split)")
    p.add_argument("--device", default="auto")
    p.add_argument("--bf16", action="store_true", help="bf16 autocast (SSMs stay fp32)")
    p.add_argument("--json", help="also write the result to this file")
    p.set_defaults(func=_eval)

    p = sub.add_parser("synthetic", help="the paper's synthetic tasks: train a 2-layer model, report test accuracy")
    p.add_argument("--task", required=True, choices=["induction", "assoc_recall"])
    p.add_argument("--mixer", default="h3", choices=["h3", "attention", "s4d"])
    p.add_argument("--vocab-size", type=int, default=0, help="0: the paper's (induction 20, assoc_recall 10)")
    p.add_argument("--seq-len", type=int, default=0, help="input tokens; 0: the paper's (induction 31, assoc_recall 22)")
    from .config import SyntheticSettings  # (light: h3pretrain.synthetic would import torch)

    p.add_argument("--loss", default=SyntheticSettings.loss, choices=["all", "answer"],
                   help="next-token loss at every position (the reference) or at the answer only")
    for flag in ("n_train", "n_test", "d_model", "n_layer", "epochs", "batch_size", "lr", "dropout",
                 "warmup_fraction", "weight_decay", "seed"):
        default = getattr(SyntheticSettings, flag)
        note = "0: the paper's (induction 400, assoc_recall 200)" if flag == "epochs" else f"default {default}"
        p.add_argument("--" + flag.replace("_", "-"), type=type(default), default=default,
                       help=f"{note} (the reference setup)")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
    p.add_argument("--json", help="also write the result (with the per-epoch history) to this file")
    p.set_defaults(func=_synthetic)

    p = sub.add_parser("summary", help="a run's result (steps, losses, checkpoint, metrics) and the next commands "
                                       "to run on it")
    p.add_argument("run_dir", help="the run directory (train.run_dir)")
    p.set_defaults(func=_summary)

    p = sub.add_parser("info", help="a preset's shape and parameter count, or a whole config explained (--config)")
    p.add_argument("--preset", default="125m")
    p.add_argument("--config", help="YAML config: print every setting with its value and meaning")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.set_defaults(func=_info)
    return parser


def main(argv: list[str] | None = None) -> int:
    from .quiet import silence_third_party_noise

    silence_third_party_noise()
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except UserError as err:  # expected: one line naming the setting or file; anything else is a bug
        command = args.command + (f" {args.slurm_command}" if args.command == "slurm" else "")
        message = " ".join(str(err).split())  # one line, whatever the message was built from
        print(f"h3pretrain {command}: error: {message}", file=sys.stderr, flush=True)
        if args.command == "train":  # leave as a finished run does (see _train)
            _leave(EXIT_USAGE)
        return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
