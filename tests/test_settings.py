"""Settings objects (``bids_adhd.settings``) and the one (de)serialisation of ``PipelineConfig``.

The command line builds frozen settings in ``cli.py``; the library reads only them. A preset
written out with ``to_json_dict`` and read back with ``from_dict`` is the same configuration,
an adapter written before ``TemplateConfig.space`` was removed stays readable, and every
allowed-value check speaks with one message.
"""
from __future__ import annotations

import dataclasses
import json

import pytest

from bids_adhd import cli
from bids_adhd.config import PipelineConfig, load_pipeline, preset_names
from bids_adhd.errors import UsageError
from bids_adhd.learn.predict import pipeline_from_dict
from bids_adhd.errors import DataError
from bids_adhd.settings import GroupSettings, ParticipantSettings, SimulateSettings, from_namespace


def _parse(*argv):
    return cli.build_parser().parse_args([str(a) for a in argv])


def test_participant_settings_from_the_command_line():
    args = _parse("/in", "/out", "participant", "--participant-label", "01", "sub-02", "--nprocs", "3",
                  "--omp-nthreads", "1", "--nipype-plugin", "Linear", "-vv")
    s = cli.participant_settings(args)
    assert isinstance(s, ParticipantSettings)
    assert (s.bids_dir, s.output_dir, s.participant_label) == ("/in", "/out", ("01", "sub-02"))
    assert (s.nprocs, s.omp_nthreads, s.nipype_plugin, s.verbose, s.pipeline) == (3, 1, "Linear", 2, "default")
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.nprocs = 4


def test_group_settings_from_the_command_line():
    args = _parse("/in", "/out", "group", "--positive", "ADHD*", "--negative", "TD", "--folds", "3", "--seed",
                  "7", "--cv", "site", "--permutations", "0", "--confounds", "none", "--no-saliency", "--resume")
    s = cli.group_settings(args)
    assert (s.pipeline, s.positive, s.negative, s.folds, s.seed) == ("paper", ("ADHD*",), ("TD",), 3, 7)
    assert (s.cv, s.permutations, s.confounds, s.saliency, s.resume) == ("site", 0, ("none",), False, True)
    from bids_adhd.learn.group import resolve_config
    from bids_adhd.learn.groupstats import stats_options

    cfg = resolve_config(s)
    assert (cfg.name, cfg.train.folds, cfg.train.seed) == ("paper", 3, 7)
    opts = stats_options(s, cfg.train.seed)
    assert (opts.cv, opts.permutations, opts.confounds, opts.saliency, opts.seed) == ("site", 0, (), False, 7)
    default = stats_options(GroupSettings("/in", "/out"), 0)
    assert default.permutations == 200 and default.confounds == ("age", "sex", "site", "mean_fd")


@pytest.mark.parametrize("cls, kw, message", [
    (ParticipantSettings, {"nprocs": 0}, "--nprocs must be ≥ 1"),
    (ParticipantSettings, {"omp_nthreads": 0}, "--omp-nthreads must be ≥ 1"),
    (ParticipantSettings, {"nipype_plugin": "Dask"}, "--nipype-plugin must be one of Linear, MultiProc"),
    (GroupSettings, {"seed": -1}, "--seed must be ≥ 0"),
    (GroupSettings, {"permutations": -5}, "--permutations must be ≥ 0"),
    (GroupSettings, {"cv": "loso"}, "--cv must be one of stratified, site"),
    (GroupSettings, {"device": "tpu"}, "--device must be one of auto, cpu, cuda"),
])
def test_settings_are_validated_on_construction(cls, kw, message):
    with pytest.raises(UsageError, match=message):
        cls("/in", "/out", **kw)


def test_bad_settings_exit_64_before_touching_the_disk(tmp_path, capsys):
    code = cli.main([str(tmp_path / "missing"), str(tmp_path / "out"), "group", "--seed", "-2"])
    assert code == 64 and "--seed must be ≥ 0 (got -2)" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_simulate_settings_from_the_command_line():
    import argparse

    from bids_adhd import simulate_cli

    parser = argparse.ArgumentParser()
    simulate_cli.add_cli_arguments(parser)
    s = from_namespace(SimulateSettings, parser.parse_args(["/sim", "--no-eddy", "--subjects", "4",
                                                            "--profile", "realistic", "--motion-ratio", "1"]))
    assert (s.out_dir, s.eddy, s.dropouts, s.subjects, s.profile, s.motion_ratio) == \
        ("/sim", False, True, 4, "realistic", 1.0)


@pytest.mark.parametrize("name", preset_names())
def test_every_preset_round_trips_through_json(name):
    cfg = load_pipeline(name)
    data = cfg.to_json_dict()
    assert json.loads(json.dumps(data)) == data          # plain JSON: no tuples left
    assert PipelineConfig.from_dict(data) == cfg
    assert pipeline_from_dict(data) == cfg


def test_an_old_adapters_pipeline_with_template_space_is_still_read():
    data = load_pipeline("fast").to_json_dict()
    data["template"]["space"] = "MNI152NLin2009aSym"     # written by versions that had the unused key
    assert pipeline_from_dict(data) == load_pipeline("fast")
    data["template"]["spacing"] = 2
    with pytest.raises(DataError, match=r"unknown key\(s\) spacing"):
        pipeline_from_dict(data)
    with pytest.raises(UsageError, match="unknown section"):
        PipelineConfig.from_dict({"trian": {}})


@pytest.mark.parametrize("section, key, value, message", [
    ("preproc", "denoise", "nlmeans", "denoise must be one of mppca, patch2self, none"),
    ("model", "adaptation", "adapter", "adaptation must be one of lora, peft-lora"),
    ("model", "pooling", "max", "pooling must be one of avg, multiscale, avgmax, spatial"),
    ("train", "amp", "fp8", "amp must be one of bf16, fp16, none"),
])
def test_allowed_values_have_one_message(tmp_path, section, key, value, message):
    path = tmp_path / "bad.yaml"
    path.write_text(f"base: fast\n{section}:\n  {key}: {value}\n")
    with pytest.raises(UsageError, match=message):
        load_pipeline(str(path))
