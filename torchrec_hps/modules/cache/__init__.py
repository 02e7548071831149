"""The module's embedding cache: interface and the fbgemm-TBE implementation (host or GPU)."""
from torchrec_hps.modules.cache.interface import EmbeddingCacheGroup
from torchrec_hps.modules.cache.tbe_cache import ABSENT_SLOT, MISS_SLOT, AsyncInserter, InvalidIdsError, TBECacheGroup

__all__ = ["ABSENT_SLOT", "MISS_SLOT", "AsyncInserter", "EmbeddingCacheGroup", "InvalidIdsError", "TBECacheGroup"]
