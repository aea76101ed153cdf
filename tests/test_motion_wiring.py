"""Wiring of the motion step (issue 11, and 16's fd_radius_mm): preset keys reach the node and
the FD computation, a missing PhaseEncodingDirection is a one-line data error when the eddy
stage needs it, the confounds carry one row per input volume and the transforms."""
from __future__ import annotations

import csv
import json

import numpy as np
import pytest
from scipy.ndimage import gaussian_filter, shift

from bids_adhd import derivatives as dv
from bids_adhd.config import PreprocConfig
from bids_adhd.dmri.motion import correct_motion, framewise_displacement
from bids_adhd.errors import DataError
from bids_adhd.interfaces.bids import _write_confounds
from bids_adhd.workflows.dwi import init_dwi_preproc_wf


def _motion_node(cfg, pe="j-"):
    wf = init_dwi_preproc_wf(cfg, phase_encoding=pe)
    return wf.get_node("motion").inputs


def test_preset_keys_reach_the_motion_node():
    i = _motion_node(PreprocConfig(fd_radius_mm=40.0, motion_rounds=3, motion_outliers="keep"))
    assert (i.fd_radius, i.rounds, i.outliers, i.eddy, i.phase_encoding) == (40.0, 3, "keep", True, "j-")
    assert _motion_node(PreprocConfig()).head_margin == 3
    assert _motion_node(PreprocConfig(motion_head_margin=5)).head_margin == 5
    assert _motion_node(PreprocConfig(motion_head_margin=None)).head_margin == -1    # -1: the whole head box
    assert _motion_node(PreprocConfig()).eddy_model == "linear"
    assert _motion_node(PreprocConfig(motion_eddy_model="none")).eddy_model == "none"


def test_fd_radius_changes_the_fd():
    """Two b0 volumes (no model needed), the second rotated: FD follows the radius given."""
    rng = np.random.default_rng(0)
    vol = gaussian_filter(rng.normal(size=(24, 24, 16)), 2.0) * 100 + 1000
    vol[:3], vol[-3:] = 0, 0
    data = np.stack([vol, shift(vol, (0.8, 0, 0), order=1)], -1).astype(np.float32)
    aff = np.diag([2.0, 2.0, 2.0, 1.0])
    kw = dict(bvals=np.zeros(2), bvecs=np.zeros((2, 3)), level_iters=(20,), factors=(1,), sigmas=(0.0,),
              box_margin=None)
    r40 = correct_motion(data, aff, fd_radius=40.0, **kw)
    r50 = correct_motion(data, aff, fd_radius=50.0, **kw)
    assert np.array_equal(r40["params"], r50["params"]) and r40["fd"][1] > 1.0
    assert np.allclose(r40["fd"], framewise_displacement(r40["params"], 40.0))
    rot = np.abs(r40["params"][1, 3:]).sum()
    assert np.isclose(r50["fd"][1] - r40["fd"][1], 10.0 * rot)


def test_missing_phase_encoding_is_a_data_error():
    with pytest.raises(DataError, match="PhaseEncodingDirection") as exc:
        _motion_node(PreprocConfig(), pe=None)
    assert exc.value.exit_code == 65 and "\n" not in str(exc.value)
    assert _motion_node(PreprocConfig(motion_eddy=False), pe=None).eddy is False
    assert _motion_node(PreprocConfig(motion=False), pe=None).enabled is False


def test_confounds_one_row_per_volume_with_matrices(tmp_path):
    n = 5
    table = np.zeros((n, 9))
    table[2, 6] = 0.7                                       # one FD outlier
    table[3, 7] = 1                                         # one dropout slice
    eye = np.eye(4).tolist()
    mats = {"Matrices": [eye] * n, "EddyMatrices": [eye] * n, "DropoutSlices": [[3, 10]], "SliceAxis": 2,
            "KeptVolumes": list(range(n)), "FDRadiusMm": 40.0}
    pre = {"fd_outlier_mm": 0.5, "fd_radius_mm": 40.0, "motion_outliers": "replace"}
    src = dv.Source(subject="01")
    _write_confounds(dv, tmp_path, src, table, mats, pre)
    rows = list(csv.DictReader(open(dv.confounds(tmp_path, src)), delimiter="\t"))
    assert len(rows) == n and rows[2]["motion_outlier"] == "1" and rows[3]["dropout_slices"] == "1"
    side = json.loads(dv.confounds(tmp_path, src, ".json").read_text())
    assert np.array(side["Matrices"]).shape == (n, 4, 4) and np.array(side["EddyMatrices"]).shape == (n, 4, 4)
    assert "40.0 mm" in side["framewise_displacement"]["Description"] and side["DropoutSlices"] == [[3, 10]]


def test_moved_volumes_read_undenoised_input(tmp_path):
    """The motion node reads the checked (undenoised) series for its moved volumes, unrung when the
    preset unrings; without denoising there is nothing to read."""
    import nibabel as nib
    from nipype.interfaces.base import Undefined

    from bids_adhd.dmri.gibbs import unring
    from bids_adhd.interfaces.dipy import MotionCorrect, _undenoised_reader

    def source(cfg):
        wf = init_dwi_preproc_wf(cfg, phase_encoding="j-")
        edges = [(u.name, d) for u, v, d in wf._graph.edges(data=True) if v.name == "motion"]
        return [u for u, d in edges if ("out_file", "in_undenoised") in d["connect"]], wf.get_node("motion").inputs

    src, i = source(PreprocConfig())
    assert src == ["check"] and i.undenoised_gibbs is True
    src, i = source(PreprocConfig(gibbs=False))
    assert src == ["check"] and i.undenoised_gibbs is False
    assert source(PreprocConfig(denoise="none"))[0] == []

    rng = np.random.default_rng(1)
    data = rng.normal(100, 10, size=(16, 16, 6, 4)).astype(np.float32)
    path = tmp_path / "dwi.nii"
    nib.save(nib.Nifti1Image(data, np.eye(4)), str(path))
    m = MotionCorrect()
    assert _undenoised_reader(m.inputs) is None and m.inputs.in_undenoised is Undefined
    m.inputs.in_undenoised = str(path)
    np.testing.assert_array_equal(_undenoised_reader(m.inputs)(2), data[..., 2])
    m.inputs.undenoised_gibbs = True
    np.testing.assert_allclose(_undenoised_reader(m.inputs)(3), unring(data[..., 3], slice_axis=2), rtol=0, atol=1e-4)
