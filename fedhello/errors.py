"""User-facing errors: one line, exit status 2, no traceback."""


class UserError(Exception):
    """Bad input from the user (config, file, argument).

    The message is a single line that names the field or file and what is wrong;
    the CLI prints it and exits with status 2.
    """
