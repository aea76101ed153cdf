"""Known-truth group benchmark on the realistic simulator profile (issue 12).

Per seed: simulate N realistic subjects, run the participant level (``fast`` preset, one subject
at a time, resumable), then score every row on the SAME 5 folds (``crossval.assign_folds`` with the
group level's seed, exactly what ``bids_adhd ... group`` computes; checked against its
``group/folds.json``):

phenotype     L2 logistic regression on age, sex, site (one-hot)
motion        L2 logistic regression on the participant level's mean framewise displacement
oracle        the truth oracle (docs/simulation.md), no fitting; AUC either direction
mean_fa       L2 logistic regression on whole-brain mean template-space FA
voxel_logreg  L2 logistic regression on template-space FA voxels (C by inner 3-fold CV on the
              training fold only; scikit-learn)
probe         the group level with the encoder frozen (``fast`` with ``adaptation: linear-probe``)
lora_fast     the group level, ``--pipeline fast``

AUC = pooled out-of-fold AUC with a 95 % percentile bootstrap CI (2000 resamples of subjects);
cpu_s = CPU seconds of that row alone (the shared participant level is reported apart, as
``participant_cpu_s``). Everything is cached under --work: subjects already processed and rows
already scored (for the same subject set) are not redone, so the benchmark continues where it
stopped. Rows are scored on the subjects whose participant level has finished (``n``); phenotype,
oracle and motion from the TRUE simulated motion (``motion_truth_fd``) are also given on every
simulated subject (``all_simulated``), since they need no participant level.

    nice -n 5 python benchmarks/group_truth.py --seed 101 --subjects 100
    nice -n 5 python benchmarks/group_truth.py --seed 202 --subjects 60
    python benchmarks/group_truth.py --seed 101 --subjects 100 --score-only   # rows from what is done
    # or in N processes at once (one core each): simulate first (the shards would race to), then score
    python benchmarks/group_truth.py --seed 101 --subjects 100 --score-only
    python benchmarks/group_truth.py --seed 101 --subjects 100 --shard 0/2 &
    python benchmarks/group_truth.py --seed 101 --subjects 100 --shard 1/2; wait
    python benchmarks/group_truth.py --seed 101 --subjects 100 --score-only

Seeds 101 and 202 were used for nothing else (the default effect size was chosen on seed 7:
benchmarks/tune_realistic_effect.py).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
ROWS = ("phenotype", "motion", "oracle", "mean_fa", "voxel_logreg", "probe", "lora_fast")
PROBE_YAML = """description: frozen-encoder linear probe on the fast preset's grid and read-out (benchmark)
base: fast
model:
  adaptation: linear-probe
"""


def cpu_children() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def cpu_self() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def cli(*args: str) -> None:
    cmd = [sys.executable, "-m", "bids_adhd", *args]
    res = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if res.returncode:
        raise RuntimeError(f"{' '.join(cmd)} -> {res.returncode}\n{res.stdout[-3000:]}")


def load_json(path: Path, default):
    return json.loads(path.read_text()) if path.is_file() else default


def save_json(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1, sort_keys=True) + "\n")
    os.replace(tmp, path)


# --- the data ------------------------------------------------------------------

def simulate(work: Path, seed: int, n: int) -> Path:
    from bids_adhd.simulate_realistic import simulate_realistic

    bids = work / "bids"
    if not (bids / "participants.tsv").is_file():
        t0 = cpu_self()
        simulate_realistic(bids, n_subjects=n, seed=seed, n_jobs=2)
        save_json(work / "simulate.json", {"cpu_s": cpu_self() - t0})
    return bids


def participant_level(work: Path, bids: Path, deadline: float, shard: tuple[int, int] = (0, 1)) -> dict:
    """Run the participant level subject by subject until done or ``deadline``; per-subject CPU cached.
    ``shard`` (k, n): only every n-th subject from the k-th (n processes may share one seed's work
    folder, each with its own CPU cache file; the caches are merged when read)."""
    from bids_adhd import derivatives as dv

    out, cache_path = work / "out", work / ("participant_cpu.json" if shard[1] == 1 else
                                            f"participant_cpu-{shard[0]}of{shard[1]}.json")
    cache = load_json(cache_path, {})
    subs = sorted(p.name[4:] for p in bids.glob("sub-*") if p.is_dir())[shard[0]::shard[1]]
    for s in subs:
        if s in cache and dv.done_stamp(out, dv.Source(subject=s)).is_file():
            continue
        if time.time() > deadline:
            break
        c0, t0 = cpu_children(), time.time()
        cli(str(bids), str(out), "participant", "--participant-label", s, "--pipeline", "fast",
            "--nprocs", "1", "--skip-bids-validation", "--work-dir", str(work / "nipype" / f"sub-{s}"), "-q")
        cache[s] = {"cpu_s": cpu_children() - c0, "wall_s": time.time() - t0}
        save_json(cache_path, cache)
        print(f"participant sub-{s}: {cache[s]['cpu_s']:.0f} s CPU ({len(cache)}/{len(subs)})", flush=True)
    return merged_cache(work)


def merged_cache(work: Path) -> dict:
    """Per-subject participant CPU/wall from every shard's cache file."""
    cache = {}
    for path in sorted(work.glob("participant_cpu*.json")):
        cache.update(load_json(path, {}))
    return cache


