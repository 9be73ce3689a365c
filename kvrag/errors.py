"""Typed errors a user can cause and fix. Each message says what to do next.

The HTTP layer maps these to 4xx/503 responses; the CLI prints the message and exits non-zero.
"""


class KvragError(Exception):
    """Base class for errors caused by input, configuration or the environment, not by a bug."""


class InvalidInputError(KvragError, ValueError):
    """A request or document is malformed: empty text, text too long, a bad option value."""


class ModelNotFoundError(KvragError):
    """A model spec names nothing that can be loaded on this machine."""


class CollectionNotFoundError(KvragError):
    """The named collection does not exist in the data directory."""


class DimensionMismatchError(KvragError, ValueError):
    """Vectors or an encoder do not have the dimension an index was built with."""


class CorruptIndexError(KvragError):
    """An index file, manifest or store on disk cannot be read back."""
