"""Errors raised by the data package.

Every problem with user-supplied data raises :class:`DataError` (a ``ValueError``) with a one-line
message that names the file, column or row at fault, so a command-line front end can print it as is
instead of a traceback.
"""

from __future__ import annotations


class DataError(ValueError):
    """Bad or missing input data (file, column, label, text)."""


class UnknownLabelError(DataError):
    """A label that is not in the label list (e.g. a test label never seen in training)."""


class DataWarning(UserWarning):
    """Input that is used, but not as given (e.g. a text truncated to ``max_length`` tokens)."""
