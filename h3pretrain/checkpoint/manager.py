"""Checkpoints: one directory per step, written under a temporary name and renamed when complete.

    run_dir/checkpoints/
        step-00000100/
            state/__R_0.distcp, state/.metadata   sharded: each rank's own share (h3pretrain.checkpoint.sharded)
            (or model/, optim/ stage-PPP-of-NNN.safetensors: gathered, h3pretrain.checkpoint.canonical)
            lr_scheduler.pt          LR schedule state
            rng/rank-00000.pt        torch CPU/CUDA RNG states per rank (tensors only)
            trainer_state.json       step (= Adam's step count), tokens seen, data-loader position, layout, config
            manifest.json            every file with its size (and sha256): written last
        latest                       name of the newest complete checkpoint: updated after the rename
        damaged/step-...             checkpoints found damaged when pruning (set aside, never deleted)
        superseded/step-...          checkpoints newer than one resumed from explicitly (train.resume=PATH)

A directory is complete only if its manifest exists and every file matches it; `find_resumable`
walks from the newest step down and skips anything torn, with a warning. Pruning keeps the
`keep_last` newest good checkpoints, and always the one just written.
In both formats the tensors are layout-independent: a checkpoint written under one TP x PP x DP
layout and ZeRO stage resumes under any other. Every torch.load runs with weights_only=True.
"""
from __future__ import annotations

import datetime
import errno
import hashlib
import json
import logging
import os
import re
import shutil
import threading
from pathlib import Path

import torch
import torch.distributed as dist

from .. import jsonio

log = logging.getLogger("h3pretrain.checkpoint")
STEP_DIR = re.compile(r"^step-(\d{8})$")


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 22):
            h.update(block)
    return h.hexdigest()


def _barrier(group=None) -> None:
    if dist.is_initialized():
        dist.barrier(group=group)


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _world() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def _broadcast(obj):
    if not dist.is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _write_text_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def rng_state() -> dict[str, torch.Tensor]:
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            state[f"cuda{i}"] = s
    return state


def set_rng_state(state: dict[str, torch.Tensor]) -> None:
    torch.set_rng_state(state["cpu"])
    if torch.cuda.is_available():
        torch.cuda.set_rng_state_all([state[k] for k in sorted(state) if k.startswith("cuda")])


class CheckpointSpaceError(OSError):
    """The device a checkpoint is written to is full (the partial write has been removed)."""


def inside(root: Path, rel: str) -> Path | None:
    """root/rel when it stays inside root once symbolic links are resolved, else None: no name a
    checkpoint's files give (`latest`, a manifest entry) may lead a reader out of it."""
    target = (Path(root) / rel).resolve()
    return target if target.is_relative_to(Path(root).resolve()) else None


def verify_checkpoint(path: Path, hashes: bool = True) -> str | None:
    """None if `path` is a complete checkpoint, else what is wrong with it (one line). Every reader
    of a checkpoint (resume, export, generate, eval) calls this first: sizes and sha256 of every
    file against the manifest, which is written last. `hashes=False` checks sizes only (pruning)."""
    manifest_path = path / "manifest.json"
    if not manifest_path.is_file():
        return "no manifest.json (the write did not finish)"
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        return f"manifest.json unreadable: {err}"
    files = manifest.get("files") if isinstance(manifest, dict) else None
    if not isinstance(files, dict) or not isinstance(manifest.get("step"), int):
        return "manifest.json lacks its step or file list"
    if "trainer_state.json" not in files or not any(rel.startswith("model/") or rel == "state/.metadata"
                                                    for rel in files):
        return "manifest.json lists no trainer state or no model weights"
    for rel, meta in files.items():
        f = inside(path, rel)
        if f is None:
            return f"manifest.json entry {rel!r} leads outside {path}"
        if not isinstance(meta, dict) or not isinstance(meta.get("bytes"), int):
            return f"manifest.json entry {rel!r} is malformed"
        if not f.is_file():
            return f"{rel} is missing"
        if f.stat().st_size != meta["bytes"]:
            return f"{rel} has {f.stat().st_size} bytes, manifest says {meta['bytes']}"
        if hashes and "sha256" in meta and _sha256(f) != meta["sha256"]:
            return f"{rel} does not match its sha256"
    return None


