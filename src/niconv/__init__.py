"""niconv: parallel, resumable batch conversion of medical-imaging cohorts.

The seed functions convert one file with no runner at all; the runner converts
a whole cohort from one YAML config (``niconv run CONFIG``).
"""
__version__ = "0.1.0"

from .converters.to_nifti import numpy_to_nifti
from .converters.to_numpy import nifti_to_numpy
from .errors import (ClusterError, ConfigError, InputError, LockError, NiconvError, OutputError, ScanError,
                     SkippedInput, UnsupportedInput)

__all__ = [
    # seed API: one file, no runner
    "nifti_to_numpy", "numpy_to_nifti",
    # errors
    "NiconvError", "ConfigError", "ScanError", "InputError", "UnsupportedInput", "SkippedInput",
    "OutputError", "LockError", "ClusterError",
]
