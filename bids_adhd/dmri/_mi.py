"""DIPY's mutual-information metric with seeded sparse sampling (template and motion registration)."""
from __future__ import annotations

import numpy as np


def seeded_mi_metric(seed: int, nbins: int = 32, sampling_proportion: float | None = None,
                     sample_mask=None):
    """DIPY's ``MutualInformationMetric`` whose sparse sample points are drawn from ``seed``.

    DIPY jitters its regular grid of sample points with NumPy's global generator; this
    subclass redraws them from ``numpy.random.default_rng(seed)``, so the same seed gives
    the same result in any process, whatever else used the global generator, and the
    caller's global random state is left alone. ``sampling_proportion=None``: dense
    (exactly DIPY's metric).

    ``sample_mask``: ``(mask, grid2world)``, a boolean array and its voxel-to-world matrix (any
    grid, e.g. the full-resolution static image's): sparse sample points whose nearest mask
    voxel is False (or outside the mask) are dropped, at every resolution level. DIPY ignores
    masks with sparse sampling ("Masking is not implemented for sampling_proportion < 1"),
    hence this: points in the empty background carry no gradient and cost as much as others.
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
            if sample_mask is not None:
                samples = samples[_inside(samples, *sample_mask)]
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


def _inside(points, mask, grid2world):
    """(P,) bool: the world ``points`` (P, 3) whose nearest voxel of ``mask`` is True."""
    mask = np.asarray(mask, bool)
    inv = np.linalg.inv(np.asarray(grid2world, float))
    ijk = np.rint(points @ inv[:3, :3].T + inv[:3, 3]).astype(np.int64)
    ok = np.all((ijk >= 0) & (ijk < np.array(mask.shape)), axis=1)
    out = np.zeros(len(points), bool)
    out[ok] = mask[tuple(ijk[ok].T)]
    return out
