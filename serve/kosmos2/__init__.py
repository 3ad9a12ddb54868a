"""The Kosmos-2 domain, no Ray, no HTTP: the tasks' prompts (``tasks``), boxes as patch-index tokens and the
entities of an answer (``grounding``), prompt ids and answer text (``text``), image decoding and the processor's
exact resize (``images``, ``resample``), the one request pipeline (``pipeline``), and a tiny offline model for
tests and the demo (``tiny``)."""
