"""CheckpointManager's choice of a checkpoint to resume from (one process, no training): the newest
complete one wins whatever `latest` says, and damaged manifests or pointers are skipped with a
warning, never a traceback."""
import json
import logging

import pytest

from h3pretrain.checkpoint import CheckpointManager


def write(directory):
    (directory / "model").mkdir()
    (directory / "model" / "stage-000-of-001.safetensors").write_bytes(b"weights" * 10)


@pytest.fixture
def three(tmp_path):
    ckpt = CheckpointManager(tmp_path / "checkpoints", keep_last=5)
    for step in (2, 4, 6):
        ckpt.save(write, step, {"step": step})
    return ckpt


def test_newest_complete_checkpoint_wins_over_an_older_latest(three):
    (three.root / "latest").write_text("step-00000004\n")  # killed before the pointer moved to 6
    assert three.find_resumable() == three.root / "step-00000006"


@pytest.mark.parametrize("damage", [b"\xff\xfe\x00garbage\x9c", b"{}", b'{"files": {}, "step": 6}',
                                    b'{"files": {"model/x": 3}, "step": 6}', b"[1, 2]"])
def test_damaged_newest_manifest_is_skipped_with_a_warning(three, caplog, damage):
    (three.root / "step-00000006" / "manifest.json").write_bytes(damage)
    with caplog.at_level(logging.WARNING):
        assert three.find_resumable() == three.root / "step-00000004"
    (warning,) = [r.getMessage() for r in caplog.records if "skipping checkpoint" in r.getMessage()]
    assert "step-00000006" in warning and "manifest.json" in warning


def test_random_bytes_in_latest_are_ignored(three):
    (three.root / "latest").write_bytes(b"\x00\xff\xfe random \x9c")
    assert three.find_resumable() == three.root / "step-00000006"


def test_a_byte_flipped_weight_file_is_refused(three):
    victim = three.root / "step-00000006" / "model" / "stage-000-of-001.safetensors"
    data = bytearray(victim.read_bytes())
    data[3] ^= 0x01
    victim.write_bytes(bytes(data))
    assert three.verify(three.root / "step-00000006") == "model/stage-000-of-001.safetensors does not match its sha256"
    assert three.find_resumable() == three.root / "step-00000004"
    manifest = json.loads((three.root / "step-00000004" / "manifest.json").read_text())
    assert "trainer_state.json" in manifest["files"]


def test_readers_refuse_a_byte_flipped_checkpoint(tmp_path):
    """load_checkpoint_model (export-hf, generate, eval) verifies sha256, not only sizes."""
    from safetensors.torch import save_file

    from conftest import tiny_config
    from h3pretrain.config import Config, to_dict
    from h3pretrain.checkpoint import load_checkpoint_model
    from h3pretrain.model import HybridLM

    model = HybridLM(tiny_config())

    def write_model(directory):
        (directory / "model").mkdir()
        save_file({k: v.contiguous() for k, v in model.state_dict().items()},
                  str(directory / "model" / "stage-000-of-001.safetensors"))

    ckpt = CheckpointManager(tmp_path / "checkpoints")
    step = ckpt.save(write_model, 6, {"step": 6, "config": to_dict(Config(model=tiny_config()))})
    cfg, weights = load_checkpoint_model(step)
    assert cfg.model.d_model == 32 and set(weights) == set(model.state_dict())
    victim = step / "model" / "stage-000-of-001.safetensors"
    data = bytearray(victim.read_bytes())
    data[-5] ^= 0x10  # a weight's bytes: the size stays the same
    victim.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="stage-000-of-001.safetensors does not match its sha256"):
        load_checkpoint_model(step)


def test_pruning_counts_good_checkpoints_and_sets_damaged_ones_aside(tmp_path, caplog):
    """Resumed from step 4 while damaged steps 6 and 8 exist: the save at step 5 must keep 5 and 4
    (and older good ones up to keep_last), and move 6 and 8 aside instead of deleting the good ones."""
    ckpt = CheckpointManager(tmp_path / "checkpoints", keep_last=2)
    for step in (2, 4, 6, 8):
        ckpt.keep_last = 9
        ckpt.save(write, step, {"step": step})
    (ckpt.root / "step-00000006" / "manifest.json").write_bytes(b"\x00garbage")
    (ckpt.root / "step-00000008" / "model" / "stage-000-of-001.safetensors").write_bytes(b"short")
    ckpt.keep_last = 2
    with caplog.at_level(logging.WARNING):
        ckpt.save(write, 5, {"step": 5})
    kept = sorted(p.name for p in ckpt.root.glob("step-*"))
    assert kept == ["step-00000004", "step-00000005"]
    assert sorted(p.name for p in (ckpt.root / "damaged").iterdir()) == ["step-00000006", "step-00000008"]
    assert "step-00000008" in caplog.text and "moved to" in caplog.text
    assert ckpt.find_resumable() == ckpt.root / "step-00000005"


def test_the_checkpoint_just_written_is_never_pruned(tmp_path):
    """An older step saved after a newer good one (keep_last 1): both the one just written and the
    newest good one stay."""
    ckpt = CheckpointManager(tmp_path / "checkpoints", keep_last=1)
    ckpt.save(write, 8, {"step": 8})
    ckpt.save(write, 3, {"step": 3})
    assert sorted(p.name for p in ckpt.root.glob("step-*")) == ["step-00000003", "step-00000008"]
    ckpt.save(write, 9, {"step": 9})
    assert sorted(p.name for p in ckpt.root.glob("step-*")) == ["step-00000009"]


def test_an_explicit_older_resume_sets_the_newer_checkpoints_aside(three):
    three.set_aside_newer(three.root / "step-00000002")
    assert sorted(p.name for p in three.root.glob("step-*")) == ["step-00000002"]
    assert sorted(p.name for p in (three.root / "superseded").iterdir()) == ["step-00000004", "step-00000006"]
    assert three.find_resumable() == three.root / "step-00000002"
