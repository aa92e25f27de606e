"""`lh-cp plan`: every rule a recipe must satisfy, and the numbers it implies.

`check_recipe` runs before any process group exists (the trainer calls it first too) and
returns every violated rule, each naming the keys and numbers involved. `plan_numbers`
derives tile size, selected length, ranks, tokens per rank, parameters and the memory
estimates: accelerator memory per rank and, with parallel.offload_activations, the pinned host
memory per rank, which `host_memory_problems` holds to a machine's memory (this one's, or
the one `lh-cp plan --host-memory-gib` names). Data paths are not required to exist here: the
plan describes shapes, so it can be made on a laptop for a cluster; training checks paths
when it opens the data.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass
from pathlib import Path

from lh_cp.model.transformer import ModelConfig, count_parameters, normalize_layer_indices
from lh_cp.ops.config import LighthouseConfig
from lh_cp.parallel.context import (
    ULYSSES_EXCHANGES,
    document_exchange_problems,
    scorer_exchange_problems,
)
from lh_cp.parallel.offload import pinned_bytes
from lh_cp.train.recipe import ATTENTION_MODES, Recipe

DEEPSPEED_MIN_VERSION = (0, 19, 8)
DEEPSPEED_INSTALL = "pip install --no-build-isolation 'deepspeed>=0.19.8' (after torch)"


def deepspeed_problem() -> str | None:
    """Why DeepSpeed cannot be used here (not installed, broken, too old), or None."""
    try:
        import deepspeed
    except (
        Exception
    ) as err:  # a broken build can fail at import with any error, not only ImportError
        return f"DeepSpeed does not import here ({type(err).__name__}: {err}); install it with {DEEPSPEED_INSTALL}"
    version = tuple(int(part) for part in re.findall(r"\d+", deepspeed.__version__)[:3])
    if version < DEEPSPEED_MIN_VERSION:
        return f"DeepSpeed {deepspeed.__version__} is older than 0.19.8; upgrade with {DEEPSPEED_INSTALL}"
    return None


def uses_ulysses(recipe: Recipe) -> bool:
    """Whether the recipe's CP splits sequences contiguously (Ulysses) rather than head-tail."""
    return recipe.parallel.exchange in ULYSSES_EXCHANGES


def _sequence_rules(recipe: Recipe, n: int, mode: str, what: str) -> list[str]:
    """Shape rules for running `mode` attention over sequences of n tokens under the recipe's CP:
    head-tail (2 * cp chunks) or contiguous (cp shards, Ulysses); a Lighthouse layer compressed
    piece by piece (head-tail chunks, compressed Ulysses shards) needs whole tiles per piece."""
    par = recipe.parallel
    ulysses = par.cp > 1 and uses_ulysses(recipe)
    pieces = par.cp if ulysses else 2 * par.cp
    if par.cp > 1 and n % pieces != 0:
        split = (
            f"parallel.cp={par.cp} equal contiguous shards (parallel.exchange={par.exchange!r})"
            if ulysses
            else f"2 * parallel.cp = {pieces} equal head-tail chunks"
        )
        return [f"{what}={n} must split into {split}: {n} % {pieces} != 0"]
    if (
        mode != "lighthouse" or recipe.lighthouse.problems()
    ):  # an invalid [lighthouse] is listed once, by itself
        return []
    try:
        cfg = recipe.lighthouse.config()
        cfg.tile_size(n)
    except ValueError as err:
        return [f"{what}={n} with [lighthouse]: {err}"]
    # plain Ulysses compresses the whole sequence; a scorer the exchange refuses is listed once,
    # by scorer_problems
    if (
        par.cp > 1
        and par.exchange != "ulysses"
        and not scorer_exchange_problems(cfg.scorer, par.exchange)
    ):
        piece = (
            "each contiguous shard (compressed on its own rank)"
            if ulysses
            else "each head-tail chunk"
        )
        try:
            cfg.for_pieces(n, pieces, piece)
        except ValueError as err:
            return [f"{what}={n} under parallel.cp={par.cp}: {err}"]
    return []


