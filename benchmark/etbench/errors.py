"""The one exception type the CLI turns into a one-line message (no traceback)."""


class EtbenchError(Exception):
    """Bad input or a missing resource: the message is meant for the user, as is."""
