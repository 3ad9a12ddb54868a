"""The fast engine: ``engine.FastEngine`` composes the ``scheduler``, the ``runner`` (forward passes over the KV
cache, with the ``layers`` as compiled functions), the ``graphs`` (CUDA graphs) and the ``transfer`` of inputs and
tokens between host and device."""
