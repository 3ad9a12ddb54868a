"""The Ray Serve application: one typed ``config``, the wire ``protocol``, the three deployments (``ingress``,
``preprocessor``, ``generator``) and the ``messages`` between them, the ``builder`` that binds them, ``launch``
to start and stop them on a machine, ``metrics``, ``remote_images``, and an async ``client`` and ``demo``.
Serve config files name ``serve.app.builder:build_app``."""
