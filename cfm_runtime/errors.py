"""User-facing errors: the message says what is wrong and how to fix it."""


class CfmError(Exception):
    """An error caused by the user's input (a path, an option, a prompt, a file).

    The CLI prints these without a traceback and exits non-zero.
    """


class ModelFileError(CfmError):
    """A model file is missing, truncated, corrupt or of an unsupported architecture."""


class ContextOverflowError(CfmError):
    """The prompt does not fit in the model's context window."""


class BrickError(CfmError):
    """An adapter file or brick that cannot be used: corrupt, wrong shapes, or for another model."""
