"""Per-subject QC numbers, figures and the self-contained HTML report."""
from __future__ import annotations

import base64
import io
import json
import math
import re

import numpy as np
import pytest

from bids_adhd import derivatives as dv
from bids_adhd.reports import figures as F
from bids_adhd.reports import participant as P

N_VOL = 20


def _motion():
    """Planted motion with a hand-computed Power FD (radius 50 mm)."""
    p = np.zeros((N_VOL, 6))
    p[7:, 0] += 2.0                 # 2 mm jump in x at volume 7 (and it stays): FD[7] = 2
    p[12:, 1] += 0.1                # volume 12: 0.1 mm in y ...
    p[12:, 5] += 0.012              # ... and 0.012 rad about z: FD[12] = 0.1 + 50·0.012 = 0.7
    p[15:, 2] += 0.2                # volume 15: 0.2 mm in z: FD[15] = 0.2 (below the 0.5 mm threshold)
    fd = np.zeros(N_VOL)
    fd[7], fd[12], fd[15] = 2.0, 0.7, 0.2
    return p, fd


def _phantom(shape=(40, 48, 40), vox=4.0, sigma=20.0, seed=0):
    """Ellipsoid 'brain' in a larger field of view, LAS affine (x flipped, like many scanners)."""
    rng = np.random.default_rng(seed)
    affine = np.diag([-vox, vox, vox, 1.0])
    affine[:3, 3] = [(shape[0] - 1) / 2 * vox, -(shape[1] - 1) / 2 * vox, -(shape[2] - 1) / 2 * vox]
    ijk = np.indices(shape).reshape(3, -1).T
    xyz = np.c_[ijk, np.ones(len(ijk))] @ affine.T
    r = np.sqrt((xyz[:, 0] / 60) ** 2 + (xyz[:, 1] / 75) ** 2 + (xyz[:, 2] / 55) ** 2).reshape(shape)
    mask = r < 1
    signal = np.where(mask, 1000.0, 0.0)
    b0s = [np.abs(signal + rng.normal(0, sigma, shape) + 1j * rng.normal(0, sigma, shape)) for _ in range(3)]
    mean_b0 = np.mean(b0s, axis=0)
    fa = np.where(mask, 0.2 + 0.5 * np.clip(1 - r, 0, 1), 0).astype(np.float32)
    md = np.where(mask, 0.8e-3, 0).astype(np.float32)
    v1 = np.zeros(shape + (3,), np.float32)
    v1[..., 0] = 1.0                 # left-right fibres everywhere: the colour FA must be red
    return mean_b0, mask, fa, md, v1, affine


# --- numbers ------------------------------------------------------------------

def test_power_fd_by_hand():
    params, fd = _motion()
    np.testing.assert_allclose(P.framewise_displacement(params), fd, atol=1e-12)


def test_qc_metrics_motion_and_volume():
    params, fd = _motion()
    mean_b0, mask, fa, md, _, affine = _phantom()
    m = P.qc_metrics(mean_b0, mask, fa, md, params, P.framewise_displacement(params), fd_outlier_mm=0.5,
                     voxel_size=(4.0, 4.0, 4.0), reg_similarity=0.93)
    assert m["n_volumes"] == N_VOL
    assert m["max_fd"] == pytest.approx(2.0)
    assert m["mean_fd"] == pytest.approx((2.0 + 0.7 + 0.2) / N_VOL)
    assert m["n_outlier_volumes"] == 2 and m["outlier_volumes"] == [7, 12]
    assert m["mask_volume_ml"] == pytest.approx(mask.sum() * 64.0 / 1000.0)
    assert m["mask_voxels"] == int(mask.sum())
    assert m["registration_similarity"] == pytest.approx(0.93)
    assert m["max_abs_translation_mm"] == pytest.approx(2.0)
    assert m["max_abs_rotation_deg"] == pytest.approx(math.degrees(0.012))
    # fd=None computes Power FD; the affine gives the voxel size
    m2 = P.qc_metrics(mean_b0, mask, fa, md, params, None, voxel_size=affine)
    assert m2["max_fd"] == pytest.approx(2.0) and m2["mask_volume_ml"] == m["mask_volume_ml"]
    # the threshold is strict: at 0.7 mm only volume 7 is an outlier
    assert P.qc_metrics(mean_b0, mask, fa, md, params, fd, fd_outlier_mm=0.7,
                        voxel_size=affine)["outlier_volumes"] == [7]
    json.dumps(m, allow_nan=False)


