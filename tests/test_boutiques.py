"""boutiques.json: a valid BIDS-App descriptor, in step with the CLI, that really runs.

* ``bosh validate --bids`` accepts it;
* every option of ``bids_adhd.cli.build_parser()`` is an input and every input an
  option, with the same flag, type, list-ness, default and choices;
* the command lines ``bosh exec simulate`` builds are accepted by the parser and
  give the values of the invocation;
* the error codes are the CLI's; the image is the Dockerfile's; the version is the package's;
* ``bosh exec launch --no-container`` runs the participant level on a tiny simulated
  dataset (the expected derivatives appear), and the descriptor's own ``tests``
  give the exit codes they assert.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

import pytest

import bids_adhd
from bids_adhd import derivatives as dv
from bids_adhd.cli import build_parser
from bids_adhd.errors import EXIT_CODES

ROOT = Path(__file__).resolve().parents[1]
DESCRIPTOR = ROOT / "boutiques.json"
SMOKE_PIPELINE = ROOT / "ci" / "smoke-pipeline.yaml"
BOSH = str(Path(sys.executable).with_name("bosh"))
POSITIONAL_KEYS = {"bids_dir": "[BIDS_DIR]", "output_dir": "[OUTPUT_DIR]", "analysis_level": "[ANALYSIS_LEVEL]"}


@pytest.fixture(scope="module")
def desc() -> dict:
    return json.loads(DESCRIPTOR.read_text())


def _env(home: Path) -> dict:
    """bosh writes a cache under HOME; keep it out of the real one; put the CLI on PATH."""
    return {**os.environ, "HOME": str(home), "PATH": f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}"}


def bosh(*args, cwd=None, home: Path, timeout=600) -> subprocess.CompletedProcess:
    return subprocess.run([BOSH, *map(str, args)], cwd=cwd, env=_env(home), capture_output=True, text=True,
                          timeout=timeout)


def _options() -> list[argparse.Action]:
    return [a for a in build_parser()._actions
            if a.option_strings and not isinstance(a, (argparse._HelpAction, argparse._VersionAction))]


def _input_for(desc: dict, action: argparse.Action) -> dict:
    found = [i for i in desc["inputs"] if i.get("command-line-flag") in action.option_strings]
    assert len(found) == 1, f"{action.option_strings}: {len(found)} descriptor inputs"
    return found[0]


# --------------------------------------------------------------------------- static checks
def test_bosh_validate_bids(tmp_path):
    proc = bosh("validate", "--bids", DESCRIPTOR, home=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "BIDS validation OK" in proc.stdout + proc.stderr


def test_every_cli_option_is_an_input_with_the_same_semantics(desc):
    for action in _options():
        inp = _input_for(desc, action)
        what = f"{action.option_strings[0]} ({inp['id']})"
        if isinstance(action, (argparse._StoreTrueAction, argparse._CountAction)):
            assert inp["type"] == "Flag", what
        elif action.type is int:
            assert inp["type"] == "Number" and inp.get("integer") is True, what
        else:
            assert inp["type"] in ("String", "File"), what
        assert bool(inp.get("list")) == (action.nargs == "+"), what
        assert list(inp.get("value-choices") or []) == list(action.choices or []), what
        default = None if isinstance(action, (argparse._StoreTrueAction, argparse._CountAction)) else action.default
        assert inp.get("default-value") == default, f"{what}: default {inp.get('default-value')} vs {default}"
        assert inp.get("optional") is True, what
        assert inp["value-key"] in desc["command-line"], what
    for dest, key in POSITIONAL_KEYS.items():
        action = next(a for a in build_parser()._actions if a.dest == dest)
        holders = [i for i in desc["inputs"] if i["value-key"] == key]
        assert holders, dest
        if action.choices:
            assert all(i.get("value-choices") == list(action.choices) for i in holders)


def test_every_input_is_a_cli_option(desc):
    flags = {s for a in _options() for s in a.option_strings}
    for inp in desc["inputs"]:
        if inp["value-key"] in POSITIONAL_KEYS.values():
            assert "command-line-flag" not in inp
            continue
        assert inp.get("command-line-flag") in flags, inp["id"]
    keys = re.findall(r"\[[A-Z_]+\]", desc["command-line"])
    assert sorted(set(keys)) == sorted({i["value-key"] for i in desc["inputs"]}), "value-keys and command line differ"
    assert len(keys) == len(set(keys)) + 1, "each value-key once (OUTPUT_DIR twice: mkdir and the app)"


def test_mutually_exclusive_options_are_a_group(desc):
    parser = build_parser()
    for group in parser._mutually_exclusive_groups:
        ids = sorted(_input_for(desc, a)["id"] for a in group._group_actions)
        assert any(sorted(g["members"]) == ids and g.get("mutually-exclusive") for g in desc["groups"]), ids


def test_error_codes_version_and_image(desc):
    codes = {e["code"] for e in desc["error-codes"]}
    assert codes == set(EXIT_CODES.values()) | {1, 130}
    assert all(e["description"].strip() for e in desc["error-codes"])
    assert desc["tool-version"] == bids_adhd.__version__
    image = desc["container-image"]
    assert image["type"] == "docker"
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert f"ARG BIDS_ADHD_IMAGE={image['image']}" in dockerfile
    assert image["image"].endswith(":" + bids_adhd.__version__)
    assert desc["suggested-resources"]["cpu-cores"] >= 1 and desc["suggested-resources"]["ram"] > 0
    gpu = desc["custom"]["gpu"]
    assert gpu["required"] is False and "--gpus" in gpu["docker"] and "--nv" in gpu["apptainer"]


# --------------------------------------------------------------------------- simulate → parser
SIMULATED = {
    "minimal participant": {"bids_dir": "data/bids", "output_dir_name": "out", "analysis_level": "participant"},
    "every participant option": {
        "bids_dir": "data/bids", "output_dir_name": "out dir", "analysis_level": "participant",
        "participant_label": ["01", "sub-02"], "session_label": ["1"], "bids_filter_file": "filters.json",
        "skip_bids_validation": True, "work_dir": "/scratch/work", "nprocs": 3, "omp_nthreads": 2,
        "nipype_plugin": "Linear", "pipeline": "fast", "model": "adapter.safetensors",
        "allow_training_subjects": True, "weights": "w.safetensors", "verbose": True},
    "group": {"bids_dir": "data/bids", "output_dir_name": "out", "analysis_level": "group",
              "label_column": "dx", "positive": ["ADHD*", "ADD"], "negative": ["TD"],
              "label_file": "phenotype/dx.tsv", "qc_exclude": ["max_fd > 3", "snr < 10"], "folds": 3, "seed": 7, "device": "cpu",
              "resume": True, "quiet": True},
}


@pytest.mark.parametrize("name", sorted(SIMULATED))
def test_simulated_command_line_parses_to_the_invocation(name, desc, tmp_path):
    invocation = SIMULATED[name]
    inv = tmp_path / "invocation.json"
    inv.write_text(json.dumps(invocation))
    proc = bosh("exec", "simulate", "-i", inv, DESCRIPTOR, home=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("mkdir -p")][-1]
    mkdir, _, command = line.partition("; ")
    argv = shlex.split(command)
    assert argv[0] == "bids_adhd"
    assert shlex.split(mkdir)[2:] == [invocation["output_dir_name"]]
    args = build_parser().parse_args(argv[1:])
    by_id = {i["id"]: i for i in desc["inputs"]}
    dest_of = {i["id"]: next(a.dest for a in _options() if i.get("command-line-flag") in a.option_strings)
               for i in desc["inputs"] if "command-line-flag" in i}
    assert args.bids_dir == invocation["bids_dir"]
    assert args.output_dir == invocation["output_dir_name"]
    assert args.analysis_level == invocation["analysis_level"]
    for key, value in invocation.items():
        if key in dest_of:
            got = getattr(args, dest_of[key])
            if by_id[key]["type"] == "Flag":
                assert bool(got) is value, key
            else:
                assert got == value, key
    defaults = build_parser().parse_args(["b", "o", invocation["analysis_level"]])
    for action in _options():
        if not any(_input_for(desc, action)["id"] == k for k in invocation):
            assert getattr(args, action.dest) == getattr(defaults, action.dest), action.dest


@pytest.mark.xfail(strict=False, reason="Boutiques 0.5.33 substitutes the first [OUTPUT_DIR] input in the list: "
                   "an absent output_dir_name removes the key before participant_level_analysis_dir is seen; "
                   "use output_dir_name at both levels (docs/deploy.md)")
def test_group_with_participant_level_analysis_dir(tmp_path):
    inv = tmp_path / "inv.json"
    inv.write_text(json.dumps({"bids_dir": "b", "participant_level_analysis_dir": "out", "analysis_level": "group"}))
    proc = bosh("exec", "simulate", "-i", inv, DESCRIPTOR, home=tmp_path)
    assert "bids_adhd b out group" in proc.stdout


# --------------------------------------------------------------------------- real runs
@pytest.fixture(scope="module")
def launch_dir(tmp_path_factory, tiny_bids):
    """A launch directory with demo/bids, where the descriptor's tests expect the data."""
    d = tmp_path_factory.mktemp("bosh")
    (d / "demo").mkdir()
    (d / "demo" / "bids").symlink_to(tiny_bids, target_is_directory=True)
    (d / "home").mkdir()
    return d


