"""Training data: documents -> one token stream -> packed sequences -> per-rank batches.

Documents are tokenized and concatenated, each followed by the end-of-document token, into
one stream per split. The stream is cut into windows of seq_len + 1 tokens (inputs and
next-token targets), visited in a seeded order that is reshuffled every epoch. A step's global
batch is the next dp_size * batch_size windows; data-parallel rank r takes its own slice. The
only state is the number of windows consumed, saved in every checkpoint, so a resumed run
reads exactly what the uninterrupted run would have read. Context-parallel ranks of one
replica receive the same batch; the trainer cuts each its head-tail shard.

Document masking (data.document_masking): each batch also carries its documents, the
cumulative lengths of the documents in the batch's flattened windows (lh_cp/ops/documents.py),
read off the end-of-document tokens: a document ends with (and includes) its end-of-document
token, and every window starts a document (the parts of a document cut by a window edge are
documents of their own in the windows that hold them). The target of an end-of-document
token, the next document's first token, is ignored (IGNORE_INDEX): attention cannot see it
from inside the document, so the loss would only teach the marginal of first tokens. Under
context parallelism the tensor stays global: every rank of a replica gets the same one.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

from lh_cp.data.corpus import (
    file_documents,
    hf_documents,
    python_corpus_fingerprint,
    python_documents,
    stdlib_documents,
)
from lh_cp.data.tokenizer import ByteTokenizer, HFTokenizer, load_tokenizer
from lh_cp.model.loss import IGNORE_INDEX
from lh_cp.section import Section

SOURCES = ("stdlib", "python", "files", "hf")
PATH_SOURCES = ("files", "hf")  # the sources that read data.path
POSITIONS = ("document", "window")


@dataclass
class DataConfig(Section):
    """Where tokens come from and how they are batched (recipe section [data]).

    source: 'stdlib' = the running interpreter's standard-library .py sources (no download,
        exists wherever Python does); 'python' = the .py sources of every installed
        distribution and of the standard library, each distinct file once, split by whole
        distribution (or standard-library module) so near-copies inside a package cannot
        leak across the split (lh_cp/data/corpus.py; `python -m lh_cp.data.corpus` prints its size here);
        'files' = local .txt files (one document each) or .jsonl
        files (one document per line), read by lh-cp itself; 'hf' = Hugging Face `datasets`
        (package required) over local files or a save_to_disk folder.
    path: file or folder for 'files' and 'hf'; must exist (checked when training starts).
    format: 'text' or 'jsonl' for 'files'; 'text', 'jsonl' (.jsonl, .json, also gzipped
        as C4 ships), 'parquet' or 'saved' (a save_to_disk folder) for 'hf'. Ignored for
        'stdlib' and 'python'. Note that the `datasets` 'text' builder makes every line a
        record, whereas 'files' + 'text' keeps a file whole.
    text_field: the field holding a document's text in jsonl, parquet and saved datasets.
    tokenizer: 'bytes' (256 bytes + end-of-document + pad = 258 tokens) or a local path to a
        Hugging Face tokenizer.json (or its folder; package 'tokenizers' required).
    eod_token: end-of-document token of a Hugging Face tokenizer, e.g. '<|end_of_text|>'.
    pad_token: padding token of a Hugging Face tokenizer; empty = reuse eod_token.
    seq_len: tokens per training sequence (the whole context, before context-parallel sharding).
    batch_size: sequences per data-parallel replica per step (CP ranks of a replica share them).
    validation_fraction: share of documents held out for validation, chosen by a hash of each
        document's name (file path relative to data.path, or record index), so the split never
        depends on order or on where the dataset lies; for 'python', the share of bytes held out
        in whole units.
    max_epochs: the most passes over the train split a run may make; a run whose steps need
        more sequences than max_epochs * (train windows) is refused before it starts, naming
        the numbers (a repeated pass is never silent). 0 = no limit.
    seed: seed of the sequence order; each epoch is a new permutation derived from it.
    cache_dir: if set, each split's token stream is saved there once as a .npy file (keyed by
        a hash of everything that defines it) and later memory-mapped, shared by all ranks of
        a node through the page cache; empty = tokenize in memory at every start.
    document_masking: each document of a packed window attends only to itself (dense
        attention with documents=, docs/document_masking.md); documents end at the
        end-of-document token, whose target (the next document's first token) is ignored.
        Validation, the leak probe and the passkey evaluation read their batches the same way.
        Lighthouse layers do not take documents yet: a recipe with document masking must train
        dense stages only (checked by lh-cp plan).
    positions: RoPE positions with document masking: 'document' restarts at 0 at every
        document start, 'window' counts from the window start. Attention scores depend only
        on position differences inside a document, so both give the same model up to
        rounding; 'document' (the default) makes a document's computation the same wherever
        it lies in the window, and matches feeding the exported model one document at a time.
        Without document masking the window is one document, so both mean window positions.
    """

    source: str = "stdlib"
    path: str = ""
    format: str = "jsonl"
    text_field: str = "text"
    tokenizer: str = "bytes"
    eod_token: str = ""
    pad_token: str = ""
    seq_len: int = 1024
    batch_size: int = 1
    validation_fraction: float = 0.02
    max_epochs: float = 1.0
    seed: int = 0
    cache_dir: str = ""
    document_masking: bool = False
    positions: str = "document"

    def problems(self) -> list[str]:
        errors = []
        if self.positions not in POSITIONS:
            errors.append(f"data.positions must be one of {POSITIONS}, got {self.positions!r}")
        if self.source not in SOURCES:
            errors.append(f"data.source must be one of {SOURCES}, got {self.source!r}")
        if self.source in PATH_SOURCES and not self.path:
            errors.append(
                f"data.path must name a local file or folder for data.source={self.source!r}"
            )
        if self.seq_len < 2:
            errors.append(f"data.seq_len must be >= 2, got {self.seq_len}")
        if self.batch_size < 1:
            errors.append(f"data.batch_size must be >= 1, got {self.batch_size}")
        if not 0.0 < self.validation_fraction < 1.0:
            errors.append(
                f"data.validation_fraction must lie strictly between 0 and 1, got {self.validation_fraction}"
            )
        if self.max_epochs < 0:
            errors.append(f"data.max_epochs must be >= 0 (0 = no limit), got {self.max_epochs}")
        return errors

    def tokenizer_vocab_size(self) -> int | None:
        """Vocabulary of the byte tokenizer without loading anything; None for a file tokenizer."""
        return ByteTokenizer.vocab_size if self.tokenizer == "bytes" else None


def make_tokenizer(cfg: DataConfig) -> ByteTokenizer | HFTokenizer:
    return load_tokenizer(cfg.tokenizer, cfg.eod_token, cfg.pad_token)


def _documents(cfg: DataConfig, split: str):
    if cfg.source == "stdlib":
        return stdlib_documents(split, cfg.validation_fraction)
    if cfg.source == "python":
        return python_documents(split, cfg.validation_fraction)
    if cfg.source == "files":
        return file_documents(cfg.path, cfg.format, cfg.text_field, split, cfg.validation_fraction)
    return hf_documents(cfg.path, cfg.format, cfg.text_field, split, cfg.validation_fraction)


def _tokenize_split(cfg: DataConfig, tokenizer, split: str) -> np.ndarray:
    dtype = np.uint16 if tokenizer.vocab_size <= 2**16 else np.int32
    eod = np.array([tokenizer.eod_id], dtype=np.int32)
    pieces = []
    for doc in _documents(cfg, split):
        pieces.append(tokenizer.encode_document(doc))
        pieces.append(eod)
    if not pieces:
        raise ValueError(f"data split {split!r} of data.source={cfg.source!r} holds no documents")
    return np.concatenate(pieces).astype(dtype)


def _stream_fingerprint(cfg: DataConfig, split: str) -> str:
    """Hash of everything that defines a split's token stream (not seq_len or batching)."""
    keys = (
        "source",
        "path",
        "format",
        "text_field",
        "tokenizer",
        "eod_token",
        "validation_fraction",
    )
    spec = {k: v for k, v in asdict(cfg).items() if k in keys}
    spec["split"] = split
    spec["document_names"] = "relative to data.path"  # older caches named files by absolute path
    if cfg.source == "stdlib":
        spec["python"] = sys.version  # the standard library is a function of the interpreter
    if cfg.source == "python":
        spec["python_files"] = python_corpus_fingerprint()
    for key in ("path", "tokenizer"):
        if spec[key] and Path(spec[key]).exists():
            stat = Path(spec[key]).resolve().stat()
            spec[key] = [str(Path(spec[key]).resolve()), stat.st_mtime_ns, stat.st_size]
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]


