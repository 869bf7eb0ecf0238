"""The one error type of gm.data: a message for a person (what was wrong, where, and how to fix it)."""

from __future__ import annotations


class DataError(RuntimeError):
    pass
