"""Passkey retrieval: prompt construction, greedy decoding and accuracy by depth, on trivial
models whose answers are known (an oracle that reads the key, a model that never does), and
on a real untrained Transformer (the harness runs; its accuracy is whatever it is)."""

from __future__ import annotations

import pytest
import torch

from lh_cp.data.passkey import (
    NEEDLE,
    SUFFIX,
    PasskeyConfig,
    make_prompt,
    passkey_accuracy,
    random_keys,
)
from lh_cp.data.tokenizer import ByteTokenizer
from lh_cp.model.transformer import ModelConfig, Transformer

TOK = ByteTokenizer()


pytestmark = pytest.mark.usefixtures("one_thread")


def _find(row: list[int], pattern: list[int]) -> int:
    for i in range(len(row) - len(pattern), -1, -1):
        if row[i : i + len(pattern)] == pattern:
            return i
    raise AssertionError("pattern not in row")


def oracle(tokens: torch.Tensor) -> torch.Tensor:
    """Predicts, after `assert PASSKEY == ` and each digit produced so far, the next digit of
    the key written in the needle: a perfect model, decoded greedily."""
    predicted = torch.zeros_like(tokens)
    needle, suffix = TOK.encode(NEEDLE.split("{key}")[0]), TOK.encode(SUFFIX)
    for b, row in enumerate(tokens.tolist()):
        start = _find(row, needle) + len(needle)
        key = row[start : row.index(ord("\n"), start)]
        answer_at = _find(row, suffix) + len(suffix)
        for j, digit in enumerate(key):
            predicted[b, answer_at - 1 + j] = digit
    return predicted


def never(tokens: torch.Tensor) -> torch.Tensor:
    return torch.full_like(tokens, ord("x"))


def test_prompt_places_the_key_at_the_depth_and_fits_the_length():
    for depth in (0.0, 0.5, 1.0):
        prompt = make_prompt(TOK, 1000, depth, "48213")
        text = TOK.decode(prompt.tokens)
        assert len(prompt.tokens) + prompt.answer_tokens <= 1000
        assert text.endswith(SUFFIX) and "PASSKEY = 48213\n" in text
        position = text.index("PASSKEY = 48213") / len(text)
        assert abs(position - depth) < 0.1, (depth, position)


def test_keys_have_the_requested_digits_and_are_reproducible():
    keys = random_keys(20, 5, seed=3)
    assert keys == random_keys(20, 5, seed=3) and all(len(k) == 5 and k[0] != "0" for k in keys)


def test_accuracy_by_depth_of_an_oracle_and_of_a_model_that_never_answers():
    cfg = PasskeyConfig(enabled=True, depths=[0.0, 0.5, 1.0], samples=3, digits=4)
    assert passkey_accuracy(oracle, TOK, cfg, 600) == {0.0: 1.0, 0.5: 1.0, 1.0: 1.0}
    assert passkey_accuracy(never, TOK, cfg, 600) == {0.0: 0.0, 0.5: 0.0, 1.0: 0.0}


def test_greedy_decoding_feeds_back_its_own_tokens():
    """A model that gets only the first digit right scores 0: decoding is autoregressive and
    exact-match."""

    def first_digit_only(tokens: torch.Tensor) -> torch.Tensor:
        predicted = oracle(tokens)
        suffix = TOK.encode(SUFFIX)
        for b, row in enumerate(tokens.tolist()):
            answer_at = _find(row, suffix) + len(suffix)
            predicted[b, answer_at:] = ord("0")
        return predicted

    cfg = PasskeyConfig(enabled=True, depths=[0.5], samples=4, digits=5)
    assert passkey_accuracy(first_digit_only, TOK, cfg, 500) == {0.5: 0.0}


def test_passkey_runs_on_a_real_transformer():
    torch.manual_seed(0)
    model = Transformer(ModelConfig(dim=32, n_layers=2, n_heads=2, n_kv_heads=1, ffn_dim=64)).eval()
    calls = []

    def predict(tokens: torch.Tensor) -> torch.Tensor:
        calls.append(tokens.shape)
        return model(tokens, torch.arange(tokens.shape[1]), predict=True)

    cfg = PasskeyConfig(enabled=True, depths=[0.0, 1.0], samples=2, digits=3)
    accuracy = passkey_accuracy(predict, TOK, cfg, 256)
    assert set(accuracy) == {0.0, 1.0} and all(0.0 <= a <= 1.0 for a in accuracy.values())
    assert calls == [(2, 256)] * 6  # one forward per answer token, per depth
