"""niconv: parallel, resumable batch conversion of medical-imaging cohorts."""
__version__ = "0.1.0"
