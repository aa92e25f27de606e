"""Document sources: the embedded standard-library corpus, the larger 'python' corpus (every
installed distribution's .py sources), local text/jsonl files, and Hugging Face `datasets`
from local files. Each yields documents in a deterministic order and assigns each to the train
or validation split by a stable rule on its name, so the split does not depend on how many
documents are read or in which process.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.metadata
import io
import json
import sys
import sysconfig
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

SPLITS = ("train", "validation")
FILE_FORMATS = ("text", "jsonl")
HF_FORMATS = ("text", "jsonl", "parquet", "saved")
INVALID_UTF8 = ("error", "replace")  # data.on_invalid_utf8


class DataError(ValueError):
    """A data file that cannot be read as its format says, named with the file and the line,
    record or byte offset."""


def decode_utf8(
    data: bytes, file: str, on_invalid: str, first_byte: int = 0, first_line: int = 1
) -> str:
    """`data` as text. Invalid UTF-8 raises DataError naming the file, the line and the byte
    offset (`data` starts at byte `first_byte`, line `first_line` of its file) when
    `on_invalid` is 'error'; 'replace' puts U+FFFD in place of each bad sequence."""
    if on_invalid not in INVALID_UTF8:
        raise ValueError(f"data.on_invalid_utf8 must be one of {INVALID_UTF8}, got {on_invalid!r}")
    try:
        return data.decode("utf-8", errors="strict" if on_invalid == "error" else "replace")
    except UnicodeDecodeError as err:
        line = first_line + data.count(b"\n", 0, err.start)
        raise DataError(
            f"{file}:{line}: invalid UTF-8 at byte offset {first_byte + err.start} "
            f"({data[err.start : err.start + 4]!r}: {err.reason}); fix the file, or set "
            f"data.on_invalid_utf8='replace' to read each bad sequence as U+FFFD"
        ) from None


def in_split(name: str, split: str, validation_fraction: float) -> bool:
    """Whether the document called `name` belongs to `split` (crc32 of the name, per mille)."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    is_validation = zlib.crc32(name.encode("utf-8")) % 1000 < round(validation_fraction * 1000)
    return is_validation == (split == "validation")


def stdlib_root() -> Path:
    """The running interpreter's standard-library folder."""
    return Path(sysconfig.get_paths()["stdlib"])


@functools.lru_cache(maxsize=1)
def stdlib_files() -> tuple[str, ...]:
    """Sorted relative paths of the standard library's .py files (listed once per process).

    Installed third-party packages (site-packages, dist-packages) are excluded: they differ
    between machines, the standard library of one Python version does not.
    """
    root = stdlib_root()
    if not root.is_dir():
        raise FileNotFoundError(
            f"data.source='stdlib': the standard-library folder {str(root)!r} does not exist"
        )
    return tuple(
        sorted(
            p.relative_to(root).as_posix()
            for p in root.rglob("*.py")
            if not {"site-packages", "dist-packages"} & set(p.relative_to(root).parts)
        )
    )


def stdlib_documents(
    split: str, validation_fraction: float, on_invalid_utf8: str | None = None
) -> Iterator[bytes | str]:
    """The interpreter's own standard-library .py sources, in sorted path order: bytes, or
    text decoded under `on_invalid_utf8` (decode_utf8) when it is given."""
    root = stdlib_root()
    for name in stdlib_files():
        if in_split(name, split, validation_fraction):
            yield _as_document(root / name, on_invalid_utf8)


def _as_document(file: Path, on_invalid_utf8: str | None) -> bytes | str:
    data = file.read_bytes()
    return data if on_invalid_utf8 is None else decode_utf8(data, str(file), on_invalid_utf8)


@dataclass(frozen=True)
class SourceUnit:
    """Files that go to one side of the split together: one installed distribution, or one
    top-level module or package of the standard library."""

    name: str
    files: tuple[Path, ...]


