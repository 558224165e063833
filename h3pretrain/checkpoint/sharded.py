"""Sharded checkpoints on PyTorch Distributed Checkpoint (DCP): every rank writes only the state it
owns, and any layout reads any other's.

The stored tensors are the canonical ones (full shapes, HybridLM names; `name::exp_avg` and
`name::exp_avg_sq` for Adam's moments), but no rank ever holds one whole. A rank owns, for each of
its parameters, the ZeRO partition of it (a flat range of its tensor-parallel piece): ZeRO-1/2's
`_hp_mapping` fragment or ZeRO-3's local partition. That range is cut into boxes of the full tensor
(row-major pieces of the flat range, then split where tensor parallelism interleaves blocks), and
DCP stores each box once with its offsets in `state/`. Loading asks DCP for the boxes the new
layout's rank owns; DCP reads the overlaps with whatever boxes were written, so TP, PP, CP, DP and
the ZeRO stage may all change. Parameters replicated over the TP group are written by TP rank 0 only
(DCP refuses overlapping boxes), the last pipeline stage's copy of the tied embedding not at all.
"""
from __future__ import annotations

import logging
import math
import pickle
import warnings
from pathlib import Path
from typing import Iterator

import torch
import torch.distributed as dist
from torch import nn

from ..errors import InputFileError
from .canonical import ADAM_KEYS, is_tp_sharded, named_params

log = logging.getLogger("h3pretrain.checkpoint")

STATE_DIR = "state"
Box = tuple[tuple[int, ...], torch.Tensor]  # offsets in the full tensor, the box's values


def is_sharded(step_dir: Path) -> bool:
    return (Path(step_dir) / STATE_DIR / ".metadata").is_file()


# ---- geometry: a flat range of a tensor-parallel piece -> boxes of the full tensor -------------

def flat_boxes(shape: tuple[int, ...], start: int, stop: int) -> Iterator[tuple[tuple[int, ...], tuple[int, ...], int]]:
    """The elements [start, stop) of a row-major tensor of `shape` as boxes (offsets, sizes,
    position of the box's first element in the flat order); each box is contiguous in that order."""
    if start >= stop:
        return
    if len(shape) <= 1:
        yield ((start,), (stop - start,), start) if shape else ((), (), start)
        return
    rest, inner = tuple(shape[1:]), math.prod(shape[1:])

    def in_row(row: int, begin: int, end: int):
        for offsets, sizes, pos in flat_boxes(rest, begin, end):
            yield (row, *offsets), (1, *sizes), pos + row * inner

    row, last = start // inner, (stop - 1) // inner
    if row == last:
        yield from in_row(row, start - row * inner, stop - row * inner)
        return
    if start % inner:
        yield from in_row(row, start % inner, inner)
        row += 1
    whole_end = stop // inner
    if whole_end > row:
        yield (row, *(0,) * len(rest)), (whole_end - row, *rest), row * inner
    if stop % inner:
        yield from in_row(whole_end, 0, stop % inner)


def full_shape(param: torch.Tensor, tp: int) -> tuple[int, ...]:
    shape = list(local_shape(param))
    if is_tp_sharded(param) and tp > 1:
        shape[param.partition_dim] *= tp
    return tuple(shape)


def local_shape(param: torch.Tensor) -> tuple[int, ...]:
    return tuple(getattr(param, "ds_shape", param.shape))  # ZeRO-3 keeps the real shape aside


def boxes(param: torch.Tensor, flat: torch.Tensor, start: int, tp_rank: int, tp: int) -> list[Box]:
    """`flat` holds elements [start, start + len) of this rank's (tensor-parallel) piece of
    `param`: the same values as boxes of the full tensor, views of `flat`. A tensor-parallel piece
    is `fused` blocks along partition_dim, each the tp_rank-th chunk of a block of the full tensor."""
    shape = local_shape(param)
    sharded = is_tp_sharded(param) and tp > 1
    dim = param.partition_dim if sharded else 0
    fused = getattr(param, "tp_fused", 1) if sharded else 1
    segment = shape[dim] // fused if shape else 1  # a block's rows in this rank's piece
    out: list[Box] = []
    for offsets, sizes, pos in flat_boxes(shape, start, start + flat.numel()):
        box = flat[pos - start: pos - start + math.prod(sizes)].view(sizes)
        if not sharded:
            out.append((offsets, box))
            continue
        lo, hi = offsets[dim], offsets[dim] + sizes[dim]
        while lo < hi:  # split where this rank's piece jumps from one block of the full tensor to the next
            block, within = divmod(lo, segment)
            n = min(hi - lo, segment - within)
            global_offsets = list(offsets)
            global_offsets[dim] = block * segment * tp + tp_rank * segment + within
            out.append((tuple(global_offsets), box.narrow(dim, lo - offsets[dim], n)))
            lo += n
    return out


