"""Exceptions that the command line turns into one-line messages with exit code 2 (bad usage or configuration)."""

__all__ = ["ConfigurationError", "ModelFileError"]


class ConfigurationError(Exception):
    """Bad usage or configuration: missing model, unreadable database URL, unreadable file list, ..."""


class ModelFileError(ConfigurationError, ValueError):
    """A model file is missing, unreadable or not a Payne network. The message names the file and the problem."""
