"""Errors that are the user's to fix: the CLI prints them as one line and exits with status 2."""


class UserError(ValueError):
    """Bad input or configuration (wrong shape, out-of-range parameter, missing file)."""
