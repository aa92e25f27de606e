"""Run recipes: TOML -> nested dataclasses, strictly.

Every option is documented once, in the dataclass it loads into (sections below, plus
ModelConfig in model.py, DataConfig in data.py, PasskeyConfig in passkey.py). An unknown key
or a value of the wrong type is an error naming the key. `--set section.key=value` overrides
are applied to the parsed TOML before conversion, so they go through the same checks;
`stages.1.steps=5` addresses the second stage. Each section lists the rules it breaks on its
own (`problems()`, lh_cp.ops.config.Section); rules that relate several sections (tile size,
CP divisibility, world size) are checked by plan.py.
"""

from __future__ import annotations

import dataclasses
import re
import tomllib
import typing
from dataclasses import dataclass, field
from pathlib import Path

from lh_cp.data.loader import DataConfig
from lh_cp.data.passkey import PasskeyConfig
from lh_cp.model.transformer import ModelConfig
from lh_cp.ops.config import LighthouseConfig
from lh_cp.parallel.context import ULYSSES_EXCHANGES, exchange_problems
from lh_cp.section import Section

DEVICES = ("auto", "cpu", "cuda")
ENGINES = ("fsdp", "deepspeed")
ZERO_STAGES = (1, 2, 3)
ATTENTION_MODES = ("lighthouse", "dense")
DECAYS = ("constant", "linear", "cosine", "wsd")  # the curves of lh_cp/train/schedule.py


@dataclass
class RunConfig(Section):
    """The run as a whole (recipe section [run]).

    name: shown in console lines and TensorBoard.
    out_dir: folder of the run: checkpoints/, tensorboard/, metrics.jsonl (one JSON line per
        logged step, rank 0) and passkey.json. Relative paths are relative to the working folder.
    seed: seed of the weight initialisation (identical on every rank).
    device: 'auto' (CUDA when available, else CPU), 'cpu' or 'cuda'. CUDA trains in bf16
        (fp32 master weights and gradient reduction), CPU in fp32.
    stop_after_step: end this invocation once this global step is done, after saving a
        checkpoint there; a later invocation resumes. 0 = run every stage to the end.
    """

    name: str = "run"
    out_dir: str = "runs/run"
    seed: int = 0
    device: str = "auto"
    stop_after_step: int = 0

    def problems(self) -> list[str]:
        errors = []
        if self.device not in DEVICES:
            errors.append(f"run.device must be one of {DEVICES}, got {self.device!r}")
        if self.stop_after_step < 0:
            errors.append(f"run.stop_after_step must be >= 0, got {self.stop_after_step}")
        return errors


def _lighthouse_problems(self) -> list[str]:
    try:
        self.config()
    except ValueError as err:
        return [f"[lighthouse]: {err}"]
    return []


def _lighthouse_config(self) -> LighthouseConfig:
    return LighthouseConfig(
        **{f.name: getattr(self, f.name) for f in dataclasses.fields(LighthouseConfig)}
    )


def _lighthouse_section() -> type:
    """[lighthouse]'s dataclass, built from LighthouseConfig's own fields (their names, types and
    defaults are declared once, there) plus dense_layers, which only a model has."""
    hints = typing.get_type_hints(LighthouseConfig)
    op_fields = [
        (f.name, hints[f.name], field(default=f.default))
        for f in dataclasses.fields(LighthouseConfig)
    ]
    dense_layers = ("dense_layers", list[int], field(default_factory=lambda: [0, 1, -2, -1]))
    namespace = {
        "config": _lighthouse_config,
        "problems": _lighthouse_problems,
        "__doc__": """Lighthouse attention of
    the non-dense layers (recipe section [lighthouse]).

    Every field of LighthouseConfig (lh_cp/ops/config.py: pool, levels, topk, tile_budget,
        selection, ...), with its default and rules; the tile size is T = data.seq_len *
        tile_budget / topk.
    dense_layers: layers that keep dense attention in the Lighthouse stage; negative indices
        count from the end. The default is the first two and the last two layers.
    """,
    }
    namespace["__module__"] = __name__
    return dataclasses.make_dataclass(
        "LighthouseSection", [*op_fields, dense_layers], bases=(Section,), namespace=namespace
    )


LighthouseSection = _lighthouse_section()


