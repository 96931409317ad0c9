"""User-facing errors: each carries one line that the CLI prints instead of a traceback."""


class ModelTraceError(Exception):
    """A problem with the user's input or environment, explained in one line."""

    exit_code = 2


class InputError(ModelTraceError):
    """The checkpoint, file or argument the user gave cannot be read as asked."""


class RemoteError(ModelTraceError):
    """A remote source is unreachable, missing or misbehaving."""


class RefusedError(ModelTraceError):
    """modeltrace refuses to open this input for safety (e.g. a pickle) unless explicitly allowed."""
