"""One error type for everything a user can cause.

Each error carries a hint that says what would fix it, so the CLI can print one
clear line without a traceback.
"""


class ZipitError(Exception):
    """A problem with the user's input or environment (exit code 2)."""

    exit_code = 2

    def __init__(self, message: str, hint: str = ""):
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return f"{self.message} ({self.hint})" if self.hint else self.message


class SpecError(ZipitError):
    """An architecture spec is malformed or does not fit the model."""


class CheckpointError(ZipitError):
    """A checkpoint cannot be read or does not match the architecture."""


class CalibrationError(ZipitError):
    """The calibration images cannot be used."""


class MergeError(ZipitError):
    """Merging failed on valid-looking input (e.g. NaN activations)."""


class OutputError(ZipitError):
    """The output file cannot be written where asked."""


class MergedFileError(ZipitError):
    """A file is not a readable zipit merge."""


class ZipitWarning(UserWarning):
    """Something a Python caller should know (images skipped, class names missing, a fallback taken)."""


class ExportError(ZipitError):
    """A merged model cannot be exported, or the export does not reproduce it."""
