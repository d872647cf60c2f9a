"""niconv: parallel, resumable batch conversion of medical-imaging cohorts.

The seed functions convert one file with no runner at all; the runner converts
a whole cohort from one YAML config (``niconv run CONFIG``).
"""
__version__ = "0.1.0"

from .errors import (ClusterError, ConfigError, DatasetError, InputError, LockError, NiconvError, OutputError,
                     ScanError, SkippedInput, UnsupportedInput)

__all__ = [
    # seed API: one file, no runner
    "nifti_to_numpy", "numpy_to_nifti",
    # errors
    "NiconvError", "ConfigError", "ScanError", "InputError", "UnsupportedInput", "SkippedInput",
    "OutputError", "LockError", "ClusterError", "DatasetError",
]


def __getattr__(name: str):
    # the seed functions load numpy and nibabel when first asked for: a helper process
    # that imports one small module of the package (the resource tracker) stays light
    if name == "nifti_to_numpy":
        from .converters.to_numpy import nifti_to_numpy
        return nifti_to_numpy
    if name == "numpy_to_nifti":
        from .converters.to_nifti import numpy_to_nifti
        return numpy_to_nifti
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
