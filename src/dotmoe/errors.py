"""User-facing errors: the CLI prints these as one line and exits non-zero."""


class DotMoeError(Exception):
    """An error caused by bad input or environment, reported without a traceback."""
