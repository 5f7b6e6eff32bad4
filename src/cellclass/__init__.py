"""cellclass: supervised classification of fluorescence microscopy cell images."""

__version__ = "0.1.0"
