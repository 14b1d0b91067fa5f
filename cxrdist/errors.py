"""Errors that are the user's to fix: the CLI prints them as one clear line (exit 2), no traceback."""


class UserError(Exception):
    """Bad input or incompatible options; the message names the file, row, shard or flag."""
