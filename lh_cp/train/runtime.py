"""Process-group start and the explicit groups a training run passes around.

One process (no torchrun) still gets a process group of size 1, so a run has a single code
path: FSDP2, DCP checkpoints and the loss normaliser behave the same at any world size.
torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT) is read here and
(the store's address, for the watchdog) in lh_cp/parallel/watchdog.py. Every group of the run
gets parallel.timeout_s; the ranks check that they run the same recipe, world layout and
software before anything else (lh_cp.parallel.agreement). Under parallel.engine = "deepspeed"
DeepSpeed's communication layer is started on top of the same process group (the `deepspeed`
launcher sets the same variables).
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh

from lh_cp.parallel import ContextParallel, build_mesh
from lh_cp.parallel.agreement import agree_on_run
from lh_cp.parallel.mesh import GROUP_AXES
from lh_cp.parallel.watchdog import Watchdog
from lh_cp.train.recipe import Recipe, RecipeError
from lh_cp.version import __version__


def launched_world_size() -> int:
    """Processes of this job: torchrun's WORLD_SIZE, or 1 for a plain `lh-cp train`."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def is_first_rank() -> bool:
    """Whether this process is the job's rank 0 (torchrun's RANK), or runs alone."""
    return os.environ.get("RANK", "0") == "0"


