"""Built-in codecs and adapter kinds. Each is registered through the same entry-point groups as a
third-party plugin (``pyproject.toml``); nothing here is imported by ``import deltahub``."""
