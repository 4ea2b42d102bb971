"""The errors a user can fix from the message alone; the CLI prints each as one line and exits with status 2.

This module imports nothing, so that run.py can refuse a bad config before torch or transformers load
(seconds of imports). The modules that raise these errors re-export them (dataset.DataError, ...).
"""

from __future__ import annotations


class ConfigError(ValueError):
    """A configuration problem, reported with the file (or override) and key it concerns."""


class DataError(ValueError):
    """A problem with an input file, reported with its path, record index and key."""


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be written or read, named with its path."""


class ModelSetupError(ValueError):
    """A model, tokenizer or checkpoint that does not fit the run."""


USER_ERRORS = (ConfigError, DataError, CheckpointError, ModelSetupError)