def _parallel_rules(recipe: Recipe) -> list[str]:
    """Rules of [parallel] that need another section or the machine (DeepSpeed installed)."""
    par, errors = recipe.parallel, []
    if par.engine == "deepspeed":
        problem = deepspeed_problem()
        if problem:
            errors.append(f"parallel.engine='deepspeed' needs DeepSpeed: {problem}")
    ulysses = par.ulysses_settings()
    heads = recipe.model.n_heads
    if ulysses and par.cp > 1 and heads % par.cp != 0:
        errors.append(
            f"{' and '.join(ulysses)}: the Ulysses all-to-all gives each CP rank whole heads, so "
            f"model.n_heads={heads} must be a multiple of parallel.cp={par.cp}"
        )
    return errors


def document_masking_problems(recipe: Recipe) -> list[str]:
    """The rule of a document-masked run (data.document_masking) whose stages train Lighthouse
    layers under CP: the Lighthouse exchange must keep documents apart
    (lh_cp.parallel.context.document_exchange_problems, where the rule lives)."""
    trains_lighthouse = any(s.attention == "lighthouse" for s in recipe.stages)
    if not recipe.data.document_masking or recipe.parallel.cp < 2 or not trains_lighthouse:
        return []
    return document_exchange_problems(recipe.parallel.exchange, prefix="parallel.")


def scorer_problems(recipe: Recipe) -> list[str]:
    """The rule of lighthouse.scorer under CP (lh_cp.parallel.context.scorer_exchange_problems,
    where it lives), for runs whose stages train Lighthouse layers."""
    trains_lighthouse = any(s.attention == "lighthouse" for s in recipe.stages)
    if recipe.parallel.cp < 2 or not trains_lighthouse:
        return []
    return scorer_exchange_problems(
        recipe.lighthouse.scorer, recipe.parallel.exchange, "lighthouse.", "parallel."
    )


def check_recipe(recipe: Recipe, world_size: int | None = None) -> list[str]:
    """Every violated rule of `recipe` (empty when it is valid). `world_size`: the number of
    processes that will run it, when known (torchrun's WORLD_SIZE)."""
    sections = [
        recipe.run,
        recipe.model,
        recipe.lighthouse,
        recipe.parallel,
        recipe.data,
        recipe.optim,
        recipe.checkpoint,
        recipe.eval,
    ]
    errors = [problem for section in sections for problem in section.problems()]
    # Rules that need the total step count wait for valid stage lengths (0 = unknown), so a
    # negative stages.N.steps is one problem, not three.
    total = recipe.total_steps if all(stage.steps >= 1 for stage in recipe.stages) else 0
    errors += recipe.metrics.problems(total)
    errors += recipe.schedule.problems(total)
    errors += [problem for i, stage in enumerate(recipe.stages) for problem in stage.problems(i)]
    for key, indices in (
        ("lighthouse.dense_layers", recipe.lighthouse.dense_layers),
        ("parallel.no_checkpoint_layers", recipe.parallel.no_checkpoint_layers),
    ):
        try:
            normalize_layer_indices(indices, max(recipe.model.n_layers, 1), key)
        except ValueError as err:
            errors.append(str(err))
    if recipe.parallel.no_checkpoint_layers and not recipe.parallel.activation_checkpoint:
        errors.append(
            f"parallel.no_checkpoint_layers={recipe.parallel.no_checkpoint_layers} exempts blocks from "
            f"activation checkpointing, which is off: set parallel.activation_checkpoint=true or drop it"
        )
    par, data = recipe.parallel, recipe.data
    errors.extend(_parallel_rules(recipe))
    errors.extend(document_masking_problems(recipe))
    errors.extend(scorer_problems(recipe))
    if world_size is not None and par.world_size != world_size:
        errors.append(
            f"parallel.cp * dp_shard * dp_replicate = {par.cp} * {par.dp_shard} * {par.dp_replicate} = "
            f"{par.world_size} must equal the number of processes, {world_size}"
        )
    vocab = data.tokenizer_vocab_size()
    if vocab is not None and recipe.model.vocab_size < vocab:
        errors.append(
            f"model.vocab_size={recipe.model.vocab_size} is smaller than the tokenizer's {vocab} tokens"
        )
    if not recipe.stages:
        errors.append(
            "the recipe has no [[stages]]; add at least one (attention = 'lighthouse' or 'dense')"
        )
    names = [s.name for s in recipe.stages]
    errors += [
        f"stages.{i}.name={name!r} is used by more than one stage"
        for i, name in enumerate(names)
        if names.count(name) > 1
    ]
    if not par.problems():  # the shapes under CP need valid degrees and exchanges
        modes = sorted({s.attention for s in recipe.stages if s.attention in ATTENTION_MODES})
        if data.seq_len >= 2:
            for mode in modes:
                errors.extend(_sequence_rules(recipe, data.seq_len, mode, "data.seq_len"))
        if recipe.eval.passkey.enabled and recipe.stages and recipe.eval.passkey.length > 0:
            final_mode = recipe.stages[-1].attention
            errors.extend(
                _sequence_rules(
                    recipe, recipe.eval.passkey.length, final_mode, "eval.passkey.length"
                )
            )
    return list(dict.fromkeys(errors))  # each rule once, in the order found


