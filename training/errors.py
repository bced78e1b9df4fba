"""Errors a user can fix. `training.cli.run_main` prints them as one line and exits with status 2.

ConfigError, CheckpointError and data.files.DataError derive from UserError; so may any new error whose message names the
culprit and says how to fix it.
"""


class UserError(Exception):
    """A mistake in the config, the data, a path or the environment; the message names it and says how to fix it."""
