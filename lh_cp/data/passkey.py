"""Synthetic passkey retrieval: a number hidden at a chosen depth of filler text, read back by
greedy decoding. Accuracy by depth measures whether the model can recall across the context.

The prompt is Python-shaped, like the default corpus: an instruction comment, filler lines, the
line `PASSKEY = <digits>` after a `depth` fraction of the filler, more filler, and finally
`assert PASSKEY == `, after which the model must produce the digits.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from lh_cp.section import Section

PREFIX = "# Remember the value of PASSKEY; it is asked for at the end.\n"
FILLER_LINE = "total = total + 1  # the grass is green and the sky is blue\n"
NEEDLE = "PASSKEY = {key}\n"
SUFFIX = "assert PASSKEY == "


@dataclass
class PasskeyConfig(Section):
    """Passkey retrieval evaluation run after the last stage (recipe section [eval.passkey]).

    enabled: run it (all ranks take part; rank 0 reports).
    length: tokens per prompt including the answer; 0 = data.seq_len. Must be a length the
        model's attention accepts (a valid Lighthouse length while Lighthouse layers are on).
    depths: where the passkey sits, as fractions of the filler (0 = start, 1 = end).
    samples: prompts per depth, each with its own random passkey; they form one batch.
    digits: length of the passkey number.
    seed: seed of the passkey numbers.
    """

    enabled: bool = False
    length: int = 0
    depths: list[float] = field(default_factory=lambda: [0.0, 0.25, 0.5, 0.75, 1.0])
    samples: int = 4
    digits: int = 5
    seed: int = 1234

    def problems(self) -> list[str]:
        errors = []
        if not self.depths or any(not 0.0 <= d <= 1.0 for d in self.depths):
            errors.append(f"eval.passkey.depths must be fractions in [0, 1], got {self.depths}")
        if self.samples < 1 or self.digits < 1:
            errors.append(
                f"eval.passkey.samples and digits must be >= 1, got {self.samples} and {self.digits}"
            )
        if self.length < 0:
            errors.append(f"eval.passkey.length must be >= 0 (0 = data.seq_len), got {self.length}")
        return errors


@dataclass
class PasskeyPrompt:
    tokens: list[int]  # the prompt, ending right before the answer
    answer: str  # the digits
    answer_tokens: int  # tokens the answer takes with this tokenizer


def make_prompt(tokenizer, length: int, depth: float, key: str) -> PasskeyPrompt:
    """A prompt of at most `length` tokens including the answer, key after `depth` of the filler."""
    answer_tokens = len(tokenizer.encode(key))
    head, needle, tail = (
        tokenizer.encode(PREFIX),
        tokenizer.encode(NEEDLE.format(key=key)),
        tokenizer.encode(SUFFIX),
    )
    line = tokenizer.encode(FILLER_LINE)
    budget = length - answer_tokens - len(head) - len(needle) - len(tail)
    lines = budget // len(line)
    if lines < 1:
        raise ValueError(
            f"eval.passkey.length={length} is too short for a passkey prompt (needs > {length - budget + len(line)})"
        )
    before = round(depth * lines)
    tokens = head + line * before + needle + line * (lines - before) + tail
    return PasskeyPrompt(tokens, key, answer_tokens)


def random_keys(count: int, digits: int, seed: int) -> list[str]:
    gen = torch.Generator().manual_seed(seed)
    first = torch.randint(
        1, 10, (count,), generator=gen
    )  # no leading zero: the number has `digits` digits
    rest = torch.randint(0, 10, (count, digits - 1), generator=gen)
    return ["".join(str(int(d)) for d in [f, *r]) for f, r in zip(first, rest)]


@torch.no_grad()
def greedy_answers(
    predict: Callable[[torch.Tensor], torch.Tensor],
    prompts: list[PasskeyPrompt],
    length: int,
    pad_id: int,
) -> list[list[int]]:
    """Greedy decoding of each prompt's answer_tokens tokens.

    predict: int64 tokens [B, length] -> int64 [B, length], the argmax next token at every
    position. Prompts are right-padded to `length`; attention is causal, so padding after a
    position never changes the prediction there, and one forward per answer token suffices.
    """
    batch = torch.full((len(prompts), length), pad_id, dtype=torch.int64)  # [B, length]
    for row, prompt in enumerate(prompts):
        batch[row, : len(prompt.tokens)] = torch.tensor(prompt.tokens)
    steps = max(p.answer_tokens for p in prompts)
    generated: list[list[int]] = [[] for _ in prompts]
    for step in range(steps):
        predicted = predict(batch)  # [B, length]
        for row, prompt in enumerate(prompts):
            position = len(prompt.tokens) + step
            if step < prompt.answer_tokens:
                token = int(predicted[row, position - 1])
                generated[row].append(token)
                batch[row, position] = token
    return generated


def passkey_accuracy(
    predict: Callable[[torch.Tensor], torch.Tensor], tokenizer, cfg: PasskeyConfig, length: int
) -> dict[float, float]:
    """Share of prompts at each depth whose greedy answer equals the passkey exactly."""
    cfg.validate()
    keys = random_keys(len(cfg.depths) * cfg.samples, cfg.digits, cfg.seed)
    accuracy = {}
    for index, depth in enumerate(cfg.depths):
        depth_keys = keys[index * cfg.samples : (index + 1) * cfg.samples]
        prompts = [make_prompt(tokenizer, length, depth, key) for key in depth_keys]
        answers = greedy_answers(predict, prompts, length, tokenizer.pad_id)
        correct = sum(tokenizer.decode(ids).strip() == p.answer for ids, p in zip(answers, prompts))
        accuracy[depth] = correct / len(prompts)
    return accuracy
