"""Exceptions that the command line turns into one-line messages with exit code 2 (bad usage or configuration)."""

__all__ = ["ConfigurationError"]


class ConfigurationError(Exception):
    """Bad usage or configuration: missing model, unreadable database URL, unreadable file list, ..."""
