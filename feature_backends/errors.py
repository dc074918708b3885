"""The exception hierarchy shared by every stage.

Each error says what went wrong and how to fix it; the CLI maps `exit_code` to the process exit status, so
bad input (a missing folder, an unknown image in a pairs file, a missing weight file) ends with status 2 as
COLMAP-style tools do, and any other failure with 1.
"""


class ReconError(Exception):
    exit_code = 1


class InputError(ReconError):
    """The user's input (folder, image, pairs file, model) cannot be used as given."""

    exit_code = 2


class ImageReadError(InputError):
    """One image cannot be decoded; stages report it by name and skip it."""


class WeightsError(ReconError):
    """A weight file is missing, unreadable, unsafe or fails its checksum."""

    exit_code = 2


class ConfigError(ReconError, ValueError):
    """An unknown backend name, an unknown configuration key or an invalid value."""

    exit_code = 2


class OutputError(ReconError):
    """The output cannot be written: a path that is a file, a read-only folder, a full disk."""

    exit_code = 2
