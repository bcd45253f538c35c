"""The data order: which samples each rank takes at each optimizer step, a pure function of (seed, step)."""
from __future__ import annotations

import numpy as np

from ldm_deploy.errors import LdmError
from training.distributed import DistEnv


class BatchOrder:
    """Epoch-wise permutations of range(n) (ResumableSampler's), cut into global batches, sharded over ranks.

    Optimizer step s consumes global positions [s*B, (s+1)*B) of the concatenated permutations;
    each global batch splits into world*accum micro-batches and rank r takes micro-batches
    r, r+world, ... (a DistributedSampler-equivalent split). Resuming needs only the step.
    """

    def __init__(self, n: int, global_batch: int, seed: int, env: DistEnv, accum: int = 1):
        if global_batch % (env.world * accum):
            raise LdmError(f"batch_size {global_batch} is not divisible by world size {env.world} x grad_accum {accum}",
                           hint="choose a batch size that splits evenly")
        if n <= 0:
            raise LdmError("the training set is empty", hint="check the dataset path / train_size")
        self.n, self.global_batch, self.seed, self.env, self.accum = n, global_batch, seed, env, accum
        self.micro = global_batch // (env.world * accum)
        from training.data.loader import ResumableSampler

        self.sampler = ResumableSampler(n, seed=seed)      # the shared per-epoch permutation
        self._perm: tuple[int, np.ndarray] | None = None

    def _permutation(self, epoch: int) -> np.ndarray:
        if self._perm is None or self._perm[0] != epoch:
            self._perm = (epoch, self.sampler.permutation(epoch))
        return self._perm[1]

    def indices(self, step: int, micro: int) -> list[int]:
        start = step * self.global_batch + (micro * self.env.world + self.env.rank) * self.micro
        out = []
        for pos in range(start, start + self.micro):
            out.append(int(self._permutation(pos // self.n)[pos % self.n]))
        return out

    def samples_seen(self, step: int) -> int:
        return step * self.global_batch

    def position(self, step: int) -> dict:
        """The ResumableSampler state (epoch, position in epoch) after `step` optimizer steps."""
        self.sampler.resume(*divmod(self.samples_seen(step), self.n))
        return self.sampler.state_dict()
