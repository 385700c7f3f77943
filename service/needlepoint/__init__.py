"""Needlepoint: decision support for image-guided hip injections."""

__version__ = "0.1.0"
