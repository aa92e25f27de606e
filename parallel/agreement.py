"""Ranks agree before they communicate: on the run (recipe, world layout, versions) at start,
and on every context-parallel attention call before its first collective. A disagreement
otherwise ends in a collective that never matches (a hang, or a backend abort that names
nothing); here every rank raises the same named error instead.

Per call, every rank always compares (there is no cache of calls seen before: a rank's cache
is keyed by its own values, so after one good call a rank with a new shape would compare while
its peers skip, and the comparison itself would abort). The comparison is one all-gather of
CALL_WORDS int64 words per rank, whatever the call:
- a 64-bit hash of the call's description (every field of the LighthouseConfig, taken from
  dataclasses.fields; each tensor's shape and dtype; the exchange);
- a mask of the tensors that hold NaN or inf (Lighthouse calls: a rank whose input is not
  finite would otherwise raise alone while its peers wait in the exchange);
- two checksum words of tensors whose contents must match (the documents= boundaries), and
  a bit per content that failed its own local check (documents that break the contract).
Only when the words differ does a second collective (all_gather_object of the descriptions)
find the names and values for the message, on every rank alike. A rank whose contents failed
their check raises that error (naming the rule); its peers raise the same kind naming that
rank. Cost: benchmarks/agreement_overhead.py, docs/faults.md.

These few integers and one small object per run are control messages, not the traffic that
transport.py meters.
"""

from __future__ import annotations

import dataclasses
import hashlib

import torch
import torch.distributed as dist

from lh_cp.ops.documents import DocumentsError, check_documents
from lh_cp.ops.entries import NonFiniteInput
from lh_cp.parallel.transport import all_gather_flat

CALL_WORDS = 4  # description hash, non-finite and invalid masks, two content checksum words
_INVALID_BIT = 32  # bit 32 + i of the mask word: the i-th checked content failed its check
_SHOWN = 4  # differences named in one message


class RanksDisagree(ValueError):
    """The ranks of a group passed different inputs to a call they must make together."""


def first_difference(mine: dict, others: list[dict]) -> tuple[int, str, object, object] | None:
    """(rank, key, its value, rank 0's value) of the first key whose value differs from rank
    0's (rank order, then rank 0's key order, then keys only the other rank has); None if all agree."""
    for rank, theirs in enumerate(others):
        for key in list(mine) + [k for k in theirs if k not in mine]:
            if mine.get(key) != theirs.get(key):
                return rank, key, theirs.get(key, "<missing>"), mine.get(key, "<missing>")
    return None


def agree_on_run(fingerprint: dict, group: dist.ProcessGroup) -> None:
    """Collective: raise ValueError on every rank unless all ranks of `group` hold the same
    `fingerprint` (flat key -> value), naming the first differing key and both values."""
    gathered: list[dict] = [{} for _ in range(dist.get_world_size(group))]
    dist.all_gather_object(gathered, fingerprint, group=group)
    found = first_difference(gathered[0], gathered)
    if found is not None:
        rank, key, theirs, ours = found
        count = sum(
            1
            for other in gathered
            for k in set(other) | set(gathered[0])
            if other.get(k) != gathered[0].get(k)
        )
        raise ValueError(
            f"the ranks disagree on the run before it starts: rank {rank} has {key}={theirs!r}, rank 0 has "
            f"{key}={ours!r} ({count} differing key(s) in all); launch every rank with the same recipe file, "
            f"--set options and software"
        )


