"""`lh-cp train`: run a recipe's stages in order, alone or under torchrun.

Order of events: check the recipe and data paths (no process group yet), start the process
group and mesh, build the model identically on every rank, hand it to the engine
(lh_cp/train/engines.py: activation checkpointing and compile, then FSDP2 or DeepSpeed ZeRO), resume
from the newest complete checkpoint if there is one, then train stage after stage. Stage
boundaries only switch the attention functions (Transformer.set_attention); weights,
optimizer state, learning-rate curve and data position carry on, and every stage end is
validated and checkpointed. A validation reports the loss in the stage's mode and with every
layer dense (the number to compare models by), and in Lighthouse stages the leak metric
(lh_cp/train/leak.py). After the last stage the passkey evaluation runs.
"""

from __future__ import annotations

import contextlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from lh_cp.data.loader import PATH_SOURCES, BatchLoader, make_tokenizer, token_stream
from lh_cp.data.passkey import passkey_accuracy
from lh_cp.model.transformer import Transformer
from lh_cp.ops.entries import NonFiniteInput
from lh_cp.train.checkpoint import (
    checkpoint_engine,
    compatibility,
    latest_checkpoint,
    newest_verified,
    prune_checkpoints,
    unwrapped_name,
)
from lh_cp.train.engines import NonFiniteStep, build_engine, check_finite_value
from lh_cp.train.leak import make_probe
from lh_cp.train.metrics import (
    STAGES_TAG,
    MetricsWriter,
    flops_per_token,
    format_duration,
    peak_flops,
    peak_memory_gib,
)
from lh_cp.train.plan import check_recipe
from lh_cp.train.profiling import profile_paths, profiled
from lh_cp.train.recipe import Recipe, RecipeError
from lh_cp.train.runtime import Runtime, launched_world_size, run_fingerprint, start, stop
from lh_cp.train.schedule import lr_at
from lh_cp.train.steps import greedy_predictor, probe_leak, training_loss, validation_loss


@dataclass
class TrainSummary:
    """What a finished (or stopped) invocation reports; rank 0's view."""

    last_step: int
    resumed_from: int
    train_loss: dict[int, float] = field(default_factory=dict)  # logged steps
    val_loss: dict[int, float] = field(default_factory=dict)  # in the stage's attention mode
    val_loss_dense: dict[int, float] = field(
        default_factory=dict
    )  # every layer dense, same batches
    leak: dict[int, dict[str, float]] = field(
        default_factory=dict
    )  # the leak metric, where measured
    passkey: dict[float, float] | None = None
    seconds: float = 0.0


def check_machine(recipe: Recipe) -> list[str]:
    """What training needs from this machine that plan does not: data paths, the device, a
    checkpoint to resume that the recipe's engine can read."""
    data, missing = recipe.data, []
    if recipe.run.device == "cuda" and not torch.cuda.is_available():
        missing.append("run.device='cuda' but torch sees no CUDA device (use 'auto' or 'cpu')")
    if data.source in PATH_SOURCES and not Path(data.path).exists():
        missing.append(f"data.path={data.path!r} does not exist (data.source={data.source!r})")
    if data.tokenizer != "bytes" and not Path(data.tokenizer).exists():
        missing.append(
            f"data.tokenizer={data.tokenizer!r} does not exist (use 'bytes' or a local tokenizer.json)"
        )
    found, engine = latest_checkpoint(recipe.checkpoint_dir), recipe.parallel.engine
    written_by = checkpoint_engine(found[1]) if found is not None else None
    if written_by not in (None, engine):
        missing.append(
            f"the checkpoint to resume, {found[1]}, was written by parallel.engine={written_by!r} "
            f"but this run uses parallel.engine={engine!r}; resume with that engine or set another checkpoint.dir"
        )
    return missing


def parameter_shapes(network: torch.nn.Module) -> dict[str, list[int]]:
    """Full shape of every parameter by name, whatever wraps or shards it: activation
    checkpointing and compile prefixes dropped, FSDP2's DTensors by their global shape,
    ZeRO-3's partitioned parameters by their ds_shape."""
    return {
        unwrapped_name(name): list(getattr(param, "ds_shape", param.shape))
        for name, param in network.named_parameters()
    }


