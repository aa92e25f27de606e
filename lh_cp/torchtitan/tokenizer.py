"""lh-cp's tokenizers (byte tokenizer, or a local Hugging Face tokenizer.json) as a torchtitan tokenizer."""

from __future__ import annotations

from dataclasses import dataclass

from torchtitan.components.tokenizer import BaseTokenizer

from lh_cp.data.tokenizer import load_tokenizer


class LhCpTokenizer(BaseTokenizer):
    """Wraps lh_cp.data.tokenizer; `inner` is the lh-cp tokenizer the lh-cp dataloader reads with."""

    @dataclass(kw_only=True, slots=True)
    class Config(BaseTokenizer.Config):
        """name: 'bytes' (258 tokens: 256 bytes, end-of-document, pad; needs no file) or a
            local path to a Hugging Face tokenizer.json or its folder. torchtitan's
            hf_assets_path is not used.
        eod_token: end-of-document token of a Hugging Face tokenizer, e.g. '<|end_of_text|>'.
        pad_token: padding token of a Hugging Face tokenizer; empty = reuse eod_token.
        """

        name: str = "bytes"
        eod_token: str = ""
        pad_token: str = ""

    def __init__(self, config: Config, **kwargs) -> None:
        super().__init__()
        self.name, self.eod_token, self.pad_token = config.name, config.eod_token, config.pad_token
        self.inner = load_tokenizer(config.name, config.eod_token, config.pad_token)
        self.eos_id = self.inner.eod_id

    def encode(self, text: str, *args, **kwargs) -> list[int]:
        return self.inner.encode(text)

    def decode(self, ids, *args, **kwargs) -> str:
        return self.inner.decode(ids)

    def get_vocab_size(self) -> int:
        return self.inner.vocab_size
