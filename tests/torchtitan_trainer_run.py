"""Run one stage of lighthouse_debugmodel through torchtitan's own Trainer on the CPU (one process).

Used by test_torchtitan_trainer.py as `python torchtitan_trainer_run.py STAGE DUMP_FOLDER DATA
[torchtitan flags...]`; prints one JSON line (last step, attention modes, loss finite).
torchtitan 0.3.0's Trainer assumes an accelerator, which this machine lacks: its device-module
calls (set_device, memory stats) go to a CPU stand-in. Everything else (config parsing, model
build, parallelize, FSDP2, dataloader, checkpoint save and resume, metrics, and
torch.distributed.set_timeout, which needs torch >= 2.14) is torchtitan's unmodified code path.
"""

from __future__ import annotations

import json
import math
import sys
import types

import torch
import torch.distributed as dist
import torchtitan.components.metrics as titan_metrics
import torchtitan.distributed.parallel_dims as titan_parallel_dims
import torchtitan.distributed.utils as titan_dist_utils
import torchtitan.tools.utils as titan_utils

CPU_DEVICE_MODULE = types.SimpleNamespace(
    set_device=lambda device: None,
    get_device_name=lambda device=None: "cpu",
    current_device=lambda: 0,
    get_device_properties=lambda device=None: types.SimpleNamespace(
        total_memory=24 * 2**30, name="cpu"
    ),
    reset_peak_memory_stats=lambda *args: None,
    empty_cache=lambda: None,
    memory_stats=lambda *args: {},
    device_count=lambda: 1,
    synchronize=lambda *args: None,
)


def use_cpu_stand_ins() -> None:
    for module in (titan_utils, titan_metrics, titan_dist_utils):
        module.device_module = CPU_DEVICE_MODULE
    for module in (titan_utils, titan_metrics, titan_dist_utils, titan_parallel_dims):
        module.device_type = "cpu"


def main(stage: str, dump_folder: str, data: str, flags: list[str]) -> None:
    use_cpu_stand_ins()
    from torchtitan.config import ConfigManager

    from lh_cp.torchtitan.inner_attention import LighthouseInnerAttention

    config = ConfigManager().parse_args(
        [
            "--module",
            "lh_cp.torchtitan",
            "--config",
            stage,
            "--dump_folder",
            dump_folder,
            "--dataloader.dataset",
            "files",
            "--dataloader.dataset_path",
            data,
            "--dataloader.format",
            "text",
            "--training.mixed_precision_param",
            "float32",
            "--optimizer.implementation",
            "for-loop",
            *flags,
        ]
    )
    trainer = config.build()
    losses = []
    log = trainer.metrics_processor.log
    trainer.metrics_processor.log = lambda step, loss, *args, **kwargs: (
        losses.append(loss),
        log(step, loss, *args, **kwargs),
    )
    trainer.train()
    modes = [
        m.mode for m in trainer.model_parts[0].modules() if isinstance(m, LighthouseInnerAttention)
    ]
    print(
        json.dumps(
            {
                "step": trainer.step,
                "modes": modes,
                "losses": losses,
                "finite": all(math.isfinite(x) for x in losses),
            }
        )
    )
    trainer.close()
    dist.destroy_process_group()


if __name__ == "__main__":
    torch.set_num_threads(1)
    main(sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4:])
