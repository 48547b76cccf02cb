"""FSDP2's dim-0 shards: which candidates are shards, and which rows of a tensor this process holds.

Under FSDP2 (`fully_shard`) every rank holds a range of rows (dim 0) of each parameter as a DTensor, and FSDP2 swaps
a whole unsharded copy onto the module while it computes. These helpers find the shards at any time and give the
entries a rank holds in whole-tensor coordinates.
"""

from __future__ import annotations

import functools

import torch
import torch.distributed as dist
from torch import nn

from .. import compat
from ..sampling.importance import entries_per_row
from ..tuner.candidates import Candidate


@functools.cache
def dtensor_type():
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # torch built without distributed support
        return None
    return DTensor


def is_shard(param) -> bool:
    """Whether `param` is a DTensor: under FSDP2, this rank's dim-0 shard of a parameter."""
    dtensor = dtensor_type()
    return dtensor is not None and isinstance(param, dtensor)


def fsdp2_shards() -> dict[tuple[int, str], nn.Parameter]:
    """(id of a module, parameter name) -> FSDP2's sharded parameter, for every parameter FSDP2 manages. FSDP2 swaps
    the module's registered parameter for an unsharded copy while the module computes; this map finds the shard at
    any time."""
    found = {}
    for _, fsdp_params in compat.fsdp2_managed():
        for fsdp_param in fsdp_params:
            for module, name in compat.fsdp2_param_homes(fsdp_param):
                found[(id(module), name)] = fsdp_param.sharded_param
    return found


def shard_problem(param, managed: dict) -> str | None:
    """Why the DTensor `param` is not a dim-0 shard StocTuning can train (None when it is)."""
    if not any(shard is param for shard in managed.values()):
        return "is a DTensor that FSDP2 does not manage (tensor parallelism?)"
    from torch.distributed.tensor import Shard

    if param.device_mesh.ndim != 1 or len(param.placements) != 1 or param.placements[0] != Shard(0):
        return (
            f"is sharded as {tuple(param.placements)} over a {param.device_mesh.ndim}-D mesh; StocTuning follows "
            "FSDP2's dim-0 shards over a 1-D mesh (not HSDP or tensor parallelism)"
        )
    return None


def sharded_replacements(candidates: list[Candidate]) -> dict[int, nn.Parameter]:
    """id of a candidate's parameter -> the dim-0 shard FSDP2 replaced it with (only candidates FSDP2 replaced)."""
    if not dist.is_available():
        return {}
    managed = fsdp2_shards()
    found = {}
    for candidate in candidates:
        attribute = candidate.name.rpartition(".")[2]
        for use in candidate.uses:
            shard = managed.get((id(use.module), attribute))
            if shard is None:
                registered = compat.module_parameters(use.module).get(attribute)
                shard = registered if is_shard(registered) else None
            if shard is not None and shard is not candidate.param:
                found[id(candidate.param)] = shard
                break
    return found


def reshard(params) -> None:
    """Drop the unsharded copies FSDP2 keeps of the modules holding `params` (the root keeps its copy between
    forwards): after StocTuning wrote into the shards outside an optimizer step, the next forward gathers them anew."""
    wanted = {id(p) for p in params}
    for module, fsdp_params in compat.fsdp2_managed():
        if any(id(fsdp_param.sharded_param) in wanted for fsdp_param in fsdp_params):
            module.reshard()


def local_entries(param: torch.Tensor) -> tuple[torch.Tensor, int]:
    """The entries of `param` this process holds, flat, and the flat index in the whole tensor of the first one. A
    plain tensor is held whole; an FSDP2 shard (a DTensor) holds a range of rows. A quantized weight's entries are
    its overlay (`overlay.Overlay`), which reads and writes them like a flat view."""
    overlay = getattr(param, "stoc_overlay", None)
    if overlay is not None:
        return overlay, 0
    if not is_shard(param):
        return param.detach().view(-1), 0
    local = param.detach().to_local()
    return local.view(-1), shard_rows(param).start * entries_per_row(param.shape)


def writable_entries(param: torch.Tensor) -> tuple[torch.Tensor, int]:
    """`local_entries` for writes that change what the weights show (switching adapters, showing the base) rather
    than train them: through `.data`, so the parameter's version counter stays as it is and a graph built before a
    switch and run after the switch back stays valid (`weight_guard` refuses a backward between the two)."""
    if getattr(param, "stoc_overlay", None) is not None:
        return local_entries(param)
    if not is_shard(param):
        return param.data.view(-1), 0
    return local_entries(param)


def shard_rows(param) -> slice:
    """The rows of the whole tensor this process holds of the FSDP2 shard `param`."""
    shape, offset = compat.dtensor_local_shape_and_offset(param.shape, param.device_mesh, param.placements)
    if not len(shape):
        return slice(0, 1)
    return slice(offset[0], offset[0] + shape[0])


def shard_group(params) -> dist.ProcessGroup | None:
    """The process group of the FSDP2 shards among `params`; None when none is a shard."""
    for param in params:
        if is_shard(param):
            return param.device_mesh.get_group()
    return None


def held_locally(index: torch.Tensor, start: int, size: int) -> torch.Tensor:
    """The whole-tensor flat indices `index` that fall in [start, start + size), made local to that range."""
    inside = (index >= start) & (index < start + size)
    return index.masked_select(inside) - start
