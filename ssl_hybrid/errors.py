"""Errors the user can fix. The CLI prints them as one line (no traceback) and exits with status 2."""


class UserError(Exception):
    """Bad input: a config value, a path, a corrupt corpus. The message names the file/key/sample."""


class ConfigError(UserError, ValueError):
    """A configuration problem; the message names the source (file or command line) and the key."""
