"""Group-level inputs as real paediatric datasets have them (issue 18).

A simulated dataset's template-space maps (``write_synthetic_maps``) relabelled
with ADHD subtypes and other conditions; phenotype files; QC-based exclusion over
QC JSON files written by the participant level's own ``qc_metrics``/``write_qc_json``
from motion parameters, one subject with injected high motion.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from bids_adhd import derivatives as dv
from bids_adhd.cli import build_parser, main
from bids_adhd.learn.group import collect_inputs
from bids_adhd.learn.labels import QC_METRICS, evaluate, parse_rule
from test_group_common import patch_tiny, synthetic, tiny_pipeline

ROOT = Path(__file__).resolve().parents[1]

#: sub-01 … sub-13: four ADHD subtypes, four TD, other conditions, two unlabelled (n/a, empty cell)
DX = ["ADHD-Combined Type", "ADHD-Inattentive Type", "ADHD-Hyperactive/Impulsive Type", "ADHD-Combined Type",
      "TD", "TD", "TD", "TD", "Anxiety", "Autism", "n/a", "", "Anxiety"]
ADHD = ["01", "02", "03", "04"]
TD = ["05", "06", "07", "08"]
HIGH_MOTION = "06"
NO_SNR = "07"            # its QC file has snr: null (no MP-PCA σ, too little background)


def _write_participants(bids: Path, rows, dx) -> None:
    lines = ["participant_id\tdiagnosis\tage\tsex\tsite"]
    lines += [f"{r['participant_id']}\t{d}\t{r['age']}\t{r['sex']}\t{r['site']}" for r, d in zip(rows, dx)]
    (bids / "participants.tsv").write_text("\n".join(lines) + "\n")


def _write_qc(out: Path, subject: str, high_motion: bool, session: str | None = None) -> Path:
    """The QC JSON the participant level writes, from 20 volumes of motion parameters (mm, rad)."""
    from bids_adhd.reports.participant import qc_metrics, write_qc_json

    rng = np.random.default_rng(int(subject))
    params = rng.normal(0, 0.05, (20, 6)) * [1, 1, 1, 0.01, 0.01, 0.01]
    params[0] = 0
    if high_motion:                                  # the head jumps 5 mm at volume 8 and back at 14
        params[8:14, 0] += 5.0
    shape = (12, 12, 12)
    mask = np.zeros(shape, bool)
    mask[3:9, 3:9, 3:9] = True
    b0 = np.where(mask, 1000.0, 0.0) + rng.rayleigh(20, shape)
    m = qc_metrics(b0, mask, np.full(shape, 0.4), np.full(shape, 0.8e-3), params, voxel_size=(2.0, 2.0, 2.0),
                   reg_similarity=0.97, noise_sigma=None if subject == NO_SNR else 25.0)
    return write_qc_json(out, dv.Source(subject=subject, session=session), m)


@pytest.fixture(scope="module")
def relabelled(tmp_path_factory):
    bids, out, rows = synthetic(tmp_path_factory.mktemp("grp_labels"), n=len(DX))
    _write_participants(bids, rows, DX)
    for r in rows:
        _write_qc(out, r["participant_id"][4:], r["participant_id"][4:] == HIGH_MOTION)
    return bids, out, rows


def _run(capsys, bids, out, *extra):
    """Exit code and the error lines (warnings logged before the error are not part of it; no traceback)."""
    code = main([str(bids), str(out), "group", "-q", *extra])
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return code, [ln for ln in err.strip().splitlines() if ln.startswith("bids_adhd:")]


# --- label mapping ------------------------------------------------------------------------

def test_subtypes_positive_pattern_and_negative(relabelled):
    bids, out, _ = relabelled
    inputs = collect_inputs(bids, out, "diagnosis", ["ADHD*"], 2, negative=["TD"])
    assert inputs.subjects == sorted(ADHD + TD)
    assert inputs.labels == {**{s: 1 for s in ADHD}, **{s: 0 for s in TD}}
    assert inputs.class_names == ("TD", "ADHD*")
    sel = inputs.selection
    assert sel["values_with_maps"]["excluded"] == {"Anxiety": 2, "Autism": 1}
    assert sel["values_analysed"]["positive"] == {"ADHD-Combined Type": 2, "ADHD-Hyperactive/Impulsive Type": 1,
                                                  "ADHD-Inattentive Type": 1}
    assert sel["values_analysed"]["negative"] == {"TD": 4}
    assert sel["n_excluded"] == {"no_label": 2, "label_value": 3} and sel["n_analysed"] == 8
    assert inputs.unlabelled == ["11", "12"]
    why = {r["participant_id"]: r["reason"] for r in inputs.excluded}
    assert why == {"sub-09": "label_value", "sub-10": "label_value", "sub-13": "label_value",
                   "sub-11": "no_label", "sub-12": "no_label"}


def test_without_negative_everything_else_is_negative_but_na_is_not(relabelled):
    """The old single-value form: one exact value, every other value negative; n/a and empty unlabelled."""
    bids, out, _ = relabelled
    inputs = collect_inputs(bids, out, "diagnosis", "ADHD-Combined Type", 2)
    assert inputs.labels["01"] == 1 and inputs.labels["04"] == 1
    assert all(inputs.labels[s] == 0 for s in ("02", "03", "05", "09", "10", "13"))
    assert "11" not in inputs.labels and "12" not in inputs.labels      # n/a and "" are never negative
    assert inputs.unlabelled == ["11", "12"] and len(inputs.subjects) == 11
    sel = inputs.selection
    assert sel["negative"] is None and sel["negative_rule"] == "everything else"
    assert sel["values_analysed"]["negative"] == {"ADHD-Hyperactive/Impulsive Type": 1, "ADHD-Inattentive Type": 1,
                                                  "Anxiety": 2, "Autism": 1, "TD": 4}
    assert inputs.class_names == ("non-ADHD-Combined Type", "ADHD-Combined Type")
    from bids_adhd.reports.group import who_html
    who = who_html({"inputs": sel, "excluded": inputs.excluded})
    assert "no <code>--negative</code> given: every value not matching <code>--positive</code> is negative" in who
    neg = who[who.index("Negative class"):who.index("Excluded, value in neither class")]
    assert all(f"{v}: {n}" in neg for v, n in (("TD", 4), ("Anxiety", 2), ("Autism", 1),
                                               ("ADHD-Inattentive Type", 1)))


def test_cli_positive_takes_several_values_and_keeps_the_old_form():
    p = build_parser()
    assert p.parse_args(["b", "o", "group"]).positive == ["ADHD"]
    assert p.parse_args(["b", "o", "group", "--positive", "ADHD"]).positive == ["ADHD"]
    a = p.parse_args(["b", "o", "group", "--positive", "ADHD*", "ADD", "--negative", "TD", "Typical*"])
    assert a.positive == ["ADHD*", "ADD"] and a.negative == ["TD", "Typical*"]


def test_value_in_both_classes_is_65(relabelled, capsys, monkeypatch):
    patch_tiny(monkeypatch)
    bids, out, _ = relabelled
    code, err = _run(capsys, bids, out, "--positive", "ADHD*", "--negative", "TD", "*Type")
    assert code == 65 and len(err) == 1
    assert "matches both --positive" in err[0] and "ADHD-" in err[0] and "*Type" in err[0]
    assert not (out / "group").exists()


def test_negative_matching_nothing_is_65(relabelled, capsys, monkeypatch):
    patch_tiny(monkeypatch)
    bids, out, _ = relabelled
    code, err = _run(capsys, bids, out, "--positive", "ADHD*", "--negative", "Control")
    assert code == 65 and len(err) == 1 and "--negative Control" in err[0] and "one class only" in err[0]


# --- phenotype files ------------------------------------------------------------------------

def _phenotype_dataset(tmp_path, n=8):
    """participants.tsv without a diagnosis; the labels and age in phenotype/dx.tsv (IDs with and without sub-)."""
    bids, out, rows = synthetic(tmp_path, n=n)
    truth = {r["participant_id"][4:]: r["diagnosis"] for r in rows}
    (bids / "participants.tsv").write_text("participant_id\tsex\tsite\n" + "".join(
        f"{r['participant_id']}\t{r['sex']}\t{r['site']}\n" for r in rows))
    (bids / "phenotype").mkdir()
    lines = ["participant_id\tdx\tage"] + [f"{'sub-' if i % 2 else ''}{s}\t{d}\t{10 + i}"
                                           for i, (s, d) in enumerate(sorted(truth.items()))]
    (bids / "phenotype" / "dx.tsv").write_text("\n".join(lines) + "\n")
    return bids, out, rows, truth


def test_labels_only_in_a_phenotype_file(tmp_path):
    bids, out, rows, truth = _phenotype_dataset(tmp_path)
    inputs = collect_inputs(bids, out, "dx", "ADHD", 2, label_file="dx.tsv")     # found in phenotype/
    assert inputs.labels == {s: int(d == "ADHD") for s, d in truth.items()}
    assert inputs.selection["label_source"] == str((bids / "phenotype" / "dx.tsv").resolve())
    subs = sorted(truth)
    assert [inputs.covariates[s]["age"] for s in subs] == [str(10 + i) for i in range(len(subs))]
    assert inputs.sites == {r["participant_id"][4:]: r["site"] for r in rows}     # site from participants.tsv
    # without the file: participants.tsv has no such column
    from bids_adhd.errors import DataError
    with pytest.raises(DataError, match="no column 'dx'"):
        collect_inputs(bids, out, "dx", "ADHD", 2)


def test_phenotype_file_errors(tmp_path, capsys, monkeypatch):
    patch_tiny(monkeypatch)
    bids, out, rows, _ = _phenotype_dataset(tmp_path)
    pheno = bids / "phenotype" / "dx.tsv"
    good = pheno.read_text()
    code, err = _run(capsys, bids, out, "--label-column", "dx", "--label-file", "nothere.tsv")
    assert code == 66 and len(err) == 1 and "--label-file nothere.tsv not found" in err[0]
    pheno.write_text(good + "sub-01\tTD\t9\n")                     # "01" (no prefix) is already there
    code, err = _run(capsys, bids, out, "--label-column", "dx", "--label-file", str(pheno))
    assert code == 65 and len(err) == 1 and "twice" in err[0] and "01" in err[0]
    pheno.write_text(good + "NDARXX001\tTD\t9\n")
    code, err = _run(capsys, bids, out, "--label-column", "dx", "--label-file", str(pheno))
    assert code == 65 and len(err) == 1 and "match no subject" in err[0] and "NDARXX001" in err[0]
    pheno.write_text(good.splitlines()[0] + "\n")
    code, err = _run(capsys, bids, out, "--label-column", "dx", "--label-file", str(pheno))
    assert code == 65 and len(err) == 1 and "no participant rows" in err[0]
    pheno.write_text(good)
    code, err = _run(capsys, bids, out, "--label-column", "diagnosis", "--label-file", str(pheno))
    assert code == 65 and len(err) == 1 and "dx.tsv has no column 'diagnosis'" in err[0]
    assert not (out / "group").exists()


# --- QC exclusion ---------------------------------------------------------------------------

def test_injected_high_motion_subject_is_excluded_with_its_rule(relabelled):
    bids, out, _ = relabelled
    qc = json.loads(dv.qc_json(out, dv.Source(subject=HIGH_MOTION)).read_text())
    calm = json.loads(dv.qc_json(out, dv.Source(subject="05")).read_text())
    assert qc["max_fd"] > 3 and calm["max_fd"] < 1                  # the injected jump, as qc_metrics sees it
    assert calm["snr"] > 10 and json.loads(dv.qc_json(out, dv.Source(subject=NO_SNR)).read_text())["snr"] is None
    inputs = collect_inputs(bids, out, "diagnosis", ["ADHD*"], 2, negative=["TD"],
                            qc_exclude=["max_fd > 3", "snr < 10"])
    assert inputs.subjects == sorted(ADHD + TD[:1] + TD[2:])
    qc_rows = [r for r in inputs.excluded if r["reason"] == "qc"]
    assert [(r["participant_id"], r["run"]) for r in qc_rows] == [(f"sub-{HIGH_MOTION}", f"sub-{HIGH_MOTION}")]
    assert qc_rows[0]["detail"].startswith("max_fd > 3 (max_fd = ")
    assert inputs.selection["qc_exclude"] == ["max_fd > 3", "snr < 10"]
    # a rule that needs a null metric cannot decide: the run stays, listed
    assert [(r["participant_id"], r["rule"]) for r in inputs.selection["qc_undecided"]] == [(f"sub-{NO_SNR}",
                                                                                              "snr < 10")]
    assert NO_SNR in inputs.subjects
    # a rule excluding nothing leaves every labelled subject in
    assert collect_inputs(bids, out, "diagnosis", ["ADHD*"], 2, negative=["TD"],
                          qc_exclude=["max_fd > 10"]).subjects == sorted(ADHD + TD)


def test_qc_rule_errors_are_64_and_missing_qc_is_66(relabelled, tmp_path, capsys, monkeypatch):
    patch_tiny(monkeypatch)
    bids, out, _ = relabelled
    for rule, msg in (("max_fd >", "not an expression"), ("__import__('os').system('true') > 0", "not allowed"),
                      ("max_fd", "not a comparison"), ("max_fdd > 3", "unknown QC metric 'max_fdd'")):
        code, err = _run(capsys, bids, out, "--positive", "ADHD*", "--negative", "TD", "--qc-exclude", rule)
        assert code == 64 and len(err) == 1 and msg in err[0], (rule, err)
    bids2, out2, _ = synthetic(tmp_path, n=6)                       # maps but no QC files
    code, err = _run(capsys, bids2, out2, "--qc-exclude", "max_fd > 3")
    assert code == 66 and len(err) == 1 and "no QC file" in err[0] and "--qc-exclude" in err[0]
    assert not (out / "group").exists() and not (out2 / "group").exists()


def test_rule_parser_is_safe_and_three_valued():
    r = parse_rule("max_fd > 3 or n_outlier_volumes / n_volumes > 0.2")
    assert evaluate(r, {"max_fd": 4.0, "n_outlier_volumes": 0, "n_volumes": 10}) is True
    assert evaluate(r, {"max_fd": 1.0, "n_outlier_volumes": 3, "n_volumes": 10}) is True
    assert evaluate(r, {"max_fd": 1.0, "n_outlier_volumes": 1, "n_volumes": 10}) is False
    assert evaluate(r, {"max_fd": None, "n_outlier_volumes": 1, "n_volumes": 10}) is None    # cannot decide
    assert evaluate(r, {"max_fd": None, "n_outlier_volumes": 3, "n_volumes": 10}) is True
    assert evaluate(parse_rule("not (0.8 <= registration_similarity < 1.5)"), {"registration_similarity": 0.5})
    from bids_adhd.errors import UsageError
    for bad in ("snr.real > 1", "[snr][0] > 1", "snr > 'a'", "(lambda: 1)() > 0", "snr < 10; import os",
                "snr if snr else 1 > 0", "x" * 400 + " > 1"):
        with pytest.raises(UsageError):
            parse_rule(bad)


def test_qc_metric_names_are_those_written_and_documented():
    """QC_METRICS: keys qc_metrics writes (numbers), each documented in docs/qc.md."""
    from bids_adhd.reports.participant import qc_metrics

    shape = (30, 30, 30)
    mask = np.zeros(shape, bool)
    mask[10:20, 10:20, 10:20] = True
    b0 = np.where(mask, 1000.0, 0.0) + np.random.default_rng(0).rayleigh(20, shape)
    m = qc_metrics(b0, mask, np.full(shape, 0.4), np.full(shape, 0.8e-3), np.zeros((5, 6)), voxel_size=(2, 2, 2))
    numeric = {k for k, v in m.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    assert set(QC_METRICS) - numeric == {"registration_similarity"} | ({"snr", "noise_sigma"} - numeric)
    doc = (ROOT / "docs" / "qc.md").read_text()
    assert [k for k in QC_METRICS if f"`{k}`" not in doc] == []


# --- the whole run: recorded, written, reported ------------------------------------------------

def test_group_run_records_the_selection(relabelled, tmp_path, capsys, monkeypatch):
    patch_tiny(monkeypatch)
    bids, out, _ = relabelled
    pipe = tiny_pipeline(tmp_path, epochs=1, head_epochs=10)
    code = main([str(bids), str(out), "group", "-q", "--pipeline", str(pipe),
                 "--positive", "ADHD*", "--negative", "TD", "--qc-exclude", "max_fd > 3"])
    assert code == 0, capsys.readouterr().err[-2000:]
    g = out / "group"
    cfg = json.loads((g / "config.json").read_text())
    assert cfg["inputs"]["positive"] == ["ADHD*"] and cfg["inputs"]["negative"] == ["TD"]
    assert cfg["inputs"]["qc_exclude"] == ["max_fd > 3"] and cfg["subjects"] == sorted(ADHD + TD[:1] + TD[2:])
    metrics = json.loads((g / "metrics.json").read_text())
    assert metrics["inputs"]["values_with_maps"]["excluded"] == {"Anxiety": 2, "Autism": 1}
    assert metrics["pooled"]["n"] == 7
    ex = [ln.split("\t") for ln in (g / "excluded.tsv").read_text().splitlines()]
    assert ex[0] == ["participant_id", "run", "reason", "detail"]
    assert sorted((r[0], r[2]) for r in ex[1:]) == [("sub-06", "qc"), ("sub-09", "label_value"),
                                                   ("sub-10", "label_value"), ("sub-11", "no_label"),
                                                   ("sub-12", "no_label"), ("sub-13", "label_value")]
    html = (g / "report.html").read_text()
    who = html[html.index("<h2>Who was analysed</h2>"):]
    assert html.index("<h2>Who was analysed</h2>") < html.index("<h2>Metrics")
    assert "Anxiety: 2" in who and "Autism: 1" in who and "max_fd &gt; 3" in who and "sub-06" in who
    assert "TD: 3" in who and "ADHD-Combined Type: 2" in who and "7 subjects analysed of 13" in who
    # a resume with another selection is refused
    code, err = _run(capsys, bids, out, "--pipeline", str(tiny_pipeline(tmp_path)), "--resume",
                     "--positive", "ADHD*", "--negative", "TD")
    assert code == 64 and len(err) == 1 and "qc_exclude" in err[0]


def test_bad_qc_files_and_values_are_65(tmp_path):
    from bids_adhd.errors import DataError
    from bids_adhd.learn.labels import read_qc

    src = dv.Source(subject="01")
    path = dv.qc_json(tmp_path, src)
    path.parent.mkdir(parents=True)
    for text, msg in (("{not json", "not valid JSON"), ("[1, 2]", "not a JSON object")):
        path.write_text(text)
        with pytest.raises(DataError, match=msg) as exc:
            read_qc(tmp_path, src)
        assert exc.value.exit_code == 65 and "\n" not in exc.value.message
    with pytest.raises(DataError, match="'snr' is not a number"):
        evaluate(parse_rule("snr < 10"), {"snr": "high"})


def test_label_file_not_utf8_is_65(tmp_path):
    from bids_adhd.errors import DataError
    from bids_adhd.learn.labels import LabelSpec, read_label_values

    (tmp_path / "participants.tsv").write_text("participant_id\tdiagnosis\nsub-01\tTD\n")
    (tmp_path / "dx.tsv").write_bytes(b"participant_id\tdx\nsub-01\t\xff\xfe\n")
    with pytest.raises(DataError, match="not UTF-8"):
        read_label_values(tmp_path, LabelSpec(column="dx", label_file="dx.tsv"))
    (tmp_path / "dx.tsv").write_text("participant_id\tdx\nsub-01\tTD\nn/a\tADHD\n")
    with pytest.raises(DataError, match="line 3 has no participant_id"):
        read_label_values(tmp_path, LabelSpec(column="dx", label_file="dx.tsv"))


def test_label_file_without_participants_tsv(tmp_path):
    """A dataset without participants.tsv: the label file alone names the subjects (sub-* folders)."""
    from bids_adhd.learn.labels import LabelSpec, read_label_values

    for s in ("01", "02"):
        (tmp_path / f"sub-{s}").mkdir()
    (tmp_path / "dx.tsv").write_text("participant_id\tdx\tsite\n01\tADHD\tA\nsub-02\tn/a\tB\n")
    values, merged, source = read_label_values(tmp_path, LabelSpec(column="dx", label_file=str(tmp_path / "dx.tsv")))
    assert values == {"01": "ADHD", "02": None} and merged["02"]["site"] == "B"


def test_spreadsheet_export_bom_and_blanks(tmp_path):
    """A TSV saved by a spreadsheet: a UTF-8 BOM, blanks around cells; a blank-only cell is n/a."""
    from bids_adhd.learn.labels import LabelSpec, map_labels, read_label_values

    for s in ("01", "02", "03"):
        (tmp_path / f"sub-{s}").mkdir()
    (tmp_path / "dx.tsv").write_bytes("\ufeffparticipant_id\tdx \nsub-01\tTD \nsub-02\t ADHD\nsub-03\t  \n"
                                      .encode("utf-8"))
    spec = LabelSpec(column="dx", label_file=str(tmp_path / "dx.tsv"), negative=("TD",))
    values, _, _ = read_label_values(tmp_path, spec)
    assert values == {"01": "TD", "02": "ADHD", "03": None}
    assert map_labels(values, spec).labels == {"01": 0, "02": 1}


def test_qc_rules_are_per_run(tmp_path):
    """Two sessions: the subject with one high-motion session keeps the other one."""
    bids, out, rows = synthetic(tmp_path, n=4, sessions=2)
    for r in rows:
        for ses in ("01", "02"):
            _write_qc(out, r["participant_id"][4:], (r["participant_id"], ses) == ("sub-02", "02"), ses)
    inputs = collect_inputs(bids, out, "diagnosis", "ADHD", 2, qc_exclude=["max_fd > 3"])
    assert inputs.subjects == ["01", "02", "03", "04"]
    assert [rm.source.session for rm in inputs.runs["02"]] == ["01"]
    assert [rm.source.session for rm in inputs.runs["01"]] == ["01", "02"]
    assert [(r["participant_id"], r["run"], r["reason"]) for r in inputs.excluded] == [("sub-02", "sub-02_ses-02",
                                                                                         "qc")]
