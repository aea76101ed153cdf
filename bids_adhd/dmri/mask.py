"""Brain mask from the mean b0 image (DIPY ``median_otsu``'s algorithm)."""
from __future__ import annotations

import numpy as np

from ..errors import DataError
from ._parallel import resolve_nprocs, thread_map

__all__ = ["mean_b0", "brain_mask", "multi_median"]


def mean_b0(data, bvals, b0_threshold=50):
    """Mean of the volumes with ``b <= b0_threshold`` (float32, 3-D).

    Raises :class:`~bids_adhd.errors.DataError` when the series has no b0 volume.
    """
    arr = np.asarray(data)
    bvals = np.asarray(bvals, dtype=float).ravel()
    if arr.ndim != 4 or arr.shape[3] != bvals.size:
        raise DataError(f"data of shape {arr.shape} does not match {bvals.size} b-values")
    b0 = bvals <= b0_threshold
    if not b0.any():
        raise DataError(f"no b0 volume (b <= {b0_threshold:g}) in the series; "
                        "a mean b0 is needed for the mask and motion correction")
    return arr[..., b0].mean(axis=3, dtype=np.float64).astype(np.float32)


def multi_median(vol, median_radius, numpass, nprocs=1):
    """DIPY's ``multi_median`` (``numpass`` cubic median filters of width ``2 r + 1``, scipy's
    ``median_filter``, mode "reflect"), with each pass split into z slabs filtered on ``nprocs``
    threads (``median_filter`` releases the GIL).

    A slab is filtered with ``r`` planes of its neighbours on each side, so every output voxel sees
    the same window as in the whole-volume filter and the volume's own faces are reflected as
    there: the result is identical to DIPY's (tests/test_dmri_dti.py). Re-implemented (one loop)
    because DIPY's version runs on one core and ``dipy.segment.mask`` imports ``dipy.reconst.dti``
    (0.8 s).
    """
    from scipy.ndimage import median_filter

    data = np.asarray(vol)                 # only read: every pass writes a new array
    r, Z = int(median_radius), data.shape[2]
    n = max(1, min(resolve_nprocs(nprocs), Z // max(4 * r, 1)))
    edges = np.linspace(0, Z, n + 1).astype(int)
    for _ in range(numpass):
        def part(k, src=data):
            lo, hi = max(edges[k] - r, 0), min(edges[k + 1] + r, Z)
            out = median_filter(src[:, :, lo:hi], size=2 * r + 1)
            return out[:, :, edges[k] - lo:edges[k + 1] - lo]
        data = np.concatenate(thread_map(part, range(n), n), axis=2)
    return data


def brain_mask(data, bvals, b0_threshold=50, median_radius=2, numpass=2, *, finalize_mask=False, nprocs=1):
    """Brain mask by DIPY ``median_otsu``'s algorithm on the mean b0.

    Equal to ``median_otsu(mean_b0, median_radius=median_radius, numpass=numpass,
    finalize_mask=finalize_mask)[1]`` (no autocrop, no dilation): ``numpass``
    median filters of radius ``median_radius`` (:func:`multi_median`, on
    ``nprocs`` threads), then DIPY's Otsu threshold (``dipy.segment.threshold.otsu``);
    ``finalize_mask=True`` also removes islands and fills holes (DIPY's
    ``remove_holes_and_islands``).

    Returns
    -------
    mask : bool ndarray (X, Y, Z)
    mean_b0 : float32 ndarray (X, Y, Z)
    """
    from dipy.segment.threshold import otsu

    b0 = mean_b0(data, bvals, b0_threshold)
    filtered = multi_median(b0, median_radius, numpass, nprocs)
    mask = filtered > otsu(filtered)
    if finalize_mask:
        from dipy.segment.mask import remove_holes_and_islands

        mask = remove_holes_and_islands(mask)
    return np.asarray(mask, dtype=bool), b0
