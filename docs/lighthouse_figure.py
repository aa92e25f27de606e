"""Draw docs/lighthouse.png: one head's Lighthouse selection on a toy sequence.

The entries are what `lh_cp.select` returns (nothing is drawn by hand): 32 tokens, two tiles
of 16, pool 2, levels 3, tile budget 2, so S = 32/4 + 2*2*4 = 24 entries. A few tokens get
larger query or key norms so that the refined spans are easy to follow. The top panel shows
the token norms the selection scores with, the middle one the pyramid with the chosen entries
(numbered in causal order), the bottom one the sequence causal SDPA runs on.

    .venv/bin/python docs/lighthouse_figure.py [--out docs/lighthouse.png]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from matplotlib.patches import Rectangle  # noqa: E402

from lh_cp import LighthouseConfig, select  # noqa: E402

N = 32
CFG = LighthouseConfig(pool=2, levels=3, topk=4, tile_budget=2)
HEAD_DIM = 8
LOUD_QUERIES = (13, 22)  # tokens whose query norm is raised
LOUD_KEYS = (5, 27)  # tokens whose key norm is raised
LEAF, REFINED, UNCHOSEN = "#4C78A8", "#F58518", "#FFFFFF"


def toy_inputs() -> tuple[torch.Tensor, torch.Tensor]:
    """q, k [1, N, 1, D] with a few loud tokens."""
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(1, N, 1, HEAD_DIM, generator=gen)
    k = torch.randn(1, N, 1, HEAD_DIM, generator=gen)
    q[:, list(LOUD_QUERIES)] *= 3.0
    k[:, list(LOUD_KEYS)] *= 3.0
    return q, k


def entry_label(start: int, end: int) -> str:
    return str(start) if end - start == 1 else f"{start}-{end - 1}"


def draw(out: Path) -> None:
    q, k = toy_inputs()
    sel = select(q, k, CFG)  # fields [1, 1, S], in causal order
    starts, ends = sel.start[0, 0].tolist(), sel.end[0, 0].tolist()
    levels, internal = sel.level[0, 0].tolist(), sel.internal[0, 0].tolist()
    tile = CFG.tile_size(N)
    chosen = {(s, lvl): i for i, (s, lvl) in enumerate(zip(starts, levels))}

    fig, (ax_norm, ax_pyr, ax_seq) = plt.subplots(
        3, 1, figsize=(10, 5.6), gridspec_kw={"height_ratios": [1.0, 2.2, 0.9]}
    )
    # Token norms: what the selection scores (a span scores the max over its tokens).
    positions = torch.arange(N)
    ax_norm.bar(positions + 0.3, q[0, :, 0].norm(dim=-1), width=0.38, color="#54A24B", label="|q|")
    ax_norm.bar(positions + 0.7, k[0, :, 0].norm(dim=-1), width=0.38, color="#B279A2", label="|k|")
    ax_norm.set_xlim(0, N)
    ax_norm.set_xticks([])
    ax_norm.set_ylabel("token\nnorm")
    ax_norm.legend(loc="upper left", ncol=2, fontsize=8, frameon=False)
    ax_norm.set_title(
        f"One head, N = {N} tokens, 2 tiles of T = {tile} (pool {CFG.pool}, levels {CFG.levels},"
        f" tile budget {CFG.tile_budget}): per tile and level, 1 span refined by query norm,"
        " 1 by key norm",
        fontsize=9,
    )

    # Pyramid: every entry outlined; the chosen ones filled and numbered in causal order.
    for level in range(1, CFG.levels + 1):
        span = CFG.span(level)
        for start in range(0, N, span):
            index = chosen.get((start, level))
            if index is None:
                face = UNCHOSEN
            else:
                face = REFINED if internal[index] else LEAF
            ax_pyr.add_patch(
                Rectangle(
                    (start + 0.08, level - 1 + 0.15),
                    span - 0.16,
                    0.7,
                    facecolor=face,
                    edgecolor="#999999",
                    linewidth=0.8,
                )
            )
            if index is not None:
                color = "white" if face == LEAF else "black"
                ax_pyr.text(
                    start + span / 2,
                    level - 0.5,
                    str(index + 1),
                    ha="center",
                    va="center",
                    fontsize=8,
                    color=color,
                )
    ax_pyr.axvline(tile, color="black", linestyle="--", linewidth=1)
    for t in range(N // tile):
        ax_pyr.text(
            t * tile + tile / 2,
            CFG.levels + 0.05,
            f"tile {t + 1}",
            ha="center",
            va="bottom",
            fontsize=9,
        )
    ax_pyr.set_xlim(0, N)
    ax_pyr.set_ylim(0, CFG.levels + 0.5)
    ax_pyr.set_yticks([lvl - 0.5 for lvl in range(1, CFG.levels + 1)])
    ax_pyr.set_yticklabels(
        [f"level {lvl}\n({CFG.span(lvl)} tok)" for lvl in range(1, CFG.levels + 1)], fontsize=8
    )
    ax_pyr.set_xticks(range(0, N + 1, 4))
    ax_pyr.set_xlabel("token position", fontsize=8)
    ax_pyr.tick_params(axis="x", labelsize=8)
    ax_pyr.legend(
        handles=[
            Rectangle((0, 0), 1, 1, facecolor=LEAF, edgecolor="#999999", label="chosen leaf"),
            Rectangle(
                (0, 0),
                1,
                1,
                facecolor=REFINED,
                edgecolor="#999999",
                label="refined span (kept too)",
            ),
            Rectangle((0, 0), 1, 1, facecolor=UNCHOSEN, edgecolor="#999999", label="not chosen"),
        ],
        loc="upper left",
        bbox_to_anchor=(1.0, 1.0),
        fontsize=8,
        frameon=False,
    )

    # The sequence SDPA sees: the S chosen entries (pooled q, k, v) in causal order.
    selected = len(starts)
    width = N / selected
    for i, (s, e) in enumerate(zip(starts, ends)):
        face = REFINED if internal[i] else LEAF
        ax_seq.add_patch(
            Rectangle(
                (i * width + 0.06, 0.1),
                width - 0.12,
                0.8,
                facecolor=face,
                edgecolor="#999999",
                linewidth=0.8,
            )
        )
        ax_seq.text(
            i * width + width / 2,
            0.5,
            f"{i + 1}\n{entry_label(s, e)}",
            ha="center",
            va="center",
            fontsize=7,
            color="white" if face == LEAF else "black",
        )
    ax_seq.set_xlim(0, N)
    ax_seq.set_ylim(0, 1)
    ax_seq.axis("off")
    fig.tight_layout(rect=(0, 0.05, 1, 1))
    fig.subplots_adjust(hspace=0.25)
    fig.text(
        0.5,
        0.02,
        f"Causal SDPA runs on these S = {selected} entries (order, tokens covered) instead of"
        f" {N} tokens; a refined span comes after its tokens; outputs go back to tokens",
        ha="center",
        fontsize=9,
    )
    fig.savefig(out, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).with_name("lighthouse.png"))
    draw(parser.parse_args().out)


if __name__ == "__main__":
    main()