# Pinned pages cannot be swapped or reclaimed: the operating system and the training
# processes themselves (Python, CUDA contexts, data) need the rest of the machine's memory.
HOST_RESERVE_FRACTION = 0.1


def machine_memory_bytes() -> int:
    """This machine's memory: /proc/meminfo's MemTotal (os.sysconf where there is none), or
    the cgroup's limit when a container is given less."""
    total = None
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemTotal:"):
                    total = int(line.split()[1]) * 1024
                    break
    except OSError:
        pass
    if total is None:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    for limit_file in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            limit = Path(limit_file).read_text().strip()
        except OSError:
            continue
        if limit.isdigit():
            total = min(total, int(limit))
    return total


def host_memory_problems(recipe: Recipe, host_memory_bytes: int, ranks_per_node: int) -> list[str]:
    """The offload rule that needs the machine: the pinned host memory of the ranks sharing a
    node must leave HOST_RESERVE_FRACTION of its memory free. Empty without offload."""
    per_rank = pinned_host_bytes_per_rank(recipe)
    if not per_rank:
        return []
    pinned, allowed = per_rank * ranks_per_node, (1 - HOST_RESERVE_FRACTION) * host_memory_bytes
    if pinned <= allowed:
        return []
    return [
        f"parallel.offload_activations=true pins {pinned / 2**30:.1f} GiB of host memory "
        f"({ranks_per_node} rank(s) per node x {checkpointed_layers(recipe)} block inputs of "
        f"{block_input_bytes(recipe) / 2**30:.2f} GiB at data.seq_len={recipe.data.seq_len}, "
        f"parallel.cp={recipe.parallel.cp}), but the machine has {host_memory_bytes / 2**30:.1f} GiB "
        f"and at most {allowed / 2**30:.1f} GiB may be pinned ({HOST_RESERVE_FRACTION:.0%} is left "
        f"to the system and the processes); shorten data.seq_len, raise parallel.cp, turn the "
        f"offload off, or plan for a larger machine (lh-cp plan --host-memory-gib)"
    ]


@dataclass
class PlanNumbers:
    world_size: int
    seq_len: int
    tokens_per_rank: int  # sequence tokens each rank holds per step (batch_size * seq_len / cp)
    tokens_per_step: int  # tokens of one global batch
    tile: int | None  # Lighthouse tile size T (None when no stage uses Lighthouse)
    chunk: int  # tokens of one head-tail chunk (allgather, ring) or contiguous shard (Ulysses) under CP
    selected: int | None  # S, entries per head of a Lighthouse layer
    params: int
    embedding_params: int
    lighthouse_layers: int
    memory_gib: float  # accelerator memory per rank (memory_estimate_gib)
    pinned_host_gib: float  # pinned host memory per rank (offloaded block inputs; 0 without)
    total_steps: int


def _bytes_per_token_per_layer(m: ModelConfig, act_bytes: int) -> int:
    """Activations a decoder block keeps for backward per token (no recomputation): inputs of
    both norms (float32 copies), q/k/v/attention output, attention output projection input,
    and the SwiGLU hidden tensors (w1, w3, silu, product)."""
    kv = m.n_kv_heads * m.head_dim
    return act_bytes * (6 * m.dim + 2 * kv + 4 * m.ffn_dim) + 4 * 2 * m.dim


