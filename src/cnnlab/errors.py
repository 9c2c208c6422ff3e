"""Errors that reach a user as one clear line (the CLI prints them and exits with 2)."""


class CnnlabError(Exception):
    """Bad input from the user: a file, a name or a setting, explained in one line."""


class InputSizeError(CnnlabError, ValueError):
    """An input tensor smaller than (or different from) what the model accepts."""
