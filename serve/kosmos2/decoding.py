"""One request's generated tokens to its answer as they arrive: text as soon as it is certain, stop strings, and
each token's share of the text for its log-probabilities.

:meth:`Decoding.push` takes the engine's new tokens and returns a :class:`Release`: the text that no later token
can change (``serve.kosmos2.text.AnswerStream``), less an end of it that could still grow into a stop string.
Once a stop string appears, the text ends before it and :attr:`Decoding.stopped` turns true, so that the
caller can cancel the generation. :meth:`Decoding.finish` gives the :class:`Outcome`: the answer (cut at the
stop string, the entities whose span passes the cut dropped), why it ended, and the last release. Streamed or
not, an answer goes through the same steps, so both are the same. :func:`follow` drives a decoding from an
engine's token stream, wherever the stream comes from (a Generator replica, an engine in this process).

Stop strings apply to the generated text, never to the prompt's own words that an echo task's answer begins
with ("An image of" of a caption); the first stop string to appear ends the text (of several completed by one
token, the one that starts first).

With log-probabilities, each generated token gets a :class:`TokenText`: the piece of the text that became
certain when it arrived (empty for grounding markup, which the text leaves out, and for what a stop string
cut), its log-probability and its most likely alternatives, each with the token's own text. The pieces joined
equal the answer's text after the prompt's own words.
"""

from __future__ import annotations

from collections.abc import AsyncIterable, AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field

from serve.engine.requests import FinishReason, Generated, GenerationResult, TokenLogprobs
from serve.kosmos2.tasks import Prompt
from serve.kosmos2.text import Answer, AnswerStream, TextCodec


@dataclass(frozen=True)
class TokenText:
    """A generated token: its piece of the answer's text, its log-probability, and its alternatives (each
    token's own text and log-probability, most likely first)."""

    text: str
    logprob: float
    top: list[tuple[str, float]]


@dataclass(frozen=True)
class Release:
    """What may go to the client now: new text, and the tokens whose pieces it completes."""

    text: str = ""
    tokens: list[TokenText] = field(default_factory=list)


@dataclass(frozen=True)
class Outcome:
    """A finished answer: its text and entities, why it ended, the tokens the model produced, the release not
    yet given, and every token's :class:`TokenText` when log-probabilities were asked for (else None)."""

    answer: Answer
    finish_reason: FinishReason
    completion_tokens: int
    rest: Release
    tokens: list[TokenText] | None


@dataclass
class _Piece:
    start: int
    text: str
    logprob: float
    top: list[tuple[str, float]]

    def token(self, cut: int | None = None) -> TokenText:
        text = self.text if cut is None else self.text[: max(cut - self.start, 0)]
        return TokenText(text, self.logprob, self.top)


def cut_answer(answer: Answer, at: int) -> Answer:
    """``answer`` ending at character ``at``, without the entities whose span passes it."""
    return Answer(answer.text[:at], [e for e in answer.entities if e.span[1] <= at])


