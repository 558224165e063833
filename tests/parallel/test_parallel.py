"""Tensor, pipeline and context parallelism on CPU/gloo: every layout computes the same losses, gradients and
updates as one process (fp32, relative 1e-5); checkpoints reshard across layouts; the 2.7B preset's
production layout plans on the meta device.

tests/parallel/parallel_probe.py runs a small hybrid model (H3, attention, H3 [, H3]) under torchrun."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.slow
PROBE = Path(__file__).with_name("parallel_probe.py")


def probe(out: Path, nproc: int, **args) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", str(PROBE),
           str(out), *(f"{k}={v}" for k, v in args.items())]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-6000:]
    return out


def losses(out: Path) -> list[float]:
    return json.loads((out / "losses.json").read_text())


def stage_files(out: Path, pattern: str) -> dict[str, torch.Tensor]:
    merged = {}
    for f in sorted(out.glob(pattern)):
        merged.update(torch.load(f, weights_only=True))
    assert merged, f"no {pattern} in {out}"
    return merged


def assert_same_tensors(ref: dict, got: dict, rel: float, what: str) -> None:
    assert sorted(ref) == sorted(got), f"{what}: different tensors"
    for name, a in ref.items():
        b = got[name]
        assert a.shape == b.shape, (what, name)
        err = (a - b).norm() / a.norm().clamp_min(1e-12)
        assert err <= rel, f"{what} {name}: relative difference {err:.2e}"


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    """Single-process runs: head_dim 1 and 2 (3 layers), 4 layers for interleaving, 6 steps for resumes."""
    root = tmp_path_factory.mktemp("one")
    return {key: probe(root / key, 1, **args) for key, args in {
        "hd1": dict(head_dim=1), "hd2": dict(head_dim=2), "hd8": dict(head_dim=8), "l4": dict(layers=4),
        "6-steps": dict(steps=6)}.items()}


LAYOUTS = {  # name: (processes, probe arguments, reference)
    "TP2": (2, dict(tp=2, head_dim=2), "hd2"),
    "PP2": (2, dict(pp=2, head_dim=1), "hd1"),
    "PP2-interleaved": (2, dict(pp=2, virtual_pp=2, layers=4), "l4"),
    "TP2-ZeRO2": (2, dict(tp=2, zero=2, head_dim=1), "hd1"),
    "TP2·PP2": (4, dict(tp=2, pp=2, head_dim=1), "hd1"),
    "TP2·DP2": (4, dict(tp=2, head_dim=2), "hd2"),
    "TP2-sequence-parallel": (2, dict(tp=2, sp=1, head_dim=2), "hd2"),
    "TP2·PP2-sequence-parallel": (4, dict(tp=2, pp=2, sp=1, head_dim=1), "hd1"),
    # context parallel, zigzag: 16 tokens in 4 / 8 chunks of 4 / 2, two per rank (the shift FIR
    # reaches 7 back: over 2 / 4 chunks); ring attention
    "CP2": (2, dict(cp=2, head_dim=2), "hd2"),
    "CP4": (4, dict(cp=4, head_dim=1), "hd1"),
    "CP4-head-dim-8-block-recompute": (4, dict(cp=4, head_dim=8, recompute="block"), "hd8"),
    "TP2·CP2-head-dim-8": (4, dict(tp=2, cp=2, head_dim=8), "hd8"),
    "TP2·CP2-sequence-parallel": (4, dict(tp=2, cp=2, sp=1, head_dim=1), "hd1"),
    "PP2·CP2": (4, dict(pp=2, cp=2, head_dim=1), "hd1"),
    # regional torch.compile and activation recompute under the layouts
    "TP2·PP2-SP-compiled-selective-recompute": (4, dict(tp=2, pp=2, sp=1, head_dim=1, compile=1,
                                                     recompute="selective"), "hd1"),
    "DP2-ZeRO3-compiled": (2, dict(zero=3, head_dim=1, compile=1), "hd1"),
    "TP2-ZeRO2-compiled-block-recompute": (2, dict(tp=2, zero=2, head_dim=1, compile=1, recompute="block"), "hd1"),
    "CP2-compiled-selective-recompute": (2, dict(cp=2, head_dim=2, compile=1, recompute="selective"), "hd2"),
}


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_layout_matches_one_process(one_process, tmp_path, layout):
    nproc, args, ref_key = LAYOUTS[layout]
    ref, got = one_process[ref_key], probe(tmp_path / layout, nproc, **args)
    assert losses(got) == pytest.approx(losses(ref), rel=1e-5)
    # The first gradients match to 1e-5. Later ones see weights that Adam moved: it divides by
    # sqrt(v), so near-zero gradients (an attention k bias) turn fp32 rounding noise into updates of
    # lr * noise, which the next gradients inherit at ~1e-5: 1e-4 for steps 2 and 3.
    for step in range(3):
        assert_same_tensors(stage_files(ref, f"grads-stage*-step{step}.pt"),
                            stage_files(got, f"grads-stage*-step{step}.pt"), 1e-5 if step == 0 else 1e-4,
                            f"{layout} gradients step {step}")
    ref_final, got_final = stage_files(ref, "final-stage*.pt"), stage_files(got, "final-stage*.pt")
    assert sorted(ref_final) == sorted(got_final)
    moments = [k for k in ref_final if "::" in k]
    assert moments, "no Adam state collected"
    assert_same_tensors({k: ref_final[k] for k in moments}, {k: got_final[k] for k in moments}, 1e-4,
                        f"{layout} Adam moments after 3 updates")
    for name in (k for k in ref_final if "::" not in k):  # weights after 3 updates
        # the same Adam effect: an absolute floor of 1/400 of one update (lr = 0.02)
        torch.testing.assert_close(got_final[name], ref_final[name], rtol=1e-5, atol=5e-5,
                                   msg=lambda m, name=name: f"{layout} {name}: {m}")


@pytest.mark.parametrize("first,second,fmt", [
    ((4, dict(tp=2, pp=2)), (4, dict()), "sharded"),  # TP2·PP2 -> TP1·PP1·DP4
    ((4, dict()), (4, dict(tp=2, pp=2)), "sharded"),  # and back
    ((2, dict(pp=2, zero=1)), (2, dict(zero=3)), "sharded"),  # PP2 ZeRO-1 -> DP2 ZeRO-3
    ((4, dict(tp=2, cp=2)), (4, dict(cp=4, zero=3)), "sharded"),  # TP2·CP2 -> CP4 ZeRO-3
    ((2, dict(zero=3)), (4, dict(tp=2, zero=2)), "sharded"),  # DP2 ZeRO-3 -> TP2·DP2 ZeRO-2
    ((4, dict(tp=2, pp=2)), (4, dict()), "gathered"),  # the earlier format still resumes
])
def test_checkpoint_reshards_across_layouts(one_process, tmp_path, first, second, fmt):
    """Saved after 3 steps under one layout, resumed under another: the losses of steps 4-6 are
    those of one process's uninterrupted run. A sharded checkpoint is every rank's own file (its
    ZeRO partition of its TP / PP piece), and reading it whole gives the writer's full tensors."""
    from h3pretrain.checkpoint import sharded

    ckpt = tmp_path / "ckpt"
    written = probe(tmp_path / "a", first[0], head_dim=1, save=ckpt, format=fmt, **first[1])
    resumed = probe(tmp_path / "b", second[0], head_dim=1, load=ckpt, steps=6, **second[1])
    assert losses(resumed) == pytest.approx(losses(one_process["6-steps"])[3:], rel=1e-5)
    pp = first[1].get("pp", 1)
    if fmt == "gathered":
        files = sorted(p.relative_to(ckpt).as_posix() for p in ckpt.rglob("*.safetensors"))
        assert files == [f"{kind}/stage-{s:03d}-of-{pp:03d}.safetensors" for kind in ("model", "optim") for s in range(pp)]
        return
    assert sorted(p.name for p in (ckpt / "state").iterdir()) == [".metadata"] + [
        f"__{rank}_0.distcp" for rank in range(first[0])]
    full = sharded.read_full(ckpt)
    assert_same_tensors(stage_files(written, "final-stage*.pt"), full, 0.0, "read whole")


