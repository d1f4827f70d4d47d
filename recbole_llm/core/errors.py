"""Errors that mean "the user's input is wrong": the CLI prints them without a traceback."""


class UserInputError(Exception):
    """Base class: a message that names what is wrong and what was expected."""


class ConfigError(UserInputError, ValueError):
    """A config key is missing, unknown or out of range."""


class DataNotFoundError(UserInputError, FileNotFoundError):
    """A dataset, model or cache file the run needs is not where it was expected."""


class CorruptFileError(UserInputError, ValueError):
    """A cache or checkpoint file exists but cannot be read (changed or damaged outside the package: the
    package itself only ever renames complete files into place)."""