class CallFingerprint:
    """What one rank passes to a call that every rank of a group makes together, reduced to
    CALL_WORDS int64 words (`words`). Fold in a value with `add`, a dataclass with `add_fields`
    (every field, so a new field is compared without a change here), a tensor's shape and dtype
    with `add_tensor`, a tensor whose contents must match too with `add_contents`, and a tensor
    that must be finite with `require_finite`."""

    def __init__(self, device: torch.device, what: str) -> None:
        self.device, self.what = device, what  # `what` names the call in messages
        self.described: dict[str, object] = {}
        self._contents: list[tuple[str, torch.Tensor]] = []
        self._finite: list[tuple[str, torch.Tensor]] = []
        # (name, error class, this rank's error or None) of contents checked locally
        self._checked: list[tuple[str, type[Exception], Exception | None]] = []

    def add(self, name: str, value: object) -> None:
        self.described[name] = value

    def add_fields(self, name: str, value) -> None:
        if value is None:
            self.add(name, None)
            return
        for field in dataclasses.fields(value):
            self.add(f"{name}.{field.name}", getattr(value, field.name))

    def add_tensor(self, name: str, t: torch.Tensor | None) -> None:
        """Its shape and dtype; anything else (None, a list by mistake) by its type, so that
        ranks passing different kinds disagree here rather than fail alone later."""
        if not isinstance(t, torch.Tensor):
            kind = None if t is None else type(t).__name__
            self.add(f"{name}.shape", kind)
            self.add(f"{name}.dtype", kind)
        else:
            self.add(f"{name}.shape", tuple(t.shape))
            self.add(f"{name}.dtype", str(t.dtype))

    def add_contents(self, name: str, t: torch.Tensor | None) -> None:
        self.add_tensor(name, t)
        if isinstance(t, torch.Tensor):
            self._contents.append((name, t))

    def require_finite(self, name: str, t: torch.Tensor) -> None:
        self._finite.append((name, t))

    def check(self, name: str, validate, error: type[Exception]) -> None:
        """Run `validate()` here; an `error` it raises is reported to every rank (bit
        _INVALID_BIT + i) instead of raising on this rank alone, before its peers' collective.
        Every rank must make the same checks, in the same order."""
        try:
            validate()
            self._checked.append((name, error, None))
        except error as err:
            self._checked.append((name, error, err))

    def words(self) -> torch.Tensor:
        """int64 [CALL_WORDS] on self.device: description hash, mask of the non-finite tensors
        (bit i: the i-th require_finite), two checksum words of the contents. No host sync."""
        digest = hashlib.blake2b(repr(self.described).encode(), digest_size=8).digest()
        head = torch.tensor([int.from_bytes(digest, "little", signed=True)], device=self.device)
        mask = torch.zeros((), dtype=torch.int64, device=self.device)
        for bit, (_, t) in enumerate(self._finite):
            if t.numel():  # aminmax refuses empty tensors; an empty tensor is finite
                low, high = torch.aminmax(t)  # NaN propagates; inf shows as an extreme
                finite = torch.isfinite(low) & torch.isfinite(high)
                mask = mask + (~finite).to(torch.int64) * (1 << bit)
        for index, (_, _, err) in enumerate(self._checked):
            if err is not None:
                mask = mask + (1 << (_INVALID_BIT + index))
        sums = torch.zeros(2, dtype=torch.int64, device=self.device)
        for index, (_, t) in enumerate(self._contents):
            flat = t.reshape(-1).to(device=self.device, dtype=torch.int64)
            weight = torch.arange(1, flat.numel() + 1, device=self.device)
            # Two position-weighted sums (int64, wrapping): equal contents give equal words;
            # a difference between ranks is an accident, not an adversary, so a checksum will do.
            sums = sums + (index + 1) * torch.stack(
                [(flat * (2 * weight + 1)).sum(), (flat * flat * weight).sum()]
            )
        return torch.cat([head, mask.view(1), sums])

    def contents(self) -> dict[str, list]:
        """The contents folded in, as lists (for the message when they differ)."""
        return {f"{name} (contents)": t.tolist() for name, t in self._contents}


