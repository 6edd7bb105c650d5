"""Errors that map to the CLI's exit codes: bad input is 2, a failed gate is 3."""
from __future__ import annotations


class FoldshipError(Exception):
    """Base class for errors foldship reports as one readable line."""

    exit_code = 1


class BadInput(FoldshipError):
    """The user's input cannot be used: the message says what is wrong and how to fix it."""

    exit_code = 2


class GateFailed(FoldshipError):
    """One or more validation gates failed; the report was still written."""

    exit_code = 3
