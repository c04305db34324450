"""Errors that carry a message meant for the user; the CLI prints them on one line and exits non-zero."""


class EdgeAsrError(Exception):
    exit_code = 1


class AudioError(EdgeAsrError):
    """Audio that cannot be read: missing, empty, corrupt or in an unsupported format."""

    exit_code = 2


class BundleError(EdgeAsrError):
    """A model bundle that is missing, incomplete, tampered with or of an unknown format: bad input, like a
    corrupt audio file."""

    exit_code = 2


class InputError(EdgeAsrError):
    """Text a user gave (hotwords, a prompt, a grammar, a configuration) that is unreadable or past a limit."""

    exit_code = 2
