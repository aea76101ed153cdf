"""Matplotlib figures for the per-subject QC report; each function returns PNG bytes.

Display conventions (all figures):

* Images are first reoriented to the closest canonical RAS+ orientation
  (``nibabel.as_closest_canonical`` logic: axis permutation and flips only, no
  resampling), so every subject is shown the same way whatever its stored
  orientation.
* Axial slices are drawn upright, anterior at the top, in **neurological
  convention**: the patient's left is on the left of the image (an "L" and an
  "R" mark every panel row). Coronal slices: superior at the top, left on the
  left. Sagittal slices: anterior on the right, superior at the top.
* Slices run inferior → superior, left → right, top row first; each panel
  carries its slice position in mm (world z for axial slices).

The Agg backend is used; nothing is shown on screen.
"""
from __future__ import annotations

import io

import numpy as np

from .common import png_bytes, pyplot

DPI = 100
PANEL_IN = 1.6          # inches per mosaic panel
BG = "black"


_mpl = pyplot


def _png(fig) -> bytes:
    return png_bytes(fig, dpi=DPI, facecolor=fig.get_facecolor())


# --- orientation ---------------------------------------------------------------

def to_canonical(data, affine, vector: bool = False):
    """Reorient ``data`` (3D, or 4D with components last) to the closest RAS+ axes.

    Returns ``(data, affine)``. With ``vector=True`` the last axis holds 3
    components expressed in the image's voxel axes; they are permuted to
    follow the axes (their signs are left alone, which is irrelevant for
    colour FA, where only |component| is shown).
    """
    from nibabel.orientations import apply_orientation, inv_ornt_aff, io_orientation

    data = np.asarray(data)
    affine = np.asarray(affine, float)
    ornt = io_orientation(affine)
    spatial = data.shape[:3]
    out = apply_orientation(data, ornt)
    new_affine = affine @ inv_ornt_aff(ornt, spatial)
    if vector:
        perm = np.empty(3, int)
        for old_axis, (new_axis, _) in enumerate(ornt.astype(int)):
            perm[new_axis] = old_axis
        out = out[..., perm]
    return np.ascontiguousarray(out), new_affine


def _slice_indices(mask, axis, n):
    """``n`` evenly spaced slice indices through the mask's extent along ``axis``."""
    other = tuple(a for a in range(3) if a != axis)
    present = np.flatnonzero(np.asarray(mask, bool).any(axis=other))
    if present.size == 0:
        present = np.arange(mask.shape[axis])
    lo, hi = present[0], present[-1]
    span = hi - lo
    # leave out the first and last 7 % (a sliver of brain says little)
    pos = np.linspace(lo + 0.07 * span, hi - 0.07 * span, n)
    return np.unique(np.round(pos).astype(int))


def _bbox2d(mask, axis, margin=3):
    """In-plane bounding box (slices) of the mask, for cropping the panels."""
    m = np.asarray(mask, bool).any(axis=axis)
    if not m.any():
        return slice(None), slice(None)
    rows = np.flatnonzero(m.any(axis=1))
    cols = np.flatnonzero(m.any(axis=0))
    return (slice(max(rows[0] - margin, 0), rows[-1] + margin + 1),
            slice(max(cols[0] - margin, 0), cols[-1] + margin + 1))


def _take(vol, axis, idx, box):
    """A 2D slice ready for ``imshow(origin='lower')``: rows = vertical axis."""
    sl = np.take(vol, idx, axis=axis)
    sl = sl[box[0], box[1]]
    # remaining axes (a, b) with a < b: a is horizontal (x for axial/coronal, y for sagittal),
    # b vertical → transpose so that rows run along b.
    return np.swapaxes(sl, 0, 1)


_AXIS_NAME = {0: "sagittal", 1: "coronal", 2: "axial"}
_AXIS_COORD = {0: "x", 1: "y", 2: "z"}