def test_snr_estimators():
    sigma = 20.0
    mean_b0, mask, fa, md, _, affine = _phantom(sigma=sigma)
    params = np.zeros((5, 6))
    m = P.qc_metrics(mean_b0, mask, fa, md, params, None, voxel_size=affine)
    assert m["snr_method"] == "background-rayleigh"
    assert m["noise_sigma"] == pytest.approx(sigma, rel=0.05)           # one volume's σ from the mean b0
    assert m["snr"] == pytest.approx(np.mean(mean_b0[mask]) / sigma, rel=0.05)
    # given σ (MP-PCA): used as is; a map uses its median in the mask; NaN falls back
    m = P.qc_metrics(mean_b0, mask, fa, md, params, None, voxel_size=affine, noise_sigma=25.0)
    assert m["snr_method"] == "mppca" and m["snr"] == pytest.approx(np.mean(mean_b0[mask]) / 25.0)
    smap = np.full(mask.shape, 1e6)
    smap[mask] = 40.0
    assert P.qc_metrics(mean_b0, mask, fa, md, params, None, voxel_size=affine,
                        noise_sigma=smap)["noise_sigma"] == pytest.approx(40.0)
    assert P.qc_metrics(mean_b0, mask, fa, md, params, None, voxel_size=affine,
                        noise_sigma=float("nan"))["snr_method"] == "background-rayleigh"
    # no background (the mask fills the image, or zero padding): honest 'unavailable'
    m = P.qc_metrics(np.where(mask, mean_b0, 0), mask, fa, md, params, None, voxel_size=affine)
    assert m["snr"] is None and m["snr_method"] == "unavailable"


def test_qc_json(tmp_path):
    params, fd = _motion()
    mean_b0, mask, fa, md, _, affine = _phantom()
    fa = fa.copy()
    fa[tuple(np.argwhere(mask)[:3].T)] = np.nan
    m = P.qc_metrics(mean_b0, mask, fa, md, params, fd, voxel_size=affine, reg_similarity=float("nan"))
    src = dv.Source(subject="01", session="1")
    path = P.write_qc_json(tmp_path, src, m, Sources=["bids:raw:sub-01/ses-1/dwi/sub-01_ses-1_dwi.nii.gz"])
    assert path == dv.qc_json(tmp_path, src)
    data = json.loads(path.read_text())             # strict JSON: no NaN
    for key in ("n_volumes", "mean_fd", "max_fd", "n_outlier_volumes", "snr", "snr_method", "mask_volume_ml",
                "registration_similarity", "fa_mean", "fa_mean_wm", "md_median", "Sources"):
        assert key in data, key
    assert data["registration_similarity"] is None
    assert data["n_nonfinite_in_mask"] == 3
    assert data["max_fd"] == pytest.approx(2.0)


# --- orientation -------------------------------------------------------------------

def test_display_orientation_neurological_and_upright():
    """A blob on the patient's left-anterior-superior must be drawn left, top (axial), top (coronal)."""
    shape = (30, 36, 32)
    for affine in (np.diag([-3.0, 3.0, 3.0, 1.0]), np.diag([3.0, -3.0, 3.0, 1.0]),
                   np.array([[0, 0, 3.0, 0], [3.0, 0, 0, 0], [0, 3.0, 0, 0], [0, 0, 0, 1]])):  # permuted axes
        affine = affine.copy()
        affine[:3, 3] = -affine[:3, :3] @ ((np.array(shape) - 1) / 2)
        vol = np.zeros(shape)
        ijk = np.round(np.linalg.solve(affine, [-25.0, 30.0, 20.0, 1.0])[:3]).astype(int)   # L, A, S
        vol[tuple(ijk)] = 1
        can, can_aff = F.to_canonical(vol, affine)
        assert np.all(np.diag(can_aff)[:3] > 0)
        i, j, k = np.argwhere(can == 1)[0]
        box = (slice(None), slice(None))
        ax = F._take(can, 2, k, box)                  # rows = y (drawn upward), cols = x
        r, c = np.argwhere(ax == 1)[0]
        assert c < ax.shape[1] / 2                    # patient left → image left (neurological)
        assert r > ax.shape[0] / 2                    # anterior → top (origin='lower')
        cor = F._take(can, 1, j, box)                 # rows = z, cols = x
        r, c = np.argwhere(cor == 1)[0]
        assert c < cor.shape[1] / 2 and r > cor.shape[0] / 2
        sag = F._take(can, 0, i, box)                 # rows = z, cols = y (anterior on the right)
        r, c = np.argwhere(sag == 1)[0]
        assert c > sag.shape[1] / 2 and r > sag.shape[0] / 2


def test_colour_fa_vectors_follow_axis_permutation():
    shape = (6, 7, 8)
    affine = np.array([[0, 0, 2.0, 0], [2.0, 0, 0, 0], [0, 2.0, 0, 0], [0, 0, 0, 1]])   # voxel k = world x
    v = np.zeros(shape + (3,))
    v[..., 2] = 1.0                                   # along voxel axis k = left-right
    can, _ = F.to_canonical(v, affine, vector=True)
    assert can.shape == (8, 6, 7, 3)
    assert np.all(can[..., 0] == 1) and np.all(can[..., 1:] == 0)    # red


# --- figures and HTML ---------------------------------------------------------------

