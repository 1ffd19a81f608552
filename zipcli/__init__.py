"""zipit: merge models trained on different tasks into one multi-head model, without training."""

__version__ = "0.1.0"

from .errors import ZipitError  # noqa: E402
from .merged import load_merged  # noqa: E402
from .pipeline import MergeOptions, MergeResult, merge  # noqa: E402
from .report import Reporter, SilentReporter  # noqa: E402
from .specs import load_spec  # noqa: E402

__all__ = ["__version__", "load_merged", "load_spec", "merge", "MergeOptions", "MergeResult", "Reporter",
           "SilentReporter", "ZipitError"]
