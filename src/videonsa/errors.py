"""Errors that mean "the user asked for something wrong", shown as one line by the CLI."""


class UserError(ValueError):
    """A mistake in the user's input or settings (a missing video, a budget too small, bad shapes).

    The CLI prints it as a single line on stderr and exits non-zero; library callers get a normal exception.
    """


def first_line(error: BaseException) -> str:
    """The first line of an exception's message (its type's name when the message is empty): what a one-line
    `UserError` quotes of a library's error, whose message may run to a traceback."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
