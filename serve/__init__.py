"""Kosmos-2 serving, in three layers, each importing only the ones below it:

- ``serve.engine``: generation. Pixels and prompt ids in, token ids out; the reference and the fast engine, the
  engine's own thread and process. No Ray, no HTTP, no tokenizer.
- ``serve.kosmos2``: the model's domain. Prompts, boxes and their tokens, text, images, and the pipeline from an
  image and a task to an engine request and from its tokens to the answer. No Ray, no HTTP.
- ``serve.app``: the Ray Serve application. Config, the OpenAI-compatible protocol, the three deployments
  (Ingress, Preprocessor, Generator), the builder and the launcher.

``serve.errors`` holds the exceptions every layer raises and their one mapping to the OpenAI error envelope.
``docs/architecture.md`` draws the picture and follows one request through it.
"""
