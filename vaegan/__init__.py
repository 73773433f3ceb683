"""The ``vaegan`` command line: one entry point dispatching to trainer, export and service."""

__version__ = "0.1.0"
