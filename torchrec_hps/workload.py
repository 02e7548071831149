"""Synthetic recsys keys: Zipf-distributed ranks scattered over the id space by a random permutation
(fbgemm's inference benchmarks use alpha 1.09; HugeCTR's profiler 1.2)."""
from __future__ import annotations

import numpy as np


class ZipfKeys:
    def __init__(self, num_rows: int, alpha: float = 1.09, seed: int = 0) -> None:
        self.rng = np.random.default_rng(seed)
        ranks = np.arange(1, num_rows + 1, dtype=np.float64)
        self.cdf = np.cumsum(ranks ** -alpha)
        self.cdf /= self.cdf[-1]
        self.perm = self.rng.permutation(num_rows)

    def sample(self, n: int) -> np.ndarray:
        """n int64 row ids; rank r (0 = hottest) is drawn with probability ~ (r + 1) ** -alpha."""
        ranks = np.searchsorted(self.cdf, self.rng.random(n), side="right")
        return self.perm[np.minimum(ranks, len(self.perm) - 1)].astype(np.int64)


def zipf_kjt(samplers, feature_names, batch: int, ids_per_bag: int = 1):
    """A KeyedJaggedTensor with `ids_per_bag` Zipf ids per bag for each feature (one sampler per feature)."""
    import torch
    from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

    values = np.concatenate([s.sample(batch * ids_per_bag) for s in samplers])
    lengths = np.full(len(feature_names) * batch, ids_per_bag, dtype=np.int64)
    return KeyedJaggedTensor.from_lengths_sync(keys=list(feature_names), values=torch.from_numpy(values),
                                               lengths=torch.from_numpy(lengths))
