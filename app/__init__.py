"""imgrec: a REST image-recognition service for the patent's residual network."""

__version__ = "0.1.0"
