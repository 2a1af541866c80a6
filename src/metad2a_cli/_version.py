"""The package version, in a module of its own so every stage can read it without
importing the package's public API (which imports the stages)."""

__version__ = "0.1.0"
