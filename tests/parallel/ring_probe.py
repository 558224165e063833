"""Run under torchrun by tests/parallel/test_ring_attention.py: ring attention over the zigzag pieces
of random sequences against one process's causal attention of the whole sequence (output and the
gradients of q, k, v), with the fused block kernel and with the math blocks; rank 0 writes the
largest relative differences to OUT.

    torchrun --nproc_per_node=N tests/parallel/ring_probe.py OUT
"""
import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F


def main() -> None:
    from h3pretrain.parallel import ring_attention as ring
    from h3pretrain.parallel.context import ContextParallel

    dist.init_process_group("gloo")
    context = ContextParallel(dist.group.WORLD)
    cp, rank = context.size, context.rank
    gen = torch.Generator().manual_seed(11)
    B, H, L, d = 2, 3, 8 * cp, 8
    q, k, v, grad = (torch.randn(B, H, L, d, generator=gen) for _ in range(4))
    whole = [x.clone().requires_grad_() for x in (q, k, v)]
    expected = F.scaled_dot_product_attention(*whole, is_causal=True)
    expected.backward(grad)
    c = L // (2 * cp)

    def mine(x: torch.Tensor) -> torch.Tensor:
        return torch.cat([x[:, :, j * c:(j + 1) * c] for j in context.chunks], dim=2)

    errors = {}
    for kernel in ("fused", "math"):
        if kernel == "math":
            ring._fused_usable = lambda q, p: False
        local = [mine(x).clone().requires_grad_() for x in (q, k, v)]
        out = ring.ring_attention(*local, dist.group.WORLD)
        out.backward(mine(grad))
        for name, got, want in [("out", out, mine(expected)), *((f"d{n}", x.grad, mine(w.grad)) for n, x, w in
                                                                 zip("qkv", local, whole))]:
            err = torch.tensor([((got - want).norm() / want.norm()).item()])
            dist.all_reduce(err, op=dist.ReduceOp.MAX)
            errors[f"{kernel} {name}"] = err.item()
    if rank == 0:
        Path(sys.argv[1]).write_text(json.dumps(errors))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
