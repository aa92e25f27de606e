"""Tokenizers: a byte tokenizer that needs nothing, and Hugging Face `tokenizers` from a local path.

Both expose `encode(text) -> list[int]`, `encode_document(bytes | str) -> int32 array`,
`decode(ids) -> str`, `vocab_size`, `eod_id` (the end-of-document token that separates packed
documents) and `pad_id`.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np


class ByteTokenizer:
    """Token i < 256 is byte i; 256 ends a document; 257 pads. 258 tokens in all."""

    eod_id = 256
    pad_id = 257
    vocab_size = 258

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def encode_document(self, doc: bytes | str) -> np.ndarray:
        data = doc if isinstance(doc, bytes) else doc.encode("utf-8")
        return np.frombuffer(data, dtype=np.uint8).astype(np.int32)

    def decode(self, ids) -> str:
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")


class HFTokenizer:
    """A `tokenizers.Tokenizer` read from a local tokenizer.json (or a folder holding one)."""

    def __init__(self, path: str, eod_token: str, pad_token: str) -> None:
        try:
            from tokenizers import Tokenizer
        except ImportError as err:
            raise ImportError(
                f"data.tokenizer={path!r} needs the Python package 'tokenizers' "
                f"(pip install tokenizers, or pip install 'lh-cp[hf]')"
            ) from err
        file = Path(path)
        if file.is_dir():
            file = file / "tokenizer.json"
        if not file.is_file():
            raise FileNotFoundError(
                f"data.tokenizer: no tokenizer file at {str(file)!r} (expected tokenizer.json)"
            )
        self._tok = Tokenizer.from_file(str(file))
        if not eod_token:
            raise ValueError(
                f"data.eod_token must name the end-of-document token of tokenizer {str(file)!r}"
            )
        self.eod_id = self._token_id(eod_token, "data.eod_token")
        self.pad_id = self._token_id(pad_token, "data.pad_token") if pad_token else self.eod_id
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)

    def _token_id(self, token: str, option: str) -> int:
        token_id = self._tok.token_to_id(token)
        if token_id is None:
            raise ValueError(f"{option}={token!r} is not a token of this tokenizer")
        return token_id

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_document(self, doc: bytes | str) -> np.ndarray:
        text = doc.decode("utf-8", errors="replace") if isinstance(doc, bytes) else doc
        return np.asarray(self.encode(text), dtype=np.int32)

    def decode(self, ids) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=True)


def load_tokenizer(
    name: str, eod_token: str = "", pad_token: str = ""
) -> ByteTokenizer | HFTokenizer:
    """'bytes' or a local path to a Hugging Face tokenizer; nothing is downloaded."""
    if name == "bytes":
        return ByteTokenizer()
    return HFTokenizer(name, eod_token, pad_token)
