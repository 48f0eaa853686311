"""Errors a user can cause. The CLI prints them as one line, with no traceback."""


class MoepagerError(Exception):
    """Bad input from the user: a path, a file, a model, an option. The message says what to do."""


class UnsupportedArchitecture(MoepagerError):
    pass


class CorruptFile(MoepagerError):
    pass
