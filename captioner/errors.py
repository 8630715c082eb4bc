"""User-facing errors: the CLI prints their message without a traceback."""


class CaptionerError(Exception):
    """An error whose message tells the user what went wrong and what to do."""


class WeightsError(CaptionerError):
    """Weights are missing, corrupt or do not fit the model."""


class CacheMismatchError(CaptionerError):
    """A feature cache was made with settings other than the ones asked for."""


class ImageError(CaptionerError):
    """An image cannot be read or converted."""