@pytest.fixture(scope="module")
def figures():
    from bids_adhd.config import TemplateConfig
    from bids_adhd.dmri import template as T

    params, fd = _motion()
    mean_b0, mask, fa, md, v1, affine = _phantom()
    cfg = TemplateConfig(resolution_mm=4.0, shape=(48, 48, 48))
    shape, grid = T.template_grid(cfg)
    target, _ = T.target_on_grid(shape, grid)
    return P.render_figures(mean_b0, mask, fa, md, v1, params, fd, affine, fd_outlier_mm=0.5,
                            template_fa=target / 0.6, template_affine=grid)


def _decode(png: bytes):
    import matplotlib.image as mpimg

    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    return mpimg.imread(io.BytesIO(png), format="png")


def test_render_figures(figures):
    assert set(figures) == {"b0_mask", "fa", "md", "colour_fa", "motion", "registration"}
    for name, png in figures.items():
        img = _decode(png)
        h, w = img.shape[:2]
        assert 200 <= h <= 2500 and 400 <= w <= 2500, (name, img.shape)
        assert 5_000 < len(png) < 1_500_000, (name, len(png))
        assert img[..., :3].std() > 0.02, name        # not blank
    # the colour FA of left-right fibres is red
    rgb = _decode(figures["colour_fa"])[..., :3]
    bright = rgb.sum(-1) > 0.6
    assert rgb[bright, 0].mean() > 3 * max(rgb[bright, 1].mean(), rgb[bright, 2].mean())


def test_write_report_self_contained(tmp_path, figures):
    params, fd = _motion()
    mean_b0, mask, fa, md, _, affine = _phantom()
    m = P.qc_metrics(mean_b0, mask, fa, md, params, fd, voxel_size=affine, reg_similarity=0.95)
    runs = [{"label": f"sub-01_ses-{s}", "source": dv.Source(subject="01", session=s), "metrics": m,
             "figures": figures} for s in ("1", "2")]
    path = P.write_report(tmp_path, "01", runs)
    assert path == dv.report_html(tmp_path, "01") and path.is_file()
    text = path.read_text(encoding="utf-8")
    assert text.startswith("<!DOCTYPE html>") and text.rstrip().endswith("</html>")
    # self-contained: every src/href is a data: URI or an in-page anchor; no external resources
    refs = re.findall(r'(?:src|href)\s*=\s*"([^"]*)"', text, flags=re.I)
    assert refs and all(r.startswith("data:") or r.startswith("#") for r in refs), \
        [r for r in refs if not (r.startswith("data:") or r.startswith("#"))]
    assert "<link" not in text.lower() and "<script" not in text.lower() and "url(" not in text.lower()
    imgs = re.findall(r'<img src="data:image/png;base64,([A-Za-z0-9+/=]+)"', text)
    assert len(imgs) == 2 * len(figures)
    for b64 in imgs:
        img = _decode(base64.b64decode(b64, validate=True))
        assert img.shape[0] >= 200 and img.shape[1] >= 400
    # one section per run, the QC table with the same numbers as the JSON
    assert text.count("<section id=") == 2
    assert "session 1" in text and "session 2" in text
    assert ">2.000<" in text and f">{m['n_outlier_volumes']}<" in text
    assert f">{m['mask_volume_ml']:.0f}<" in text
    assert not list(tmp_path.glob(".*tmp*"))         # atomic write left no temporary file


def test_report_run_from_files(tmp_path):
    """The glue the participant workflow uses: files of one run → a write_report entry."""
    import nibabel as nib

    from bids_adhd.config import TemplateConfig
    from bids_adhd.dmri import template as T

    params, fd = _motion()
    mean_b0, mask, fa, md, v1, affine = _phantom()
    files = {}
    for key, arr in (("b0", mean_b0), ("mask", mask.astype(np.uint8)), ("fa", fa), ("md", md), ("v1", v1)):
        files[key] = str(tmp_path / f"{key}.nii.gz")
        nib.save(nib.Nifti1Image(np.asarray(arr, np.float32 if key != "mask" else np.uint8), affine), files[key])
    shape, grid = T.template_grid(TemplateConfig(resolution_mm=4.0, shape=(48, 48, 48)))
    files["std_fa"] = str(tmp_path / "std_fa.nii.gz")
    nib.save(nib.Nifti1Image(T.target_on_grid(shape, grid)[0], grid), files["std_fa"])
    files["motion"] = str(tmp_path / "motion.tsv")
    cols = ["trans_x", "trans_y", "trans_z", "rot_x", "rot_y", "rot_z", "framewise_displacement"]
    np.savetxt(files["motion"], np.c_[params, fd], delimiter="\t", header="\t".join(cols), comments="")
    qc = P.qc_metrics(mean_b0, mask, fa, md, params, fd, voxel_size=affine)
    run = P.report_run_from_files({"source": {"subject": "01", "run": "1"}, "label": "sub-01_run-1",
                                   "qc": qc, "files": files})
    assert set(run["figures"]) == {"b0_mask", "fa", "md", "colour_fa", "motion", "registration"}
    path = P.write_report(tmp_path / "out", "sub-01", [run])
    assert path.name == "sub-01.html" and "run 1" in path.read_text()