def mosaic(vol, affine, *, mask=None, axis=2, n=12, ncols=6, cmap="gray", vmin=None, vmax=None,
           rgb=False, contours=(), title="", colorbar_label=None, crop_mask=None) -> bytes:
    """A mosaic of slices of a canonical (RAS+) volume.

    ``contours``: sequence of (3D array, level, colour) drawn on every panel.
    ``crop_mask``: panels are cropped to this mask's bounding box (default ``mask``).
    ``rgb``: ``vol`` is (X, Y, Z, 3) in [0, 1].
    """
    plt = _mpl()
    vol = np.asarray(vol)
    shape3 = vol.shape[:3]
    full = np.ones(shape3, bool)
    sel = np.asarray(mask, bool) if mask is not None else (
        np.asarray(crop_mask, bool) if crop_mask is not None else full)
    crop = np.asarray(crop_mask, bool) if crop_mask is not None else sel
    idx = _slice_indices(sel, axis, n)          # slices through the brain mask
    box = _bbox2d(crop, axis)                   # panels cropped to crop_mask (default: the mask)
    nrows = int(np.ceil(len(idx) / ncols))
    ncols_eff = min(ncols, len(idx))
    sample = _take(vol, axis, idx[0], box)
    aspect = sample.shape[0] / max(sample.shape[1], 1)
    vox = np.sqrt((np.asarray(affine)[:3, :3] ** 2).sum(0))
    plane = [a for a in range(3) if a != axis]
    pix_aspect = vox[plane[1]] / vox[plane[0]]
    panel_w = PANEL_IN
    panel_h = PANEL_IN * aspect * pix_aspect
    top = 0.45 if title else 0.15
    bottom = 0.75 if colorbar_label else 0.1
    fig = plt.figure(figsize=(panel_w * ncols_eff, panel_h * nrows + top + bottom), facecolor=BG)
    gs = fig.add_gridspec(nrows, ncols_eff, left=0.005, right=0.995,
                          top=1 - top / fig.get_figheight(), bottom=bottom / fig.get_figheight(),
                          wspace=0.02, hspace=0.02)
    im = None
    for k, i in enumerate(idx):
        ax = fig.add_subplot(gs[k // ncols_eff, k % ncols_eff])
        ax.set_facecolor(BG)
        sl = _take(vol, axis, i, box)
        if rgb:
            im = ax.imshow(np.clip(sl, 0, 1), origin="lower", interpolation="nearest", aspect=pix_aspect)
        else:
            im = ax.imshow(sl, origin="lower", cmap=cmap, vmin=vmin, vmax=vmax, interpolation="nearest",
                           aspect=pix_aspect)
        for cvol, level, colour in contours:
            csl = _take(np.asarray(cvol, float), axis, i, box)
            if csl.min() < level < csl.max():
                ax.contour(csl, levels=[level], colors=[colour], linewidths=0.8, origin="lower")
        coord = (np.asarray(affine) @ np.r_[[0, 0, 0][:axis] + [i] + [0, 0, 0][axis + 1:3], 1])[axis]
        ax.text(0.03, 0.03, f"{_AXIS_COORD[axis]}={coord:.0f}", color="w", fontsize=7,
                transform=ax.transAxes, va="bottom", ha="left")
        first, last = k % ncols_eff == 0, k % ncols_eff == ncols_eff - 1 or k == len(idx) - 1
        lo_lab, hi_lab = ("P", "A") if axis == 0 else ("L", "R")    # image left / image right
        if first:
            ax.text(0.02, 0.97, lo_lab, color="yellow", fontsize=9, fontweight="bold",
                    transform=ax.transAxes, va="top", ha="left")
        if last:
            ax.text(0.98, 0.97, hi_lab, color="yellow", fontsize=9, fontweight="bold",
                    transform=ax.transAxes, va="top", ha="right")
        ax.set_xticks([])
        ax.set_yticks([])
        for s in ax.spines.values():
            s.set_visible(False)
    if title:
        fig.suptitle(title, color="w", fontsize=10, y=1 - 0.08 / fig.get_figheight())
    if colorbar_label and im is not None and not rgb:
        cax = fig.add_axes([0.3, 0.42 / fig.get_figheight(), 0.4, 0.12 / fig.get_figheight()])
        cb = fig.colorbar(im, cax=cax, orientation="horizontal")
        cb.set_label(colorbar_label, color="w", fontsize=8, labelpad=1)
        cb.ax.tick_params(colors="w", labelsize=7)
        cb.outline.set_edgecolor("w")
    return _png(fig)


# --- the report figures --------------------------------------------------------

def _robust_max(vol, mask, q=99.5):
    vals = np.asarray(vol)[np.asarray(mask, bool)] if mask is not None else np.asarray(vol).ravel()
    vals = vals[np.isfinite(vals)]
    return float(np.percentile(vals, q)) if vals.size else 1.0


def b0_mask_figure(mean_b0, mask, affine, n=12) -> bytes:
    b0, aff = to_canonical(np.nan_to_num(mean_b0), affine)
    m, _ = to_canonical(np.asarray(mask, np.float32), affine)
    return mosaic(b0, aff, mask=m > 0.5, crop_mask=_dilate(m > 0.5, 4), n=n, cmap="gray", vmin=0,
                  vmax=_robust_max(b0, m > 0.5), contours=[(m, 0.5, "#ff3030")],
                  title="Mean b0 with the brain mask (red) — axial, neurological (L on left)")


def _dilate(mask, it):
    from scipy import ndimage

    return ndimage.binary_dilation(mask, iterations=it) if mask.any() else mask


def fa_figure(fa, mask, affine, n=12) -> bytes:
    f, aff = to_canonical(np.nan_to_num(fa), affine)
    m, _ = to_canonical(np.asarray(mask, np.float32), affine)
    return mosaic(f, aff, mask=m > 0.5, n=n, cmap="gray", vmin=0, vmax=1,
                  title="FA — axial, neurological (L on left)", colorbar_label="fractional anisotropy")


def md_figure(md, mask, affine, n=12) -> bytes:
    d, aff = to_canonical(np.nan_to_num(md) * 1e3, affine)
    m, _ = to_canonical(np.asarray(mask, np.float32), affine)
    return mosaic(d, aff, mask=m > 0.5, n=n, cmap="gray", vmin=0, vmax=3.0,
                  title="MD — axial, neurological (L on left)", colorbar_label="mean diffusivity (10⁻³ mm²/s)")


def colour_fa_figure(fa, v1, mask, affine, n=12) -> bytes:
    """|V1|·FA as RGB: red = left–right, green = anterior–posterior, blue = inferior–superior."""
    v = np.asarray(v1, np.float32)
    if v.ndim == 5:                     # DIPY evecs: (..., 3 components, 3 vectors); V1 = [..., :, 0]
        v = v[..., :, 0]
    f, aff = to_canonical(np.clip(np.nan_to_num(fa), 0, 1), affine)
    vc, _ = to_canonical(np.nan_to_num(v), affine, vector=True)
    m, _ = to_canonical(np.asarray(mask, np.float32), affine)
    rgb = np.abs(vc) * f[..., None]
    rgb = np.clip(rgb / max(_robust_max(f, m > 0.5, 99.0), 1e-3), 0, 1)
    return mosaic(rgb, aff, mask=m > 0.5, n=n, rgb=True,
                  title="Colour FA |V1|·FA (red L–R, green A–P, blue I–S) — axial, neurological")


def motion_figure(params, fd, fd_outlier_mm=0.5) -> bytes:
    """Two panels: translations (mm) and rotations (deg); framewise displacement with the threshold."""
    plt = _mpl()
    params = np.asarray(params, float).reshape(-1, 6)
    fd = np.asarray(fd, float).ravel()
    vols = np.arange(len(fd))
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(9, 4.6), sharex=True,
                                   gridspec_kw={"height_ratios": [1.2, 1]})
    colours = ("#d62728", "#2ca02c", "#1f77b4")
    for j, (name, c) in enumerate(zip("xyz", colours)):
        ax1.plot(vols, params[:, j], color=c, lw=1.4, label=f"trans {name} (mm)")
    ax1b = ax1.twinx()
    for j, (name, c) in enumerate(zip("xyz", colours)):
        ax1b.plot(vols, np.degrees(params[:, 3 + j]), color=c, lw=1.2, ls="--", label=f"rot {name} (deg)")
    ax1.set_ylabel("translation (mm)")
    ax1b.set_ylabel("rotation (deg)")
    lim = max(np.abs(params[:, :3]).max(), np.degrees(np.abs(params[:, 3:])).max(), 0.5) * 1.15
    ax1.set_ylim(-lim, lim)
    ax1b.set_ylim(-lim, lim)
    h1, l1 = ax1.get_legend_handles_labels()
    h2, l2 = ax1b.get_legend_handles_labels()
    ax1.legend(h1 + h2, l1 + l2, ncol=6, fontsize=7, loc="upper center", bbox_to_anchor=(0.5, 1.22),
               frameon=False)
    ax1.axhline(0, color="0.7", lw=0.6)
    ax1.grid(alpha=0.3)

    ax2.plot(vols, fd, color="k", lw=1.3, marker="o", ms=3, label="FD")
    ax2.axhline(fd_outlier_mm, color="#d62728", ls="--", lw=1, label=f"threshold {fd_outlier_mm:g} mm")
    out = fd > fd_outlier_mm
    if out.any():
        ax2.plot(vols[out], fd[out], ls="none", marker="o", ms=7, mfc="none", mec="#d62728", mew=1.6,
                 label=f"outliers ({int(out.sum())})")
    ax2.set_ylabel("FD (mm)")
    ax2.set_xlabel("volume")
    ax2.set_ylim(0, max(fd.max() if fd.size else 0, fd_outlier_mm) * 1.2)
    ax2.legend(fontsize=7, loc="upper right", frameon=False)
    ax2.grid(alpha=0.3)
    if len(vols):
        ax2.set_xlim(-0.5, len(vols) - 0.5)
    fig.tight_layout()
    return _png(fig)


def registration_figure(template_fa, grid_affine, template_mask=None, template_wm=None,
                        n=6) -> bytes:
    """Template-space FA with the template's brain (cyan) and white-matter (red) outlines.

    Three rows: axial, coronal, sagittal slices of the subject's FA on the
    output grid. The outlines are the template's, so a good registration puts
    the subject's bright white matter inside the red contour and the brain
    edge on the cyan one.
    """
    plt = _mpl()
    import matplotlib.image as mpimg

    fa, aff = to_canonical(np.nan_to_num(template_fa), grid_affine)
    contours = []
    crop = fa > 0.05
    if template_mask is not None:
        tm, _ = to_canonical(np.asarray(template_mask, np.float32), grid_affine)
        contours.append((tm, 0.5, "#00e5ff"))
        crop = crop | (tm > 0.5)
    if template_wm is not None:
        tw, _ = to_canonical(np.asarray(template_wm, np.float32), grid_affine)
        contours.append((tw, 0.5, "#ff3030"))
    rows = []
    for axis, label in ((2, "axial"), (1, "coronal"), (0, "sagittal")):
        png = mosaic(fa, aff, crop_mask=crop, axis=axis, n=n, ncols=n, cmap="gray", vmin=0, vmax=1,
                     contours=contours, title=f"{label}")
        rows.append(mpimg.imread(io.BytesIO(png)))
    width = max(r.shape[1] for r in rows)
    padded = [np.pad(r, ((0, 0), (0, width - r.shape[1]), (0, 0))) for r in rows]
    img = np.concatenate(padded, axis=0)
    fig = plt.figure(figsize=(width / DPI, (img.shape[0] + 30) / DPI), facecolor=BG)
    ax = fig.add_axes([0, 0, 1, img.shape[0] / (img.shape[0] + 30)])
    ax.imshow(img)
    ax.axis("off")
    fig.text(0.5, 1 - 15 / (img.shape[0] + 30), "Template-space FA with the template brain (cyan) and "
             "WM (red) outlines — neurological", color="w", ha="center", va="center", fontsize=10)
    return _png(fig)
