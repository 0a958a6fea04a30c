"""acrn-pydm: the ACRN device model in Python."""

__version__ = "0.1.0"
