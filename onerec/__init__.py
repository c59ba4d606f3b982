"""onerec: the library behind onerec-platform. Importing it has no side effects."""

__version__ = "0.1.0"