# ---- what this rank owns: ZeRO's partitions of its parameters ----------------------------------

def _zero3_range(param) -> tuple[int, int]:
    """ZeRO-3: (start, valid elements) of this rank's partition (the last one is padded)."""
    size = param.ds_tensor.ds_numel
    start = dist.get_rank(group=param.ds_process_group) * size
    return start, max(0, min(size, param.ds_numel - start))


def owned(param: nn.Parameter, key: str | None) -> tuple[int, torch.Tensor] | None:
    """(flat start, 1-D tensor) of this rank's ZeRO partition of the fp32 weight (key None) or of an
    Adam moment, as a view of DeepSpeed's state; None if this rank holds none of it."""
    if hasattr(param, "ds_id"):
        from deepspeed.utils import safe_get_local_fp32_param, safe_get_local_optimizer_state

        start, valid = _zero3_range(param)
        if valid == 0:
            return None
        value = safe_get_local_fp32_param(param) if key is None else safe_get_local_optimizer_state(param, key)
        return None if value is None else (start, value.narrow(0, 0, valid))  # None: a frozen parameter
    mapping = getattr(param, "_hp_mapping", None)
    if mapping is None:
        return None
    return mapping.lp_fragment_address.start, mapping.get_hp_fragment(key)


def _writes(param, tp_rank: int) -> bool:
    if getattr(param, "ds_pipe_replicated", False):
        return False  # the last stage's copy of the tied embedding: the first stage writes it
    return tp_rank == 0 or is_tp_sharded(param)


# ---- DCP's view of a rank's boxes ------------------------------------------------------------

class Pieces(torch.Tensor):
    """A rank's boxes of one full tensor, in the form DCP takes them (its _Checkpointable protocol):
    a tensor of the full shape that holds no storage of its own."""

    @staticmethod
    def __new__(cls, shape, dtype, pieces: list[Box]):
        return torch.Tensor._make_wrapper_subclass(cls, torch.Size(shape), dtype=dtype)

    def __init__(self, shape, dtype, pieces: list[Box]):
        self.pieces = pieces

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        raise NotImplementedError(f"{cls.__name__} only carries boxes for a checkpoint ({func})")

    def __create_write_items__(self, fqn: str, obj) -> list:
        from torch.distributed.checkpoint.metadata import ChunkStorageMetadata, MetadataIndex, TensorProperties
        from torch.distributed.checkpoint.planner import TensorWriteData, WriteItem, WriteItemType

        return [WriteItem(index=MetadataIndex(fqn, torch.Size(offsets), i), type=WriteItemType.SHARD,
                          tensor_data=TensorWriteData(
                              chunk=ChunkStorageMetadata(offsets=torch.Size(offsets), sizes=box.size()),
                              properties=TensorProperties.create_from_tensor(box), size=self.size()))
                for i, (offsets, box) in enumerate(self.pieces)]

    def __create_chunk_list__(self) -> list:
        from torch.distributed.checkpoint.metadata import ChunkStorageMetadata

        return [ChunkStorageMetadata(offsets=torch.Size(offsets), sizes=box.size()) for offsets, box in self.pieces]

    def __get_tensor_shard__(self, index) -> torch.Tensor:
        if index.index is not None and index.index < len(self.pieces) \
                and torch.Size(self.pieces[index.index][0]) == index.offset:
            return self.pieces[index.index][1]
        for offsets, box in self.pieces:
            if torch.Size(offsets) == index.offset:
                return box
        raise ValueError(f"no box at {index.offset} for {index.fqn}")

    def __repr__(self) -> str:
        return f"Pieces({tuple(self.shape)}, {len(self.pieces)} boxes)"


def _entry(param, flat: torch.Tensor, start: int, tp_rank: int, tp: int) -> Pieces:
    return Pieces(full_shape(param, tp), flat.dtype, boxes(param, flat, start, tp_rank, tp))


# ---- reading `.metadata` without running code ----------------------------------------------

