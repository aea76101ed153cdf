"""Group level under faults: training must be reproducible bit for bit, and a run SIGKILLed
at any of nine points then continued with ``--resume`` must end with exactly the outputs of
an uninterrupted run (docs/reliability.md, cases 74-85).

The in-process tests check the training loop (``train_model``) with a tiny classifier on
16^3 inputs; the kill chain runs real ``bids_adhd BIDS OUT group`` processes (the tiny
stand-in classifier of ``test_group_common``, on the maps ``write_synthetic_maps`` puts in
OUTPUT_DIR without running the participant level).
"""
from __future__ import annotations

import json
import os
import select
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from helpers import tree_hash, finish_process

from test_group_common import tiny_build_model


def _cfg(**train):
    from bids_adhd.config import load_pipeline

    cfg = load_pipeline("fast")
    t = dict(epochs=3, batch_size=2, head_epochs=0, augment_flip=True, augment_affine=True, patience=10,
             warmup_epochs=1)
    t.update(train)
    return cfg.replace("train", **t)


def _items(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [{"id": f"{i}", "subject": f"{i:02d}", "label": i % 2, "image": torch.rand(1, 16, 16, 16, generator=g)}
            for i in range(n)]


def _train(tmp_path, cfg, name, resume=False, train_set=None, val_set=None):
    from bids_adhd.learn.group import _augment
    from bids_adhd.learn.train import initial_state, train_model

    torch.manual_seed(cfg.train.seed)
    model, _ = tiny_build_model(cfg.model)
    res = train_model(model, initial_state(model), train_set or _items(4), val_set if val_set is not None
                      else _items(2, seed=1), cfg, torch.device("cpu"), ckpt_dir=tmp_path / "ckpt" / name,
                      log_path=tmp_path / name / "log.tsv", seed=7, resume=resume, progress=False,
                      augment=_augment(cfg), tb_dir=None)
    from bids_adhd.learn.classifier import adapter_state_dict
    return res, adapter_state_dict(model)


def _same_state(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_augmented_training_is_reproducible(tmp_path):
    """Two trainings with random flips and affine augmentation give the same bits.

    Was not so: MONAI's random transforms draw from their own numpy RandomState, which the
    per-epoch ``torch.manual_seed`` does not touch, and ``if augment`` (bool(Compose) ->
    len() -> flatten()) re-seeded the transforms from entropy before every sample."""
    cfg = _cfg()
    r1, s1 = _train(tmp_path, cfg, "a")
    r2, s2 = _train(tmp_path, cfg, "b")
    assert [h["train_loss"] for h in r1["history"]] == [h["train_loss"] for h in r2["history"]]
    _same_state(s1, s2)


def test_resume_after_early_stop_stays_stopped(tmp_path):
    """A fold killed after the checkpoint of the epoch that stopped it early (before its
    adapter and metrics were written) resumes as stopped: no further epoch is trained.

    lr 0 and frozen normalisation statistics: the validation loss never improves, so the
    run stops after 1 + patience epochs, long before ``epochs``."""
    cfg = _cfg(lr=0.0, norm_mode="frozen", patience=2, epochs=6, augment_flip=False, augment_affine=False)
    r1, s1 = _train(tmp_path, cfg, "a")
    assert r1["stopped_early"] and r1["epochs_run"] == 3
    assert (tmp_path / "ckpt" / "a" / "last.pt").is_file()      # as a kill would leave it
    r2, s2 = _train(tmp_path, cfg, "a", resume=True)
    assert (r2["epochs_run"], r2["stopped_early"], r2["best_epoch"]) == (3, True, r1["best_epoch"])
    assert r2["history"] == r1["history"]
    _same_state(s1, s2)


# --- the kill chain: real group runs SIGKILLed at nine points, then resumed -----------------

_RUNNER = r'''
import json, os, signal, sys
sys.path.insert(0, {tests!r})
import test_group_common as c
import bids_adhd.learn.classifier as classifier
classifier.build_model = c.tiny_build_model
from bids_adhd.cli import main


def install_kill(spec):
    # <how>:<what>[#<n>]: SIGKILL this process (its whole process group) at the n-th
    #   open:<path part>      file opened (audit hook)
    #   before:<path part>    os.replace onto that path: temp file complete, not yet renamed
    #   after:<path part>     right after that os.replace
    #   step:<desc>           after a fine-tuning optimiser step of train_model(desc=<desc>)
    how, _, what = spec.partition(":")
    what, _, nth = what.partition("#")
    nth, seen = int(nth or 1), [0]

    def hit(subject):
        if what in subject:
            seen[0] += 1
            if seen[0] == nth:
                sys.stderr.flush()
                os.killpg(os.getpgid(0), signal.SIGKILL)

    if how == "open":
        def audit(event, args):
            if event == "open" and isinstance(args[0], str):
                hit(args[0])
        sys.addaudithook(audit)
    elif how in ("before", "after"):
        replace = os.replace

        def kill_replace(src, dst, *a, **kw):
            if how == "before":
                hit(os.fspath(dst))
            replace(src, dst, *a, **kw)
            if how == "after":
                hit(os.fspath(dst))
        os.replace = kill_replace
    elif how == "step":
        from torch.optim.optimizer import register_optimizer_step_post_hook

        def post_step(opt, args, kwargs):
            f = sys._getframe(1)
            while f is not None and f.f_code.co_name not in ("train_model", "train_head"):
                f = f.f_back
            if f is not None and f.f_code.co_name == "train_model":
                hit(str(f.f_locals.get("desc")))
        register_optimizer_step_post_hook(post_step)
    else:
        raise SystemExit(f"bad kill spec {{spec!r}}")


def serve():
    # Fork server: import once, then one fresh child process per request (a JSON line with
    # argv, kill, log); answers with the child's exit status (-9: SIGKILLed). Saves the ~5-10 s
    # of importing torch/MONAI per run. The parent runs no torch op (no thread pool to fork).
    import bids_adhd.learn.group, bids_adhd.learn.train, bids_adhd.learn.adapter  # noqa: F401
    import bids_adhd.reports.group, bids_adhd.learn.metrics, sklearn.model_selection  # noqa: F401
    import monai.transforms, safetensors.torch, tqdm, matplotlib  # noqa: F401
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot  # noqa: F401
    for line in sys.stdin:
        job = json.loads(line)
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                os.setpgid(0, 0)
                fd = os.open(job["log"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
                os.dup2(fd, 1)
                os.dup2(fd, 2)
                if job.get("kill"):
                    install_kill(job["kill"])
                code = main(job["argv"])
            except SystemExit as exc:
                code = exc.code if isinstance(exc.code, int) else 1
            except BaseException:
                import traceback
                traceback.print_exc()
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)
        print(json.dumps({{"pid": pid}}), flush=True)
        _, status = os.waitpid(pid, 0)
        print(json.dumps({{"code": os.waitstatus_to_exitcode(status)}}), flush=True)


if sys.argv[1:] == ["--serve"]:
    serve()
else:
    if os.environ.get("BIDS_ADHD_TEST_KILL"):
        install_kill(os.environ["BIDS_ADHD_TEST_KILL"])
    raise SystemExit(main(sys.argv[1:]))
'''

#: 8 subjects (4 per class), 2 folds: 2 inner-training subjects per fold, batch 1 (padded to 2
#: for BatchNorm), so 2 steps per epoch; head warm-up, 2 epochs, the paper preset's flips and
#: affine augmentation, its BatchNorm-in-train-mode normalisation
_PIPELINE = """\
base: fast
train:
  folds: 2
  epochs: 2
  warmup_epochs: 1
  patience: 10
  head_epochs: 5
  batch_size: 1
  augment_flip: true
  augment_affine: true
"""

def _ckpt(gdir: Path, name: str):
    p = gdir / "checkpoints" / name / "last.pt"
    return torch.load(str(p), map_location="cpu", weights_only=True) if p.is_file() else None


def _epoch(gdir, name):
    c = _ckpt(gdir, name)
    return None if c is None else (c["epoch"], c["optimizer"] is not None)


#: (what, BIDS_ADHD_TEST_KILL, what the killed run left: a check on group/), in the order a run
#: reaches them: each run resumes the previous killed one and is killed at the next point
KILL_POINTS = [
    ("group/ set up, config.json written, fold assignment not yet", "after:group/config.json",
     lambda g: (g / "config.json").is_file() and not (g / "folds.tsv").exists()),
    ("reading the input maps (fold assignment saved)",
     "open:sub-05_space-MNI152NLin2009aSym_model-tensor_param-fa_dwimap.nii.gz",
     lambda g: (g / "folds.tsv").is_file() and not (g / "checkpoints").exists()),
    ("mid-epoch in fold 1 (first of the 2 steps of epoch 2)", "step:fold-1#3",
     lambda g: _epoch(g, "fold-1") == (1, True)),
    ("right after fold 1's last epoch checkpoint, before its adapter", "after:checkpoints/fold-1/last.pt",
     lambda g: _epoch(g, "fold-1") == (2, True) and not (g / "fold-1" / "adapter.safetensors").exists()),
    ("between folds (fold 1 finished)", "after:group/fold-1/metrics.json",
     lambda g: (g / "fold-1" / "metrics.json").is_file() and _epoch(g, "fold-2") is None),
    ("right after fold 2's head warm-up checkpoint (no optimiser state yet)", "after:checkpoints/fold-2/last.pt",
     lambda g: _epoch(g, "fold-2") == (0, False)),
    ("writing fold 2's adapter (temp file complete, not renamed)", "before:group/fold-2/adapter.safetensors",
     lambda g: list((g / "fold-2").glob(".adapter.safetensors.*")) and not (g / "fold-2" / "metrics.json").exists()),
    ("final all-subjects model: adapter in place, final.json not", "after:group/final/adapter.safetensors",
     lambda g: _epoch(g, "final") == (2, True) and not (g / "final" / "final.json").exists()),
    ("writing the report (predictions.tsv written, report not renamed)", "before:group/report.html",
     lambda g: (g / "predictions.tsv").is_file() and list(g.glob(".report.html.*"))),
]


def _group_env():
    env = {k: v for k, v in os.environ.items() if not k.startswith("BIDS_ADHD_TEST_")}
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    return env


def _start(runner, bids, out, pipeline, *extra, kill=None):
    env = _group_env()
    if kill:
        env["BIDS_ADHD_TEST_KILL"] = kill
    cmd = [sys.executable, str(runner), str(bids), str(out), "group", "--skip-bids-validation", "--pipeline",
           str(pipeline), "--nprocs", "1", "-q", *extra]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True, env=env)


def _finish(proc, timeout=300):
    return finish_process(proc, timeout, "group run")


class _ForkServer:
    """The runner in ``--serve`` mode: ``run(argv, kill)`` -> (exit code, stderr) of a fresh child."""

    def __init__(self, runner: Path, logs: Path):
        self.logs, self.n = logs, 0
        logs.mkdir(parents=True, exist_ok=True)
        self.err = open(logs / "server.log", "w")
        self.proc = subprocess.Popen([sys.executable, str(runner), "--serve"], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=self.err, text=True,
                                     start_new_session=True, env=_group_env())

    def _answer(self, timeout: float) -> dict:
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        line = self.proc.stdout.readline() if ready else ""
        if not line:
            raise TimeoutError
        return json.loads(line)

    def run(self, argv, kill=None, timeout=300) -> tuple[int, str]:
        self.n += 1
        log = self.logs / f"run-{self.n}.log"
        self.proc.stdin.write(json.dumps({"argv": [str(a) for a in argv], "kill": kill, "log": str(log)}) + "\n")
        self.proc.stdin.flush()
        pid = self._answer(60)["pid"]
        try:
            code = self._answer(timeout)["code"]
        except TimeoutError:
            os.killpg(pid, signal.SIGKILL)
            pytest.fail(f"group run did not finish in {timeout} s:\n{log.read_text()[-3000:]}")
        return code, log.read_text()

    def close(self):
        self.proc.stdin.close()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        self.err.close()


def _group_argv(bids, out, pipeline, *extra):
    return [bids, out, "group", "--skip-bids-validation", "--pipeline", pipeline, "--nprocs", "1", "-q", *extra]


def _final_files(gdir: Path) -> dict[str, Path]:
    return {p.relative_to(gdir).as_posix(): p for p in gdir.rglob("*")
            if p.is_file() and not any(part.startswith(".") for part in p.relative_to(gdir).parts)}


def _temps(out: Path) -> list[str]:
    return sorted(p.relative_to(out).as_posix() for p in out.rglob(".*") if ".tmp" in p.name)


def _adapter(path: Path):
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as fh:
        meta = dict(fh.metadata())
        tensors = {k: fh.get_tensor(k) for k in fh.keys()}
    meta.pop("created")                         # the write time: the one field allowed to differ
    return meta, tensors


def _untimed(obj):
    """A results JSON without what measures time (seconds, memory) or names OUTPUT_DIR."""
    if isinstance(obj, dict):
        return {k: _untimed(v) for k, v in obj.items()
                if k not in ("seconds", "timing", "peak_memory_mb", "adapter")}
    if isinstance(obj, list):
        return [_untimed(v) for v in obj]
    return obj


def _untimed_log(path: Path) -> list[list[str]]:
    rows = [ln.split("\t") for ln in path.read_text().splitlines()]
    col = rows[0].index("seconds")
    return [r[:col] + r[col + 1:] for r in rows]


def _check_after_kill(gdir: Path, what: str):
    """Every final-named file is complete (parses / loads); the run is not marked finished."""
    assert not (gdir / "metrics.json").exists(), f"{what}: group/metrics.json marks an unfinished run finished"
    for rel, p in _final_files(gdir).items():
        if p.suffix == ".json":
            json.loads(p.read_text())
        elif p.suffix == ".tsv":
            rows = [ln.split("\t") for ln in p.read_text().splitlines()]
            # excluded.tsv is complete with its header only when nobody was left out
            assert (len(rows) > 1 or rel == "excluded.tsv" and rows) and len({len(r) for r in rows}) == 1, (what, rel)
        elif p.suffix == ".safetensors":
            _adapter(p)
        elif p.suffix == ".pt":
            torch.load(str(p), map_location="cpu", weights_only=True)


def _assert_same_results(gdir: Path, ref: Path):
    have, want = _final_files(gdir), _final_files(ref)
    assert set(have) == set(want), (sorted(set(have) - set(want)), sorted(set(want) - set(have)))
    for rel, p in want.items():
        q = have[rel]
        if rel.endswith((".tsv", ".png")) and not rel.endswith("training_log.tsv"):
            assert q.read_bytes() == p.read_bytes(), f"{rel} differs from the uninterrupted run's"
        elif rel.endswith("training_log.tsv"):
            assert _untimed_log(q) == _untimed_log(p), rel
        elif rel.endswith(".safetensors"):
            (m1, t1), (m2, t2) = _adapter(q), _adapter(p)
            assert m1 == m2, rel
            assert t1.keys() == t2.keys() and all(torch.equal(t1[k], t2[k]) for k in t1), rel
        elif rel == "config.json":
            a, b = json.loads(q.read_text()), json.loads(p.read_text())
            assert {k: v for k, v in a.items() if k != "command"} == {k: v for k, v in b.items() if k != "command"}
        elif rel.endswith(".json"):
            assert _untimed(json.loads(q.read_text())) == _untimed(json.loads(p.read_text())), rel
        elif rel.endswith(".nii.gz"):           # the saliency maps (issue 13): same model, same map
            import nibabel as nib
            assert np.array_equal(np.asarray(nib.load(str(q)).dataobj), np.asarray(nib.load(str(p)).dataobj)), rel
        elif rel == "report.html":
            text = q.read_text()
            for f in json.loads((ref / "metrics.json").read_text())["folds"]:
                assert f"fold {f['fold']}" in text.lower() or str(f["fold"]) in text
            for k in (1, 2):
                assert json.loads((ref / f"fold-{k}" / "metrics.json").read_text())["model_id"] in text
        else:
            pytest.fail(f"unexpected output {rel}")


@pytest.fixture(scope="module")
def chain_data(tmp_path_factory):
    from test_group_common import synthetic

    root = tmp_path_factory.mktemp("group_kill")
    bids, maps, _ = synthetic(root, n=8)
    (root / "pipeline.yaml").write_text(_PIPELINE)
    runner = root / "run_group.py"
    runner.write_text(_RUNNER.format(tests=str(Path(__file__).parent)))
    return dict(root=root, bids=bids, maps=maps, pipeline=root / "pipeline.yaml", runner=runner)


def _inputs_hash(bids: Path, out: Path) -> tuple:
    """BIDS_DIR and the participant-level outputs in OUTPUT_DIR (everything but group/)."""
    return tree_hash(bids), {p.name: tree_hash(p) if p.is_dir() else p.read_bytes()
                             for p in sorted(out.iterdir()) if p.name != "group"}


def test_kill_chain_then_resume_equals_uninterrupted(chain_data, request):
    """SIGKILL at each of KILL_POINTS in turn (each run resumes the previous one with
    --resume), then a last --resume: the outputs equal an uninterrupted run's, bit for bit
    (CPU, one thread, fixed seeds): folds.tsv, every predictions.tsv and PNG; every JSON and
    training log but for durations (``seconds``, ``timing``, ``peak_memory_mb``) and the
    absolute adapter path in final.json; the adapters' tensors and metadata but for their
    ``created`` time. After each kill no final-named file is partial and group/metrics.json
    (written last) is absent; at the end no checkpoint or temporary file is left, the
    adapters load, and BIDS_DIR and the participant-level maps are byte-identical.

    The uninterrupted reference is an ordinary process run beside the chain; the chain's
    runs are children forked from one process that has imported torch/MONAI once
    (``--serve``): each is a fresh process killed for real, without ~5-10 s of imports each.
    """
    d = chain_data
    root, bids, pipe, runner = d["root"], d["bids"], d["pipeline"], d["runner"]
    ref_out, out = root / "reference", root / "killed"
    shutil.copytree(d["maps"], ref_out)
    shutil.copytree(d["maps"], out)
    before = _inputs_hash(bids, d["maps"])
    t0 = time.perf_counter()
    reference = _start(runner, bids, ref_out, pipe)         # uninterrupted, alongside the chain
    gdir = out / "group"
    folds = fold1 = None
    seen_temp = False
    server = _ForkServer(runner, root / "logs")
    request.addfinalizer(server.close)
    for i, (what, kill, left) in enumerate(KILL_POINTS):
        code, err = server.run(_group_argv(bids, out, pipe, *(["--resume"] if i else [])), kill=kill)
        assert code == -signal.SIGKILL, f"kill point '{what}' not reached (exit {code}):\n{err[-3000:]}"
        _check_after_kill(gdir, what)
        assert left(gdir), f"the run was not killed where intended: {what}"
        if (gdir / "folds.tsv").exists():                     # written once, never changed by a resume
            folds = folds or (gdir / "folds.tsv").read_text()
            assert (gdir / "folds.tsv").read_text() == folds, what
        if (gdir / "fold-1" / "metrics.json").exists():        # a finished fold is never redone
            fold1 = fold1 or (gdir / "fold-1" / "metrics.json").read_bytes()
            assert (gdir / "fold-1" / "metrics.json").read_bytes() == fold1, what
        seen_temp |= bool(_temps(out))
    assert folds is not None and fold1 is not None and seen_temp
    code, err = server.run(_group_argv(bids, out, pipe, "--resume"))
    assert code == 0, err[-3000:]
    code_ref, err_ref = _finish(reference)
    assert code_ref == 0, err_ref[-3000:]
    seconds = time.perf_counter() - t0

    _assert_same_results(gdir, ref_out / "group")
    assert (gdir / "fold-1" / "metrics.json").read_bytes() == fold1
    assert not (gdir / "checkpoints").exists()
    assert _temps(out) == [], "temporary files left in OUTPUT_DIR"
    # the adapters load into the model rebuilt from the pipeline
    from bids_adhd.config import load_pipeline
    from bids_adhd.learn.adapter import load_into, read_adapter

    model, _ = tiny_build_model(load_pipeline(str(pipe)).model)
    for name, fold in (("fold-1", "1"), ("fold-2", "2"), ("final", "final")):
        tensors, meta = read_adapter(gdir / name / "adapter.safetensors")
        assert meta["fold"] == fold
        load_into(model, tensors, name)
    # the saved assignment is the one the seed gives
    from bids_adhd.bids import read_participants
    from bids_adhd.learn.crossval import assign_folds, read_folds

    rows = read_participants(bids)
    subs = sorted(r["participant_id"][4:] for r in rows)
    labels = {r["participant_id"][4:]: int(r["diagnosis"] == "ADHD") for r in rows}
    saved, _ = read_folds(gdir / "folds.tsv", ("TD", "ADHD"))
    assert saved == assign_folds(subs, [labels[s] for s in subs], 2, seed=0)
    assert _inputs_hash(bids, out) == before and _inputs_hash(bids, ref_out) == before
    print(f"kill chain: {len(KILL_POINTS)} kills + resume + reference in {seconds:.0f} s")