def _gradient_bytes_per_token(m: ModelConfig, act_bytes: int) -> int:
    """Gradients alive at once while a block back-propagates, per token: of the block's
    output and of the residual stream inside it (act_bytes per channel each), and a norm's
    float32 input gradient (4 bytes per channel)."""
    return 2 * act_bytes * m.dim + 4 * m.dim


def cp_dense_bytes_per_token(recipe: Recipe) -> int:
    """Float32 buffers the CP exchange of a dense layer adds, per local token, during its
    backward (parallel/headtail/exchange.py, ring.py): dK/dV accumulators (8 bytes per
    key/value channel each): three in the ring (one being computed, one in flight, one
    arriving), W + 1 in the all-gather (one per source, plus the reduce-scatter's result)
    beside the gathered bf16 K/V (4 bytes per key/value channel per source); and, from W = 3
    on, the ring's float32 dq sum over several remote blocks (4 bytes per query channel).
    Where a query chunk gets at most one remote dq (the all-gather; the ring at W = 2) it is
    added to the own block's in the kernel's dtype, and the forward merges straight into the
    bf16 output rows: no float32 buffer per query channel. Zero without CP, under Ulysses, or
    when no layer ever attends densely."""
    m, par = recipe.model, recipe.parallel
    dense_somewhere = bool(
        normalize_layer_indices(recipe.lighthouse.dense_layers, m.n_layers)
    ) or any(s.attention == "dense" for s in recipe.stages)
    if par.cp == 1 or uses_ulysses(recipe) or not dense_somewhere:
        return 0
    q_channels, kv = m.n_heads * m.head_dim, m.n_kv_heads * m.head_dim
    if par.dense_exchange == "ring":
        return (4 * q_channels if par.cp >= 3 else 0) + 3 * 8 * kv
    return (par.cp + 1) * 8 * kv + par.cp * 4 * kv


def state_bytes_per_rank(recipe: Recipe, first_step: bool = False) -> float:
    """fp32 weights, gradients and AdamW moments (4 + 4 + 8 bytes per parameter) held by one
    rank: FSDP2 shards all of them over dp_shard * cp ranks; ZeRO over every rank shards the
    moments (stage 1), also the gradients (2), also the weights (3). first_step: before the
    first optimizer step, which is when AdamW allocates its moments."""
    par, params = recipe.parallel, count_parameters(recipe.model)
    if par.engine != "deepspeed":
        per_param = 8 if first_step else 16
        return per_param * params / (par.dp_shard * par.cp)
    sharded = {1: 8, 2: 12, 3: 16}.get(par.zero_stage, 16)
    total = (16 - sharded) * params + sharded * params / par.world_size
    return total - (8 * params / par.world_size if first_step else 0)


def checkpointed_layers(recipe: Recipe) -> int:
    """Blocks recomputed in backward (0 without activation checkpointing)."""
    par, m = recipe.parallel, recipe.model
    if not par.activation_checkpoint:
        return 0
    kept = normalize_layer_indices(
        par.no_checkpoint_layers, m.n_layers, "parallel.no_checkpoint_layers"
    )
    return m.n_layers - len(kept)


def offloads(recipe: Recipe) -> bool:
    """Whether the run keeps the checkpointed blocks' inputs in pinned host memory: offload
    on, on a GPU (on CPU it changes nothing; lh_cp/parallel/offload.py)."""
    par = recipe.parallel
    return par.offload_activations and par.activation_checkpoint and recipe.run.device != "cpu"


def block_input_bytes(recipe: Recipe, on_gpu: bool = True) -> int:
    """Bytes of one block's input on one rank: [batch, tokens per rank, dim] in bf16 on a GPU
    (FSDP2's compute dtype), float32 on CPU."""
    m, par, data = recipe.model, recipe.parallel, recipe.data
    return data.batch_size * data.seq_len // par.cp * m.dim * (2 if on_gpu else 4)


def pinned_host_bytes_per_rank(recipe: Recipe) -> int:
    """Pinned host memory one rank holds at the end of a forward with offload on: every
    checkpointed block's input, in pieces as the host allocator rounds them
    (lh_cp.parallel.offload.pinned_bytes); 0 without offload."""
    if not offloads(recipe):
        return 0
    return checkpointed_layers(recipe) * pinned_bytes(block_input_bytes(recipe))