@dataclass
class ParallelConfig(Section):
    """How ranks split the work (recipe section [parallel]). World size = cp * dp_shard * dp_replicate.

    engine: what shards the weights and steps the optimizer: 'fsdp' (FSDP2 over dp_shard x cp,
        HSDP over dp_replicate; torch.distributed.checkpoint folders) or 'deepspeed' (a
        DeepSpeed ZeRO engine over every rank, DeepSpeed checkpoint folders; needs
        `pip install --no-build-isolation 'deepspeed>=0.19.8'` after torch, and dp_replicate = 1).
        Both train the same model with the same AdamW, schedule, data and stages.
    zero_stage: under engine='deepspeed', what ZeRO shards over all ranks: 1 optimizer state,
        2 also gradients, 3 also weights. Ignored by 'fsdp'.
    cp: context-parallel degree: each sequence is split over cp ranks. With the head-tail
        exchanges it is cut into 2*cp chunks, rank r of a CP group holding chunks r and
        2*cp-1-r (load balance); with the Ulysses exchanges into cp contiguous shards.
    dp_shard: data-parallel replicas whose weights, gradients and optimizer state FSDP2 shards
        (sharding spans dp_shard x cp ranks).
    dp_replicate: data-parallel replicas that each hold a full (sharded) copy (HSDP).
    exchange: how Lighthouse layers attend across the CP ranks. Head-tail layout: 'allgather'
        or 'ring' (compressed K/V move between ranks). Contiguous layout (DeepSpeed-Ulysses:
        all-to-all from sequence shards to head groups, which needs n_heads % cp == 0):
        'ulysses' (DeepSpeed's DistributedAttention around Lighthouse: uncompressed q, k, v
        and the output move) or 'ulysses_compressed' (each rank compresses its shard, only the
        compressed entries move; each shard of seq_len / cp tokens must be a whole number of
        Lighthouse tiles). The Ulysses exchanges run under engine='deepspeed' only.
    dense_exchange: the same for dense layers and the recovery stage: 'ring' or 'allgather'
        (head-tail), or 'ulysses' (contiguous). It must use the layout of `exchange`, so
        under 'ulysses' and 'ulysses_compressed' it must be 'ulysses' (dense attention has
        nothing to compress).
    activation_checkpoint: recompute each decoder block in backward instead of storing its
        activations (needed at long context).
    no_checkpoint_layers: with activation_checkpoint, blocks (indices; negatives count from
        the end) that keep their activations instead, where memory allows: a dense layer's
        attention forward is the costliest part of a block to recompute at long context, so
        the dense layers of a Lighthouse model are the first candidates. `lh-cp plan` counts
        them in its memory estimate.
    offload_activations: with activation_checkpoint, the input each checkpointed block keeps
        for backward waits in pinned host memory instead of GPU memory, copied out and back on
        a CUDA stream of its own while neighbouring blocks compute (lh_cp/parallel/offload.py;
        docs/offload.md says when it pays). `lh-cp plan` counts the pinned host memory and
        refuses a run that would pin more than the machine has. On CPU the inputs are copied
        to another host tensor and back: no memory is saved and no number changes. Not
        available under engine='deepspeed'.
    compile: torch.compile each decoder block.
    timeout_s: timeout of every collective of every process group of the run (a rank waiting
        longer raises), and twice the watchdog's limit: under torchrun a rank that sends no
        heartbeat for timeout_s / 2 seconds (stopped, frozen) ends the job with a message naming
        it (lh_cp/parallel/watchdog.py). The default, 600 s, is long enough for a first step
        that compiles kernels and tokenizes a corpus, and far below PyTorch's 30 minutes.
    """

    engine: str = "fsdp"
    zero_stage: int = 3
    cp: int = 1
    dp_shard: int = 1
    dp_replicate: int = 1
    exchange: str = "allgather"
    dense_exchange: str = "ring"
    activation_checkpoint: bool = False
    no_checkpoint_layers: list[int] = field(default_factory=list)
    offload_activations: bool = False
    compile: bool = False
    timeout_s: int = 600

    @property
    def world_size(self) -> int:
        return self.cp * self.dp_shard * self.dp_replicate

    @property
    def dp(self) -> int:
        return self.dp_shard * self.dp_replicate

    def ulysses_settings(self) -> list[str]:
        """The exchange options set to a Ulysses exchange, as 'parallel.key=value' for messages."""
        return [
            f"parallel.{name}={getattr(self, name)!r}"
            for name in ("exchange", "dense_exchange")
            if getattr(self, name) in ULYSSES_EXCHANGES
        ]

    def problems(self) -> list[str]:
        errors = [
            f"parallel.{name} must be >= 1, got {getattr(self, name)}"
            for name in ("cp", "dp_shard", "dp_replicate")
            if getattr(self, name) < 1
        ]
        if self.engine not in ENGINES:
            errors.append(f"parallel.engine must be one of {ENGINES}, got {self.engine!r}")
        if self.zero_stage not in ZERO_STAGES:
            errors.append(
                f"parallel.zero_stage must be one of {ZERO_STAGES} (ZeRO shards 1: optimizer state, "
                f"2: + gradients, 3: + weights), got {self.zero_stage}"
            )
        if self.engine == "deepspeed" and self.dp_replicate != 1:
            errors.append(
                f"parallel.dp_replicate={self.dp_replicate} must be 1 under parallel.engine='deepspeed': "
                f"ZeRO shards over every rank (for the same {self.dp} data-parallel replicas use "
                f"dp_shard={self.dp} and dp_replicate=1)"
            )
        if self.timeout_s < 10:
            errors.append(
                f"parallel.timeout_s must be >= 10 seconds (the watchdog beats every few seconds), got {self.timeout_s}"
            )
        if self.offload_activations and not self.activation_checkpoint:
            errors.append(
                "parallel.offload_activations=true offloads the inputs of checkpointed blocks, but "
                "parallel.activation_checkpoint is false: set it to true, or drop the offload"
            )
        if self.offload_activations and self.engine == "deepspeed":
            errors.append(
                "parallel.offload_activations=true works with parallel.engine='fsdp' only (it is "
                "not tested under DeepSpeed ZeRO's parameter hooks); use engine='fsdp'"
            )
        exchanges = exchange_problems(self.exchange, self.dense_exchange, "parallel.")
        errors.extend(exchanges)
        ulysses = self.ulysses_settings()
        if not exchanges and ulysses and self.engine != "deepspeed":
            errors.append(
                f"{' and '.join(ulysses)} run under parallel.engine='deepspeed' only "
                f"(DeepSpeed-Ulysses), got parallel.engine={self.engine!r}"
            )
        return errors


