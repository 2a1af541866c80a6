"""Errors that are the user's to fix: the CLI prints them as one line and exits 2."""


class UserError(Exception):
    """A mistake in what the user asked for (bad input, bad path), not a bug."""

    exit_code = 2
