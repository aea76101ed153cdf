"""Brain mask from the mean b0 image (DIPY ``median_otsu``)."""
from __future__ import annotations

import numpy as np

from ..errors import DataError

__all__ = ["mean_b0", "brain_mask"]


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


def brain_mask(data, bvals, b0_threshold=50, median_radius=2, numpass=2, *, finalize_mask=False):
    """Brain mask by DIPY ``median_otsu`` on the mean b0.

    ``median_otsu(mean_b0, median_radius=median_radius, numpass=numpass,
    finalize_mask=finalize_mask)`` (no autocrop, no dilation): ``numpass``
    median filters of radius ``median_radius``, then an Otsu threshold;
    ``finalize_mask=True`` also removes islands and fills holes (DIPY's
    ``remove_holes_and_islands``).

    Returns
    -------
    mask : bool ndarray (X, Y, Z)
    mean_b0 : float32 ndarray (X, Y, Z)
    """
    from dipy.segment.mask import median_otsu

    b0 = mean_b0(data, bvals, b0_threshold)
    _, mask = median_otsu(b0, median_radius=median_radius, numpass=numpass,
                          finalize_mask=finalize_mask)
    return np.asarray(mask, dtype=bool), b0
