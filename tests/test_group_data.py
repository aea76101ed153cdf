"""Group-level inputs: finding maps, intensity handling, grids, sessions, adapters."""
from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest

from bids_adhd import derivatives as dv
from bids_adhd.config import load_pipeline
from bids_adhd.dmri.template import template_grid
from bids_adhd.learn.data import MD_SCALE, find_template_maps, load_input, normalise, resample_to_grid, run_maps
from bids_adhd.simulate_maps import write_synthetic_maps


@pytest.fixture(scope="module")
def two_sessions(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("grpdata")
    rows = write_synthetic_maps(tmp / "out", tmp / "bids", n_subjects=4, seed=2, sessions=2,
                                template_cfg=load_pipeline("fast").template)
    return tmp / "out", tmp / "bids", rows


def test_find_maps_with_sessions(two_sessions):
    out, _, _ = two_sessions
    complete, incomplete = find_template_maps(out)
    assert sorted(complete) == ["01", "02", "03", "04"] and not incomplete
    assert [r.source.session for r in complete["01"]] == ["01", "02"]
    # a run with FA but no MD is reported as incomplete
    rm = complete["02"][0]
    rm.md.unlink()
    complete, incomplete = find_template_maps(out)
    assert len(complete["02"]) == 1 and rm.md.name in incomplete["02"]


def test_intensity_mapping(two_sessions):
    out, _, _ = two_sessions
    cfg = load_pipeline("fast")
    grid = template_grid(cfg.template)
    rm = find_template_maps(out)[0]["01"][0]
    x = load_input(rm, ("fa", "md"), grid, "none")
    fa = nib.load(str(rm.fa)).get_fdata()
    md = nib.load(str(rm.md)).get_fdata()
    mask = nib.load(str(rm.mask)).get_fdata() > 0.5
    assert x.shape == (2, 32, 32, 32) and x.dtype == np.float32
    np.testing.assert_allclose(x[0][mask], np.clip(fa[mask], 0, 1), atol=1e-6)
    np.testing.assert_allclose(x[1][mask], np.clip(md[mask] / MD_SCALE, 0, 1), atol=1e-6)
    assert np.all(x[:, ~mask] == 0) and x.min() >= 0 and x.max() <= 1
    xm = load_input(rm, ("fa",), grid, "mean")
    assert xm[0][mask].mean() == pytest.approx(0.3, rel=1e-4)
    xz = load_input(rm, ("fa",), grid, "zscore")
    assert xz[0][mask].mean() == pytest.approx(0, abs=1e-4) and xz[0][mask].std() == pytest.approx(1, rel=1e-3)
    assert np.all(xz[:, ~mask] == 0)


def test_global_scale_removed_by_mean_normalisation():
    rng = np.random.default_rng(0)
    x = rng.uniform(0.1, 0.6, (1, 8, 8, 8)).astype(np.float32)
    mask = np.ones((8, 8, 8), bool)
    np.testing.assert_allclose(normalise(x, mask, "mean"), normalise(1.07 * x, mask, "mean"), rtol=1e-5)
    np.testing.assert_allclose(normalise(x, mask, "zscore"), normalise(1.07 * x + 0.01, mask, "zscore"),
                               rtol=1e-4, atol=1e-5)


def test_resample_between_template_grids():
    fine = template_grid(load_pipeline("paper").template)
    coarse = template_grid(load_pipeline("fast").template)
    data = np.full(fine[0], 0.4, np.float32)
    out = resample_to_grid(data, fine[1], *coarse)
    assert out.shape == (32, 32, 32)
    inner = out[4:-4, 4:-4, 4:-4]
    np.testing.assert_allclose(inner, 0.4, atol=1e-4)


def test_run_maps_names_match_derivatives():
    src = dv.Source(subject="01", session="02")
    rm = run_maps("/o", src)
    assert rm.fa == dv.dwimap("/o", src, "fa", space=dv.TEMPLATE_SPACE)
    assert rm.mask == dv.brain_mask("/o", src, space=dv.TEMPLATE_SPACE)
