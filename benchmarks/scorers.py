"""Cost of the selection scorers (docs/LIGHTHOUSE.md s.3 and s.13), one GPU, one run.

For each length (128K and 512K tokens by default) and each variant (a list of LighthouseConfig
overrides; by default scorer=norm, scorer=dilated, scorer=gla, rope=entries), with B = 1, H = 8,
D = 128, bf16 and pool 4, levels 3, topk 2048, tile budget 128:
- `layer`: lighthouse_attention forward + backward with RoPE as the model applies it (median
  of CUDA-event times over rotating fresh inputs): the tokens rotated before the layer, or
  with rope=entries the entries rotated inside it (LIGHTHOUSE.md s.14);
- `scores`: the scoring step alone (what the layer's selection computes its scores with).
Ratios are against the first variant (the paper's "norm"). A variant that cannot run (e.g.
"gla" without fla-core) is reported with its error and the run goes on.

    python benchmarks/scorers.py                       # writes benchmarks/results/scorers_<gpu>.json
    python benchmarks/scorers.py --variants scorer=norm scorer=dilated,dilation=8
    python benchmarks/scorers.py --smoke --out /tmp/scorers.json   # CPU, toy sizes: the script runs

A variant is comma-separated field=value pairs of LighthouseConfig (values parsed as the
field's type), so a new option is measured by adding its variant string.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from timing import call_ms  # noqa: E402

from lh_cp import LighthouseConfig, lighthouse_attention  # noqa: E402
from lh_cp.model.transformer import ModelConfig, apply_rope, rope_tables  # noqa: E402
from lh_cp.ops import kernels  # noqa: E402
from lh_cp.ops.select import selection_scores  # noqa: E402

DEFAULT_VARIANTS = ["scorer=norm", "scorer=dilated", "scorer=gla", "rope=entries"]
ROPE_THETA = ModelConfig.rope_theta  # the model's default


def parse_variant(text: str, base: LighthouseConfig) -> LighthouseConfig:
    """'scorer=dilated,dilation=8' -> base with those fields replaced (ValueError naming an
    unknown field or a bad value)."""
    fields = {f.name: f for f in dataclasses.fields(LighthouseConfig)}
    changes = {}
    for pair in filter(None, text.split(",")):
        name, _, value = pair.partition("=")
        if name not in fields:
            raise ValueError(
                f"variant {text!r}: {name!r} is not a LighthouseConfig field ({', '.join(fields)})"
            )
        kind = type(getattr(base, name))
        changes[name] = kind(value)
    return dataclasses.replace(base, **changes)


def time_ms(fn, sets: list[list[torch.Tensor]], warmup: int, repeats: int) -> float:
    """Median time of fn(*inputs) over rotating input sets (benchmarks/timing.py)."""
    times = []
    for i in range(warmup + repeats):
        inputs = sets[i % len(sets)]
        times.append(call_ms(lambda: fn(*inputs), inputs))  # noqa: B023 (called at once)
    return statistics.median(times[warmup:])


def layer_step(cfg: LighthouseConfig, grad_out: torch.Tensor, tables):
    """Forward + backward of the layer as the model runs it, RoPE included: the model rotates
    q and k before the layer under rope="tokens", the layer rotates its entries under
    rope="entries" (LIGHTHOUSE.md s.14); `tables` = (cos, sin) [N, D/2]."""
    if cfg.rope == "entries":

        def step(q, k, v):
            lighthouse_attention(q, k, v, cfg, rope=tables).backward(grad_out)

    else:

        def step(q, k, v):
            q, k = apply_rope(q, *tables), apply_rope(k, *tables)
            lighthouse_attention(q, k, v, cfg).backward(grad_out)

    return step


def scoring_step(cfg: LighthouseConfig):
    """The scores the layer's selection reads, computed as the layer computes them."""

    def step(q, k, v):
        if kernels.available(q, k, v):
            from lh_cp.ops.kernels.ops import kernel_scores

            return kernel_scores(q, k, cfg, v)
        return selection_scores(q.detach(), k.detach(), v.detach(), cfg)

    return step


