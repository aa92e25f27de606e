"""LighthouseConfig: the four numbers that define a Lighthouse layer, and their rules.

Every rule of LIGHTHOUSE.md s.2 is checked here, with a message that names the rule and the
numbers. Rules that involve the sequence length N are checked by `tile_size(N)`, which every
caller goes through before touching data. `for_pieces` is the one place that turns a config
for N tokens into the config of one piece of them (a head-tail CP chunk, a Ulysses shard).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

SELECTIONS = ("tile_topk", "causal")
SCORERS = ("norm", "dilated", "gla")
ROPES = ("tokens", "entries")


def _is_power_of_two(x: int) -> bool:
    return x >= 1 and (x & (x - 1)) == 0


@dataclass(frozen=True)
class LighthouseConfig:
    """Hyper-parameters of Lighthouse attention (LIGHTHOUSE.md s.2).

    pool: children per pyramid entry; a power of two >= 2.
    levels: pyramid depth L; level 1 is tokens, level l entries span pool**(l-1) tokens.
        levels=1 is exactly dense causal attention.
    topk: entries refined per level over the whole sequence; a multiple of tile_budget.
    tile_budget: entries refined per level per tile (b); even, half chosen by query score and
        half by key score. The tile size follows: T = N * tile_budget / topk.
    selection: which spans get refined. "tile_topk" is the paper's (LIGHTHOUSE.md s.4): the
        best of the whole tile, so an output can depend on later tokens of its tile (s.10).
        "causal" (s.11) decides left to right from earlier tokens only: no output depends on
        a later input. Both emit the same number of entries S.
    min_document_tokens: with packed documents (documents=, LIGHTHOUSE.md s.12), documents
        shorter than this run exact dense attention whatever their tiles; 0 leaves the rule of
        s.12 alone (a document compresses the whole tiles inside it, the rest is dense).
    scorer: what scores a token for the selection (LIGHTHOUSE.md s.13). "norm" (the paper's
        default, s.3): the L2 norms of its q and k. "dilated": the norms of a causal softmax
        attention's output over the strided sub-sequence of every `dilation`-th token;
        "gla": the same with a fixed-decay gated linear attention (on CUDA it needs the
        optional fla-core: pip install 'lh-cp[gla]').
    dilation: the stride of the "dilated" and "gla" scorers (unused by "norm"); N must be a
        multiple of it.
    rope: where RoPE rotates q and k. "tokens" (the paper's): the model rotates every token
        and the layer pools rotated vectors. "entries" (LIGHTHOUSE.md s.14): the layer gets q
        and k unrotated plus the rotation tables (rope=(cos, sin)) and rotates each gathered
        entry at the position of the last token it covers.
    """

    pool: int = 4
    levels: int = 3
    topk: int = 2048
    tile_budget: int = 128
    selection: str = "tile_topk"
    min_document_tokens: int = 0
    scorer: str = "norm"
    dilation: int = 4
    rope: str = "tokens"

    def __post_init__(self) -> None:
        for name in ("pool", "levels", "topk", "tile_budget", "min_document_tokens", "dilation"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise ValueError(f"LighthouseConfig.{name} must be an int, got {value!r}")
        if self.selection not in SELECTIONS:
            raise ValueError(
                f"LighthouseConfig.selection must be one of {SELECTIONS}, got selection={self.selection!r}"
            )
        if self.scorer not in SCORERS:
            raise ValueError(
                f"LighthouseConfig.scorer must be one of {SCORERS}, got scorer={self.scorer!r}"
            )
        if self.dilation < 1:
            raise ValueError(f"dilation must be a positive int, got dilation={self.dilation}")
        if self.rope not in ROPES:
            raise ValueError(
                f"LighthouseConfig.rope must be one of {ROPES}, got rope={self.rope!r}"
            )
        if self.rope == "entries" and self.scorer != "norm":
            raise ValueError(
                f"rope='entries' works with scorer='norm' only, got scorer={self.scorer!r}: the "
                f"'dilated' and 'gla' scorers attend between tokens, so their scores depend on "
                f"the tokens' rotation, which rope='entries' leaves to the entries "
                f"(LIGHTHOUSE.md s.14); use rope='tokens' or scorer='norm'"
            )
        if self.min_document_tokens < 0:
            raise ValueError(
                f"min_document_tokens must be >= 0, got min_document_tokens={self.min_document_tokens}"
            )
        if self.pool < 2 or not _is_power_of_two(self.pool):
            raise ValueError(f"pool must be a power of two >= 2, got pool={self.pool}")
        if self.levels < 1:
            raise ValueError(f"levels must be >= 1, got levels={self.levels}")
        if self.tile_budget < 2 or self.tile_budget % 2 != 0:
            raise ValueError(
                f"tile_budget must be even and >= 2 (half by query, half by key score), "
                f"got tile_budget={self.tile_budget}"
            )
        if self.topk < 1 or self.topk % self.tile_budget != 0:
            raise ValueError(
                f"topk must be a positive multiple of tile_budget: topk % tile_budget == 0 "
                f"fails for topk={self.topk}, tile_budget={self.tile_budget}"
            )

    @property
    def coarsest_span(self) -> int:
        """Tokens covered by one entry of the coarsest level: pool**(levels-1)."""
        return self.pool ** (self.levels - 1)

    @property
    def uses_thresholds(self) -> bool:
        """The causal selection with something to refine (levels > 1): its tiles decide with
        thresholds handed on from the tile before, across CP chunks too (s.11)."""
        return self.selection == "causal" and self.levels > 1

    @property
    def tiles(self) -> int:
        """Number of selection tiles in any valid sequence: N / T = topk / tile_budget."""
        return self.topk // self.tile_budget

    def span(self, level: int) -> int:
        """Tokens covered by one entry of `level` (1-based)."""
        return self.pool ** (level - 1)

    def tile_size(self, n: int) -> int:
        """Tile size T for a sequence of n tokens; raises ValueError if n is not valid."""
        if n < 1:
            raise ValueError(f"sequence length must be >= 1, got N={n}")
        if (n * self.tile_budget) % self.topk != 0:
            raise ValueError(
                f"N % T == 0 fails: the tile size T = N * tile_budget / topk = "
                f"{n} * {self.tile_budget} / {self.topk} is not a whole number; "
                f"N must be a multiple of topk / gcd(topk, tile_budget)"
            )
        if self.scorer != "norm" and n % self.dilation != 0:
            raise ValueError(
                f"N % dilation == 0 fails: scorer={self.scorer!r} views the sequence as {self.dilation} "
                f"strided sub-sequences, so N={n} must be a multiple of dilation={self.dilation}"
            )
        tile = n * self.tile_budget // self.topk
        if tile % self.coarsest_span != 0:
            raise ValueError(
                f"T % pool**(levels-1) == 0 fails: tile size T={tile} (N={n}) is not a multiple "
                f"of pool**(levels-1) = {self.pool}**{self.levels - 1} = {self.coarsest_span}"
            )
        if tile // self.coarsest_span < self.tile_budget:
            raise ValueError(
                f"T / pool**(levels-1) >= tile_budget fails: the coarsest level of a tile has "
                f"{tile} / {self.coarsest_span} = {tile // self.coarsest_span} entries, fewer "
                f"than tile_budget={self.tile_budget} (N={n}; use a longer sequence, a smaller "
                f"topk, or fewer levels)"
            )
        return tile

    def threshold_rank(self, level: int, tile: int) -> int:
        """Causal selection (LIGHTHOUSE.md s.11): a level's threshold is the k-th largest score
        of its eligible spans in the previous tile, k = b/2 at the top level (where every span
        is a candidate, as in the paper) and T / (2 c_{l+1}) below it (the same share of the
        eligible spans as b/2 is of the (pool-1) * b candidates a tile refines from)."""
        if level == self.levels:
            return self.tile_budget // 2
        return tile // (2 * self.span(level + 1))

    def entries_per_tile(self, n: int) -> int:
        """Entries one tile emits: T / c_L + (L-1) * pool * tile_budget."""
        tile = self.tile_size(n)
        return tile // self.coarsest_span + (self.levels - 1) * self.pool * self.tile_budget

    def selected_length(self, n: int) -> int:
        """S = N / c_L + (L-1) * pool * topk: fixed by the configuration and N alone."""
        self.tile_size(n)
        return n // self.coarsest_span + (self.levels - 1) * self.pool * self.topk

    def for_pieces(self, n: int, pieces: int, piece: str = "piece") -> LighthouseConfig:
        """The config that selects inside each of `pieces` equal consecutive pieces of an
        n-token sequence exactly as this one does on the whole (LIGHTHOUSE.md s.8).

        Tiles never straddle pieces, so each piece must hold whole tiles of T = n * tile_budget
        / topk tokens; keeping T means scaling topk to the piece's share, topk / pieces. Since
        piece / T = topk / (pieces * tile_budget), that holds exactly when topk is a multiple
        of pieces * tile_budget, whatever n. `piece` names the pieces in the error, e.g.
        "each head-tail chunk". Raises ValueError naming the rule and the numbers.
        """
        tile = self.tile_size(n)
        if self.scorer != "norm" and pieces > 1:
            raise ValueError(
                f"scorer={self.scorer!r} cannot select inside {piece}: it scores a token from the whole "
                f"prefix of its strided sub-sequence, which a piece of the sequence does not hold; use "
                f"scorer='norm', or context parallelism with exchange 'ulysses' (whole sequences per rank)"
            )
        if pieces < 1 or n % pieces != 0 or (n // pieces) % tile != 0:
            raise ValueError(
                f"{piece} of {n} / {pieces} = {n / pieces:g} tokens must be a multiple of the tile size T={tile} "
                f"(T = N * tile_budget / topk = {n} * {self.tile_budget} / {self.topk}; tiles never straddle "
                f"pieces): since piece / T = topk / (pieces * tile_budget), topk={self.topk} must be a multiple "
                f"of {pieces} * tile_budget = {pieces * self.tile_budget}; use a larger topk or fewer pieces"
            )
        return replace(self, topk=self.topk // pieces)
