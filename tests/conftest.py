"""Shared fixtures."""
from __future__ import annotations

import pytest

#: Arguments of ``tiny_bids``: 2 subjects (1 ADHD, 1 TD), the demo grid (64x76x64,
#: 2.5 mm), 3 b0 + 6 directions at b=1000, default SNR (25), motion and effect (0.08).
TINY_BIDS_ARGS = dict(n_subjects=2, seed=1, size="demo", directions=6)


@pytest.fixture(scope="session")
def tiny_bids(tmp_path_factory):
    """A tiny simulated BIDS dataset (``bids_adhd.simulate``), shared by the whole
    session: treat it as read only. Ground truth under ``derivatives/truth``."""
    from bids_adhd.simulate import simulate_dataset

    return simulate_dataset(tmp_path_factory.mktemp("tiny_bids") / "bids", **TINY_BIDS_ARGS, n_jobs=2)


@pytest.fixture()
def weights_env(tmp_path, monkeypatch):
    """An empty foundation-weights cache and an empty image location, both under tmp_path."""
    from bids_adhd.learn import foundation as fd

    monkeypatch.setenv(fd.ENV_WEIGHTS_DIR, str(tmp_path / "cache"))
    monkeypatch.setattr(fd, "IMAGE_MODELS_DIR", tmp_path / "opt")
    return tmp_path
