"""Errors in what a user configured (an option's value, a run folder): the ``mdeq`` command prints
them as one line naming the option and exits with status 2, instead of a traceback."""

from __future__ import annotations


class ConfigError(ValueError):
    """An option or a combination of options that cannot work; the message names the option."""
