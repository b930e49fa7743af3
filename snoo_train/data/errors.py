"""The one error type for bad data input (paths, fields, splits, sizes).

A ValueError, so callers that catch ValueError keep working; the training entry point turns
it into one clear line instead of a traceback."""


class DataError(ValueError):
    """Bad data input; the message names the config key (data.*, trainer.batch_size, ...)."""
