"""The service's configs and the bench's price table, YAML files shipped with the project: this folder in a
checkout, the package ``serve.configs`` once installed (``pyproject.toml`` maps one to the other), found by
``serve.app.shipped.config_path``."""
