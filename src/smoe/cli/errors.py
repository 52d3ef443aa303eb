"""The CLI's user-facing error type."""

from __future__ import annotations

__all__ = ["CLIError"]


class CLIError(Exception):
    """A user-facing error: printed as one line, exit status 2."""