@dataclass
class OptimConfig(Section):
    """AdamW and gradient clipping (recipe section [optim]).

    lr: peak learning rate (reached at the end of warmup).
    betas: AdamW (beta1, beta2).
    eps: AdamW epsilon.
    weight_decay: decoupled weight decay of matrices; norms' weights are not decayed.
    grad_clip: clip the global gradient norm to this value; 0 = no clipping (the norm is still logged).
    """

    lr: float = 3e-4
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1e-8
    weight_decay: float = 0.1
    grad_clip: float = 1.0

    def problems(self) -> list[str]:
        errors = []
        if self.lr <= 0 or self.eps <= 0 or self.weight_decay < 0 or self.grad_clip < 0:
            errors.append(
                f"optim needs lr > 0, eps > 0, weight_decay >= 0, grad_clip >= 0; got lr={self.lr}, "
                f"eps={self.eps}, weight_decay={self.weight_decay}, grad_clip={self.grad_clip}"
            )
        if len(self.betas) != 2 or not all(0.0 <= b < 1.0 for b in self.betas):
            errors.append(f"optim.betas must be two numbers in [0, 1), got {self.betas}")
        return errors


@dataclass
class ScheduleConfig(Section):
    """Learning-rate schedule over all stages together (recipe section [schedule]); the
    recovery stage continues the same curve (no re-warm). Curves: lh_cp/train/schedule.py.

    warmup_steps: linear warmup from lr / warmup_steps to lr over this many steps.
    decay: after warmup, 'constant' (lr to the last step: the paper's protocol), 'linear' or
        'cosine' (down to min_lr_ratio * lr at the last step of the last stage), or 'wsd'
        (warmup-stable-decay: lr until the last decay_steps steps, then linearly down to
        min_lr_ratio * lr at the last step; put the decay inside the recovery stage with
        decay_steps <= the recovery stage's steps).
    min_lr_ratio: the learning rate at the last step, as a fraction of optim.lr (unused by 'constant').
    decay_steps: length of the decaying tail of 'wsd'; must be 0 for the other curves.
    """

    warmup_steps: int = 100
    decay: str = "cosine"
    min_lr_ratio: float = 0.1
    decay_steps: int = 0

    def problems(self, total_steps: int = 0) -> list[str]:
        """`total_steps`: of all stages together; 0 = unknown (the rules that need it are skipped)."""
        errors = []
        if self.decay not in DECAYS:
            errors.append(f"schedule.decay must be one of {DECAYS}, got {self.decay!r}")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            errors.append(f"schedule.min_lr_ratio must lie in [0, 1], got {self.min_lr_ratio}")
        if self.warmup_steps < 0 or (total_steps and self.warmup_steps >= total_steps):
            errors.append(
                f"schedule.warmup_steps={self.warmup_steps} must be >= 0 and below the total steps of "
                f"all stages, {total_steps}"
            )
        if self.decay == "wsd" and total_steps:
            stable_end = total_steps - self.warmup_steps
            if not 1 <= self.decay_steps <= stable_end:
                errors.append(
                    f"schedule.decay_steps={self.decay_steps} must lie in [1, total steps - warmup_steps] = "
                    f"[1, {total_steps} - {self.warmup_steps} = {stable_end}] for schedule.decay='wsd'"
                )
        elif self.decay != "wsd" and self.decay_steps != 0:
            errors.append(
                f"schedule.decay_steps={self.decay_steps} is used by schedule.decay='wsd' only; "
                f"set it to 0 with schedule.decay={self.decay!r}"
            )
        return errors


