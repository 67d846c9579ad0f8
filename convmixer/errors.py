"""The errors a user can cause. Each message is one line that names the problem and the fix;
the ``convmixer`` command prints any ``ConvMixerError`` that way (exit code 2) and lets every other
exception show as the bug it is."""


class ConvMixerError(Exception):
    """A problem the user can fix (a setting, a file, a run folder)."""


class ConfigError(ConvMixerError, ValueError):
    """A configuration the run cannot start with; the message names the key and the fix."""


class ModelError(ConvMixerError, ValueError):
    """A model that cannot be built or fed: an unknown name, impossible sizes, a wrong input."""


class DataError(ConvMixerError, RuntimeError):
    """A data set that cannot be read: missing, corrupt or in an unexpected format."""


class WeightsError(ConvMixerError, RuntimeError):
    """A weights file that cannot be used: missing, corrupt, unsafe or for another model."""


class TrainingError(ConvMixerError, RuntimeError):
    """The run cannot go on (non-finite loss, a run folder in use, a checkpoint of another run, ...)."""