def check_data_volume(recipe: Recipe, train_windows: int, val_windows: int, dp: int) -> None:
    """Refuse a run that would silently repeat data: more training sequences than
    data.max_epochs passes over the train split, or validation batches that wrap around."""
    data = recipe.data
    needed = recipe.total_steps * data.batch_size * dp
    if data.max_epochs and needed > data.max_epochs * train_windows:
        raise RecipeError(
            f"the run needs {recipe.total_steps} steps x {data.batch_size * dp} sequences = {needed:,} sequences of "
            f"data.seq_len={data.seq_len}, but the train split of data.source={data.source!r} holds {train_windows:,} "
            f"({needed / train_windows:.2f} passes; data.max_epochs={data.max_epochs:g}); use more data, fewer steps, "
            f"or allow more passes with data.max_epochs"
        )
    val_needed = recipe.eval.val_batches * data.batch_size * dp
    if val_needed > val_windows:
        raise RecipeError(
            f"each validation reads eval.val_batches={recipe.eval.val_batches} x {data.batch_size * dp} = {val_needed} "
            f"sequences of data.seq_len={data.seq_len}, but the validation split holds {val_windows}; lower "
            f"eval.val_batches or raise data.validation_fraction"
        )


class Trainer:
    def __init__(self, recipe: Recipe, rt: Runtime) -> None:
        self.recipe, self.rt = recipe, rt
        data = recipe.data
        self.tokenizer = make_tokenizer(data)
        if self.tokenizer.vocab_size > recipe.model.vocab_size:
            raise ValueError(
                f"model.vocab_size={recipe.model.vocab_size} is smaller than the tokenizer's {self.tokenizer.vocab_size} tokens"
            )
        self.train_stream = token_stream(data, self.tokenizer, "train")
        self.val_stream = token_stream(data, self.tokenizer, "validation")
        # The end-of-document token where documents are masked: training, validation, the leak
        # probe and the passkey evaluation all read their documents off it.
        self.eod_id = self.tokenizer.eod_id if data.document_masking else None
        self.loader = BatchLoader(
            self.train_stream,
            data.seq_len,
            data.batch_size,
            rt.dp_rank,
            rt.dp_size,
            data.seed,
            shuffle=True,
            eod_id=self.eod_id,
        )
        check_data_volume(
            recipe, self.loader.windows, (len(self.val_stream) - 1) // data.seq_len, rt.dp_size
        )
        measure_leak = recipe.eval.leak and any(s.attention == "lighthouse" for s in recipe.stages)
        self.leak_probe = None
        if measure_leak or recipe.eval.leak_in_dense_stages:
            self.leak_probe = make_probe(
                self.val_stream, data.seq_len, recipe.eval.leak_positions, data.seed
            )
        # Same seed on every rank: identical initial weights before FSDP or ZeRO shards them.
        torch.manual_seed(recipe.run.seed)
        self.lighthouse = recipe.lighthouse.config()
        model = Transformer(
            recipe.model, self.lighthouse, tuple(recipe.lighthouse.dense_layers)
        ).to(rt.device)
        self.engine = build_engine(model, recipe, rt)
        self.model, self.network = self.engine.model, self.engine.network
        self.ckpt_dir = recipe.checkpoint_dir
        self.stage_ends = set(recipe.stage_ends())
        # What every checkpoint's manifest records of this run, to check a resume against.
        self.meta = {
            "engine": recipe.parallel.engine,
            "recipe": run_fingerprint(recipe, rt.mesh.size()),
            "params": parameter_shapes(self.network),
        }
        self.notices: list[str] = []  # resume events, for the console and TensorBoard
        self.tokens_per_step = data.seq_len * data.batch_size * rt.dp_size

    def resume(self) -> int:
        """Load the newest checkpoint that verifies (falling back past the ones that do not,
        each named in self.notices), after checking it fits this run; 0 when there is none."""
        found, failed = newest_verified(
            self.ckpt_dir, self.rt.world, content=self.recipe.checkpoint.verify
        )
        self.notices += [
            f"checkpoint {path} failed verification: {reason}; trying an older one"
            for path, reason in failed
        ]
        if found is None:
            if failed:
                tried = "\n  ".join(f"{path}: {reason}" for path, reason in failed)
                raise RecipeError(
                    f"no checkpoint under {self.ckpt_dir} verifies; tried, newest first:\n  {tried}"
                    f"\nmove them away (or delete them) to start anew, or set another checkpoint.dir"
                )
            return 0
        _, path, verdict = found
        if verdict.legacy:
            self.notices.append(f"checkpoint {path}: {verdict.reason}")
        else:
            self._check_fits(path, verdict.manifest)
        try:
            loaded, data_state = self.engine.load(path, self.loader.state_dict())
        except (
            Exception
        ) as err:  # a DCP or DeepSpeed error deep in the loader: name the folder first
            raise RuntimeError(
                f"could not load checkpoint {path}: {type(err).__name__}: {err}"
            ) from err
        self.loader.load_state_dict(data_state)
        if failed:
            self.notices.append(
                f"resumed from {path} (step {loaded}), the newest checkpoint that verifies"
            )
        return loaded

    def _check_fits(self, path: Path, manifest: dict) -> None:
        """Refuse a checkpoint whose parameters do not fit this run, naming every difference;
        a changed setting that keeps the shapes is only reported."""
        shapes, settings = compatibility(manifest, self.meta)
        if shapes:
            changed = "\n  ".join(settings) if settings else "(no setting of the recipe differs)"
            raise RecipeError(
                f"checkpoint {path} does not fit this run's model; parameters that differ:\n  "
                + "\n  ".join(shapes)
                + f"\nsettings that differ from the run that wrote it:\n  {changed}\nto start a new run with these "
                f"settings, set a new run.out_dir (or checkpoint.dir); to resume this one, undo the change"
            )
        if settings:
            self.notices.append(f"resuming {path} with changed settings: " + "; ".join(settings))

    def save(self, step: int) -> None:
        self.engine.save(self.ckpt_dir, step, self.loader.state_dict(), self.meta)
        prune_checkpoints(
            self.ckpt_dir, self.recipe.checkpoint.keep_last, self.stage_ends, self.rt.world
        )

    def step(self, step: int) -> tuple[float, float, float]:
        """One optimizer step; returns (global mean loss, gradient norm before clipping, lr)."""
        lr = lr_at(step, self.recipe.total_steps, self.recipe.optim, self.recipe.schedule)
        try:
            loss, mean_loss = training_loss(
                self.model, self.rt, self.loader.next_batch(), self.recipe.data.positions
            )
        except NonFiniteInput as err:  # a Lighthouse layer's q, k or v overflowed
            raise NonFiniteStep("attention input", str(err)) from err
        check_finite_value(
            "loss", float(mean_loss)
        )  # the global mean: every rank stops here together
        norm = self.engine.step(loss, lr)
        return float(mean_loss), norm, lr


