"""Errors a user can fix. The CLI turns each into one line on stderr and exit code 1."""


class GeosegError(Exception):
    """Base class: something the user can fix; the message says what is wrong and how to fix it."""


class InputError(GeosegError, ValueError):
    """A bad input file or option value (missing file, no CRS, wrong band count, ...)."""


class BundleError(GeosegError):
    """A model file that is not a valid geoseg bundle, or one this version cannot read."""


class OutputError(GeosegError):
    """An output that cannot be written (exists, folder missing or not writable, disk full)."""
