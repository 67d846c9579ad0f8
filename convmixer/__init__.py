"""ConvMixer ("Patches Are All You Need?"): models, training, evaluation and tools."""
from .fastops import flush_denormals, tune_allocator

tune_allocator()  # see fastops: halves eager CPU step time; CONVMIXER_NO_MALLOPT=1 turns it off
flush_denormals()  # see fastops: keeps a trained model as fast as a fresh one; CONVMIXER_NO_FTZ=1 turns it off

from .model import ConvMixer, VARIANTS, count_parameters, create_model, flops_per_image, list_models  # noqa: E402
from .weights import WeightsError, load_weights, save_weights  # noqa: E402

__version__ = "0.1.0"
__all__ = ["ConvMixer", "VARIANTS", "create_model", "list_models", "count_parameters", "flops_per_image",
           "save_weights", "load_weights", "WeightsError", "__version__"]
