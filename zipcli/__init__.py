"""zipit: merge models trained on different tasks into one multi-head model, without training.

The public names are loaded on first use, so that ``zipit --help`` and other commands that need
no model answer without importing torch.
"""

__version__ = "0.1.0"

_PUBLIC = {
    "ZipitError": "errors", "ZipitWarning": "errors", "load_merged": "merged", "MergeOptions": "pipeline", "MergeResult": "pipeline",
    "merge": "pipeline", "Reporter": "report", "SilentReporter": "report", "LoggingReporter": "report",
    "load_spec": "specs",
}
__all__ = ["__version__", *_PUBLIC]


def __getattr__(name: str):
    if name in _PUBLIC:
        from importlib import import_module

        return getattr(import_module(f".{_PUBLIC[name]}", __name__), name)
    raise AttributeError(f"module 'zipcli' has no attribute {name!r}")


def __dir__():
    return sorted(__all__)