def test_partition_balances_cost_and_keeps_order():
    from h3pretrain.config import preset
    from h3pretrain.parallel.pipeline import partition
    from h3pretrain.model.flops import layer_train_flops, train_flops_per_token

    cfg = preset("1.3b")
    kinds = cfg.layer_kinds()
    for pp, vpp in [(1, 1), (2, 1), (4, 1), (2, 2), (4, 3)]:
        chunks = partition(cfg, pp, vpp)
        layers = [i for c in chunks for i in c.layers]
        assert layers == list(range(cfg.n_layer)), (pp, vpp)
        assert [(c.stage, c.virtual) for c in chunks] == [(i % pp, i // pp) for i in range(pp * vpp)]
        costs = [c.cost for c in chunks]
        assert sum(costs) == pytest.approx(train_flops_per_token(cfg, 2048))
        # moving one boundary layer to a neighbour never lowers the most expensive chunk
        for i in range(len(chunks) - 1):
            a, b = chunks[i], chunks[i + 1]
            for moved, to_b in ((a.layers[-1], True), (b.layers[0], False)):
                if len(a.layers if to_b else b.layers) == 1:
                    continue
                c = layer_train_flops(cfg, kinds[moved], 2048)
                new = costs.copy()
                new[i] += -c if to_b else c
                new[i + 1] += c if to_b else -c
                assert max(new) >= max(costs) * (1 - 1e-12), (pp, vpp, i, moved)
    with pytest.raises(ValueError, match="cannot fill"):
        partition(cfg, 8, 4)


def test_2_7b_production_layout_plans_on_meta():
    from h3pretrain.config import Config, preset
    from h3pretrain.parallel.plan import plan, report

    cfg = Config(model=preset("2.7b"))
    cfg.parallel.tp, cfg.parallel.pp = 2, 2
    cfg.train.global_batch, cfg.train.micro_batch = 256, 4
    chunks, stages, dp = plan(cfg, 8, 2048)
    assert dp == 2 and len(stages) == 2
    tied_copy = cfg.model.padded_vocab_size * cfg.model.d_model
    assert sum(s.params for s in stages) - tied_copy == 2_670_307_840
    costs = [c.cost for c in chunks]
    assert max(costs) / min(costs) < 1.1  # 32 layers split to within one layer's cost
    for s in stages:
        assert 0 < s.total_gib < 80, s
    text = report(cfg, 8, 2048)
    print(text)
    assert "stage 0 chunk 0: embedding, layers 0-" in text and "ln_f + tied head" in text
    assert "GiB" in text


def test_launch_configs_production_layouts_plan_on_meta():
    """Each preset's SLURM config (nodes x 8 GPUs, its layout) fits 80 GB GPUs by the estimate."""
    from h3pretrain.config import load_yaml
    from h3pretrain.parallel.plan import plan

    for size, params in [("125m", 126_387_456), ("355m", 361_058_304), ("1.3b", 1_326_096_384),
                         ("2.7b", 2_670_307_840)]:
        cfg = load_yaml(Path(__file__).resolve().parents[2] / "launch" / "configs" / f"{size}.yaml")
        gpus = cfg.slurm.nodes * cfg.slurm.gpus_per_node
        chunks, stages, dp = plan(cfg, gpus, 2048)
        tied_copies = (cfg.parallel.pp > 1) * cfg.model.padded_vocab_size * cfg.model.d_model
        assert sum(s.params for s in stages) - tied_copies == params, size
        assert dp * cfg.parallel.tp * cfg.parallel.pp == gpus
        for s in stages:
            assert s.total_gib < 80, (size, s)
