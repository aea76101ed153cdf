"""The group report's statistics sections: intervals, permutation test, calibration, confounds, saliency.

``stats_sections(group_dir, results)`` returns ``(html, figures)``: the HTML of
the sections (figures embedded as base64 PNG) and ``{name: png bytes}`` for
``group/figures/``. Every number comes from ``metrics.json`` (``results``);
sections whose entry is missing are left out.
"""
from __future__ import annotations

import html
from pathlib import Path

import numpy as np

from .common import figure_png as _png, fmt as _f, img_tag as _img, pyplot as _plt

CI_ROWS = (("auc", "AUC"), ("balanced_accuracy", "balanced accuracy"), ("sensitivity", "sensitivity"),
           ("specificity", "specificity"), ("brier", "Brier score (lower is better)"))


def _ci(v) -> str:
    return "n/a" if not v else f"{v[0]:.3f} – {v[1]:.3f}"


def uncertainty_html(results: dict) -> str:
    pooled = results["pooled"]
    rows = "".join(f"<tr><td>{name}</td><td>{_f(pooled.get(k))}</td><td>{_ci(pooled.get(k + '_ci95'))}</td></tr>"
                   for k, name in CI_ROWS)
    return (f"<h2>Uncertainty</h2><p>{html.escape(pooled.get('ci_method', ''))}.</p>"
            f"<table><tr><th>pooled out-of-fold</th><th>estimate</th><th>95 % CI</th></tr>{rows}</table>")


def permutation_figure(perm: dict) -> bytes:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5.2, 3.2))
    ax.hist(perm["null_auc"]["values"], bins=25, range=(0, 1), color="0.6", label=f"null ({perm['n']} permutations)")
    ax.axvline(perm["observed_auc"], color="k", lw=2, label=f"observed {perm['observed_auc']:.2f} "
                                                            f"(p = {perm['p_value']:.3g})")
    if perm.get("model_auc") is not None:
        ax.axvline(perm["model_auc"], color="tab:blue", ls="--", lw=1.5,
                   label=f"fine-tuned model {perm['model_auc']:.2f} (reference)")
    ax.set_xlabel("pooled out-of-fold AUC, frozen-feature read-out")
    ax.set_ylabel("permutations")
    ax.legend(fontsize=7)
    return _png(fig)


def permutation_html(perm: dict | None, figs: dict) -> str:
    if not perm or not perm.get("n"):
        return "<h2>Permutation test</h2><p>Not run (<code>--permutations 0</code>).</p>"
    figs["permutation_null.png"] = permutation_figure(perm)
    null = perm["null_auc"]
    return (f"<h2>Permutation test</h2><p><b>p = {perm['p_value']:.3g}</b> ({perm['n']} permutations, "
            f"+1 correction): observed AUC {perm['observed_auc']:.3f}, null mean {null['mean']:.3f}, "
            f"95th percentile {null['q95']:.3f}. What is permuted: {html.escape(perm['what_is_permuted'])}.</p>"
            + _img(figs["permutation_null.png"], "permutation null distribution"))


def harmonization_html(harm: dict | None) -> str:
    if not harm:
        return ""
    cov = ", ".join(harm.get("protected_covariates") or []) or "none"
    return (f"<h3>Site harmonisation</h3><p>{html.escape(harm['method'])} ({html.escape(harm['library'])}, "
            f"{html.escape(harm['variant'])}); batch: {html.escape(harm['batch'])}; protected covariates: "
            f"{html.escape(cov)}; fitted on {html.escape(harm['fitted_on'])}. Applies to "
            f"{html.escape(harm['applies_to'])}.</p>")


def reliability_figure(cal: dict) -> bytes:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(4.2, 4.0))
    ax.plot([0, 1], [0, 1], ls="--", color="0.6", lw=1, label="perfect calibration")
    for key, name, style in (("reliability_uncalibrated", "model's own", "o:"), ("reliability", "calibrated", "s-")):
        r = cal.get(key)
        if r:
            ax.plot(r["mean_predicted"], r["fraction_positive"], style, label=f"{name} (n per bin {r['count']})")
    ax.set_xlabel("mean predicted probability")
    ax.set_ylabel("fraction positive")
    ax.set_xlim(0, 1)
    ax.set_ylim(-0.02, 1.02)
    ax.legend(fontsize=7)
    ax.set_title("reliability, out-of-fold", fontsize=10)
    return _png(fig)


def calibration_html(results: dict, figs: dict) -> str:
    cal, thr = results.get("calibration"), results.get("threshold")
    if not cal:
        return ""
    figs["reliability.png"] = reliability_figure(cal)
    rows = "".join(
        f"<tr><td>fold {i + 1}</td><td>{_f((c or {}).get('slope'))}</td><td>{_f((c or {}).get('intercept'))}</td>"
        f"<td>{(c or {}).get('n', 0)}</td><td>{_f(t)}</td></tr>" for i, (c, t) in enumerate(zip(cal["folds"],
                                                                                              thr["folds"])))
    return (f"<h2>Calibration and threshold</h2><p>{html.escape(cal['method'])}. Threshold: "
            f"{html.escape(thr['method'])}. Brier score {_f(results['pooled'].get('brier'))} calibrated, "
            f"{_f(cal.get('brier_uncalibrated'))} uncalibrated; final model: threshold {_f(thr.get('final'))}.</p>"
            f"<table><tr><th></th><th>slope</th><th>intercept</th><th>inner-val subjects</th><th>threshold</th></tr>"
            f"{rows}</table>" + _img(figs["reliability.png"], "reliability diagram"))


