"""Sharing the work of one distillation between processes (``accelerate launch``, ``torchrun``).

Embedding and synthesis are split between processes and gathered in order; the prototypes are computed
once and broadcast, or, in passes over shards, by every process over its own shards, which then exchange only
aggregates (:func:`all_reduce_sum`, :func:`all_gather`); only the main process writes the output. With one process
every function here is a no-op.
"""

from __future__ import annotations

import math


def process_state():
    """The ``accelerate.PartialState`` of this process.

    On a machine without accelerator a plain ``PartialState()`` under ``torchrun`` reports one process, so
    the CPU state (gloo) is asked for explicitly there.
    """
    import torch
    from accelerate import PartialState

    return PartialState(cpu=not torch.cuda.is_available())


def process_share(count: int, state) -> range:
    """This process's contiguous share of ``range(count)`` (shards, say): process ``p`` of ``P`` takes items
    ``[p * ceil(count / P), (p + 1) * ceil(count / P))``, clipped; the last processes may take none."""
    per_process = math.ceil(count / state.num_processes) if count else 0
    start = min(count, state.process_index * per_process)
    return range(start, min(count, start + per_process))


def all_reduce_sum(array, state):
    """The element-wise sum of every process's ``array`` (a numpy array of the same shape and dtype on each), on
    every process. Integers are summed exactly; float64 sums may differ from one process's sum in the last bits."""
    if state.num_processes == 1:
        return array
    import numpy as np
    import torch
    import torch.distributed as dist

    tensor = torch.from_numpy(np.ascontiguousarray(array).copy())
    if torch.cuda.is_available() and dist.get_backend() == "nccl":
        tensor = tensor.cuda()
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor.cpu().numpy()


def all_gather(value, state) -> list:
    """Every process's ``value`` (any picklable object), in process order, on every process."""
    if state.num_processes == 1:
        return [value]
    import torch.distributed as dist

    values = [None] * state.num_processes
    dist.all_gather_object(values, value)
    return values


def broadcast(value, state):
    """The main process's ``value``, on every process."""
    if state.num_processes == 1:
        return value
    from accelerate.utils import broadcast_object_list

    holder = [value if state.is_main_process else None]
    broadcast_object_list(holder, from_process=0)
    return holder[0]


def gather_dicts(part: dict, state) -> dict:
    """The union of every process's ``part``."""
    if state.num_processes == 1:
        return part
    from accelerate.utils import gather_object

    merged = {}
    for piece in gather_object([part]):
        merged.update(piece)
    return merged


def barrier(state) -> None:
    if state.num_processes > 1:
        state.wait_for_everyone()


class _SingleProcess:
    """Stands for the state of a run on one process, without initialising accelerate."""

    num_processes = 1
    process_index = 0
    is_main_process = True


SINGLE_PROCESS = _SingleProcess()
