"""The choice of each next token under a request's own parameters, shared by every engine.

Every request gets exactly its own parameters inside a batch: greedy or temperature/top-p sampling, a seed,
a token limit and a no-repeat n-gram size. Rows that ask for log-probabilities get them from
:func:`token_logprobs` (the other rows cost nothing). Sampling draws one uniform number per step from the request's own
seeded generator and inverts the nucleus distribution with it, so a seeded request gives the same tokens
whatever else shares its batch. Greedy rows without an n-gram ban take a vectorized path with no Python per
row.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence

import numpy as np
import torch

from serve.engine.requests import SamplingParams, TokenLogprobs


class TokenChooser:
    """The per-request state of token choice: the n-gram table and the seeded random stream."""

    def __init__(self, params: SamplingParams, prompt_ids: Sequence[int]) -> None:
        """Greedy requests (most) skip the random stream and, without a ban, the history: the engine's single
        thread makes one chooser per request."""
        self.params = params
        self.n = params.no_repeat_ngram_size
        self.history = [int(t) for t in prompt_ids] if self.n else []
        self.ngrams: dict[tuple[int, ...], set[int]] = defaultdict(set)
        for start in range(len(self.history) - self.n + 1 if self.n else 0):
            self._record(start)
        self.random: np.random.Generator | None = None
        if not params.greedy:
            seed = params.seed if params.seed is not None else int(np.random.SeedSequence().entropy % 2**63)
            self.random = np.random.Generator(np.random.Philox(seed))

    @property
    def simple(self) -> bool:
        """Greedy with no ban: chosen by a plain argmax with the rest of the batch."""
        return self.params.greedy and not self.n

    def banned(self) -> list[int]:
        """Tokens that would repeat an n-gram already in the sequence (prompt included, as transformers does)."""
        if not self.n or len(self.history) < self.n - 1:
            return []
        prefix = tuple(self.history[len(self.history) - self.n + 1 :]) if self.n > 1 else ()
        return list(self.ngrams.get(prefix, ()))

    def append(self, token: int) -> None:
        if self.n:
            self.history.append(token)
            if len(self.history) >= self.n:
                self._record(len(self.history) - self.n)

    def _record(self, start: int) -> None:
        gram = self.history[start : start + self.n]
        self.ngrams[tuple(gram[:-1])].add(gram[-1])


def choose_tokens(logits: torch.Tensor, choosers: Sequence[TokenChooser]) -> list[int]:
    """Next token of each row of ``logits`` (rows x vocabulary) under its request's parameters."""
    tokens = logits.argmax(dim=-1)
    special = [i for i, c in enumerate(choosers) if not c.simple]
    if special:
        rows = torch.tensor(special, device=logits.device)
        tokens[rows] = choose_special(logits[rows].float(), [choosers[i] for i in special])
    return tokens.tolist()


def choose_special(logits: torch.Tensor, choosers: Sequence[TokenChooser]) -> torch.Tensor:
    """Next tokens of rows that ban n-grams or sample (``logits`` is modified in place)."""
    bans = [(row, token) for row, c in enumerate(choosers) for token in c.banned()]
    if bans:
        rows, cols = zip(*bans)
        logits[list(rows), list(cols)] = -float("inf")
    chosen = logits.argmax(dim=-1)
    sampled = [row for row, c in enumerate(choosers) if not c.params.greedy]
    if sampled:
        temperature = torch.tensor([choosers[r].params.temperature for r in sampled], device=logits.device)
        top_p = torch.tensor([choosers[r].params.top_p for r in sampled], device=logits.device)
        uniform = torch.tensor([choosers[r].random.random() for r in sampled], device=logits.device)
        chosen[sampled] = sample_nucleus(logits[sampled] / temperature[:, None], top_p, uniform)
    return chosen


def sample_nucleus(logits: torch.Tensor, top_p: torch.Tensor, uniform: torch.Tensor) -> torch.Tensor:
    """Inverse-CDF sampling from each row's top-p nucleus with the given uniform numbers in [0, 1).

    The nucleus is the smallest set of most likely tokens whose probability reaches ``top_p`` (at least one).

    >>> logits = torch.log(torch.tensor([[0.5, 0.3, 0.2]]))
    >>> sample_nucleus(logits, torch.tensor([1.0]), torch.tensor([0.6])).item()
    1
    >>> sample_nucleus(logits, torch.tensor([0.5]), torch.tensor([0.99])).item()  # nucleus is token 0 alone
    0
    """
    probs = torch.softmax(logits.float(), dim=-1)
    sorted_probs, order = probs.sort(dim=-1, descending=True)
    before = sorted_probs.cumsum(dim=-1) - sorted_probs
    sorted_probs = sorted_probs.masked_fill(before >= top_p[:, None], 0.0)
    cumulative = sorted_probs.cumsum(dim=-1)
    target = uniform[:, None] * cumulative[:, -1:]
    index = torch.searchsorted(cumulative, target, right=True).clamp(max=probs.shape[-1] - 1)
    return order.gather(-1, index).squeeze(-1)


def token_logprobs(
    logits: torch.Tensor, tokens: torch.Tensor, counts: Sequence[int]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Log-probabilities for rows of ``logits`` (rows x vocabulary, as the model gave them) whose chosen tokens are
    ``tokens``: each chosen token's, and the ``max(counts)`` most likely tokens' ids and log-probabilities (most
    likely first), all on the logits' device. :func:`split_logprobs` takes them apart on the host.

    >>> logits = torch.log(torch.tensor([[0.5, 0.3, 0.2]]))
    >>> chosen, ids, values = token_logprobs(logits, torch.tensor([1]), [2])
    >>> round(chosen.exp().item(), 4), ids.tolist(), [round(v, 4) for v in values.exp()[0].tolist()]
    (0.3, [[0, 1]], [0.5, 0.3])
    """
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    chosen = logprobs.gather(-1, tokens[:, None].long())[:, 0]
    values, ids = logprobs.topk(max(counts, default=0), dim=-1)
    return chosen, ids, values


def split_logprobs(
    chosen: torch.Tensor, ids: torch.Tensor, values: torch.Tensor, counts: Sequence[int]
) -> list[TokenLogprobs]:
    """One single-token :class:`TokenLogprobs` per row of :func:`token_logprobs`' output, row ``i`` keeping its
    ``counts[i]`` most likely tokens (one copy to the host for all rows)."""
    chosen_list, ids_list, values_list = chosen.tolist(), ids.tolist(), values.tolist()
    return [
        TokenLogprobs([chosen_list[row]], [ids_list[row][:count]], [values_list[row][:count]])
        for row, count in enumerate(counts)
    ]
