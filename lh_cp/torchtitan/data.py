"""lh-cp's training data behind torchtitan's dataloader interface.

The same token stream and window order as lh-cp's own trainer (lh_cp.data.loader: documents joined
by end-of-document, cut into seq_len + 1 windows, a seeded permutation per epoch, data-parallel
rank r reading its slice of each global batch), yielded one sequence at a time to torchtitan's
ParallelAwareDataloader (a StatefulDataLoader, checkpointed by torchtitan). Positions are the
global token index 0..seq_len-1: Lighthouse attention is causal over the whole packed sequence
(no per-document reset), exactly as in lh-cp's model; under context parallelism torchtitan's
head-tail sharding cuts the positions together with the tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.distributed.checkpoint.stateful import Stateful
from torch.utils.data import IterableDataset
from torchtitan.components.dataloader import ParallelAwareDataloader

from lh_cp.data.loader import SOURCES, BatchLoader, DataConfig, token_stream
from lh_cp.torchtitan.tokenizer import LhCpTokenizer


class TokenWindows(IterableDataset, Stateful):
    """Sequences of one data-parallel rank: ({'input', 'positions'}, labels), each int64 [seq_len]."""

    def __init__(self, loader: BatchLoader) -> None:
        self.loader = loader
        self.positions = torch.arange(loader.seq_len, dtype=torch.int64)

    def __iter__(self):
        while True:
            inputs, labels, _ = self.loader.next_batch()  # [batch_size, seq_len] each
            for row in range(inputs.shape[0]):
                yield {"input": inputs[row], "positions": self.positions}, labels[row]

    def state_dict(self) -> dict:
        return self.loader.state_dict()

    def load_state_dict(self, state_dict: dict) -> None:
        self.loader.load_state_dict(state_dict)


class LhCpDataLoader(ParallelAwareDataloader):
    """torchtitan dataloader over lh-cp's data sources (recipe section [data])."""

    @dataclass(kw_only=True, slots=True)
    class Config(ParallelAwareDataloader.Config):
        """dataset: lh-cp data source: 'stdlib' (this Python's standard-library sources, no
            download), 'python' (every installed distribution's .py sources), 'files' (local
            .txt / .jsonl) or 'hf' (Hugging Face `datasets` over local files or a save_to_disk folder).
        dataset_path: file or folder for 'files' and 'hf'.
        format, text_field, validation_fraction, seed, cache_dir: as lh_cp.data.loader.DataConfig.
        """

        dataset: str = "stdlib"
        format: str = "jsonl"
        text_field: str = "text"
        validation_fraction: float = 0.02
        seed: int = 0
        cache_dir: str = ""

        def __post_init__(self) -> None:
            if self.dataset not in SOURCES:
                raise ValueError(
                    f"dataloader.dataset must be an lh-cp data source {SOURCES}, got {self.dataset!r}"
                )
            if self.num_workers != 0:
                raise ValueError(
                    f"dataloader.num_workers must be 0 (the lh-cp token stream is read in the "
                    f"training process; windows are cheap slices), got {self.num_workers}"
                )

        def data_config(
            self, tokenizer: LhCpTokenizer, seq_len: int, batch_size: int
        ) -> DataConfig:
            cfg = DataConfig(
                source=self.dataset,
                path=self.dataset_path or "",
                format=self.format,
                text_field=self.text_field,
                tokenizer=tokenizer.name,
                eod_token=tokenizer.eod_token,
                pad_token=tokenizer.pad_token,
                seq_len=seq_len,
                batch_size=batch_size,
                validation_fraction=self.validation_fraction,
                seed=self.seed,
                cache_dir=self.cache_dir,
            )
            cfg.validate()
            return cfg

    def __init__(
        self,
        config: Config,
        *,
        dp_world_size: int,
        dp_rank: int,
        tokenizer,
        seq_len: int,
        local_batch_size: int,
        snapshot_every_n_steps: int | None = 1,
        **kwargs,
    ) -> None:
        if not isinstance(tokenizer, LhCpTokenizer):
            raise ValueError(
                f"LhCpDataLoader reads with lh-cp's tokenizers: set the trainer's tokenizer to "
                f"LhCpTokenizer.Config, got {type(tokenizer).__name__}"
            )
        data = config.data_config(tokenizer, seq_len, local_batch_size)
        stream = token_stream(data, tokenizer.inner, "train")
        loader = BatchLoader(
            stream, seq_len, local_batch_size, dp_rank, dp_world_size, data.seed, shuffle=True
        )
        super().__init__(
            TokenWindows(loader),
            dp_rank=dp_rank,
            dp_world_size=dp_world_size,
            num_workers=config.num_workers,
            persistent_workers=config.persistent_workers,
            pin_memory=config.pin_memory,
            prefetch_factor=config.prefetch_factor,
            snapshot_every_n_steps=snapshot_every_n_steps,
            batch_size=local_batch_size,
        )