def _shown(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 120 else text[:117] + "..."


def attention_call(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cfg,
    exchange: str,
    documents: torch.Tensor | None = None,
    world: int = 1,
) -> CallFingerprint:
    """The fingerprint of a context-parallel attention call: every field of `cfg` (a
    LighthouseConfig, or None for dense attention), the exchange, the shapes and dtype of q, k,
    v, the contents of `documents` (checked against the whole batch of `world` shards first,
    lh_cp.ops.documents.check_documents); for Lighthouse, q, k and v must be finite (its
    selection refuses NaN and inf; dense attention lets them through to the loss, on every rank
    alike)."""
    what = "Lighthouse attention" if cfg is not None else "dense causal attention"
    call = CallFingerprint(q.device, what)
    call.add("exchange", exchange)
    call.add_fields("cfg", cfg)
    for name, t in (("q", q), ("k", k), ("v", v)):
        call.add_tensor(name, t)
        if cfg is not None:
            call.require_finite(name, t)
    call.add_contents("documents", documents)
    batch, n_global = q.shape[0], q.shape[1] * world
    # Checked on every rank alike (None passes), so every rank folds in the same checks.
    call.check(
        "documents",
        lambda: documents is None or check_documents(documents, batch, n_global, q.device),
        DocumentsError,
    )
    return call


def agree_on_call(call: CallFingerprint, group: dist.ProcessGroup) -> None:
    """Collective over `group`, every rank every call: one all-gather of the CALL_WORDS words.
    Raises RanksDisagree on every rank if any description or contents differ (naming the
    differences), else NonFiniteInput on every rank if any rank's required-finite tensor holds
    NaN or inf (naming the ranks and tensors)."""
    what = call.what
    world = dist.get_world_size(group)
    mine = call.words()
    gathered = torch.empty(world * CALL_WORDS, dtype=torch.int64, device=mine.device)
    all_gather_flat(gathered, mine, group=group)  # flat: gloo wants 1-D here
    rows = gathered.view(world, CALL_WORDS).tolist()  # the one host sync
    for index, (name, error, mine_failed) in enumerate(call._checked):
        failed = [rank for rank, row in enumerate(rows) if row[1] >> (_INVALID_BIT + index) & 1]
        if mine_failed is not None:
            raise mine_failed
        if failed:
            raise error(
                f"rank(s) {failed} of the context-parallel group passed invalid {name} (their "
                f"error names the rule); every rank must pass the same, valid {name}"
            )
    if any(row[0] != rows[0][0] or row[2:] != rows[0][2:] for row in rows):
        _raise_difference(call, group)
    bad = [
        f"{name} on rank {rank}"
        for rank, row in enumerate(rows)
        for bit, (name, _) in enumerate(call._finite)
        if row[1] >> bit & 1
    ]
    if bad:
        raise NonFiniteInput(
            f"{what} needs finite inputs: NaN or inf in {', '.join(bad)} of the {world} ranks of "
            f"the context-parallel group (every rank stops here, before any exchange)"
        )


def _raise_difference(call: CallFingerprint, group: dist.ProcessGroup) -> None:
    """Second collective of a disagreeing call (every rank takes it: every rank saw the same
    gathered words): gather the descriptions and raise the same RanksDisagree everywhere."""
    mine = {**call.described, **call.contents()}
    gathered: list[dict] = [{} for _ in range(dist.get_world_size(group))]
    dist.all_gather_object(gathered, mine, group=group)
    differing = [
        f"{key}: rank {rank} {_shown(theirs.get(key, '<missing>'))}, rank 0 "
        f"{_shown(gathered[0].get(key, '<missing>'))}"
        for rank, theirs in enumerate(gathered)
        for key in list(gathered[0]) + [k for k in theirs if k not in gathered[0]]
        if theirs.get(key) != gathered[0].get(key)
    ]
    more = f"; and {len(differing) - _SHOWN} more" if len(differing) > _SHOWN else ""
    raise RanksDisagree(
        f"the ranks of the context-parallel group call {call.what} with different inputs "
        f"({'; '.join(differing[:_SHOWN])}{more}); every rank must pass its shard of the same "
        f"sequence with the same configuration"
    )
