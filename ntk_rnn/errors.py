"""One exception type for bad input; the CLI prints its message as a single line and exits 2."""


class ConfigError(ValueError):
    """Invalid configuration or input; the message names the field and the allowed range."""


class TrainingDiverged(RuntimeError):
    """The loss became NaN/Inf or exceeded the divergence bound; the last good state was saved."""


def renamed_value(value: object, renamed: dict, key: str, warn: bool = True) -> object:
    """``value``, or its new spelling when ``renamed`` ({old: new}) lists it as deprecated, with
    one FutureWarning naming ``key`` (``warn=False``: silently, e.g. a saved run's config)."""
    if not isinstance(value, str) or value not in renamed:
        return value
    new = renamed[value]
    if warn:
        import warnings

        warnings.warn(f"{key}={value} is deprecated (renamed); use {key}={new}", FutureWarning,
                      stacklevel=3)
    return new
