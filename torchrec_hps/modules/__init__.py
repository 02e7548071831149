"""The nn.Module side: HPSEmbeddingBagCollection and its cache."""
from torchrec_hps.modules.hps_ebc import HPSEmbeddingBagCollection

__all__ = ["HPSEmbeddingBagCollection"]