class Decoding:
    """The answer to one request as its tokens arrive; ``width`` x ``height`` is the original image's size."""

    def __init__(
        self,
        codec: TextCodec,
        prompt: Prompt,
        prompt_ids: Sequence[int],
        size: tuple[int, int],
        stop: Sequence[str] = (),
        logprobs: bool = False,
    ) -> None:
        self.codec, self.prompt, self.prompt_ids, self.size = codec, prompt, list(prompt_ids), size
        self.stops = tuple(stop)
        self.logprobs = logprobs
        self.stream = AnswerStream(codec, prompt, self.prompt_ids)
        self.text = self.stream.push([])  # an echo task's answer begins with the prompt's own words
        self.start = len(self.text)
        self.released = 0
        self.cut: int | None = None
        self.token_ids: list[int] = []
        self.pieces: list[_Piece] = []
        self.given = 0  # pieces released

    @property
    def stopped(self) -> bool:
        """Whether a stop string has ended the text (the rest of the generation is not needed)."""
        return self.cut is not None

    def opening(self) -> Release:
        """What is certain before any token: an echo task's prompt words."""
        return self._release(final=False)

    def push(self, token_ids: Sequence[int], logprobs: TokenLogprobs | None = None) -> Release:
        """Take new tokens (and their log-probabilities, when asked for); returns what may go out now."""
        if self.stopped:
            return Release()
        self.token_ids += token_ids
        if self.logprobs and logprobs is not None:
            for index, token in enumerate(token_ids):
                start = len(self.text)
                self._grow(self.stream.push([token]))
                top = list(zip(self.codec.token_texts(logprobs.top_ids[index]), logprobs.top_logprobs[index]))
                self.pieces.append(_Piece(start, self.text[start:], logprobs.chosen[index], top))
        elif self.stops:
            for token in token_ids:  # one at a time, as streamed: the first stop string to appear ends the text
                self._grow(self.stream.push([token]))
        else:
            self._grow(self.stream.push(token_ids))
        return self._release(final=False)

    def finish(self, result: GenerationResult | None) -> Outcome:
        """The answer from the engine's ``result``, or, after a stop string, from the tokens pushed."""
        if result is None:
            token_ids, reason, completion = self.token_ids, "stop", len(self.token_ids)
        else:
            token_ids, reason, completion = result.token_ids, result.finish_reason, result.completion_tokens
            missing = result.token_ids[len(self.token_ids) :]
            if missing and (self.stops or self.logprobs) and not self.stopped:
                self.push(missing, result.logprobs.slice(len(self.token_ids)) if result.logprobs else None)
        answer = self.codec.answer(self.prompt, self.prompt_ids, token_ids, *self.size)
        if not self.stopped:
            rest = self.stream.finish(answer.text)
            if rest and self.pieces[self.given :]:
                self.pieces[-1].text += rest  # what the last token made certain once nothing could follow
                self.text += rest
                self._scan(len(self.text) - len(rest))
            else:
                self._grow(rest)
        if self.cut is not None:
            answer, reason = cut_answer(answer, self.cut), "stop"
        release = self._release(final=True)
        tokens = [piece.token(self.cut) for piece in self._kept()] if self.logprobs else None
        return Outcome(answer, reason, completion, release, tokens)

    def _grow(self, piece: str) -> None:
        before = len(self.text)
        self.text += piece
        self._scan(before)

    def _scan(self, before: int) -> None:
        """Look for a stop string ending in the text added after ``before``."""
        if not self.stops or self.cut is not None:
            return
        longest = max(len(stop) for stop in self.stops)
        since = max(self.start, before - longest + 1)
        found = [at for at in (self.text.find(stop, since) for stop in self.stops) if at >= 0]
        if found:
            self.cut = min(found)

    def _held(self) -> int:
        """Characters at the end of the text that could be the start of a stop string."""
        room, held = len(self.text) - self.start, 0
        for stop in self.stops:
            for size in range(min(len(stop) - 1, room), held, -1):
                if self.text.endswith(stop[:size]):
                    held = size
                    break
        return held

    def _kept(self) -> list[_Piece]:
        """The pieces before the cut (all, without one)."""
        if self.cut is None:
            return self.pieces
        return [p for p in self.pieces if p.start < self.cut or (p.start == self.cut and not p.text)]

    def _release(self, final: bool) -> Release:
        end = len(self.text) - (0 if final else self._held()) if self.cut is None else self.cut
        end = max(end, self.released)
        text, self.released = self.text[self.released : end], end
        kept = self._kept()
        tokens = []
        while self.given < len(kept):
            piece = kept[self.given]
            last = self.given == len(self.pieces) - 1
            waiting = piece.start + len(piece.text) > end or (last and self.stream.holding)
            if waiting and not final and self.cut is None:
                break  # its text is not all out yet, or the last token may still gain what the stream holds
            tokens.append(piece.token(self.cut))
            self.given += 1
        return Release(text, tokens)


async def follow(
    decoding: Decoding, items: AsyncIterable[Generated | GenerationResult], cancel: Callable[[], object]
) -> AsyncIterator[Release | Outcome]:
    """Push an engine's stream into ``decoding``: what each step makes certain, then the outcome. Once a stop string
    has ended the text, ``cancel`` stops the generation and the outcome comes from the tokens pushed."""
    async for item in items:
        if isinstance(item, GenerationResult):
            yield decoding.finish(item)
            return
        yield decoding.push(item.token_ids, item.logprobs)
        if decoding.stopped:
            cancel()
            yield decoding.finish(None)
            return
    raise RuntimeError("the engine's stream ended without a result")
