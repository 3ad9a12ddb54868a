"""Generation: requests of pixels, prompt ids and sampling parameters in, token ids out; no Ray, no HTTP.

``requests`` and ``base`` define the interface every engine implements; ``reference`` (the Hugging Face modules)
and ``fast`` (continuous batching, CUDA graphs) implement it, and ``build`` picks one from ``config``. ``loop``
drives an engine on a thread for asyncio callers, ``process`` runs it in a child process, with ``messages`` the
records that cross to it.
"""
