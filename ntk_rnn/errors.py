"""One exception type for bad input; the CLI prints its message as a single line and exits 2."""


class ConfigError(ValueError):
    """Invalid configuration or input; the message names the field and the allowed range."""


class TrainingDiverged(RuntimeError):
    """The loss became NaN/Inf or exceeded the divergence bound; the last good state was saved."""