@dataclass
class StageConfig(Section):
    """One training stage (recipe array [[stages]]); stages run in order.

    name: shown in logs; unique.
    attention: 'lighthouse' (Lighthouse in every layer but lighthouse.dense_layers) or
        'dense' (every layer dense: the recovery stage).
    steps: optimizer steps in this stage.
    """

    name: str = "lighthouse"
    attention: str = "lighthouse"
    steps: int = 1

    def problems(self, index: int = 0) -> list[str]:
        """`index`: the stage's place in [[stages]], as the messages name it."""
        errors = []
        if self.attention not in ATTENTION_MODES:
            errors.append(
                f"stages.{index}.attention must be one of {ATTENTION_MODES}, got {self.attention!r}"
            )
        if self.steps < 1:
            errors.append(f"stages.{index}.steps must be >= 1, got {self.steps}")
        return errors


@dataclass
class CheckpointConfig(Section):
    """Distributed checkpoints (torch.distributed.checkpoint) (recipe section [checkpoint]).

    interval: save every this many global steps; 0 = only at stage ends. The end of every
        stage is always saved and never deleted.
    keep_last: interval checkpoints kept (older ones are deleted once a newer one is complete).
    dir: checkpoint folder; empty = <run.out_dir>/checkpoints. A run resumes from the newest
        complete checkpoint found there that verifies against its manifest, falling back to
        older ones (each failure named on the console and in TensorBoard), and refuses one
        whose parameter shapes differ from the run's, naming every difference.
    verify: check every file's CRC-32 against the manifest on resume (files and sizes are
        always checked). Cost: one read of the checkpoint, shared by the ranks: CRC-32 ran at
        1.7 GB/s on one core of the 2-core development machine, so the 6.4 GB of a 530M model's
        float32 weights and AdamW moments take about 3.7 s in one process, 0.5 s per rank over 8
        (a second or two more on a cold page cache); the same is spent writing the manifest.
    """

    interval: int = 0
    keep_last: int = 2
    dir: str = ""
    verify: bool = True

    def problems(self) -> list[str]:
        if self.interval < 0 or self.keep_last < 1:
            return [
                f"checkpoint.interval must be >= 0 and keep_last >= 1, got {self.interval} and {self.keep_last}"
            ]
        return []