def token_stream(cfg: DataConfig, tokenizer, split: str) -> np.ndarray:
    """All documents of `split`, tokenized, each followed by end-of-document: 1-D array."""
    if not cfg.cache_dir:
        return _tokenize_split(cfg, tokenizer, split)
    cache = Path(cfg.cache_dir) / f"{split}-{_stream_fingerprint(cfg, split)}.npy"
    if not cache.is_file():
        cache.parent.mkdir(parents=True, exist_ok=True)
        stream = _tokenize_split(cfg, tokenizer, split)
        # Several ranks may build the same cache at once: each writes its own file and the
        # atomic rename leaves one complete copy.
        partial = cache.with_name(f"{cache.stem}.{os.getpid()}.partial.npy")
        np.save(partial, stream)
        os.replace(partial, cache)
    return np.load(cache, mmap_mode="r")


class Batch(NamedTuple):
    """One rank's batch: inputs and targets int64 [B, N]; documents None (no masking) or the
    int32 cumulative document lengths over the B * N tokens (lh_cp/ops/documents.py)."""

    inputs: torch.Tensor
    targets: torch.Tensor
    documents: torch.Tensor | None = None


def document_batch(inputs: torch.Tensor, targets: torch.Tensor, eod_id: int | None) -> Batch:
    """The batch of windows inputs, targets [B, N] with document masking (eod_id: the
    end-of-document token) or without it (eod_id None: documents None, targets unchanged).

    A document starts at every window start and after every end-of-document input; the
    targets of end-of-document inputs become IGNORE_INDEX."""
    if eod_id is None:
        return Batch(inputs, targets, None)
    batch, n = inputs.shape
    ends = inputs == eod_id  # [B, N]
    starts = torch.zeros_like(ends)
    starts[:, 0] = True
    starts[:, 1:] = ends[:, :-1]
    first_tokens = torch.nonzero(starts.flatten()).flatten()
    documents = torch.cat([first_tokens, first_tokens.new_tensor([batch * n])]).to(torch.int32)
    return Batch(inputs, targets.masked_fill(ends, IGNORE_INDEX), documents)