_METADATA_GLOBALS = {
    "torch.distributed.checkpoint.metadata": None,  # any of its classes
    "torch.distributed.checkpoint.filesystem": {"_StorageInfo"},
    "torch.serialization": {"_get_layout"},
    "pathlib": {"PosixPath", "PurePosixPath", "WindowsPath", "PureWindowsPath"},
    "collections": {"OrderedDict"},
}


class _MetadataUnpickler(pickle.Unpickler):
    """DCP's `.metadata` is a pickle: only the classes it is made of may be named in it (a pickle
    that names anything else, e.g. a function to call, is refused before anything runs)."""

    def find_class(self, module: str, name: str):
        allowed = _METADATA_GLOBALS.get(module, set())
        if module == "torch" and (name == "Size" or isinstance(getattr(torch, name, None), (torch.dtype, torch.layout))):
            return getattr(torch, name)
        if allowed is None or name in allowed:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"{module}.{name} has no place in a checkpoint's metadata")


def reader(directory: Path):
    """DCP's file reader for directory/state/, reading `.metadata` with the restricted unpickler
    (DCP reads the tensor files itself with torch.load(weights_only=True))."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import StorageMeta

    class Reader(FileSystemReader):
        def read_metadata(self, *args, **kwargs):
            path = Path(self.path) / ".metadata"
            try:
                with open(path, "rb") as f:
                    metadata = _MetadataUnpickler(f).load()
            except (pickle.UnpicklingError, EOFError, AttributeError, ImportError, TypeError, ValueError) as err:
                raise InputFileError(f"{path} is not checkpoint metadata this program wrote: {err}") from None
            if getattr(metadata, "storage_meta", None) is None:
                metadata.storage_meta = StorageMeta()
            metadata.storage_meta.load_id = self.load_id
            return metadata

    return Reader(str(Path(directory) / STATE_DIR))


# ---- save and load ---------------------------------------------------------------------------

def collect_owned(models: list[nn.Module], tp_rank: int, tp: int) -> dict[str, Pieces]:
    """Not collective. This rank's share (ZeRO partition of weights and Adam moments), copied into
    host memory (the copy is what a background write reads while training goes on)."""
    state: dict[str, Pieces] = {}
    for name, p in named_params(models):
        if not _writes(p, tp_rank):
            continue
        for key in (None, *ADAM_KEYS):
            part = owned(p, key)
            if part is not None and part[1].numel():
                start, flat = part
                pieces = [(offsets, _to_host(box)) for offsets, box in boxes(p, flat, start, tp_rank, tp)]
                state[name if key is None else f"{name}::{key}"] = Pieces(full_shape(p, tp), torch.float32, pieces)
    if torch.cuda.is_available():
        torch.cuda.synchronize()  # the copies into pinned memory have landed
    return state


def _to_host(box: torch.Tensor) -> torch.Tensor:
    """A contiguous fp32 copy in host memory with a storage of its own (DCP writes whole storages);
    from a GPU into pinned memory, without waiting per tensor."""
    box = box.detach()
    if box.is_cuda:
        out = host_buffer(box.shape, pinned=True)
        out.copy_(box, non_blocking=out.is_pinned())
        return out
    return box.to("cpu", torch.float32, copy=True).contiguous()


_pinning_failed: list[str] = []  # once pinning has failed in this process, it is not tried again


def host_buffer(shape: torch.Size | tuple[int, ...], pinned: bool) -> torch.Tensor:
    """An fp32 host tensor; pinned (page-locked, for asynchronous device-to-host copies) when asked
    and possible. A failed pinned allocation (the driver's page-locked limit, a container's memlock
    limit) falls back to pageable memory with one warning: the save is slower, not lost."""
    if pinned and not _pinning_failed:
        try:
            return torch.empty(shape, dtype=torch.float32, pin_memory=True)
        except RuntimeError as err:
            _pinning_failed.append(str(err).splitlines()[0] if str(err) else type(err).__name__)
            log.warning("pinned host memory for a checkpoint could not be allocated (%s): using pageable memory "
                        "(device-to-host copies then wait for each tensor)", _pinning_failed[0])
    return torch.empty(shape, dtype=torch.float32)


def write(state: dict[str, Pieces], directory: Path, group) -> list[Path]:
    """Collective over `group` (every rank of the job): DCP writes each rank's boxes to its own file
    in directory/state/; the coordinator writes `.metadata` last. Returns the files this rank wrote."""
    import torch.distributed.checkpoint as dcp

    from torch.distributed.checkpoint.api import CheckpointException

    out = Path(directory) / STATE_DIR
    out.mkdir(parents=True, exist_ok=True)
    try:
        dcp.save(state, storage_writer=dcp.FileSystemWriter(str(out), single_file_per_rank=True, sync_files=True),
                 process_group=group)
    except CheckpointException as err:  # a BaseException: the first rank's cause (e.g. OSError) instead
        failures = list(err.failures.values())
        raise (failures[0][0] if failures else RuntimeError(str(err))) from None
    rank = dist.get_rank(group) if dist.is_initialized() else 0
    mine = sorted(out.glob(f"__{rank}_*.distcp"))
    return mine + ([out / ".metadata"] if rank == 0 else [])


def load_into(models: list[nn.Module], directory: Path, tp_rank: int, tp: int, group=None) -> None:
    """Collective over `group`. Every parameter of this rank from a sharded checkpoint of any
    layout: the full weight of its tensor-parallel piece (ZeRO-3: its partition) and its ZeRO
    partition of the Adam moments, read by DCP straight into DeepSpeed's tensors."""
    state: dict[str, Pieces] = {}
    after: list = []
    for name, p in named_params(models):
        if hasattr(p, "ds_id"):
            _zero3_targets(name, p, tp_rank, tp, state, after)
            continue
        with torch.no_grad():
            state[name] = _entry(p, p.data.view(-1), 0, tp_rank, tp)
        for key in ADAM_KEYS:
            part = owned(p, key)
            if part is not None and part[1].numel():
                state[f"{name}::{key}"] = _entry(p, part[1], part[0], tp_rank, tp)
        if getattr(p, "_hp_mapping", None) is not None:
            after.append(p._hp_mapping.update_hp)  # the fp32 master from the weight just read
    _load(state, directory, group, no_dist=not dist.is_initialized())
    for fn in after:
        fn()


