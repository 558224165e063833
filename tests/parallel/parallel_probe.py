"""Run under torchrun by tests/parallel/test_parallel.py: a few optimizer steps of a small hybrid model under
one (TP, PP, CP, DP) layout on fixed random batches. The first TP/DP rank of every stage writes that
stage's full gradients of each step and its final weights; rank 0 writes the losses.

    torchrun --nproc_per_node=N tests/parallel/parallel_probe.py OUT tp=2 pp=1 virtual_pp=1 cp=1 head_dim=1 zero=1 \
        layers=3 compile=0 recompute=none format=sharded [save=DIR | load=DIR]
"""
import json
import sys
from pathlib import Path

import torch


def main() -> None:
    out = Path(sys.argv[1])
    args = dict(tp="1", pp="1", virtual_pp="1", cp="1", head_dim="1", zero="1", layers="3", steps="3", sp="0", compile="0",
                recompute="none", format="sharded")
    args.update(a.split("=", 1) for a in sys.argv[2:])
    mode = "save" if "save" in args else "load" if "load" in args else ""
    ckpt = Path(args[mode]) if mode else None
    tp, pp, vpp, cp, head_dim, zero, layers = (int(args[k]) for k in ("tp", "pp", "virtual_pp", "cp", "head_dim",
                                                                       "zero", "layers"))
    from h3pretrain.config import Config, ModelConfig, ParallelConfig, TrainConfig
    from h3pretrain.train.engine import TrainingEngine
    from h3pretrain.train.loop import init_distributed

    rank, world, device = init_distributed()
    model = ModelConfig(vocab_size=61, pad_vocab_multiple=8, d_model=32, n_layer=layers, attn_layer_idx=[1],
                        attn_num_heads=4, attn_rotary_dim=4, ssm_head_dim=head_dim, ssm_d_state=8,
                        embed_dropout=0.0, attn_dropout=0.0)
    train = TrainConfig(global_batch=8, micro_batch=2, lr=0.02, warmup_steps=2, steps=6, precision="fp32",
                        zero_stage=zero, seed=3, grad_clip=0.5, compile=args["compile"] == "1",
                        recompute=args["recompute"], checkpoint_format=args["format"])
    cfg = Config(model=model, train=train, parallel=ParallelConfig(tp=tp, pp=pp, virtual_pp=vpp, cp=cp,
                                                                    sequence_parallel=args["sp"] == "1"))
    seq = 16
    engine = TrainingEngine(cfg, device, seq)
    layout = engine.layout
    gen = torch.Generator().manual_seed(7)
    batches = [torch.randint(0, model.vocab_size, (train.global_batch, seq + 1), generator=gen) for _ in range(6)]
    first, steps = 0, int(args["steps"])
    if mode == "load":
        first = 3
        engine.load(ckpt, step=first)
    writer = layout.tp_rank == 0 and layout.dp_rank == 0 and layout.cp_rank == 0
    losses, norms = [], []
    for step in range(first, steps):
        local = batches[step].chunk(layout.dp)[layout.dp_rank]

        def dump(step=step):
            grads = {k: v for k, v in engine.collect(optimizer_state=False, grads=True).items() if k.endswith("::grad")}
            if writer:
                torch.save(grads, out / f"grads-stage{layout.pp_rank}-step{step}.pt")

        losses.append(engine.train_step(local, before_step=dump).loss)
        norms.append(engine.grad_norm())
    weights = engine.collect(optimizer_state=True)
    if writer:
        torch.save(weights, out / f"final-stage{layout.pp_rank}.pt")
    if mode == "save":
        ckpt.mkdir(parents=True, exist_ok=True)
        torch.distributed.barrier()
        engine.save(ckpt)(None)
    if rank == 0:
        (out / "losses.json").write_text(json.dumps(losses))
        (out / "grad_norms.json").write_text(json.dumps(norms))
    torch.distributed.barrier()


if __name__ == "__main__":
    main()