def _stdlib_units() -> list[SourceUnit]:
    root = stdlib_root()
    groups: dict[str, list[Path]] = {}
    for name in stdlib_files():
        top = name.split("/", 1)[0].removesuffix(".py")
        groups.setdefault(f"stdlib/{top}", []).append(root / name)
    return [SourceUnit(name, tuple(files)) for name, files in groups.items()]


def _distribution_units() -> list[SourceUnit]:
    """Every installed distribution with .py files, once by normalised name (the first found
    on sys.path, as import would find it), its files in sorted order."""
    units, seen = [], set()
    for dist in importlib.metadata.distributions():
        name = (dist.metadata["Name"] or "").lower().replace("-", "_").replace(".", "_")
        if not name or name in seen:
            continue
        seen.add(name)
        files = sorted({Path(dist.locate_file(f)) for f in (dist.files or ()) if f.suffix == ".py"})
        files = [f for f in files if f.is_file()]
        if files:
            units.append(SourceUnit(f"dist/{name}", tuple(files)))
    return units


@dataclass(frozen=True)
class PythonCorpus:
    """The 'python' data source: the .py files of every installed distribution and of the
    standard library, each distinct file content once.

    units: (name, files kept after deduplication) in sorted name order; validation: names of
    the units held out.
    """

    units: tuple[SourceUnit, ...]
    sizes: tuple[int, ...]  # bytes of each unit after deduplication
    validation: frozenset[str]

    def split_bytes(self, split: str) -> int:
        return sum(
            size
            for unit, size in zip(self.units, self.sizes)
            if (unit.name in self.validation) == (split == "validation")
        )


def _unit_order_key(name: str) -> tuple[int, str]:
    return zlib.crc32(name.encode("utf-8")), name


@functools.lru_cache(maxsize=4)
def python_corpus(validation_fraction: float) -> PythonCorpus:
    """Deduplicate by content (a file whose bytes were already seen in an earlier unit or file,
    in sorted order, is dropped), then hold out whole units for validation: units are visited
    in the order of a hash of their names and held out while the held-out bytes stay within
    validation_fraction of the total. Whole units, because files of one package are often
    near-copies of each other (vendored modules, generated stubs) and would leak across a
    per-file split."""
    units = sorted(_stdlib_units() + _distribution_units(), key=lambda unit: unit.name)
    seen: set[bytes] = set()
    kept_units, sizes = [], []
    for unit in units:
        kept, size = [], 0
        for file in unit.files:
            data = file.read_bytes()
            digest = hashlib.blake2b(data, digest_size=16).digest()
            if not data.strip() or digest in seen:
                continue
            seen.add(digest)
            kept.append(file)
            size += len(data)
        if kept:
            kept_units.append(SourceUnit(unit.name, tuple(kept)))
            sizes.append(size)
    budget, held, validation = validation_fraction * sum(sizes), 0, set()
    for index in sorted(range(len(kept_units)), key=lambda i: _unit_order_key(kept_units[i].name)):
        if held + sizes[index] <= budget:
            validation.add(kept_units[index].name)
            held += sizes[index]
    return PythonCorpus(tuple(kept_units), tuple(sizes), frozenset(validation))


