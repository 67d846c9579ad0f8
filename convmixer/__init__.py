"""ConvMixer ("Patches Are All You Need?"): models, training, evaluation and tools.

Importing the package changes nothing in the process; ``convmixer.tune_cpu()`` opts in to the CPU
settings that the ``convmixer`` command applies to itself (see runtime.tune_cpu)."""
import importlib

from .errors import ConvMixerError, WeightsError
from .model import ConvMixer, VARIANTS, count_parameters, create_model, flops_per_image, list_models
from .run import RunInfo, load_model
from .runtime import tune_cpu
from .weights import load_weights, save_weights

__version__ = "0.1.0"
__all__ = ["ConvMixer", "VARIANTS", "create_model", "list_models", "count_parameters", "flops_per_image",
           "save_weights", "load_weights", "load_model", "RunInfo", "ConvMixerError", "WeightsError", "tune_cpu",
           "__version__"]
_SUBMODULES = ("config", "data", "train", "evaluate", "run", "runtime", "weights", "model", "errors", "fastops",
               "bench", "viz", "ablate", "export", "cli")


def __getattr__(name):  # convmixer.train, convmixer.config, ... after a bare `import convmixer`
    if name in _SUBMODULES:
        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module 'convmixer' has no attribute {name!r}")
