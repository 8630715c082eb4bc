"""User-facing errors: the CLI prints their message without a traceback."""


class CaptionerError(Exception):
    """An error whose message tells the user what went wrong and what to do."""


class WeightsError(CaptionerError):
    """Weights are missing, corrupt or do not fit the model."""


class CacheMismatchError(CaptionerError):
    """A feature cache was made with settings other than the ones asked for."""


class ImageError(CaptionerError):
    """An image cannot be read or converted."""


class RequestError(CaptionerError):
    """A bad request to ``captioner serve``; ``status`` is the HTTP status it answers."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


class MachineFaultError(CaptionerError):
    """The machine refused a write: a full disk, a read-only file system, a permission, a
    path component that is a file, too many open files, a folder removed while running
    (see :mod:`captioner.faults`)."""