def memory_estimate_gib(recipe: Recipe, on_gpu: bool = True, first_step: bool = False) -> float:
    """Peak accelerator memory per rank, roughly: weights, gradients and AdamW moments as the
    engine shards them (state_bytes_per_rank; no moments in the first step), two all-gathered
    bf16 blocks (prefetch), stored activations (one block input per checkpointed layer, every
    activation of the others), and the larger of what backward adds at its two peaks: one
    block recomputed with the gradients alive while it back-propagates and the CP dense
    exchange's float32 buffers (cp_dense_bytes_per_token), or one loss chunk's logits (the
    loss is back-propagated before any block, so the two are never alive together).
    Lighthouse layers' compressed tensors are smaller than a dense block's and not counted
    apart. With offload (offloads(recipe)) the checkpointed blocks' inputs are in host memory
    (pinned_host_bytes_per_rank) and at most two are on the GPU at once: the one being
    recomputed and the one arriving.

    Checked against measured peaks (tests/test_plan_memory.py reads them from
    benchmarks/results/): single-GPU and CP=2 runs of the 270M model and the 530M model."""
    m, par, data = recipe.model, recipe.parallel, recipe.data
    act_bytes = 2 if on_gpu else 4
    weights = 4 * m.dim * m.dim + 3 * m.dim * m.ffn_dim  # upper bound of one block's weights
    tokens = data.batch_size * data.seq_len // par.cp
    per_layer = _bytes_per_token_per_layer(m, act_bytes) * tokens
    checkpointed = checkpointed_layers(recipe)
    inputs_on_gpu = min(2, checkpointed) if on_gpu and offloads(recipe) else checkpointed
    stored = inputs_on_gpu * tokens * m.dim * act_bytes + (m.n_layers - checkpointed) * per_layer
    gradients = _gradient_bytes_per_token(m, act_bytes) * tokens
    exchange = cp_dense_bytes_per_token(recipe) * tokens
    recomputed = per_layer if checkpointed else 0
    block_backward = recomputed + gradients + exchange
    logits = (
        3 * min(m.loss_chunk_tokens, tokens) * m.vocab_size * 4
    )  # float32 logits, softmax, grad
    state = state_bytes_per_rank(recipe, first_step)
    total = state + 2 * weights * act_bytes + stored + max(block_backward, logits)
    return total / 2**30


def plan_numbers(recipe: Recipe) -> PlanNumbers:
    par, data, m = recipe.parallel, recipe.data, recipe.model
    uses_lighthouse = any(s.attention == "lighthouse" for s in recipe.stages)
    cfg: LighthouseConfig = recipe.lighthouse.config()
    n = data.seq_len
    lighthouse_layers = m.n_layers - len(
        normalize_layer_indices(recipe.lighthouse.dense_layers, m.n_layers)
    )
    return PlanNumbers(
        world_size=par.world_size,
        seq_len=n,
        tokens_per_rank=data.batch_size * n // par.cp,
        tokens_per_step=data.batch_size * n * par.dp,
        tile=cfg.tile_size(n) if uses_lighthouse else None,
        chunk=n // (par.cp if uses_ulysses(recipe) else 2 * par.cp) if par.cp > 1 else n,
        selected=cfg.selected_length(n) if uses_lighthouse else None,
        params=count_parameters(m),
        embedding_params=m.vocab_size * m.dim * (1 if m.tie_embeddings else 2),
        lighthouse_layers=lighthouse_layers,
        memory_gib=memory_estimate_gib(recipe, on_gpu=recipe.run.device != "cpu"),
        pinned_host_gib=pinned_host_bytes_per_rank(recipe) / 2**30,
        total_steps=recipe.total_steps,
    )


def _count(x: float) -> str:
    for unit, size in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(x) >= size:
            return f"{x / size:.2f}{unit}"
    return str(int(x))