def _zero3_targets(name: str, p, tp_rank: int, tp: int, state: dict, after: list) -> None:
    from deepspeed.utils import safe_set_local_fp32_param, safe_set_local_optimizer_state

    start, valid = _zero3_range(p)
    if valid == 0:
        return
    lp = p.ds_tensor.data
    state[name] = _entry(p, lp.narrow(0, 0, valid), start, tp_rank, tp)
    after.append(lambda: safe_set_local_fp32_param(p, lp.float()))
    for key in ADAM_KEYS:
        buf = torch.zeros(lp.numel(), dtype=torch.float32)
        state[f"{name}::{key}"] = _entry(p, buf.narrow(0, 0, valid), start, tp_rank, tp)
        after.append(lambda buf=buf, key=key: safe_set_local_optimizer_state(p, buf.to(lp.device), key))


def read_full(directory: Path, keep=lambda key: True) -> dict[str, torch.Tensor]:
    """One process, no collectives: the full tensors whose names pass `keep` (export, eval,
    generation, consolidation). Memory: the tensors asked for."""
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    metadata = reader(directory).read_metadata()
    state = {k: torch.empty(tuple(m.size), dtype=m.properties.dtype)
             for k, m in metadata.state_dict_metadata.items() if isinstance(m, TensorStorageMetadata) and keep(k)}
    with warnings.catch_warnings():  # "assuming the intent is to load in a single process": it is
        warnings.simplefilter("ignore", UserWarning)
        _load(state, directory, None, no_dist=True)
    return state


def _load(state: dict, directory: Path, group, no_dist: bool) -> None:
    """DCP's load, its failure (a BaseException there) as one line naming the checkpoint."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException

    try:
        dcp.load(state, storage_reader=reader(directory), process_group=group, no_dist=no_dist)
    except CheckpointException as err:
        causes = [f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
                  for e, _ in getattr(err, "failures", {}).values()] or [str(err).splitlines()[0]]
        raise InputFileError(f"{Path(directory) / STATE_DIR} could not be read: {causes[0]}") from None


def stored_keys(directory: Path) -> list[str]:
    import torch.distributed.checkpoint as dcp

    return sorted(reader(directory).read_metadata().state_dict_metadata)


__all__ = ["STATE_DIR", "Pieces", "boxes", "collect_owned", "flat_boxes", "is_sharded", "load_into", "read_full",
           "stored_keys", "write"]