class CheckpointManager:
    """Collective where noted: every rank of the job constructs one (a background write coordinates
    the ranks over a process group of its own, so training's collectives run meanwhile)."""

    def __init__(self, root: str | Path, keep_last: int = 3, hash_files: bool = True, timeout_s: float | None = None):
        self.root = Path(root)
        self.keep_last, self.hash_files = keep_last, hash_files
        timeout = {"timeout": datetime.timedelta(seconds=timeout_s)} if timeout_s else {}
        self.group = dist.new_group(backend="gloo", **timeout) if dist.is_initialized() else None
        self._pending: threading.Thread | None = None
        self._failure: BaseException | None = None

    # ---- writing --------------------------------------------------------------------------

    def save(self, write_tensors, step: int, trainer_state: dict, background: bool = False,
             on_complete=None) -> Path:
        """Collective: every rank calls it. write_tensors(directory) collects the model and optimizer
        state (collectively) and either writes it or returns a function that does. With
        `background`, that function, the manifest, the rename and `latest` run in a thread: the
        checkpoint counts once `wait()` returns (the next save, the end of a run, a stop all wait).
        on_complete() runs on rank 0 once the checkpoint is complete. Returns the final directory."""
        self.wait()
        name = f"step-{step:08d}"
        final, tmp = self.root / name, self.root / (name + ".tmp")
        if _rank() == 0:
            self.root.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(tmp, ignore_errors=True)
            (tmp / "rng").mkdir(parents=True)
        _barrier()
        finish = write_tensors(tmp)
        rng = rng_state()

        def complete() -> None:
            try:
                written = list(finish(self.group) or []) if finish is not None else []
                written.append(tmp / "rng" / f"rank-{_rank():05d}.pt")
                torch.save(rng, written[-1])
            except OSError as err:
                if err.errno != errno.ENOSPC:
                    raise
                shutil.rmtree(tmp, ignore_errors=True)  # the previous checkpoint stays the one in use
                need = self._expected_bytes() or getattr(finish, "nbytes", 0) * _world()
                raise CheckpointSpaceError(f"no space left on the device of {self.root} while writing {name}: it "
                                           f"needs about {need:,} bytes, "
                                           f"{shutil.disk_usage(self.root).free:,} are free; the previous "
                                           "checkpoint stays in use (free space, then resume)") from None
            described = self._describe(tmp, written)  # every rank hashes what it wrote, in parallel
            if dist.is_initialized():
                gathered = [None] * dist.get_world_size(self.group) if _rank() == 0 else None
                dist.gather_object(described, gathered, dst=0, group=self.group)
                described = {k: v for part in gathered or [] for k, v in part.items()}
            if _rank() == 0:
                self._commit(tmp, final, name, step, trainer_state, described)
                if on_complete is not None:
                    on_complete()
            _barrier(self.group)

        if background:
            self._pending = threading.Thread(target=self._run, args=(complete,), name=f"checkpoint-{step}")
            self._pending.start()
        else:
            complete()
        return final

    def _expected_bytes(self) -> int:
        """What a checkpoint of this run takes: the newest complete one's files (their manifest)."""
        for path in sorted(self.root.glob("step-*"), reverse=True):
            try:
                files = json.loads((path / "manifest.json").read_text())["files"]
                return sum(int(meta["bytes"]) for meta in files.values())
            except (OSError, ValueError, KeyError, TypeError):
                continue
        return 0

    def _run(self, complete) -> None:
        try:
            complete()
        except BaseException as err:  # noqa: BLE001 - raised again by wait() in the training thread
            self._failure = err

    def wait(self) -> None:
        """Until the checkpoint being written in the background (if any) is complete."""
        if self._pending is not None:
            self._pending.join()
            self._pending = None
        if self._failure is not None:
            err, self._failure = self._failure, None
            raise err

    def _describe(self, tmp: Path, files) -> dict[str, dict]:
        """Manifest entries (size, sha256) of files under `tmp`."""
        return {str(Path(p).relative_to(tmp)): {"bytes": Path(p).stat().st_size,
                                                 **({"sha256": _sha256(Path(p))} if self.hash_files else {})}
                for p in files}

    def _commit(self, tmp: Path, final: Path, name: str, step: int, trainer_state: dict,
                described: dict[str, dict]) -> None:
        """Rank 0, every file written: the manifest (the ranks' descriptions of their files, and of
        any other file there), the rename, `latest`, pruning."""
        _write_text_atomic(tmp / "trainer_state.json", jsonio.dumps(trainer_state, indent=1, sort_keys=True))
        files = sorted(p for p in tmp.rglob("*") if p.is_file())
        entries = self._describe(tmp, [p for p in files if str(p.relative_to(tmp)) not in described])
        manifest = {"step": step, "files": {str(p.relative_to(tmp)): entries.get(str(p.relative_to(tmp)))
                                            or described[str(p.relative_to(tmp))] for p in files}}
        _write_text_atomic(tmp / "manifest.json", jsonio.dumps(manifest, indent=1, sort_keys=True))
        old = self.root / (name + ".replaced")
        if final.exists():  # a re-save of the same step: the old copy goes only once the new one is in place
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
        _write_text_atomic(self.root / "latest", name + "\n")
        self._prune(final)

    def _prune(self, written: Path) -> None:
        """Keeps the `keep_last` newest good checkpoints, always the newest good one and the one just
        written (which differ after an explicit resume from an older step). A damaged
        one is never counted as kept, nor deleted: it is moved to `damaged/` with a warning."""
        good = 0
        for _, path in sorted(self._step_dirs(), reverse=True):
            problem = None if path == written else verify_checkpoint(path, hashes=False)
            if problem:
                self._set_aside(path, "damaged", problem)
            elif good < self.keep_last or path == written or good == 0:  # never the newest good one
                good += 1
            else:
                shutil.rmtree(path, ignore_errors=True)

    def _set_aside(self, path: Path, why: str, problem: str) -> Path:
        target = self.root / why / path.name
        n = 1
        while target.exists():
            target, n = self.root / why / f"{path.name}.{n}", n + 1
        target.parent.mkdir(exist_ok=True)
        os.replace(path, target)
        log.warning("checkpoint %s %s: moved to %s", path, problem, target)
        return target

    def set_aside_newer(self, resumed: Path) -> None:
        """Rank 0, after an explicit resume from an older checkpoint: the newer ones belong to the
        run's abandoned continuation and must not be chosen by a later automatic resume."""
        step = int(STEP_DIR.match(resumed.name).group(1)) if STEP_DIR.match(resumed.name) else None
        if step is None or resumed.parent.resolve() != self.root.resolve():
            return
        for other, path in self._step_dirs():
            if other > step:
                self._set_aside(path, "superseded", f"is newer than the resumed step {step}")

    def _step_dirs(self) -> list[tuple[int, Path]]:
        if not self.root.is_dir():
            return []
        return [(int(m.group(1)), p) for p in self.root.iterdir() if (m := STEP_DIR.match(p.name)) and p.is_dir()]

    # ---- reading --------------------------------------------------------------------------

    def verify(self, path: Path) -> str | None:
        """None if `path` is a complete checkpoint, else what is wrong with it (verify_checkpoint)."""
        return verify_checkpoint(path)

    def find_resumable(self) -> Path | None:
        """Collective. The newest complete checkpoint (by step; `latest` only tells people which one
        was written last: a kill between a checkpoint's rename and the pointer's update leaves it
        one behind, and a damaged pointer is ignored)."""
        choice = None
        if _rank() == 0:
            for _, path in sorted(self._step_dirs(), reverse=True):
                problem = self.verify(path)
                if problem is None:
                    choice = str(path)
                    break
                log.warning("skipping checkpoint %s: %s", path, problem)
        choice = _broadcast(choice)
        return Path(choice) if choice else None

    @staticmethod
    def read_state(path: Path) -> dict:
        return json.loads((path / "trainer_state.json").read_text())

    @staticmethod
    def restore_rng(path: Path, same_layout: bool) -> None:
        """This rank's RNG state, when the checkpoint was written by the same layout (under another,
        ranks do not correspond and keep their fresh seeds: only dropout masks are affected)."""
        rng_file = path / "rng" / f"rank-{_rank():05d}.pt"
        if same_layout and rng_file.is_file():
            set_rng_state(torch.load(rng_file, weights_only=True))
