"""The per-subject level: ``single_subject_<label>_wf`` sub-workflows, and ``sub-<label>/log/<run-id>/``
holding the resolved pipeline YAML and the crash files, which the subject's report lists."""
from __future__ import annotations

import json

import yaml

from bids_adhd import derivatives as dv
from bids_adhd.bids import collect_runs
from bids_adhd.cli import main
from bids_adhd.config import load_pipeline
from bids_adhd.errors import DataError
from bids_adhd.workflows.participant import init_participant_wf
from helpers import make_tiny_bids


def test_one_sub_workflow_per_subject_with_its_crash_dir(tmp_path):
    bids = make_tiny_bids(tmp_path / "bids", subjects=("01", "02"))
    runs = collect_runs(bids)
    out = tmp_path / "out"
    wf = init_participant_wf(runs, load_pipeline("fast"), bids, out, tmp_path / "work", "hash", run_id="RUNID")
    names = wf.list_node_names()
    assert {n.split(".")[0] for n in names} == {"single_subject_01_wf", "single_subject_02_wf"}
    for name in names:
        subject = name.split(".")[0].split("_")[2]
        crash_dir = wf.get_node(name).config["execution"]["crashdump_dir"]
        assert crash_dir == str(dv.log_dir(out, subject, "RUNID")), name


def test_node_failure_lands_in_the_log_dir_and_the_report(tmp_path, capsys, monkeypatch):
    """A user error inside a node (here planted in the first node, run in-process by the Linear
    plugin): exit 65 with one line naming the node and the crash file; the crash file and the
    resolved pipeline sit in ``sub-01/log/<run-id>/``; the subject's report lists the crash."""
    import bids_adhd.interfaces.dipy as ifaces

    def fail(self):
        raise DataError("planted failure inside the check node")

    monkeypatch.setattr(ifaces.CheckDWI, "_compute", fail)
    bids = make_tiny_bids(tmp_path / "bids", subjects=("01",))
    out = tmp_path / "out"
    code = main([str(bids), str(out), "participant", "--pipeline", "fast", "--skip-bids-validation",
                 "--nipype-plugin", "Linear", "--work-dir", str(tmp_path / "work")])
    err = capsys.readouterr().err
    assert code == 65, err
    lines = [ln for ln in err.splitlines() if ln.startswith("bids_adhd: error:")]
    assert len(lines) == 1 and "planted failure inside the check node" in lines[0], err
    assert "node single_subject_01_wf.dwi_preproc_sub01.check" in lines[0], lines[0]
    (log,) = sorted((out / "sub-01" / "log").iterdir())
    (crash,) = dv.crash_files(log)
    assert str(crash) in lines[0]
    assert dv.read_crash(crash)["error"].endswith("planted failure inside the check node")
    resolved = yaml.safe_load(dv.pipeline_yaml(out, "01", log.name).read_text())
    assert resolved == json.loads(json.dumps(load_pipeline("fast").to_dict(), default=list))
    report = dv.report_html(out, "01").read_text()
    assert '<section id="errors">' in report and "planted failure inside the check node" in report
    assert crash.relative_to(out).as_posix() in report


def test_thread_variables_set_by_a_run_are_restored(monkeypatch):
    """The participant run sets the BLAS/OpenMP thread counts for its node processes; an in-process
    caller gets its own values back (an unset variable stays unset), even when the run fails."""
    import os

    import pytest

    from bids_adhd.workflows.run import _THREAD_VARS, _env_restored

    monkeypatch.setenv("OMP_NUM_THREADS", "7")
    monkeypatch.delenv("MKL_NUM_THREADS", raising=False)
    with pytest.raises(RuntimeError):
        with _env_restored(_THREAD_VARS):
            for var in _THREAD_VARS:
                os.environ[var] = "2"
            raise RuntimeError("the workflow failed")
    assert os.environ["OMP_NUM_THREADS"] == "7"
    assert "MKL_NUM_THREADS" not in os.environ
