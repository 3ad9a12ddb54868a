"""Triton kernels of the fast engine, each with a reference in plain torch that runs elsewhere (the CPU): the
decode attention and the cache writes (``attention``), the feed-forward blocks' elementwise middles (``ffn``)."""
