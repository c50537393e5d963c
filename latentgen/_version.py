"""The version, apart from the package root (whose first use of the pipeline loads torch)."""

__version__ = "0.1.0"
