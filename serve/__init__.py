"""Kosmos-2 serving: the engine and its helpers (no Ray, no HTTP) and the Ray Serve application on top.

Data flow: ``images`` and ``tasks``/``text`` prepare a request on CPU replicas; ``engine`` (or ``fastpath``)
generates on GPU replicas, in a process of their own (``engine_process``, around ``engine_loop``); ``text`` and
``grounding`` turn the tokens into an answer with boxes; ``app`` binds the deployments from one ``config``;
``protocol`` and ``errors`` define the wire format.
"""
