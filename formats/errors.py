"""The one exception type the whole tool raises for bad input."""


class ConvertError(Exception):
    """A one-line, user-facing error that names the file (and tensor) at fault.

    The CLI prints ``str(err)`` and exits with status 2; nothing else catches it,
    so every message must stand on its own.
    """


class TransientError(ConvertError):
    """A failure that says nothing about the inputs (the network went away): work already finished is kept
    for ``--resume`` rather than removed as it is for bad input."""
