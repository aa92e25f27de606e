"""Plot time versus N (log-log) from a benchmarks/attention.py JSON: dense SDPA, Lighthouse, floor.

python benchmarks/plot_attention.py benchmarks/results/attention_h100.json benchmarks/results/attention_h100.png
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 2:
        print(__doc__, file=sys.stderr)
        return 2
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = sorted(json.loads(Path(argv[0]).read_text()), key=lambda r: r["N"])
    # One configuration per N on the plot: the first row given for each N.
    rows = [r for i, r in enumerate(rows) if all(r["N"] != p["N"] for p in rows[:i])]
    ns = [r["N"] for r in rows]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    ax.plot(ns, [r["sdpa_ms"] for r in rows], "o-", label="dense causal SDPA")
    ax.plot(
        ns,
        [r["lighthouse_ms"] for r in rows],
        "s-",
        label="Lighthouse (Triton kernels + cuDNN SDPA)",
    )
    ax.plot(
        ns,
        [r["floor_ms"] for r in rows],
        "k--",
        lw=1,
        label="floor: SDPA on S entries + bytes / 3 TB/s",
    )
    for r in rows:
        if r.get("sdpa_repeats", 2) == 1:
            ax.annotate(
                "one run",
                (r["N"], r["sdpa_ms"]),
                textcoords="offset points",
                xytext=(-40, 6),
                fontsize=8,
            )
        ax.annotate(
            f"{r['lighthouse_ms']:.1f}",
            (r["N"], r["lighthouse_ms"]),
            textcoords="offset points",
            xytext=(4, -12),
            fontsize=8,
        )
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xticks(
        ns,
        [
            (f"{n // 1024}K" if n < 2**20 else f"{n // 2**20}M") + f"\nL={r['config']['levels']}"
            for n, r in zip(ns, rows)
        ],
    )
    ax.set_xlabel("sequence length N (tokens)")
    ax.set_ylabel("forward + backward, ms (median)")
    cfg = rows[0]["config"]
    ax.set_title(
        f"{rows[0]['device']}: B=1 H={cfg['heads']} D={cfg['dim']} {cfg['dtype']}, "
        f"pool={cfg['pool']} topk={cfg['topk']}",
        fontsize=9,
    )
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(argv[1], dpi=120)
    return 0


if __name__ == "__main__":
    sys.exit(main())
