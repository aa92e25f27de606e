"""A process group of this process alone, for timing the CP code path at W = 1 inside a
benchmark script (nccl on CUDA, as torchrun with one process makes it; gloo on CPU)."""

from __future__ import annotations

import datetime
import socket

import torch
import torch.distributed as dist


def one_rank_group(device: torch.device):
    """Initialise the default process group with this process as its only rank; returns it.
    The caller destroys it (dist.destroy_process_group) when done."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    dist.init_process_group(
        "nccl" if device.type == "cuda" else "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=0,
        world_size=1,
        timeout=datetime.timedelta(seconds=120),
        # nccl wants the device with its index
        **(
            {"device_id": torch.device("cuda", torch.cuda.current_device())}
            if device.type == "cuda"
            else {}
        ),
    )
    return dist.group.WORLD