def _stage_scalars(trainer: Trainer, stage: int) -> tuple[int, float]:
    """(Lighthouse layers in use, selected fraction S/N of a Lighthouse layer) of a stage."""
    recipe = trainer.recipe
    if recipe.stages[stage].attention != "lighthouse":
        return 0, 1.0
    n = recipe.data.seq_len
    return len(trainer.network.lighthouse_layers), trainer.lighthouse.selected_length(n) / n


def train(recipe: Recipe) -> TrainSummary:
    """Run `recipe` in this process (one rank of a torchrun job, or the only process)."""
    problems = check_recipe(recipe, launched_world_size()) + check_machine(recipe)
    if problems:
        raise RecipeError("the recipe is not valid:\n  " + "\n  ".join(problems))
    rt = start(recipe)
    try:
        return _train(recipe, rt)
    finally:
        stop(rt)


def _train(recipe: Recipe, rt: Runtime) -> TrainSummary:
    began = time.perf_counter()
    trainer = Trainer(recipe, rt)
    resumed = trainer.resume()
    summary = TrainSummary(last_step=resumed, resumed_from=resumed)
    out_dir = Path(recipe.run.out_dir)
    writer = (
        MetricsWriter(recipe.tensorboard_dir, out_dir / "metrics.jsonl", resumed, recipe.run.name)
        if rt.is_main
        else None
    )
    peak, peak_source = peak_flops(rt.device, recipe.metrics.peak_tflops)
    total = recipe.total_steps
    if writer:
        # Stage names and attention, for plots of the TensorBoard logs (lh-cp plot).
        writer.text(STAGES_TAG, json.dumps([[s.name, s.attention] for s in recipe.stages]), resumed)
        for notice in trainer.notices:
            writer.console(notice)
        if trainer.notices:
            writer.text("run/resume", "\n\n".join(trainer.notices), resumed)
        where = f"resumed from step {resumed}" if resumed else "from scratch"
        writer.console(
            f"{total} steps in {len(recipe.stages)} stages, {rt.mesh.size()} ranks on {rt.device.type}, "
            f"{where}; checkpoints in {trainer.ckpt_dir}, TensorBoard in {recipe.tensorboard_dir}; "
            f"MFU against {peak / 1e12:.2f} TFLOP/s ({peak_source})"
        )
    stop_at = recipe.run.stop_after_step or total
    current_stage, window, recent = -1, LogWindow(), []
    for step in range(resumed + 1, min(stop_at, total) + 1):
        stage = recipe.stage_at(step)
        if stage != current_stage:
            trainer.network.set_attention(recipe.stages[stage].attention)
            current_stage = stage
            if writer:
                # Logged at the stage's first step whatever the log interval, so plots mark the boundary exactly.
                writer.scalars(step, {"train/stage": stage}, kind="stage")
                writer.console(
                    f"stage {stage + 1}/{len(recipe.stages)} {recipe.stages[stage].name!r}: "
                    f"{recipe.stages[stage].attention} attention from step {step}"
                )
        tick = time.perf_counter()
        profiling = step == recipe.metrics.profile_step
        try:
            with (
                profiled(out_dir, step, rt.rank, rt.device)
                if profiling
                else contextlib.nullcontext()
            ):
                loss, norm, lr = trainer.step(step)
        except NonFiniteStep as err:
            raise _stopped_by(err, trainer, step, stage, writer) from err
        elapsed = time.perf_counter() - tick
        if profiling and writer:
            writer.console(
                f"step {step} profiled: {' and '.join(map(str, profile_paths(out_dir, step, rt.rank)))}"
            )
        if rt.watchdog:
            rt.watchdog.progress(step)
        window.add(loss, norm, elapsed)
        recent = (recent + [elapsed])[-20:]
        stage_end = step in trainer.stage_ends
        log_now = (
            step % recipe.metrics.log_interval == 0 or stage_end or step in (stop_at, resumed + 1)
        )
        if writer and log_now:
            summary.train_loss[step] = _log_step(
                writer, trainer, recipe, rt, step, stage, lr, window, peak, recent
            )
        if log_now:
            window = LogWindow()
        val_interval = recipe.eval.val_interval
        if stage_end or (val_interval and step % val_interval == 0):
            _validate(trainer, writer, summary, step, stage)
        interval = recipe.checkpoint.interval
        if stage_end or step == stop_at or (interval and step % interval == 0):
            trainer.save(step)
        summary.last_step = step
    if summary.last_step >= total and recipe.eval.passkey.enabled:
        summary.passkey = _passkey(trainer, rt, recipe, writer, out_dir)
    summary.seconds = time.perf_counter() - began
    if writer:
        if summary.last_step < total:
            writer.console(
                f"stopped after step {summary.last_step} (run.stop_after_step); run again to resume"
            )
        else:
            writer.console(
                f"done: {total} steps in {format_duration(summary.seconds)} "
                f"(this invocation), checkpoints in {trainer.ckpt_dir}"
            )
        writer.close()
    return summary


