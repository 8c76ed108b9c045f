"""One exception type for bad user input, so the CLI can print one line and exit non-zero."""


class UserError(Exception):
    """Bad input from the user (config, data, paths). The message is a single line naming the culprit."""
