"""The package's version, at the bottom so that every layer may write it into files and pages."""

__version__ = "0.1.0"
