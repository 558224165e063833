"""h3pretrain.rundir reads metrics.jsonl from its end in growing pieces: a record that straddles
the border of two pieces is read whole, the last record of each kind wins, and a line being
written is skipped."""
import json

import pytest

from h3pretrain import rundir


def _write(run, lines):
    run.mkdir(exist_ok=True)
    (run / "metrics.jsonl").write_text("".join(line + "\n" for line in lines))


@pytest.mark.parametrize("shift", [-55, -20, -1, 0, 1, 17, 40])  # 40: the border falls after it
def test_a_record_across_the_border_of_two_pieces_is_read(tmp_path, shift):
    wanted = json.dumps({"step": 7, "kind": "eval", "loss": 1.5, "note": "x" * 30})
    tail = [json.dumps({"step": 8, "kind": "train", "loss": 2.0})]
    size = len("\n".join(tail)) + 1
    # filler so that the eval line crosses the first piece's border (TAIL_BYTES from the end)
    pad = rundir.TAIL_BYTES - size - len(wanted) // 2 + shift
    filler = json.dumps({"step": 0, "kind": "train", "loss": 0.0, "pad": "p" * max(0, pad - 60)})
    older = json.dumps({"step": 1, "kind": "eval", "loss": 9.0})
    _write(tmp_path / "run", [older, "not json", wanted, filler, *tail, '{"step": 9, "kind": "tr'])
    found = rundir.last_records(tmp_path / "run", ("train", "eval"))
    assert found == {"train": json.loads(tail[0]), "eval": json.loads(wanted)}


def test_a_kind_the_file_lacks_is_absent_and_no_file_is_empty(tmp_path):
    _write(tmp_path / "run", [json.dumps({"step": i, "kind": "train", "loss": float(i)}) for i in range(3000)])
    assert rundir.last_records(tmp_path / "run", ("train", "eval")) == {
        "train": {"step": 2999, "kind": "train", "loss": 2999.0}}
    assert rundir.last_records(tmp_path / "none") == {}
