"""Data-parallel training through ``paddle.distributed`` (NCCL on GPU, gloo on CPU).

Launch with ``python -m paddle.distributed.launch --nproc_per_node 2 train.py ...`` (on CPU use
``--nproc_per_node``; ``--devices`` is for GPUs). Each rank holds the whole (frozen) base and the
trainable adapters; every rank draws its own data shard and noise. After the backward passes of an
update, the trainable gradients of the groups being updated are averaged across ranks in one fused
all-reduce (``all_reduce_gradients``), so every rank applies the same update and the adapters stay
identical (the initial adapters are broadcast from rank 0 once, ``broadcast_parameters``).
Averaging explicitly, rather than through ``paddle.DataParallel``, keeps the method free to run
several forward passes with different adapters and to skip groups on some updates.

Sharding hook for large models
------------------------------
For FLUX.1 at 12B parameters in bf16 (~24 GB) plus activations, plain data parallel fits on
80 GB GPUs with LoRA. Full fine-tuning or large trainable heads need the optimizer state and
gradients sharded across ranks. Paddle provides this as group sharding:

    from paddle.distributed.sharding import group_sharded_parallel
    model, optimizer, scaler = group_sharded_parallel(model, optimizer, level="os_g", scaler=None)

``level="os"`` shards optimizer states, ``"os_g"`` also gradients, ``"p_g_os"`` also parameters
(stage 3). :func:`group_sharded` below applies it to one layer and its optimizer. A sharded optimizer
reduces gradients itself, so the trainer's ``all_reduce_gradients`` must then be skipped for that group;
this is not wired into ``Trainer`` (LoRA distillation does not need it) and is untested here (it needs
GPUs and NCCL).
"""
import os
from typing import List

import numpy as np
import paddle
import paddle.distributed as dist


def world_size() -> int:
    return int(os.environ.get("PADDLE_TRAINERS_NUM", "1"))


def rank() -> int:
    return int(os.environ.get("PADDLE_TRAINER_ID", "0"))


def is_main_process() -> bool:
    return rank() == 0


_INITIALISED = False


def init_distributed() -> None:
    """Initialise the process group when launched with more than one process (idempotent)."""
    global _INITIALISED
    if world_size() > 1 and not _INITIALISED:
        dist.init_parallel_env()
        _INITIALISED = True


def barrier() -> None:
    if world_size() > 1:
        dist.barrier()


def finish_distributed() -> None:
    """Leave the process group together (a barrier, then ``destroy_process_group``): a rank that exits while its
    peer is still tearing gloo down can abort (exit code -6) after its work is done."""
    global _INITIALISED
    if _INITIALISED:
        dist.barrier()
        dist.destroy_process_group()
        _INITIALISED = False


@paddle.no_grad()
def broadcast_parameters(params: List[paddle.Tensor], src: int = 0) -> None:
    """Copy rank ``src``'s values of ``params`` to every rank."""
    if world_size() <= 1:
        return
    for param in params:
        dist.broadcast(param, src=src)


@paddle.no_grad()
def all_reduce_gradients(params: List[paddle.Tensor]) -> None:
    """Average the gradients of ``params`` over ranks in one fused all-reduce (missing grads count as 0)."""
    size = world_size()
    if size <= 1 or not params:
        return
    flat = []
    for param in params:
        grad = param.grad
        flat.append((grad.astype("float32") if grad is not None else paddle.zeros(param.shape, "float32")).flatten())
    buffer = paddle.concat(flat)
    dist.all_reduce(buffer)
    buffer = buffer / size
    offset = 0
    for param in params:
        numel = int(np.prod(param.shape))
        averaged = buffer[offset:offset + numel].reshape(param.shape).astype(param.dtype)
        offset += numel
        if param.grad is None:
            param.grad = averaged  # a rank whose graph did not reach this parameter still gets the average
        else:
            param.grad.set_value(averaged)


def all_reduce_mean(values: List[float]) -> List[float]:
    """Mean of a list of floats over ranks (non-finite values propagate to every rank)."""
    if world_size() <= 1:
        return list(values)
    tensor = paddle.to_tensor(np.asarray(values, dtype=np.float64))
    dist.all_reduce(tensor)
    return (tensor / world_size()).numpy().tolist()


def group_sharded(layer, optimizer, level: str = "os_g"):
    """Shard ``optimizer``'s states (``"os"``), gradients (``"os_g"``) or parameters too (``"p_g_os"``).

    Thin wrapper over ``paddle.distributed.sharding.group_sharded_parallel`` for GPU runs (see module
    docstring). Returns ``(layer, optimizer)``.
    """
    if level not in ("os", "os_g", "p_g_os"):
        raise ValueError(f"sharding level must be os, os_g or p_g_os, got {level!r}")
    if world_size() <= 1:
        raise RuntimeError("group sharding needs a multi-process launch (python -m paddle.distributed.launch)")
    from paddle.distributed.sharding import group_sharded_parallel

    layer, optimizer, _ = group_sharded_parallel(layer, optimizer, level=level)
    return layer, optimizer
