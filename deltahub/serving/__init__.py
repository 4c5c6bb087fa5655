"""Serving: the ExpertPool (hot-swap and mixed-expert batches on one model). See :mod:`deltahub.serving.pool`."""

from deltahub.serving.pool import ExpertPool

__all__ = ["ExpertPool"]