def _stopped_by(
    err: NonFiniteStep, trainer: Trainer, step: int, stage: int, writer: MetricsWriter | None
) -> NonFiniteStep:
    """The error that ends a run at a non-finite step, naming the step, stage, rank and the
    checkpoint a rerun resumes from (nothing of this step is saved)."""
    found = latest_checkpoint(trainer.ckpt_dir)
    kept = (
        f"the last good checkpoint is {found[1]} (step {found[0]})"
        if found
        else "no checkpoint was saved yet"
    )
    where = (
        f"at step {step}, stage {stage + 1} {trainer.recipe.stages[stage].name!r}, rank {trainer.rt.rank}: "
        f"training stopped; {kept}; lower optim.lr or raise schedule.warmup_steps, then resume or start anew"
    )
    stopped = NonFiniteStep(err.what, err.value, where)
    if writer:
        writer.console(str(stopped))
    return stopped


def _validate(
    trainer: Trainer, writer: MetricsWriter | None, summary: TrainSummary, step: int, stage: int
) -> None:
    """Validation loss in the stage's mode and with every layer dense (same batches), and the
    leak metric where it applies; logged to TensorBoard, metrics.jsonl and the console."""
    recipe, rt, network = trainer.recipe, trainer.rt, trainer.network
    mode = recipe.stages[stage].attention
    values = {
        "val/loss": validation_loss(trainer.model, rt, recipe, trainer.val_stream, trainer.eod_id)
    }
    leak_here = trainer.leak_probe is not None and (
        (mode == "lighthouse" and recipe.eval.leak)
        or (mode == "dense" and recipe.eval.leak_in_dense_stages)
    )
    if leak_here:
        values.update(probe_leak(trainer.model, rt, recipe, trainer.leak_probe, trainer.eod_id))
    if mode == "dense":
        values["val/loss_dense"] = values["val/loss"]
    else:
        network.set_attention("dense")
        try:
            values["val/loss_dense"] = validation_loss(
                trainer.model, rt, recipe, trainer.val_stream, trainer.eod_id
            )
        finally:
            network.set_attention(mode)
    summary.val_loss[step], summary.val_loss_dense[step] = (
        values["val/loss"],
        values["val/loss_dense"],
    )
    if leak_here:
        summary.leak[step] = {k: v for k, v in values.items() if "leak" in k}
    if writer:
        writer.scalars(step, values, kind="val")
        line = f"step {step} validation ({recipe.stages[stage].name}): {mode}-mode loss {values['val/loss']:.4f}"
        if mode != "dense":
            line += f", dense-mode loss {values['val/loss_dense']:.4f}"
        if leak_here:
            line += (
                f" | leak: next token {values['val/leak_next_token_nats']:+.4f} nats, "
                f"t+2..t+4 {values['val/leak_near_future_nats']:+.4f} nats"
            )
        writer.console(line)


