"""Token choice: n-gram bans as transformers computes them, exact nucleus sampling, seeded streams."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers.generation.logits_process import NoRepeatNGramLogitsProcessor

from serve.engine.requests import SamplingParams
from serve.engine.sampling import TokenChooser, choose_tokens, sample_nucleus


@pytest.mark.parametrize("n", [1, 2, 3, 4])
def test_ngram_ban_equals_transformers(n):
    rng = np.random.default_rng(n)
    vocab = 12
    prompt = rng.integers(0, vocab, 15).tolist()
    chooser = TokenChooser(SamplingParams(no_repeat_ngram_size=n), prompt)
    reference = NoRepeatNGramLogitsProcessor(n)
    history = list(prompt)
    for _ in range(20):
        scores = reference(torch.tensor([history]), torch.zeros(1, vocab))
        expected = sorted(torch.nonzero(scores[0] == -float("inf")).flatten().tolist())
        assert sorted(chooser.banned()) == expected
        token = int(rng.integers(0, vocab))
        chooser.append(token)
        history.append(token)


def test_nucleus_frequencies_are_exact():
    probs = torch.tensor([0.1, 0.4, 0.2, 0.3])
    logits = torch.log(probs)[None].repeat(1000, 1)
    uniform = (torch.arange(1000) + 0.5) / 1000
    counts = torch.bincount(sample_nucleus(logits, torch.ones(1000), uniform), minlength=4)
    assert counts.tolist() == [100, 400, 200, 300]
    # top_p 0.6 keeps the tokens with 0.4 and 0.3 (0.4 < 0.6), renormalized to 4/7 and 3/7
    counts = torch.bincount(sample_nucleus(logits, torch.full((1000,), 0.6), uniform), minlength=4)
    assert counts.tolist() == [0, 571, 0, 429]


def test_ban_and_greedy_rows_in_one_batch():
    logits = torch.tensor([[0.0, 5.0, 1.0], [0.0, 5.0, 1.0]])
    plain = TokenChooser(SamplingParams(), [0])
    banned = TokenChooser(SamplingParams(no_repeat_ngram_size=2), [1, 1])  # bigram (1, 1) seen: 1 is banned
    assert choose_tokens(logits, [plain, banned]) == [1, 2]


def test_seeded_streams_repeat_and_differ():
    logits = torch.randn(1, 50, generator=torch.Generator().manual_seed(0)).repeat(3, 1)
    params = SamplingParams(temperature=1.0, seed=7)
    other = SamplingParams(temperature=1.0, seed=8)
    choosers = [TokenChooser(params, []), TokenChooser(params, []), TokenChooser(other, [])]
    draws = [choose_tokens(logits, choosers) for _ in range(30)]
    assert all(a == b for a, b, _ in draws)
    assert any(a != c for a, _, c in draws)


@pytest.mark.parametrize(
    "kwargs", [{"max_new_tokens": 0}, {"temperature": -1}, {"temperature": 3}, {"top_p": 0}, {"top_p": 1.5}]
)
def test_params_are_checked(kwargs):
    with pytest.raises(ValueError):
        SamplingParams(**kwargs)
