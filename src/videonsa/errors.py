"""Errors that mean "the user asked for something wrong", shown as one line by the CLI."""


class UserError(ValueError):
    """A mistake in the user's input or settings (a missing video, a budget too small, bad shapes).

    The CLI prints it as a single line on stderr and exits non-zero; library callers get a normal exception.
    """
