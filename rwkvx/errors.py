"""The exceptions rwkvx raises for bad input.

Every problem caused by what the caller passed in (a file, a tokenizer, a token id, an
option) raises a subclass of :class:`RwkvxError`, which is itself a ``ValueError``, so
``except ValueError`` keeps working for callers that do not know about rwkvx. The message
is one line that names the problem; the CLI prints it as ``rwkvx: error: <message>``.
"""


class RwkvxError(ValueError):
    """Base class: bad input of any kind (options, token ids, shapes)."""


class CheckpointError(RwkvxError):
    """A model file is missing, unreadable, of an unknown format, truncated or inconsistent."""


class TokenizerError(RwkvxError):
    """A tokenizer file is missing or unreadable, or its vocabulary does not fit the model."""


class RwkvxWarning(UserWarning):
    """Something works but may not do what was meant (e.g. a state made by another checkpoint)."""
