"""lh-cp data behind torchtitan's dataloader: the windows of lh-cp's loader, global positions, resume."""

from __future__ import annotations

import pytest

pytest.importorskip(
    "torchtitan", reason="torchtitan is not installed (pip install 'lh-cp[torchtitan]')"
)

import torch  # noqa: E402

from lh_cp.data.loader import BatchLoader, DataConfig, token_stream  # noqa: E402
from lh_cp.data.tokenizer import ByteTokenizer  # noqa: E402
from lh_cp.torchtitan.data import LhCpDataLoader  # noqa: E402
from lh_cp.torchtitan.tokenizer import LhCpTokenizer  # noqa: E402

SEQ, BATCH = 64, 2


def _documents(tmp_path) -> str:
    for i in range(40):
        (tmp_path / f"doc{i:02d}.txt").write_text(f"document {i}: " + "lighthouse " * (10 + i))
    return str(tmp_path)


def _loader(path: str, dp_rank: int = 0, dp_world_size: int = 2) -> LhCpDataLoader:
    config = LhCpDataLoader.Config(
        dataset="files", dataset_path=path, format="text", validation_fraction=0.1, seed=3
    )
    return config.build(
        dp_world_size=dp_world_size,
        dp_rank=dp_rank,
        tokenizer=LhCpTokenizer.Config().build(tokenizer_path="."),
        seq_len=SEQ,
        local_batch_size=BATCH,
        snapshot_every_n_steps=1,
    )


def test_batches_are_lh_cp_windows_with_global_positions(tmp_path):
    path = _documents(tmp_path)
    data = DataConfig(
        source="files",
        path=path,
        format="text",
        validation_fraction=0.1,
        seq_len=SEQ,
        batch_size=BATCH,
        seed=3,
    )
    reference = BatchLoader(
        token_stream(data, ByteTokenizer(), "train"), SEQ, BATCH, 1, 2, 3, shuffle=True
    )
    batches = iter(_loader(path, dp_rank=1))
    for _ in range(3):
        inputs, labels = next(batches)
        expected_inputs, expected_labels, _ = reference.next_batch()
        assert torch.equal(inputs["input"], expected_inputs) and torch.equal(
            labels, expected_labels
        )
        assert torch.equal(inputs["positions"], torch.arange(SEQ).expand(BATCH, SEQ))


def test_resume_continues_where_the_checkpoint_was_taken(tmp_path):
    path = _documents(tmp_path)
    first = _loader(path)
    stream = iter(first)
    next(stream)
    state = first.state_dict()
    expected = [next(stream)[1] for _ in range(2)]
    resumed = _loader(path)
    resumed.load_state_dict(state)
    again = iter(resumed)
    assert all(torch.equal(next(again)[1], labels) for labels in expected)


def test_data_errors_name_the_option():
    with pytest.raises(ValueError, match="dataloader.dataset must be an lh-cp data source"):
        LhCpDataLoader.Config(dataset="c4")
    with pytest.raises(ValueError, match="num_workers must be 0"):
        LhCpDataLoader.Config(num_workers=2)
    with pytest.raises(ValueError, match="set the trainer's tokenizer to LhCpTokenizer"):
        LhCpDataLoader.Config().build(
            dp_world_size=1, dp_rank=0, tokenizer=object(), seq_len=SEQ, local_batch_size=1
        )
