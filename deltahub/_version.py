"""The package version, in one place: the build reads it (pyproject ``dynamic``), and modules import it from
here rather than from ``deltahub/__init__.py``, so no layer below the top imports the package facade."""

__version__ = "0.1.0"