def pick_device(setting: str) -> torch.device:
    if setting == "cuda" and not torch.cuda.is_available():
        raise ValueError("run.device='cuda' but torch sees no CUDA device")
    if setting == "cpu" or (setting == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    torch.cuda.set_device(local_rank)
    return torch.device("cuda", local_rank)


@dataclass
class Runtime:
    """Device, mesh and the groups of this rank.

    cp: the context-parallel group with its layout and exchanges (parallel.cp, .exchange,
        .dense_exchange), None when parallel.cp == 1.
    loss_group: every rank holding different tokens of the global batch (mesh axis dp_cp).
    dp_rank, dp_size: this rank's data-parallel replica and their number (mesh axis dp).
    """

    device: torch.device
    mesh: DeviceMesh
    world: dist.ProcessGroup
    cp: ContextParallel | None
    loss_group: dist.ProcessGroup
    dp_rank: int
    dp_size: int
    rank: int
    watchdog: Watchdog | None = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def start(recipe: Recipe) -> Runtime:
    device = pick_device(recipe.run.device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    timeout = datetime.timedelta(seconds=recipe.parallel.timeout_s)
    if "RANK" in os.environ:
        dist.init_process_group(
            backend, timeout=timeout, device_id=device if device.type == "cuda" else None
        )
    else:
        dist.init_process_group(
            backend, store=dist.HashStore(), rank=0, world_size=1, timeout=timeout
        )
    try:
        return _runtime(recipe, device, backend, timeout)
    except BaseException:
        dist.destroy_process_group()
        raise


def _runtime(
    recipe: Recipe, device: torch.device, backend: str, timeout: datetime.timedelta
) -> Runtime:
    par = recipe.parallel
    try:
        agree_on_run(run_fingerprint(recipe, dist.get_world_size()), dist.group.WORLD)
    except ValueError as err:
        raise RecipeError(str(err)) from None
    if par.engine == "deepspeed":
        _start_deepspeed_comm(backend)
    mesh = build_mesh(device.type, dp_replicate=par.dp_replicate, dp_shard=par.dp_shard, cp=par.cp)
    set_timeout = (
        getattr(dist, "set_timeout", None) or dist.distributed_c10d._set_pg_timeout
    )  # public from torch 2.14
    for axis in GROUP_AXES:  # the mesh's groups are created with PyTorch's default timeout
        set_timeout(timeout, mesh[axis].get_group())
    watchdog = Watchdog.for_torchrun(dist.get_rank(), dist.get_world_size(), par.timeout_s / 2)
    return runtime_on_mesh(mesh, par, device, watchdog.start() if watchdog else None)


def runtime_on_mesh(
    mesh: DeviceMesh, par, device: torch.device, watchdog: Watchdog | None = None
) -> Runtime:
    """The Runtime of this rank on `mesh` (build_mesh) for the [parallel] section `par`."""
    return Runtime(
        device=device,
        mesh=mesh,
        world=dist.group.WORLD,
        cp=ContextParallel(mesh["cp"].get_group(), par.exchange, par.dense_exchange)
        if par.cp > 1
        else None,
        loss_group=mesh["dp_cp"].get_group(),
        dp_rank=mesh["dp"].get_local_rank(),
        dp_size=mesh["dp"].size(),
        rank=dist.get_rank(),
        watchdog=watchdog,
    )


def _flatten(value, prefix: str = "") -> dict:
    if isinstance(value, dict):
        out = {}
        for key, item in value.items():
            out.update(_flatten(item, f"{prefix}{key}."))
        return out
    if isinstance(value, list):
        return {
            **{f"{prefix}{i}": v for i, v in enumerate(value) if not isinstance(v, (dict, list))},
            **{
                k: v
                for i, item in enumerate(value)
                if isinstance(item, (dict, list))
                for k, v in _flatten(item, f"{prefix}{i}.").items()
            },
        }
    return {prefix.rstrip("."): value}


def run_fingerprint(recipe: Recipe, world_size: int) -> dict:
    """What every rank of a run must agree on: every recipe key (flattened: 'optim.lr',
    'stages.1.steps'), the world size and the software versions."""
    from dataclasses import asdict

    return {
        **_flatten(asdict(recipe)),
        "world_size": world_size,
        "torch": torch.__version__,
        "lh_cp": __version__,
    }


# DeepSpeed builds this op on CPU in deepspeed.init_distributed. Up to torch 2.13 the build is
# guarded by a lock *file* whose mere existence blocks (torch.utils.file_baton): a run killed
# while holding it leaves it behind, and every later run waits on it forever. torch 2.14.1 holds
# an OS advisory lock on that file instead (seen in both wheels' cpp_extension._jit_compile), so
# there the file stays on disk and means nothing.
DEEPSPEED_CPU_OP = "deepspeed_shm_comm"
STALE_LOCK_S = 600  # the op builds in well under a minute
LOCK_FILE_BLOCKS = tuple(int(x) for x in torch.__version__.split("+")[0].split(".")[:2]) < (2, 14)


def check_extension_lock(name: str, now: float | None = None) -> None:
    """Raise RuntimeError if torch's build lock file of C++ extension `name` blocks
    (LOCK_FILE_BLOCKS) and is older than STALE_LOCK_S: the run would otherwise hang without a
    word."""
    import time

    from torch.utils import cpp_extension

    build_directory = getattr(cpp_extension, "_get_build_directory", None)
    if not LOCK_FILE_BLOCKS or build_directory is None:
        return
    lock = os.path.join(build_directory(name, verbose=False), "lock")
    try:
        age = (time.time() if now is None else now) - os.stat(lock).st_mtime
    except FileNotFoundError:
        return
    if age > STALE_LOCK_S:
        raise RuntimeError(
            f"{lock} has existed for {age / 60:.0f} min: an earlier run was killed while torch built "
            f"{name} for DeepSpeed, and this run would wait on that lock forever. If no other run on "
            f"this machine is building it now, delete the file and start again."
        )


def _start_deepspeed_comm(backend: str) -> None:
    """deepspeed.comm over the process group just started (DeepSpeed wraps it, starts nothing).

    DeepSpeed's engine reads LOCAL_RANK from the environment; a plain one-process run has
    none, so it is set to 0 there. On gloo (CPU) DeepSpeed builds its shared-memory op first;
    a stale build lock is refused with its path instead of hanging (check_extension_lock).
    """
    import deepspeed

    os.environ.setdefault("LOCAL_RANK", "0")
    if backend == "gloo":
        check_extension_lock(DEEPSPEED_CPU_OP)
    deepspeed.init_distributed(dist_backend=backend)


def stop(rt: Runtime | None = None) -> None:
    """Stop the watchdog (marking this rank done), then end the process group."""
    if rt is not None and rt.watchdog is not None:
        rt.watchdog.stop()
    if dist.is_initialized():
        dist.destroy_process_group()