def python_corpus_fingerprint() -> str:
    """Hash of the file list (paths, sizes, modification times) the 'python' corpus reads, so a
    cached token stream is rebuilt when a package is installed, removed or changed."""
    digest = hashlib.sha256(sys.version.encode())
    for unit in sorted(_stdlib_units() + _distribution_units(), key=lambda unit: unit.name):
        for file in unit.files:
            stat = file.stat()
            digest.update(f"{unit.name}\0{file}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:16]


def python_documents(
    split: str, validation_fraction: float, on_invalid_utf8: str | None = None
) -> Iterator[bytes | str]:
    """The 'python' corpus's documents of `split`: one per file, units in sorted name order;
    bytes, or text decoded under `on_invalid_utf8` when it is given."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    corpus = python_corpus(validation_fraction)
    for unit in corpus.units:
        if (unit.name in corpus.validation) == (split == "validation"):
            for file in unit.files:
                yield _as_document(file, on_invalid_utf8)


def describe_python_corpus(validation_fraction: float) -> str:
    """One paragraph on the 'python' corpus of this interpreter: units, files and bytes per split."""
    corpus = python_corpus(validation_fraction)
    files = {
        split: sum(
            len(u.files)
            for u in corpus.units
            if (u.name in corpus.validation) == (split == "validation")
        )
        for split in SPLITS
    }
    total = sum(corpus.sizes)
    return (
        f"python corpus of {sys.executable}: {len(corpus.units)} units "
        f"({sum(u.name.startswith('dist/') for u in corpus.units)} distributions), "
        f"{sum(files.values()):,} distinct files, {total / 1e6:,.1f} MB; train "
        f"{corpus.split_bytes('train') / 1e6:,.1f} MB "
        f"in {files['train']:,} files, validation {corpus.split_bytes('validation') / 1e6:,.1f} MB in "
        f"{files['validation']:,} files ({len(corpus.validation)} units, validation_fraction={validation_fraction})"
    )


def _local_files(path: str, suffixes: tuple[str, ...]) -> list[Path]:
    root = Path(path)
    if not path or not root.exists():
        raise FileNotFoundError(f"data.path={path!r} does not exist")
    if root.is_file():
        return [root]
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.name.endswith(suffixes))
    if not files:
        raise FileNotFoundError(
            f"data.path={path!r} holds no files ending in {' or '.join(suffixes)}"
        )
    return files


def file_documents(
    path: str,
    fmt: str,
    text_field: str,
    split: str,
    validation_fraction: float,
    on_invalid_utf8: str = "error",
) -> Iterator[str]:
    """Local files read by lh-cp itself: each .txt file is a document (format 'text'), each
    line of a .jsonl file is a JSON object whose `text_field` is a document (format 'jsonl').
    A line that is not such an object, and invalid UTF-8 (under on_invalid_utf8 = 'error'),
    raise DataError naming the file and line (and the byte offset)."""
    if fmt not in FILE_FORMATS:
        raise ValueError(
            f"data.format must be one of {FILE_FORMATS} for data.source='files', got {fmt!r}"
        )
    files = _local_files(path, (".txt",) if fmt == "text" else (".jsonl",))
    # Documents are named relative to data.path (as the standard library's are to its root),
    # so the split does not change when the dataset is moved or copied elsewhere.
    base = Path(path) if Path(path).is_dir() else Path(path).parent
    for file in files:
        name = file.relative_to(base).as_posix()
        if fmt == "text":
            if in_split(name, split, validation_fraction):
                yield decode_utf8(file.read_bytes(), str(file), on_invalid_utf8)
            continue
        for number, line in _jsonl_lines(file, on_invalid_utf8):
            if not line.strip() or not in_split(f"{name}:{number}", split, validation_fraction):
                continue
            yield _jsonl_text(line, text_field, f"{file}:{number + 1}")


def _jsonl_lines(file: Path, on_invalid_utf8: str) -> Iterator[tuple[int, str]]:
    """(index, text) of each line of `file`, numbered as Python's text mode numbers them
    (universal newlines: '\\n', '\\r\\n' and a lone '\\r' each end a line), each decoded under
    `on_invalid_utf8` with its byte offset in the file."""
    number, offset = 0, 0
    with file.open("rb") as handle:
        for raw in handle:  # split at b"\n"; a lone b"\r" inside is split below
            text = decode_utf8(raw, str(file), on_invalid_utf8, offset, number + 1)
            offset += len(raw)
            for line in io.StringIO(text, newline=None):
                yield number, line
                number += 1


def _jsonl_text(line: str, text_field: str, where: str) -> str:
    """The document of one jsonl line; DataError names `where` (file:line) when the line is
    not a JSON object holding a string under `text_field`."""
    try:
        record = json.loads(line)
    except json.JSONDecodeError as err:
        raise DataError(
            f"{where}: not valid JSON ({err.msg}, column {err.colno}): {line.strip()[:80]!r}"
        ) from None
    if not isinstance(record, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(record).__name__}")
    if text_field not in record:
        raise DataError(
            f"{where}: no field data.text_field={text_field!r} in the JSON record "
            f"(fields: {', '.join(map(repr, list(record)[:8]))})"
        )
    if not isinstance(record[text_field], str):
        raise DataError(
            f"{where}: field {text_field!r} holds {type(record[text_field]).__name__}, not text"
        )
    return record[text_field]


def hf_documents(
    path: str,
    fmt: str,
    text_field: str,
    split: str,
    validation_fraction: float,
    on_invalid_utf8: str = "error",
) -> Iterator[str]:
    """Records of a Hugging Face dataset read from local files ('text', 'jsonl', 'parquet')
    or from a `save_to_disk` folder ('saved'). Its 'train' split (else its first split by name)
    is read and re-split here by record index, so every format splits the same way. A file
    `datasets` cannot read raises DataError with datasets' own account (the row, the position)
    and the files it was given; on_invalid_utf8 becomes the text and json builders'
    encoding_errors ('strict' or 'replace')."""
    if fmt not in HF_FORMATS:
        raise ValueError(
            f"data.format must be one of {HF_FORMATS} for data.source='hf', got {fmt!r}"
        )
    try:
        import datasets
    except ImportError as err:
        raise ImportError(
            "data.source='hf' needs the Python package 'datasets' (pip install datasets, or "
            "pip install 'lh-cp[hf]'); data.source='files' reads .txt and .jsonl without it"
        ) from err
    if not path or not Path(path).exists():
        raise FileNotFoundError(f"data.path={path!r} does not exist")
    if fmt == "saved":
        loaded = datasets.load_from_disk(path)
    else:
        # datasets' json builder reads gzip itself (C4 ships as .json.gz).
        suffixes = {
            "text": (".txt",),
            "jsonl": (".jsonl", ".json", ".jsonl.gz", ".json.gz"),
            "parquet": (".parquet",),
        }[fmt]
        files = [str(f) for f in _local_files(path, suffixes)]
        builder = {"text": "text", "jsonl": "json", "parquet": "parquet"}[fmt]
        options = {}
        if builder != "parquet":
            options["encoding_errors"] = "strict" if on_invalid_utf8 == "error" else "replace"
        try:
            loaded = datasets.load_dataset(builder, data_files=files, **options)
        except Exception as err:
            raise DataError(_datasets_failure(err, files)) from None
    if isinstance(loaded, datasets.DatasetDict):
        loaded = loaded["train"] if "train" in loaded else loaded[sorted(loaded.keys())[0]]
    if text_field not in loaded.column_names:
        raise KeyError(
            f"data.text_field={text_field!r} is not a column of {path!r} (columns: {loaded.column_names})"
        )
    for index, record in enumerate(loaded):
        if in_split(str(index), split, validation_fraction):
            yield record[text_field]


def _datasets_failure(err: BaseException, files: list[str]) -> str:
    """One line on a file `datasets` could not read: its messages along the cause chain."""
    messages, seen = [], err
    while seen is not None and len(messages) < 4:
        text = " ".join(str(seen).split())[:200]
        if text and text not in messages:
            messages.append(f"{type(seen).__name__}: {text}")
        seen = seen.__cause__ or seen.__context__
    named = files[0] if len(files) == 1 else f"one of {len(files)} files ({files[0]}, ...)"
    return f"data.source='hf' could not read {named}: {'; '.join(messages)}"


if __name__ == "__main__":
    print(describe_python_corpus(float(sys.argv[1]) if len(sys.argv) > 1 else 0.02))
