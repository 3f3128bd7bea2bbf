"""Errors meant for people.

A `KilnError` is a user mistake (bad config, missing file, corrupt input): the CLI prints
its message as one line and exits non-zero, without a traceback. Anything else is a bug
and keeps its traceback.
"""


class KilnError(Exception):
    """A problem the user can fix; the message says what is wrong and how to fix it."""


class ConfigError(KilnError):
    """An invalid configuration key or value."""


class DataError(KilnError):
    """Unusable input data: missing paths, empty corpora, corrupt shards."""


class CheckpointError(KilnError):
    """No usable checkpoint, or a checkpoint that does not match the run."""


class NotApplicable(DataError):
    """The data has no part this step needs (text windows of an image-text run): an evaluation
    suite that meets it is skipped, with this message as the reason."""
