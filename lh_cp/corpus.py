"""Document sources: the embedded standard-library corpus, local text/jsonl files, and
Hugging Face `datasets` from local files. Each yields documents in a deterministic order and
assigns each to the train or validation split by a stable hash of its name, so the split does
not depend on how many documents are read or in which process.
"""

from __future__ import annotations

import functools
import json
import sysconfig
import zlib
from collections.abc import Iterator
from pathlib import Path

SPLITS = ("train", "validation")
FILE_FORMATS = ("text", "jsonl")
HF_FORMATS = ("text", "jsonl", "parquet", "saved")


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
        raise FileNotFoundError(f"data.source='stdlib': the standard-library folder {str(root)!r} does not exist")
    return tuple(sorted(
        p.relative_to(root).as_posix()
        for p in root.rglob("*.py")
        if not {"site-packages", "dist-packages"} & set(p.relative_to(root).parts)
    ))


def stdlib_documents(split: str, validation_fraction: float) -> Iterator[bytes]:
    """The interpreter's own standard-library .py sources, in sorted path order."""
    root = stdlib_root()
    for name in stdlib_files():
        if in_split(name, split, validation_fraction):
            yield (root / name).read_bytes()


def _local_files(path: str, suffixes: tuple[str, ...]) -> list[Path]:
    root = Path(path)
    if not path or not root.exists():
        raise FileNotFoundError(f"data.path={path!r} does not exist")
    if root.is_file():
        return [root]
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix in suffixes)
    if not files:
        raise FileNotFoundError(f"data.path={path!r} holds no files ending in {' or '.join(suffixes)}")
    return files


def file_documents(path: str, fmt: str, text_field: str, split: str, validation_fraction: float) -> Iterator[str]:
    """Local files read by lh-cp itself: each .txt file is a document (format 'text'), each
    line of a .jsonl file is a JSON object whose `text_field` is a document (format 'jsonl')."""
    if fmt not in FILE_FORMATS:
        raise ValueError(f"data.format must be one of {FILE_FORMATS} for data.source='files', got {fmt!r}")
    files = _local_files(path, (".txt",) if fmt == "text" else (".jsonl",))
    # Documents are named relative to data.path (as the standard library's are to its root),
    # so the split does not change when the dataset is moved or copied elsewhere.
    base = Path(path) if Path(path).is_dir() else Path(path).parent
    for file in files:
        name = file.relative_to(base).as_posix()
        if fmt == "text":
            if in_split(name, split, validation_fraction):
                yield file.read_text(encoding="utf-8", errors="replace")
            continue
        with file.open(encoding="utf-8") as lines:
            for number, line in enumerate(lines):
                if not line.strip() or not in_split(f"{name}:{number}", split, validation_fraction):
                    continue
                record = json.loads(line)
                if text_field not in record:
                    raise KeyError(f"{file}:{number + 1}: no field data.text_field={text_field!r} in the JSON record")
                yield record[text_field]


def hf_documents(path: str, fmt: str, text_field: str, split: str, validation_fraction: float) -> Iterator[str]:
    """Records of a Hugging Face dataset read from local files ('text', 'jsonl', 'parquet')
    or from a `save_to_disk` folder ('saved'). Its 'train' split (else its first split by name)
    is read and re-split here by record index, so every format splits the same way."""
    if fmt not in HF_FORMATS:
        raise ValueError(f"data.format must be one of {HF_FORMATS} for data.source='hf', got {fmt!r}")
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
        suffixes = {"text": (".txt",), "jsonl": (".jsonl", ".json"), "parquet": (".parquet",)}[fmt]
        files = [str(f) for f in _local_files(path, suffixes)]
        builder = {"text": "text", "jsonl": "json", "parquet": "parquet"}[fmt]
        loaded = datasets.load_dataset(builder, data_files=files)
    if isinstance(loaded, datasets.DatasetDict):
        loaded = loaded["train"] if "train" in loaded else loaded[sorted(loaded.keys())[0]]
    if text_field not in loaded.column_names:
        raise KeyError(f"data.text_field={text_field!r} is not a column of {path!r} (columns: {loaded.column_names})")
    for index, record in enumerate(loaded):
        if in_split(str(index), split, validation_fraction):
            yield record[text_field]
