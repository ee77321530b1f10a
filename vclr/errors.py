"""Every error vclr raises on purpose: `VclrError` and its kinds, in one module that imports nothing.

A `VclrError` is the user's to fix: the CLI prints its message on one line (exit status 2) and the service answers it
as a 4xx JSON error. Library errors name arguments and files ("no model source: give a run or a model"); only
`vclr.cli` translates them into flags. Anything else that escapes is a bug and keeps its traceback.
"""


class VclrError(Exception):
    """A user-facing error: the CLI prints its message on one line, without a traceback."""


class ConfigError(VclrError):
    """An unknown config key, a wrong type or an out-of-range value (vclr.config)."""


class DataError(VclrError):
    """A dataset that cannot be read: a missing table, column or image folder (vclr.data)."""


class PrepareError(VclrError):
    """A dataset converter's input is missing or malformed (vclr.data.prepare)."""


class ModelSourceError(VclrError):
    """A missing or wrong model source (vclr.model.source)."""


class ConversionError(VclrError):
    """A weight file that cannot be converted into an image tower (vclr.model.convert)."""


class ResourceError(VclrError):
    """The requested work does not fit this machine (memory, disk)."""


class DiskFullError(ResourceError, OSError):
    """A save stopped by a full disk (errno ENOSPC); the message says how much space it needs (vclr.storage)."""

    def __init__(self, message: str):
        OSError.__init__(self, 28, message)  # ENOSPC

    def __str__(self) -> str:
        return self.args[1]


class ExportDisagrees(VclrError):
    """An ONNX export whose towers embed too far from the PyTorch model's; `cosine`: the smallest on its probes
    (vclr.export.onnx). A model that quantises badly raises it for its int8 export."""

    def __init__(self, cosine: float, message: str):
        super().__init__(message)
        self.cosine = cosine


class IndexDirError(VclrError):
    """A missing, foreign, corrupt or inconsistent index directory, or a query that does not fit the index."""


class Overloaded(VclrError):
    """More queries are waiting than the service takes: try again shortly (503)."""


class TimedOut(VclrError):
    """A query waited longer than the service's timeout (503)."""
