"""DIPY's mutual-information metric with seeded sparse sampling (template and motion registration)."""
from __future__ import annotations

import numpy as np


def seeded_mi_metric(seed: int, nbins: int = 32, sampling_proportion: float | None = None):
    """DIPY's ``MutualInformationMetric`` whose sparse sample points are drawn from ``seed``.

    DIPY jitters its regular grid of sample points with NumPy's global generator; this
    subclass redraws them from ``numpy.random.default_rng(seed)``, so the same seed gives
    the same result in any process, whatever else used the global generator, and the
    caller's global random state is left alone. ``sampling_proportion=None``: dense
    (exactly DIPY's metric).
    """
    from dipy.align.imaffine import MutualInformationMetric
    from dipy.align.parzenhist import sample_domain_regular

    class _SeededMI(MutualInformationMetric):
        def setup(self, transform, static, moving, static_grid2world=None, moving_grid2world=None,
                  starting_affine=None, static_mask=None, moving_mask=None):
            super().setup(transform, static, moving, static_grid2world=static_grid2world,
                          moving_grid2world=moving_grid2world, starting_affine=starting_affine,
                          static_mask=static_mask, moving_mask=moving_mask)
            if self.sampling_proportion is None:
                return
            k = int(np.ceil(1.0 / self.sampling_proportion))
            shape = np.array(self.static.shape, dtype=np.int32)
            rng = np.random.default_rng(seed)
            samples = np.asarray(sample_domain_regular(k, shape, self.static_grid2world, rng=rng))
            self.ns = samples.shape[0]
            self.samples = np.hstack((samples, np.ones((self.ns, 1))))
            if self.starting_affine is None:
                self.samples_prealigned = self.samples
            else:
                self.samples_prealigned = self.starting_affine.dot(self.samples.T).T
            static_p = self.static_world2grid.dot(self.samples.T).T[..., :self.dim]
            vals, _ = self.interp_method(self.static, static_p)
            self.static_vals = np.array(vals, dtype=np.float64)

    return _SeededMI(nbins=nbins, sampling_proportion=sampling_proportion)
