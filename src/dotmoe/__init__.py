"""dotmoe: convert a dense gated-FFN causal LM into a Mixture-of-Experts model (DOT-MoE)."""

from dotmoe.errors import DotMoeError
from dotmoe.paths import reference_data_file, reference_model_dir

__version__ = "0.1.0"
__all__ = ["DotMoeError", "reference_model_dir", "reference_data_file", "__version__"]
