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
    (see :mod:`captioner.storage.faults`)."""


class OptionError(CaptionerError):
    """A bad value of one setting: ``field`` is its name (``batch_size``), ``text`` what is
    wrong. The message reads ``batch_size must be ...``; the CLI prints the field as its flag
    (``--batch-size must be ...``), so library code never names command-line flags."""

    def __init__(self, field: str, text: str):
        super().__init__(f"{field} {text}")
        self.field, self.text = field, text

    def flag_line(self) -> str:
        """The message with the field written as its command-line flag."""
        return f"--{self.field.replace('_', '-')} {self.text}"


class IncompleteError(OptionError):
    """``strict`` was asked for and some inputs failed: the CLI exits 1 (``--strict`` means
    the same in every command), not 2."""

    exit_status = 1

    def __init__(self, text: str):
        super().__init__("strict", text)