def confounds_html(conf: dict | None) -> str:
    if conf is None:
        return ""
    if not conf.get("columns"):
        return "<h2>Confounds</h2><p>No confound columns found.</p>"
    flag = ""
    if conf["flagged"]:
        flag = (f'<div class="banner">Confound(s) <b>{html.escape(", ".join(conf["flagged"]))}</b> predict the label '
                "on their own (95 % CI of the AUC above 0.5): the classifier may be reading the confound rather "
                "than the brain. Check the score against it below.</div>")
    rows = "".join(f"<tr><td>{html.escape(k)}</td><td>{_f(v['auc'])}</td><td>{_ci(v['auc_ci95'])}</td>"
                   f"<td>{v['missing_values']}</td></tr>" for k, v in conf["alone"].items())
    vs = []
    for c, v in conf["score_vs"].items():
        if "levels" in v:
            txt = "; ".join(f"{html.escape(k)}: AUC {_f(x['auc'])} (n={x['n']}, mean P {x['mean_score']:.2f})"
                            for k, x in v["levels"].items())
        else:
            txt = f"Spearman r {_f(v['spearman_r'])} (p {_f(v['p_value'])}, n={v['n']})"
        vs.append(f"<tr><td>{html.escape(c)}</td><td style='text-align:left'>{txt}</td></tr>")
    return (f"<h2>Confounds</h2>{flag}<p>{html.escape(conf['model'])}.</p>"
            f"<table><tr><th>confound alone</th><th>AUC</th><th>95 % CI</th><th>missing values</th></tr>{rows}</table>"
            f"<table><tr><th>classifier score vs</th><th>per-level AUC or correlation</th></tr>{''.join(vs)}</table>")


def saliency_figure(sal_path: Path, effect_path: Path | None = None) -> bytes:
    """Axial, coronal and sagittal slices through the saliency maximum over nilearn's MNI152 template."""
    import nibabel as nib
    from nilearn.image import resample_to_img

    from ..dmri import mni152

    plt = _plt()
    img = nib.load(str(sal_path))
    sal = np.asarray(img.get_fdata())
    bg = np.asarray(resample_to_img(mni152.image("t1"), img, interpolation="continuous",
                                    force_resample=True, copy_header=True).get_fdata())
    eff = None
    if effect_path is not None and Path(effect_path).is_file():
        eff = np.asarray(resample_to_img(nib.load(str(effect_path)), img, interpolation="nearest",
                                         force_resample=True, copy_header=True).get_fdata()) > 0
    c = np.unravel_index(np.argmax(sal), sal.shape)
    fig, axes = plt.subplots(1, 3, figsize=(9.5, 3.4))
    vmax = float(np.percentile(sal, 99.5)) or 1.0
    for ax, axis, name in zip(axes, (2, 1, 0), ("axial", "coronal", "sagittal")):
        take = (lambda a: np.take(a, c[axis], axis=axis).T)
        ax.imshow(take(bg), cmap="gray", origin="lower")
        s = take(sal)
        ax.imshow(np.ma.masked_less(s, np.percentile(sal, 75)), cmap="hot", origin="lower", vmin=0, vmax=vmax,
                  alpha=0.75)
        if eff is not None and take(eff).any():
            ax.contour(take(eff).astype(float), levels=[0.5], colors="cyan", linewidths=1)
        ax.set_title(f"{name} (slice {c[axis]})", fontsize=9)
        ax.axis("off")
    fig.suptitle("mean |saliency| (top quarter shown)" + ("; cyan: true effect region" if eff is not None else ""),
                 fontsize=9)
    return _png(fig)


def saliency_html(group_dir: Path, sal: dict | None, figs: dict, effect_path: Path | None) -> str:
    if not sal:
        return ""
    figs["saliency.png"] = saliency_figure(Path(group_dir) / sal["path"], effect_path)
    ratio = ""
    if sal.get("effect_ratio"):
        r = sal["effect_ratio"]
        ratio = (f" Mean saliency inside the true effect region / in the white matter outside it: "
                 f"<b>{r['ratio']:.2f}</b> ({r['voxels_effect']} and {r['voxels_wm_outside']} voxels).")
    return (f"<h2>Where the model looks</h2><p><code>{html.escape(sal['path'])}</code>: "
            f"{html.escape(sal['method'])} magnitude, averaged over each fold's test subjects and the "
            f"{sal['folds']} folds.{ratio}</p>" + _img(figs["saliency.png"], "saliency"))


def stats_sections(group_dir, results: dict, effect_path: Path | None = None) -> tuple[str, dict]:
    figs: dict[str, bytes] = {}
    parts = [uncertainty_html(results), permutation_html(results.get("permutation"), figs),
             harmonization_html(results.get("harmonization")),
             calibration_html(results, figs), confounds_html(results.get("confounds")),
             saliency_html(Path(group_dir), results.get("saliency"), figs, effect_path)]
    return "\n".join(p for p in parts if p), figs
