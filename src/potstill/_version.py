"""potstill's version, in a module of its own so that anything can read it without importing
the package's ``__init__`` (and everything it pulls in)."""

__version__ = "0.1.0"
