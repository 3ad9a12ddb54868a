"""Messages between a Generator replica and its engine process: typed records, pickled, with arrays beside them as
raw buffers."""

from __future__ import annotations

import socket
import threading
from multiprocessing.connection import Connection

import numpy as np

from serve.engine.config import EngineConfig, ModelConfig
from serve.engine.messages import EngineStats, Events, Failed, Finished, StartEngine, Submit, Tokens, receive, send
from serve.engine.requests import GenerationRequest, GenerationResult, SamplingParams, TokenLogprobs
from serve.errors import InvalidRequest


def test_arrays_travel_beside_the_pickle():
    ours, theirs = socket.socketpair()
    sender, receiver = Connection(ours.detach()), Connection(theirs.detach())
    rng = np.random.default_rng(0)
    requests = [
        GenerationRequest(
            rng.integers(0, 256, (224, 224, 3), dtype=np.uint8), np.arange(70, dtype=np.int32), SamplingParams(9)
        )
        for _ in range(3)
    ]
    message = [Submit(ticket, request, False) for ticket, request in enumerate(requests)]
    # A socket pair holds less than three images: send while the other side reads, as the two processes do.
    writer = threading.Thread(target=send, args=(sender, message))
    writer.start()
    head = receiver.recv_bytes()  # the pickle, with the small prompt ids but not the pixels
    assert len(head) < 3 * 280 + 2_000
    buffers = [receiver.recv_bytes() for _ in range(int.from_bytes(head[:4], "big"))]
    assert [len(b) for b in buffers] == [224 * 224 * 3] * 3
    writer.join()

    writer = threading.Thread(target=send, args=(sender, message))
    writer.start()
    got = receive(receiver)
    writer.join()
    assert [(type(m), m.ticket, m.streaming) for m in got] == [(Submit, t, False) for t in range(3)]
    for request, sent in zip((m.request for m in got), requests):
        assert np.array_equal(request.pixels, sent.pixels) and np.array_equal(request.prompt_ids, sent.prompt_ids)
        assert request.params == sent.params and not request.pixels.flags.writeable
    sender.close()
    receiver.close()


def roundtrip(message):
    ours, theirs = socket.socketpair()
    sender, receiver = Connection(ours.detach()), Connection(theirs.detach())
    try:
        send(sender, message)
        return receive(receiver)
    finally:
        sender.close()
        receiver.close()


def test_every_message_is_a_record_that_survives_the_trip():
    start = StartEngine(ModelConfig(source="tiny", device="cpu"), EngineConfig(max_batch_size=4))
    assert roundtrip(start) == start
    stats = EngineStats(waiting=2, running=3, steps=7, busy_s=0.5)
    events = Events(
        [
            Tokens(1, [5, 6]),
            Tokens(3, [7], TokenLogprobs([-0.25], [[7, 9]], [[-0.25, -1.5]])),
            Finished(1, GenerationResult([5, 6], "stop", 70, 3)),
            Finished(3, GenerationResult([7], "length", 70, 1, TokenLogprobs([-0.25], [[7, 9]], [[-0.25, -1.5]]))),
            Failed(2, InvalidRequest("too long", param="max_tokens")),
        ],
        stats,
    )
    got = roundtrip(events)
    assert got.stats == stats and [type(e) for e in got.events] == [Tokens, Tokens, Finished, Finished, Failed]
    assert got.events[:4] == events.events[:4]
    error = got.events[4].error
    assert isinstance(error, InvalidRequest) and (error.message, error.param) == ("too long", "max_tokens")
    assert [e.ends for e in got.events] == [False, False, True, True, True]