def format_plan(recipe: Recipe, numbers: PlanNumbers) -> str:
    par, m = recipe.parallel, recipe.model
    accelerator = "CPU processes" if recipe.run.device == "cpu" else "GPUs"
    lines = [
        f"recipe {recipe.run.name!r}: valid",
        f"  {accelerator}: {numbers.world_size} = cp {par.cp} x dp_shard {par.dp_shard} x "
        f"dp_replicate {par.dp_replicate}",
        f"  model: {_count(numbers.params)} parameters ({numbers.params:,}; "
        f"{_count(numbers.params - numbers.embedding_params)} "
        f"without embeddings), {m.n_layers} layers, dim {m.dim}, heads "
        f"{m.n_heads}/{m.n_kv_heads} kv, ffn {m.ffn_dim}, vocab {m.vocab_size}",
        f"  sequence: N = {numbers.seq_len:,} tokens; per rank per step {numbers.tokens_per_rank:,} tokens; "
        f"global batch {numbers.tokens_per_step:,} tokens",
    ]
    if recipe.data.document_masking:
        lines.append(
            f"  document masking: each document attends only to itself (dense layers; Lighthouse "
            f"layers as docs/LIGHTHOUSE.md s.12), RoPE positions per {recipe.data.positions}; "
            f"end-of-document targets ignored"
        )
    if par.engine == "deepspeed":
        lines.append(
            f"  engine: DeepSpeed ZeRO stage {par.zero_stage} over all {numbers.world_size} ranks"
        )
    if par.cp > 1 and uses_ulysses(recipe):
        repeat = ""
        if (
            m.n_kv_heads % par.cp
        ):  # DistributedAttention splits kv heads evenly (parallel/ulysses.py)
            repeat = f", kv heads repeated to {math.lcm(m.n_kv_heads, par.cp)} for plain Ulysses"
        lines.append(
            f"  context parallel: {par.cp} contiguous shards of {numbers.chunk:,} tokens, exchange "
            f"{par.exchange} (lighthouse) / {par.dense_exchange} (dense), {m.n_heads // par.cp} query "
            f"heads per rank after the all-to-all{repeat}"
        )
    elif par.cp > 1:
        lines.append(
            f"  context parallel: {2 * par.cp} head-tail chunks of {numbers.chunk:,} tokens, exchange "
            f"{par.exchange} (lighthouse) / {par.dense_exchange} (dense)"
        )
    if numbers.tile is not None:
        lh = recipe.lighthouse
        unit = "shard" if uses_ulysses(recipe) else "chunk"
        chunk_tiles = f", {numbers.chunk // numbers.tile} per {unit}" if par.cp > 1 else ""
        lines.append(
            f"  lighthouse: pool {lh.pool}, levels {lh.levels}, topk {lh.topk}, tile_budget {lh.tile_budget}, "
            f"selection {lh.selection} -> "
            f"tile T = {numbers.tile:,} ({numbers.seq_len // numbers.tile} tiles{chunk_tiles}), "
            f"S = {numbers.selected:,} = {numbers.selected / numbers.seq_len:.2%} of N, in "
            f"{numbers.lighthouse_layers} of {m.n_layers} layers"
        )
    stages = ", ".join(f"{s.name} ({s.attention}, {s.steps:,} steps)" for s in recipe.stages)
    lines.append(
        f"  stages: {stages}; {numbers.total_steps:,} steps, "
        f"{_count(numbers.total_steps * numbers.tokens_per_step)} tokens"
    )
    checkpointing = "without activation checkpointing"
    if par.activation_checkpoint:
        kept = sorted(
            normalize_layer_indices(
                par.no_checkpoint_layers, m.n_layers, "parallel.no_checkpoint_layers"
            )
        )
        checkpointing = "with activation checkpointing" + (f", layers {kept} kept" if kept else "")
    if offloads(recipe):
        checkpointing += ", block inputs offloaded to host memory"
    lines.append(f"  memory estimate per rank: {numbers.memory_gib:.1f} GiB ({checkpointing})")
    if offloads(recipe):
        lines.append(
            f"  pinned host memory per rank: {numbers.pinned_host_gib:.1f} GiB "
            f"({checkpointed_layers(recipe)} block inputs of "
            f"{block_input_bytes(recipe) / 2**30:.2f} GiB)"
        )
    elif par.offload_activations:
        lines.append(
            "  activation offload: on, but on CPU it saves nothing (inputs are in host memory)"
        )
    return "\n".join(lines)
