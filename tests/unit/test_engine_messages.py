"""Messages between a Generator replica and its engine process: pickled, with arrays beside them as raw buffers."""

from __future__ import annotations

import socket
import threading
from multiprocessing.connection import Connection

import numpy as np

from serve.engine.process import receive, send
from serve.engine.requests import GenerationRequest, SamplingParams


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
    message = [("submit", ticket, request, False) for ticket, request in enumerate(requests)]
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
    assert [(kind, ticket, streaming) for kind, ticket, _, streaming in got] == [("submit", t, False) for t in range(3)]
    for (_, _, request, _), sent in zip(got, requests):
        assert np.array_equal(request.pixels, sent.pixels) and np.array_equal(request.prompt_ids, sent.prompt_ids)
        assert request.params == sent.params and not request.pixels.flags.writeable
    sender.close()
    receiver.close()