def _launch(launch_dir: Path, invocation: dict, name: str) -> subprocess.CompletedProcess:
    inv = launch_dir / f"{name}.json"
    inv.write_text(json.dumps(invocation))
    return bosh("exec", "launch", "--no-container", "--skip-data-collection", "--stream", DESCRIPTOR, inv,
                cwd=launch_dir, home=launch_dir / "home", timeout=1800)


def test_launch_runs_the_participant_level(launch_dir, desc):
    """The descriptor's participant test, with the smoke preset instead of 'fast' to keep CI short."""
    case = next(t for t in desc["tests"] if t["assertions"].get("exit-code") == 0)
    invocation = {**case["invocation"], "pipeline": str(SMOKE_PIPELINE)}
    t0 = time.perf_counter()
    proc = _launch(launch_dir, invocation, "participant")
    print(f"bosh exec launch, participant level, 1 subject: {time.perf_counter() - t0:.1f} s")
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    out = launch_dir / invocation["output_dir_name"]
    for sub in invocation["participant_label"]:
        for f in dv.participant_outputs(out, dv.Source(subject=sub)):
            assert f.is_file(), f
        assert dv.report_html(out, sub).is_file()
    assert json.loads((out / "dataset_description.json").read_text())["DatasetType"] == "derivative"


def test_descriptor_tests_give_their_exit_codes(launch_dir, desc):
    """The descriptor's other tests (error paths), as `bosh test` would run them, without a container."""
    cases = [t for t in desc["tests"] if t["assertions"].get("exit-code", 0) != 0]
    assert cases
    for case in cases:
        proc = _launch(launch_dir, case["invocation"], case["name"])
        expected = case["assertions"]["exit-code"]
        assert proc.returncode == expected, (case["name"], proc.stdout[-2000:], proc.stderr[-2000:])
        described = next(e["description"] for e in desc["error-codes"] if e["code"] == expected)
        assert described in proc.stdout, "bosh reports the descriptor's meaning of the exit code"


def test_descriptor_test_invocations_are_valid(desc, tmp_path):
    for case in desc["tests"]:
        inv = tmp_path / f"{case['name']}.json"
        inv.write_text(json.dumps(case["invocation"]))
        proc = bosh("invocation", DESCRIPTOR, "-i", inv, home=tmp_path)
        assert proc.returncode == 0, (case["name"], proc.stdout + proc.stderr)