def run(args) -> list[dict]:
    device = "cuda" if torch.cuda.is_available() and not args.smoke else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    base = LighthouseConfig(pool=4, levels=3, topk=args.topk, tile_budget=args.tile_budget)
    variants = [(text, parse_variant(text, base)) for text in args.variants]
    rows = []
    for n in args.lengths:
        shape = (1, n, args.heads, args.dim)
        sets = [
            [torch.randn(shape, device=device, dtype=dtype).requires_grad_() for _ in range(3)]
            for _ in range(args.input_sets)
        ]
        grad_out = torch.randn(shape, device=device, dtype=dtype)
        positions = torch.arange(n, device=device)
        tables = rope_tables(positions, args.dim, ROPE_THETA, dtype)  # [N, D/2] each
        reference = None
        for text, cfg in variants:
            row = {"n": n, "variant": text, "config": dataclasses.asdict(cfg)}
            try:
                row["layer_ms"] = time_ms(
                    layer_step(cfg, grad_out, tables), sets, args.warmup, args.repeats
                )
                row["scores_ms"] = time_ms(scoring_step(cfg), sets, args.warmup, args.repeats)
            except (ImportError, RuntimeError) as err:  # e.g. scorer=gla without fla-core
                row["error"] = f"{type(err).__name__}: {err}"
            if reference is None:
                reference = row
            for key in ("layer_ms", "scores_ms"):
                if key in row and key in reference:
                    row[key.replace("_ms", "_over_first")] = row[key] / reference[key]
            rows.append(row)
            print(table([row], header=len(rows) == 1), flush=True)
            if device == "cuda":
                torch.cuda.empty_cache()
    return rows


def table(rows: list[dict], header: bool = True) -> str:
    lines = []
    if header:
        lines.append(
            f"{'N':>8} {'variant':<28} | {'layer ms':>9} {'x first':>7} | {'scores ms':>9} {'x first':>7}"
            "  (layer: fwd+bwd)"
        )
    for r in rows:
        if "error" in r:
            lines.append(f"{r['n']:>8} {r['variant']:<28} | {r['error']}")
            continue
        lines.append(
            f"{r['n']:>8} {r['variant']:<28} | {r['layer_ms']:>9.2f} {r.get('layer_over_first', float('nan')):>7.3f} "
            f"| {r['scores_ms']:>9.3f} {r.get('scores_over_first', float('nan')):>7.3f}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--out", type=Path, help="JSON result file (default benchmarks/results/scorers_<gpu>.json)"
    )
    parser.add_argument("--smoke", action="store_true", help="CPU, toy sizes")
    parser.add_argument(
        "--variants", nargs="+", default=DEFAULT_VARIANTS, help="the first is the reference"
    )
    parser.add_argument("--lengths", type=int, nargs="+", default=[131072, 524288])
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--topk", type=int, default=2048)
    parser.add_argument("--tile-budget", type=int, default=128)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--input-sets", type=int, default=2)
    args = parser.parse_args(argv)
    if args.smoke:
        args.lengths, args.heads, args.dim = [1024], 2, 16
        args.topk, args.tile_budget, args.warmup, args.repeats, args.input_sets = 32, 4, 0, 1, 1
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() and not args.smoke else "cpu"
    out = (
        args.out
        or Path(__file__).parent
        / "results"
        / f"scorers_{re.sub(r'[^a-z0-9]+', '_', gpu.lower())}.json"
    )
    rows = run(args)
    result = {
        "device": gpu,
        "torch": torch.__version__,
        "command": " ".join(sys.argv),
        "shape": {
            "batch": 1,
            "heads": args.heads,
            "dim": args.dim,
            "dtype": "bf16" if gpu != "cpu" else "float32",
        },
        "rows": rows,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