@dataclass
class MetricsConfig(Section):
    """Logging (recipe section [metrics]).

    tensorboard_dir: TensorBoard event files; empty = <run.out_dir>/tensorboard.
    log_interval: log (TensorBoard, console, metrics.jsonl) every this many steps, and the last step of each stage.
    peak_tflops: per-device peak for MFU; 0 = known GPUs' bf16 dense peak, or on CPU a
        float32 matmul measured at start.
    profile_step: run this global step under torch.profiler and write, per rank, a Chrome
        trace (profile_step<N>_rank<R>.json, open in Perfetto) and a table of the operators
        with the most device time (.txt) into run.out_dir; 0 = off. That step's logged time
        includes the profiler's overhead.
    """

    tensorboard_dir: str = ""
    log_interval: int = 1
    peak_tflops: float = 0.0
    profile_step: int = 0

    def problems(self, total_steps: int = 0) -> list[str]:
        """`total_steps`: of all stages together; 0 = unknown (the rules that need it are skipped)."""
        errors = []
        if self.log_interval < 1 or self.peak_tflops < 0:
            errors.append(
                "metrics.log_interval must be >= 1 and peak_tflops >= 0, got "
                f"{self.log_interval} and {self.peak_tflops}"
            )
        if self.profile_step < 0 or (total_steps and self.profile_step > total_steps):
            errors.append(
                f"metrics.profile_step={self.profile_step} must be 0 (off) or a step of the run, 1..{total_steps}"
            )
        return errors


@dataclass
class EvalConfig(Section):
    """Evaluation (recipe section [eval], with [eval.passkey]).

    val_interval: validation loss every this many global steps; 0 = only at stage ends
        (stage ends are always evaluated).
    val_batches: global batches of the validation split per evaluation (the same ones each
        time; the split must hold that many distinct batches). Each validation logs val/loss
        in the stage's attention mode and val/loss_dense with every layer dense on the same
        batches (in a dense stage the two are one number). Compare models by val/loss_dense:
        a Lighthouse-mode loss can read later tokens through the tile-wide selection
        (docs/LIGHTHOUSE.md s.10), so it is not a language-model loss.
    leak: at every validation of a Lighthouse stage, the leak metric (lh_cp/train/leak.py): the mean
        increase of the Lighthouse-mode loss at probe positions t when only the input at t + 1
        (val/leak_next_token_nats), or at t + 2 .. t + 4 (val/leak_near_future_nats), is
        replaced; zero for a strictly causal model. Costs about leak_positions training steps
        of a one-sequence batch per validation.
    leak_positions: probe positions t (one validation window each, the same at every validation).
    leak_in_dense_stages: also measure it at validations of dense stages, where it must be
        exactly zero (a check of the metric itself).
    passkey: the passkey retrieval evaluation, run once after the last stage.
    """

    val_interval: int = 0
    val_batches: int = 2
    leak: bool = True
    leak_positions: int = 16
    leak_in_dense_stages: bool = False
    passkey: PasskeyConfig = field(default_factory=PasskeyConfig)

    def problems(self) -> list[str]:
        errors = []
        if self.val_interval < 0 or self.val_batches < 1:
            errors.append(
                f"eval.val_interval must be >= 0 and val_batches >= 1, got {self.val_interval} and {self.val_batches}"
            )
        if self.leak_positions < 1:
            errors.append(
                f"eval.leak_positions must be >= 1 (probe positions of the leak metric), got {self.leak_positions}"
            )
        return errors + self.passkey.problems()