@dataclass
class LogWindow:
    """Steps since the previous log line: their losses, gradient norms and wall times."""

    losses: list[float] = field(default_factory=list)
    norms: list[float] = field(default_factory=list)
    seconds: float = 0.0

    def add(self, loss: float, norm: float, seconds: float) -> None:
        self.losses.append(loss)
        self.norms.append(norm)
        self.seconds += seconds


def _log_step(
    writer: MetricsWriter,
    trainer: Trainer,
    recipe: Recipe,
    rt: Runtime,
    step: int,
    stage: int,
    lr: float,
    window: LogWindow,
    peak: float,
    recent: list[float],
) -> float:
    """TensorBoard, metrics.jsonl and console line for `step`. Loss, gradient norm, tokens/s and
    MFU are means over the steps since the previous log line, so a sparse log interval still
    shows the trend rather than one step's noise. Returns the logged loss."""
    steps = len(window.losses)
    loss, norm = sum(window.losses) / steps, sum(window.norms) / steps
    lh_layers, fraction = _stage_scalars(trainer, stage)
    tokens_per_s = trainer.tokens_per_step * steps / window.seconds
    flops = (
        flops_per_token(recipe.model, recipe.data.seq_len, trainer.lighthouse, lh_layers)
        * tokens_per_s
    )
    mfu = flops / (rt.mesh.size() * peak)
    memory = peak_memory_gib(rt.device)
    eta = (recipe.total_steps - step) * sorted(recent)[len(recent) // 2]
    writer.scalars(
        step,
        {
            "train/loss": loss,
            "train/lr": lr,
            "train/grad_norm": norm,
            "perf/tokens_per_s": tokens_per_s,
            "perf/mfu": mfu,
            "perf/peak_memory_gib": memory,
            "train/stage": stage,
            "lighthouse/selected_fraction": fraction,
        },
    )
    writer.console(
        f"step {step}/{recipe.total_steps} {recipe.stages[stage].name} | loss {loss:.4f} | lr {lr:.2e} | "
        f"gnorm {norm:.3f} | {tokens_per_s:,.0f} tok/s | mfu {mfu:.1%} | mem {memory:.2f} GiB | "
        f"S/N {fraction:.3f} | eta {format_duration(eta)}"
    )
    return loss


def _passkey(
    trainer: Trainer, rt: Runtime, recipe: Recipe, writer: MetricsWriter | None, out_dir: Path
) -> dict[float, float]:
    final = recipe.stages[-1]
    trainer.network.set_attention(final.attention)
    length = recipe.eval.passkey.length or recipe.data.seq_len
    predict = greedy_predictor(trainer.model, rt, trainer.eod_id, recipe.data.positions)
    accuracy = passkey_accuracy(predict, trainer.tokenizer, recipe.eval.passkey, length)
    if writer:
        step = recipe.total_steps
        writer.scalars(
            step,
            {f"passkey/depth_{depth:g}": acc for depth, acc in accuracy.items()},
            kind="passkey",
        )
        mean = sum(accuracy.values()) / len(accuracy)
        table = ", ".join(f"{depth:g}: {acc:.0%}" for depth, acc in accuracy.items())
        writer.console(
            f"passkey retrieval at {length} tokens ({final.attention} attention), accuracy by depth: "
            f"{table}; mean {mean:.0%}"
        )
        (out_dir / "passkey.json").write_text(
            json.dumps(
                {
                    "length": length,
                    "attention": final.attention,
                    "accuracy_by_depth": {str(d): a for d, a in accuracy.items()},
                },
                indent=2,
            )
            + "\n"
        )
    return accuracy