class BatchLoader:
    """Batches of one data-parallel rank over windows of seq_len + 1 tokens of `stream`.

    shuffle=True visits the windows in a permutation seeded by (seed, epoch); shuffle=False
    in stream order (validation). `consumed` counts windows taken by all ranks together.
    eod_id: the end-of-document token with document masking (document_batch), else None.
    """

    def __init__(
        self,
        stream: np.ndarray,
        seq_len: int,
        batch_size: int,
        dp_rank: int,
        dp_size: int,
        seed: int,
        shuffle: bool,
        name: str = "train",
        eod_id: int | None = None,
    ) -> None:
        self.stream, self.seq_len, self.batch_size = stream, seq_len, batch_size
        self.eod_id = eod_id
        self.dp_rank, self.dp_size, self.seed, self.shuffle = dp_rank, dp_size, seed, shuffle
        self.windows = (len(stream) - 1) // seq_len
        if self.windows < batch_size * dp_size:
            raise ValueError(
                f"the {name} split has {len(stream)} tokens = {self.windows} sequences of "
                f"data.seq_len={seq_len}, fewer than one global batch of "
                f"data.batch_size * dp = {batch_size} * {dp_size}; use more data or a smaller batch"
            )
        self.consumed = 0
        self._order_epoch, self._order = -1, None

    def _window(self, index: int) -> int:
        epoch, within = divmod(index, self.windows)
        if not self.shuffle:
            return within
        if epoch != self._order_epoch:
            gen = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._order, self._order_epoch = torch.randperm(self.windows, generator=gen), epoch
        return int(self._order[within])

    def next_batch(self) -> Batch:
        """(inputs, targets, documents) of this rank's slice: int64 [batch_size, seq_len] each,
        documents as document_batch makes them."""
        first = self.consumed + self.dp_rank * self.batch_size
        rows = []
        for index in range(first, first + self.batch_size):
            begin = self._window(index) * self.seq_len
            rows.append(
                torch.from_numpy(self.stream[begin : begin + self.seq_len + 1].astype(np.int64))
            )
        self.consumed += self.batch_size * self.dp_size
        window = torch.stack(rows)  # [B, seq_len + 1]
        return document_batch(window[:, :-1], window[:, 1:], self.eod_id)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"consumed": torch.tensor(self.consumed, dtype=torch.int64)}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.consumed = int(state["consumed"])
