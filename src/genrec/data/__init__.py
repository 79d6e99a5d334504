"""Readers for the published dataset formats, preprocessing to per-user sequences, splits and jagged batches."""

from genrec.data.errors import DataError

__all__ = ["DataError"]
