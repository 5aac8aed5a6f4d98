"""Errors a user can cause. Each carries one clear message naming the problem and the fix.

The CLI catches `KvgraphError` and prints its message (no traceback); anything else is a bug.
"""


class KvgraphError(Exception):
    """Base class for every user-facing kvgraph error."""


class GGUFError(KvgraphError):
    """The model file is not a valid, supported GGUF file."""


class UnsupportedModelError(GGUFError):
    """The file is valid GGUF but describes something kvgraph cannot run."""


class ModelNotFoundError(KvgraphError):
    """A model name or path that does not exist."""


class DownloadError(KvgraphError):
    """Fetching a model from the package registry failed."""


class TokenizerError(KvgraphError):
    """Tokenizer metadata is missing or malformed, or a chat template failed."""


class ContextOverflowError(KvgraphError):
    """A prompt (plus requested tokens) does not fit the context window."""


class InvalidArgumentError(KvgraphError):
    """A parameter value a user passed is out of range or malformed."""


class GraphCacheVerifyError(KvgraphError):
    """Verify mode found that a rebuilt graph differs from the cached one (a kvgraph bug)."""
