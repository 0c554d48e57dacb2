"""User-facing errors: the CLI prints their message as one line and exits with code 2."""


class FlowrailError(Exception):
    """Bad input from the user (a config value, a path, a shard, a checkpoint); the message names the thing."""


class DataError(FlowrailError):
    """A shard set, a shard or a sample is missing, corrupt or of the wrong shape."""


class CheckpointError(FlowrailError):
    """A checkpoint is missing, incomplete or incompatible with the model configuration."""