def table(bids: Path) -> dict:
    import csv

    with open(bids / "participants.tsv") as f:
        return {r["participant_id"][4:]: r for r in csv.DictReader(f, delimiter="\t")}


def folds_for(subjects: list[str], labels: list[int]) -> dict:
    """The group level's fold assignment for these subjects (``fast`` preset's seed and fold count)."""
    from bids_adhd.config import load_pipeline
    from bids_adhd.learn.crossval import assign_folds

    cfg = load_pipeline("fast")
    assert not cfg.train.stratify_site, "the fast preset stratifies by site: pass the sites"
    return assign_folds(subjects, labels, cfg.train.folds, cfg.train.seed)


# --- features --------------------------------------------------------------------

def template_fa(out: Path, subjects: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """(subjects x voxels) template-space FA inside the voxels that are in every subject's template mask."""
    import nibabel as nib

    from bids_adhd import derivatives as dv

    fa, masks = [], []
    for s in subjects:
        src = dv.Source(subject=s)
        fa.append(np.asarray(nib.load(str(dv.dwimap(out, src, "fa", space=dv.TEMPLATE_SPACE))).dataobj, np.float32))
        masks.append(np.asarray(nib.load(str(dv.brain_mask(out, src, space=dv.TEMPLATE_SPACE))).dataobj) > 0)
    common = np.all(masks, axis=0)
    return np.stack([f[common] for f in fa]), common


def mean_fd(out: Path, s: str) -> float:
    import csv

    from bids_adhd import derivatives as dv

    with open(dv.confounds(out, dv.Source(subject=s))) as f:
        rows = list(csv.DictReader(f, delimiter="\t"))
    col = next(k for k in rows[0] if "framewise" in k)
    vals = [float(r[col]) for r in rows if r[col] not in ("", "n/a")]
    return float(np.mean(vals))


def phenotype_features(tab: dict, subjects: list[str]) -> np.ndarray:
    sites = sorted({tab[s]["site"] for s in subjects})
    return np.array([[float(tab[s]["age"]), float(tab[s]["sex"] == "M")]
                     + [float(tab[s]["site"] == k) for k in sites[1:]] for s in subjects])


# --- scoring ---------------------------------------------------------------------

def bootstrap_auc(y, p, n_boot: int = 2000, seed: int = 0) -> tuple[float, list[float]]:
    from sklearn.metrics import roc_auc_score

    y, p = np.asarray(y), np.asarray(p, float)
    rng = np.random.default_rng(seed)
    aucs = []
    for _ in range(n_boot):
        i = rng.integers(0, len(y), len(y))
        if 0 < y[i].sum() < len(i):
            aucs.append(roc_auc_score(y[i], p[i]))
    return float(roc_auc_score(y, p)), [float(np.percentile(aucs, 2.5)), float(np.percentile(aucs, 97.5))]


def cv_logreg(X: np.ndarray, y: np.ndarray, folds: np.ndarray, tune_c: bool = False) -> np.ndarray:
    """Out-of-fold P(ADHD) from a standardised L2 logistic regression fitted on each training fold."""
    from sklearn.linear_model import LogisticRegression, LogisticRegressionCV
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    p = np.zeros(len(y))
    for k in np.unique(folds):
        tr, te = folds != k, folds == k
        clf = (LogisticRegressionCV(Cs=np.logspace(-4, 2, 7), cv=3, max_iter=2000, scoring="roc_auc")
               if tune_c else LogisticRegression(max_iter=2000))
        model = make_pipeline(StandardScaler(), clf).fit(X[tr], y[tr])
        p[te] = model.predict_proba(X[te])[:, 1]
    return p


def group_row(work: Path, bids: Path, name: str, pipeline: str, folds: dict) -> np.ndarray:
    """Run the group level into its own output folder (sharing the participant outputs) and read its
    out-of-fold probabilities; check that it used the same folds as every other row."""
    import csv

    gout = work / f"group-{name}"
    gout.mkdir(parents=True, exist_ok=True)
    for s in folds:                                  # the scored subjects' participant outputs, by symlink
        link = gout / f"sub-{s}"
        if not link.exists():
            link.symlink_to((work / "out" / f"sub-{s}").resolve(), target_is_directory=True)
    env_cli = [str(bids), str(gout), "group", "--pipeline", pipeline, "--skip-bids-validation", "-q"]
    cli(*env_cli)
    from bids_adhd.learn.crossval import read_folds

    used, _ = read_folds(gout / "group" / "folds.tsv", ("TD", "ADHD"))
    assert {k: int(v) for k, v in used.items()} == folds, "the group level used other folds or subjects"
    with open(gout / "group" / "predictions.tsv") as f:
        return {r["participant_id"][4:]: float(r["probability"]) for r in csv.DictReader(f, delimiter="\t")}


def score_rows(work: Path, bids: Path, subjects: list[str], rows: tuple) -> dict:
    """Every row on ``subjects`` with the same folds; cached per (row, subject set)."""
    from bids_adhd.simulate_realistic import oracle_scores

    tab = table(bids)
    y = np.array([int(tab[s]["diagnosis"] == "ADHD") for s in subjects])
    folds = folds_for(subjects, list(y))
    fold_arr = np.array([folds[s] for s in subjects])
    key = hashlib.sha256(" ".join(subjects).encode()).hexdigest()[:12]
    out = work / "out"
    makers = {
        "phenotype": lambda: cv_logreg(phenotype_features(tab, subjects), y, fold_arr),
        "motion": lambda: cv_logreg(np.array([[mean_fd(out, s)] for s in subjects]), y, fold_arr),
        "oracle": lambda: np.array([oracle_scores(bids)[f"sub-{s}"] for s in subjects]),
        "mean_fa": lambda: cv_logreg(template_fa(out, subjects)[0].mean(axis=1, keepdims=True), y, fold_arr),
        "voxel_logreg": lambda: cv_logreg(template_fa(out, subjects)[0], y, fold_arr, tune_c=True),
        "probe": lambda: _probs(group_row(work, bids, "probe", str(_probe_yaml(work)), folds), subjects),
        "lora_fast": lambda: _probs(group_row(work, bids, "lora_fast", "fast", folds), subjects),
    }
    result = {}
    for name in rows:
        cache = work / "rows" / f"{name}-{key}.json"
        if not cache.is_file():
            c0, k0 = cpu_self(), cpu_children()
            p = makers[name]()
            auc, ci = bootstrap_auc(y, p)
            if name == "oracle":                       # no fitting: AUC in either direction
                auc, ci = (auc, ci) if auc >= 0.5 else (1 - auc, [1 - ci[1], 1 - ci[0]])
            save_json(cache, {"auc": auc, "auc_ci95": ci, "cpu_s": cpu_self() - c0 + cpu_children() - k0,
                              "n": len(subjects), "scores": dict(zip(subjects, map(float, p)))})
            print(f"{name}: AUC {auc:.3f} [{ci[0]:.3f}, {ci[1]:.3f}]", flush=True)
        r = load_json(cache, {})
        result[name] = {k: r[k] for k in ("auc", "auc_ci95", "cpu_s")}
    return result


def _probs(by_subject: dict, subjects: list[str]) -> np.ndarray:
    return np.array([by_subject[s] for s in subjects])


def _probe_yaml(work: Path) -> Path:
    path = work / "probe.yaml"
    path.write_text(PROBE_YAML)
    return path


def truth_mean_fd(bids: Path, s: str) -> float:
    """Mean framewise displacement (Power: |d trans| + 50 mm x |d rot|) of the TRUE simulated motion."""
    import csv

    path = bids / "derivatives" / "truth" / f"sub-{s}" / "dwi" / f"sub-{s}_desc-motion_timeseries.tsv"
    with open(path) as f:
        m = np.array([[float(r[k]) for k in ("trans_x", "trans_y", "trans_z", "rot_x", "rot_y", "rot_z")]
                      for r in csv.DictReader(f, delimiter="\t")])
    d = np.abs(np.diff(m, axis=0))
    return float(np.concatenate([[0.0], d[:, :3].sum(1) + 50.0 * d[:, 3:].sum(1)]).mean())


def all_simulated(bids: Path) -> dict:
    """The rows that need no participant level, on EVERY simulated subject (their own 5 folds, same
    assignment rule): phenotype, oracle and motion from the true motion (``motion_truth_fd``)."""
    from bids_adhd.simulate_realistic import oracle_scores

    tab = table(bids)
    subs = sorted(tab)
    y = np.array([int(tab[s]["diagnosis"] == "ADHD") for s in subs])
    folds = folds_for(subs, list(y))
    fold_arr = np.array([folds[s] for s in subs])
    out = {"n": len(subs)}
    for name, make in (("phenotype", lambda: cv_logreg(phenotype_features(tab, subs), y, fold_arr)),
                       ("oracle", lambda: np.array([oracle_scores(bids)[f"sub-{s}"] for s in subs])),
                       ("motion_truth_fd", lambda: cv_logreg(np.array([[truth_mean_fd(bids, s)] for s in subs]),
                                                             y, fold_arr))):
        c0 = cpu_self()
        auc, ci = bootstrap_auc(y, make())
        if name == "oracle" and auc < 0.5:             # no fitting: AUC in either direction
            auc, ci = 1 - auc, [1 - ci[1], 1 - ci[0]]
        out[name] = {"auc": auc, "auc_ci95": ci, "cpu_s": cpu_self() - c0}
    return out


def all_simulated_in_memory(seed: int, n: int) -> dict:
    """``all_simulated`` without writing the dataset: the same subjects, truth maps and motion computed in
    memory by the functions that write the truth files (tests/test_simulate_realistic.py checks that the
    oracle from the files equals the one in memory). For a seed whose dataset is not simulated yet."""
    from bids_adhd import simulate_realistic as R

    c0 = cpu_self()
    subs = R.participants(n, seed)
    labels, laff = R.region_labels()
    rows, oracle, fd = {}, [], []
    for s in subs:
        R.set_anatomy(s, seed, R.Options(), labels, laff)
        run, _ = R.motion_run(s, seed, R.Options(), R.SITES[s.site].directions + 3)
        t = R.truth_maps(s, run)
        oracle.append(R.oracle_score(t["fa"], t["wm"], t["effect"]))
        m = np.zeros((R.SITES[s.site].directions + 3, 6))
        for v, (rot, trans) in run.moved.items():
            m[v] = np.concatenate([trans, rot])
        d = np.abs(np.diff(m, axis=0))
        fd.append(float(np.concatenate([[0.0], d[:, :3].sum(1) + 50.0 * d[:, 3:].sum(1)]).mean()))
        rows[s.label] = {"age": str(s.age), "sex": s.sex, "site": s.site, "diagnosis": s.diagnosis}
    labs = [s.label for s in subs]
    y = np.array([int(rows[k]["diagnosis"] == "ADHD") for k in labs])
    fold_arr = np.array([folds_for(labs, list(y))[k] for k in labs])
    out = {"n": n, "method": "in memory (dataset not written)", "cpu_s_total": cpu_self() - c0}
    for name, p in (("phenotype", cv_logreg(phenotype_features(rows, labs), y, fold_arr)),
                    ("oracle", np.array(oracle)), ("motion_truth_fd", cv_logreg(np.array(fd)[:, None], y, fold_arr))):
        auc, ci = bootstrap_auc(y, p)
        if name == "oracle" and auc < 0.5:
            auc, ci = 1 - auc, [1 - ci[1], 1 - ci[0]]
        out[name] = {"auc": auc, "auc_ci95": ci}
    return out


def write_results(results: dict) -> None:
    save_json(RESULTS / "group_truth.json", results)
    lines = ["# Known-truth group benchmark (realistic profile)", "",
             "`python benchmarks/group_truth.py` (see its docstring). Pooled out-of-fold AUC [95 % bootstrap CI]; "
             "CPU seconds of the row alone. n = subjects whose participant level had finished.", ""]
    seeds = [str(s) for s in results["seeds"]]
    lines.append("| row | " + " | ".join(f"seed {s} (n={results['n'].get(s, 0)})" for s in seeds) + " |")
    lines.append("|---|" + "---|" * len(seeds))
    for row in ROWS:
        cells = []
        for s in seeds:
            r = results["rows"].get(row, {}).get(s)
            cells.append(f"{r['auc']:.2f} [{r['auc_ci95'][0]:.2f}, {r['auc_ci95'][1]:.2f}], {r['cpu_s']:.0f} s"
                         if r else "not run")
        lines.append(f"| {row} | " + " | ".join(cells) + " |")
    lines += ["", "Rows that need no participant level, on every simulated subject (`all_simulated`):", "",
              "| row | " + " | ".join(f"seed {s} (n={results.get('all_simulated', {}).get(s, {}).get('n', 0)})"
                                     for s in seeds) + " |", "|---|" + "---|" * len(seeds)]
    for row in ("phenotype", "oracle", "motion_truth_fd"):
        cells = []
        for s in seeds:
            r = results.get("all_simulated", {}).get(s, {}).get(row)
            cpu = f", {r['cpu_s']:.0f} s" if r and "cpu_s" in r else ""
            cells.append(f"{r['auc']:.2f} [{r['auc_ci95'][0]:.2f}, {r['auc_ci95'][1]:.2f}]{cpu}" if r else "not run")
        lines.append(f"| {row} | " + " | ".join(cells) + " |")
    for s in seeds:
        a = results.get("all_simulated", {}).get(s, {})
        if "method" in a:
            lines.append(f"\nSeed {s}: {a['method']}, {a['cpu_s_total']:.0f} s CPU for all three rows.")
    (RESULTS / "group_truth.md").write_text("\n".join(lines) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seed", type=int, required=True)
    ap.add_argument("--subjects", type=int, required=True)
    ap.add_argument("--work", default=str(HERE.parent / "work" / "group_truth"))
    ap.add_argument("--hours", type=float, default=24.0, help="stop starting subjects after this long")
    ap.add_argument("--score-only", action="store_true", help="no participant level: score what is done")
    ap.add_argument("--shard", default="0/1", help="K/N: process every N-th subject from the K-th (run N of "
                    "these at once on one seed, then --score-only)")
    ap.add_argument("--rows", nargs="+", default=list(ROWS), choices=ROWS)
    ap.add_argument("--truth-in-memory", action="store_true",
                    help="only the all_simulated rows, computed in memory without writing the dataset")
    a = ap.parse_args()
    shard = _parse_shard(a.shard)
    if a.truth_in_memory:
        o_mem = all_simulated_in_memory(a.seed, a.subjects)

        def put(results: dict) -> None:
            results["seeds"] = sorted(set(results["seeds"]) | {a.seed})
            results.setdefault("all_simulated", {}).setdefault(str(a.seed), o_mem)
        update_results(put)
        return
    work = Path(a.work) / f"seed-{a.seed}"
    bids = simulate(work, a.seed, a.subjects)
    deadline = time.time() + 3600 * a.hours
    if shard[1] > 1 and not a.score_only:
        participant_level(work, bids, deadline, shard)
        return                       # a shard only processes subjects; --score-only scores and records
    key = str(a.seed)
    o_all = all_simulated(bids)

    def first(results: dict) -> None:
        results["seeds"] = sorted(set(results["seeds"]) | {a.seed})
        results.setdefault("all_simulated", {})[key] = o_all
    update_results(first)
    cache = merged_cache(work) if a.score_only else participant_level(work, bids, deadline)
    from bids_adhd import derivatives as dv

    done = sorted(s for s in cache if dv.done_stamp(work / "out", dv.Source(subject=s)).is_file())
    scored = score_rows(work, bids, done, tuple(a.rows)) if len(done) >= 10 else {}

    def last(results: dict) -> None:
        results["n"][key] = len(done)
        results.setdefault("n_simulated", {})[key] = a.subjects
        results.setdefault("participant_cpu_s", {})[key] = sum(cache[s]["cpu_s"] for s in done)
        results.setdefault("simulate_cpu_s", {})[key] = load_json(work / "simulate.json", {}).get("cpu_s")
        for name, r in scored.items():
            results["rows"].setdefault(name, {})[key] = r
    update_results(last)


def _parse_shard(text: str) -> tuple[int, int]:
    try:
        k, n = (int(x) for x in text.split("/"))
    except ValueError:
        k, n = -1, 0
    if not 0 <= k < n:
        raise SystemExit(f"--shard must be K/N with 0 <= K < N (got {text!r})")
    return k, n


def update_results(change) -> None:
    """Load, change and write group_truth.json (re-read each time: seeds may run in parallel)."""
    results = load_json(RESULTS / "group_truth.json", {"seeds": [], "n": {}, "rows": {}})
    change(results)
    write_results(results)


if __name__ == "__main__":
    main()
