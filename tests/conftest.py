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


#: Test modules that take longest (serial run on the 2-core CI machine, 2 Dec 2026: group_signal
#: ~410 s, container ~300 s, dmri_motion ~190 s, slurm ~120 s, participant_e2e ~115 s, ...). `make
#: test` runs the suite on 2 pytest-xdist workers, one module per work unit (`--dist loadfile`),
#: handed out in collection order: these go first, so that no long module starts last and
#: leaves the other worker idle.
HEAVY_FIRST = ("test_group_signal.py", "test_container.py", "test_dmri_motion.py", "test_slurm.py",
               "test_participant_e2e.py", "test_torchrun.py", "test_group_resume.py", "test_reliability_faults.py",
               "test_group_faults.py", "test_boutiques.py", "test_template.py")


def pytest_collection_modifyitems(config, items):
    rank = {name: k for k, name in enumerate(HEAVY_FIRST)}
    # stable: within a module, and among the other modules, the collection order stays
    items.sort(key=lambda item: rank.get(item.path.name, len(HEAVY_FIRST)))
