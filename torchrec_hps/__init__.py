"""torchrec-hps: a hierarchical parameter server for TorchRec inference."""
from torchrec_hps._env import EnvironmentCheckError, check_environment, load_fbgemm

load_fbgemm()

from torchrec_hps.modules import ops as _ops  # noqa: E402,F401  (registers torchrec_hps::pooled_lookup)

__version__ = "0.1.0"
__all__ = ["EnvironmentCheckError", "check_environment", "__version__"]
