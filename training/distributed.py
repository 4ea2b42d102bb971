"""Process group set-up, host-side agreement between ranks, and FSDP2 sharding for the latent loop
(docs/design.md §4)."""

from __future__ import annotations

import dataclasses
import os
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh


@dataclasses.dataclass(frozen=True)
class DistInfo:
    """Where this process runs. world_size 1 without torchrun means no process group at all."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return dist.is_available() and dist.is_initialized()


def init_distributed(timeout_s: int) -> DistInfo:
    """Join the torchrun process group if there is one (nccl on GPU, gloo on CPU).

    The bounded timeout makes a dead or diverged rank fail the others instead of hanging them.
    """
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return DistInfo(0, 1, 0, device)
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
        dist.init_process_group("nccl", timeout=timedelta(seconds=timeout_s), device_id=device)
        # numbers the host already has (label counts, stop requests) are summed over gloo on the
        # CPU: no device-to-host copy, so the GPU queue is never drained for them
        global _HOST_GROUP
        _HOST_GROUP = dist.new_group(backend="gloo", timeout=timedelta(seconds=timeout_s))
    else:
        device = torch.device("cpu")
        dist.init_process_group("gloo", timeout=timedelta(seconds=timeout_s))
    return DistInfo(rank, world, local_rank, device)


_HOST_GROUP: dist.ProcessGroup | None = None  # gloo group beside nccl; None: the default group is gloo


def shutdown() -> None:
    global _HOST_GROUP
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    _HOST_GROUP = None


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def all_reduce_sum(values: torch.Tensor) -> torch.Tensor:
    """Sum over ranks (identity without a process group); returns the same tensor."""
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(values, op=dist.ReduceOp.SUM)
    return values


def all_reduce_host(values: list[float]) -> list[float]:
    """Sum host numbers over ranks (identity without a process group), without touching the GPU."""
    if not (dist.is_available() and dist.is_initialized()):
        return list(values)
    t = torch.tensor(values, dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.SUM, group=_HOST_GROUP)
    return t.tolist()


def all_reduce_max(value: int, device: torch.device) -> int:
    if not (dist.is_available() and dist.is_initialized()):
        return value
    t = torch.tensor([value], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t.item())


def mixed_precision_dtype(bf16: bool, fp16: bool) -> torch.dtype | None:
    return torch.bfloat16 if bf16 else torch.float16 if fp16 else None


def device_mesh(shard_size: int, device: torch.device) -> DeviceMesh | None:
    """The mesh FSDP2 shards over: None (every rank holds a shard of one copy) when shard_size is 0 or
    the world size; else (world / shard_size) x shard_size, named ("replicate", "shard"): hybrid
    sharding, each group of shard_size consecutive ranks (a node's GPUs, under torchrun's numbering)
    holds one sharded copy, so parameter all-gathers stay inside a group and only gradients are
    all-reduced across groups."""
    world = dist.get_world_size()
    if shard_size in (0, world):
        return None
    if world % shard_size:
        raise ValueError(f"fsdp_shard_size {shard_size} does not divide the world size {world}")
    return init_device_mesh(device.type, (world // shard_size, shard_size), mesh_dim_names=("replicate", "shard"))


def shard(
    wrapper: nn.Module,
    decoder_layers: nn.ModuleList,
    vision_layers: nn.ModuleList | None,
    dtype: torch.dtype | None,
    mesh: DeviceMesh | None = None,
) -> None:
    """fully_shard each decoder layer and vision layer, then the Coconut wrapper as the root, over mesh
    (device_mesh: None is every rank).

    A step runs every decoder layer n+1 times (the latent passes), forward and backward. Decoder
    layers therefore stay gathered for the whole step: reshard_after_forward=False keeps them
    between the forward passes, and reshard_after_backward=False between the backward passes
    (FSDP2 would otherwise free them after each pass's backward and all-gather them again for the
    next: n extra all-gathers per layer per step). release_gathered() frees them before the
    optimizer updates the shards, and after every forward outside a training step (evaluation,
    generation: no backward ever reshards them there, nor the root). Vision layers run once and
    reshard. Gradients are reduced in fp32 under bf16/fp16 compute.
    """
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method

    policy = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32) if dtype else MixedPrecisionPolicy()
    for layer in decoder_layers:
        fully_shard(layer, mesh=mesh, mp_policy=policy, reshard_after_forward=False)
        layer.set_reshard_after_backward(False)
    for layer in vision_layers or []:
        fully_shard(layer, mesh=mesh, mp_policy=policy)
    fully_shard(wrapper, mesh=mesh, mp_policy=policy)
    register_fsdp_forward_method(wrapper, "generate")


def release_gathered(module: nn.Module) -> None:
    """Free the gathered parameters of every FSDP module in `module` (a no-op where none is gathered).

    Due before each optimizer step, since a layer that is still gathered would not all-gather the
    updated shards in the next forward; and after evaluation, before an optimizer is built or
    state is gathered for a checkpoint: while a module is gathered, its parameters are plain
    unsharded tensors, which an optimizer built then would hold instead of the sharded ones.
    """
    from torch.distributed.fsdp import FSDPModule

    for sub in module.modules():
        if isinstance(sub, FSDPModule):
            sub.reshard()


def check_optimizer_params(model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Every tensor the optimizer updates must be a parameter of the model as it stands (sharded
    under FSDP). Cheap (a set of ids), and it turns a later SIGSEGV or KeyError into this error."""
    own = {id(p) for p in model.parameters()}
    foreign = sum(id(p) not in own for group in optimizer.param_groups for p in group["params"])
    if foreign:
        raise RuntimeError(
            f"the optimizer holds {foreign} tensors that are not parameters of the model "
            "(built while FSDP had them gathered?)"
        )