@dataclass
class Recipe:
    run: RunConfig = field(default_factory=RunConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    lighthouse: LighthouseSection = field(default_factory=LighthouseSection)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    stages: list[StageConfig] = field(default_factory=list)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    @property
    def total_steps(self) -> int:
        return sum(stage.steps for stage in self.stages)

    def stage_at(self, step: int) -> int:
        """Index of the stage global step `step` (counted from 1) belongs to."""
        return stage_containing(step, [stage.steps for stage in self.stages])

    def stage_ends(self) -> list[int]:
        """Global step at which each stage ends (steps are counted from 1)."""
        ends, total = [], 0
        for stage in self.stages:
            total += stage.steps
            ends.append(total)
        return ends

    @property
    def checkpoint_dir(self) -> Path:
        return Path(self.checkpoint.dir or Path(self.run.out_dir) / "checkpoints")

    @property
    def tensorboard_dir(self) -> Path:
        return Path(self.metrics.tensorboard_dir or Path(self.run.out_dir) / "tensorboard")


def stage_containing(step: int, stage_steps: list[int]) -> int:
    """Index of the stage global step `step` (counted from 1) lies in, for stages of
    `stage_steps` steps each, run in order; a step past the last stage belongs to the last."""
    end = 0
    for index, steps in enumerate(stage_steps):
        end += steps
        if step <= end:
            return index
    return len(stage_steps) - 1


class RecipeError(ValueError):
    """A recipe key that does not exist or holds a value of the wrong type."""


def _convert(value, kind, key: str, errors: list[str]):
    """`value` as type `kind` (a dataclass, list[...], int, float, bool or str); a mismatch is
    appended to `errors` (and None returned), so every problem of a recipe is reported at once."""
    if dataclasses.is_dataclass(kind):
        if not isinstance(value, dict):
            errors.append(
                f"recipe key {key}: expected a table, got {type(value).__name__} {value!r}"
            )
            return None
        return _from_dict(kind, value, key, errors)
    if typing.get_origin(kind) is list:
        (item,) = typing.get_args(kind)
        if not isinstance(value, list):
            errors.append(
                f"recipe key {key}: expected a list, got {type(value).__name__} {value!r}"
            )
            return None
        return [_convert(v, item, f"{key}.{i}", errors) for i, v in enumerate(value)]
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if kind in (int, float, str, bool) and type(value) is kind:
        return value
    errors.append(
        f"recipe key {key}: expected {kind.__name__}, got {type(value).__name__} {value!r}"
    )
    return None


def _from_dict(cls, data: dict, where: str, errors: list[str]):
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        full = f"{where}.{key}" if where else key
        if key not in names:
            errors.append(
                f"unknown recipe key {full!r}; valid keys{' in [' + where + ']' if where else ''}: {', '.join(names)}"
            )
            continue
        kwargs[key] = _convert(value, hints[key], full, errors)
    return None if errors else cls(**kwargs)


# A --set value that is not TOML may still be a bare word (--set data.source=files, a path);
# anything with a quote, a space, a bracket, a comma, '=' or '#' is refused, not taken literally.
_BARE_WORD = re.compile(r"[^\s'\"\[\]{},=#]+")


def parse_override(text: str) -> tuple[list[str], object]:
    """'section.key=value' -> (['section', 'key'], value); the value is read as a TOML value
    (numbers, booleans, quoted strings, [lists]); a bare word (no space, quote, bracket, comma,
    '=' or '#': a name, a path) is taken as that string; anything else is a RecipeError with the
    quoting hint."""
    if "=" not in text:
        raise RecipeError(f"--set expects section.key=value, got {text!r}")
    path, raw = text.split("=", 1)
    try:
        value = tomllib.loads(f"value = {raw}")["value"]
    except tomllib.TOMLDecodeError:
        if not _BARE_WORD.fullmatch(raw):
            raise RecipeError(
                f"--set {text}: {raw!r} is not a TOML value; quote strings in single quotes inside the "
                f"shell's double quotes, e.g. --set \"{path.strip()}='my value'\""
            ) from None
        value = raw
    return path.strip().split("."), value


def _apply_override(data: dict, path: list[str], value, text: str) -> None:
    node = data
    for depth, part in enumerate(path[:-1]):
        here = ".".join(path[: depth + 1])
        if isinstance(node, list):
            if not part.isdigit() or int(part) >= len(node):
                raise RecipeError(
                    f"--set {text}: {here} is not an existing list index (the list has {len(node)} entries)"
                )
            node = node[int(part)]
        else:
            node = node.setdefault(part, {})
            if not isinstance(node, (dict, list)):
                raise RecipeError(f"--set {text}: {here} is a value, not a section")
    if isinstance(node, list):
        raise RecipeError(f"--set {text}: cannot replace a whole list entry; set one of its keys")
    node[path[-1]] = value


def recipe_from_dict(data: dict, overrides: list[str] = ()) -> Recipe:
    for text in overrides:
        path, value = parse_override(text)
        _apply_override(data, path, value, text)
    errors: list[str] = []
    recipe = _from_dict(Recipe, data, "", errors)
    if errors:
        raise RecipeError("\n".join(errors))
    return recipe


def load_recipe(path: str | Path, overrides: list[str] = ()) -> Recipe:
    """Read a recipe TOML file and apply `--set` overrides; structure and types are checked."""
    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"recipe file {str(file)!r} does not exist")
    with file.open("rb") as handle:
        try:
            data = tomllib.load(handle)
        except tomllib.TOMLDecodeError as err:
            raise RecipeError(f"{file}: invalid TOML: {err}") from err
    return recipe_from_dict(data, overrides)
