"""The one exception type the CLI turns into a one-line message (no traceback)."""


class EtbenchError(Exception):
    """Bad input or a missing resource: the message is meant for the user, as is."""


def one_line(err: BaseException) -> str:
    """``Type: first line`` of an exception raised by a library, for a one-line error message."""
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0]}" if text else type(err).__name__
