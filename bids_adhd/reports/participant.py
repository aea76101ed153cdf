"""Per-subject QC report: figures (``render_figures``) and one self-contained HTML
report per subject (``write_report``), showing the numbers of ``bids_adhd.qc``.

The numbers and their definitions are in ``bids_adhd.qc`` and ``docs/qc.md``.
"""
from __future__ import annotations

import datetime as _dt
import html
import os
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from .. import __version__
from .. import derivatives as dv
from .common import img_tag
# The numbers live in ``bids_adhd.qc`` (computed in the sink's QC step); re-exported for readers.
from ..qc import WM_FA_THRESHOLD, background_sigma, framewise_displacement, qc_metrics  # noqa: F401

# thresholds that colour a row of the report table (warning only; nothing is excluded)
WARN = {"max_fd": 2.0, "n_outlier_volumes_fraction": 0.2, "snr": 10.0, "registration_similarity": 0.8}


QC_FIELDS = [
    # key, label, unit, format, description
    ("n_volumes", "Volumes", "", "{:d}", "DWI volumes in the run"),
    ("mean_fd", "Mean FD", "mm", "{:.3f}", "mean framewise displacement of the rigid head motion (Power "
     "2012; rotations on a sphere of fd_radius_mm)"),
    ("fd_radius_mm", "FD sphere radius", "mm", "{:.0f}", "head radius converting rotations to mm in FD"),
    ("max_fd", "Max FD", "mm", "{:.3f}", "largest framewise displacement"),
    ("n_outlier_volumes", "Outlier volumes", "", "{:d}", "volumes with FD above the threshold"),
    ("n_dropout_slices", "Dropout slices", "", "{:d}", "slices with signal dropout (model residuals)"),
    ("n_resampled_volumes", "Resampled volumes", "", "{:d}", "volumes resampled by the motion step "
     "(the others' transform is the identity)"),
    ("fd_threshold_mm", "FD threshold", "mm", "{:.2f}", "outlier threshold"),
    ("max_abs_translation_mm", "Max |translation|", "mm", "{:.2f}", "relative to the reference b0"),
    ("max_abs_rotation_deg", "Max |rotation|", "deg", "{:.2f}", "relative to the reference b0"),
    ("snr", "SNR (b0)", "", "{:.1f}", "mean b0 in the brain mask / noise σ of one volume"),
    ("snr_method", "Noise σ from", "", "{}", "mppca: MP-PCA σ; background-rayleigh: image background"),
    ("noise_sigma", "Noise σ", "a.u.", "{:.4g}", "noise standard deviation of one volume"),
    ("mask_volume_ml", "Brain mask volume", "ml", "{:.0f}", "voxel count × voxel volume"),
    ("fa_mean", "FA mean (mask)", "", "{:.3f}", "mean FA inside the brain mask"),
    ("fa_mean_wm", "FA mean (WM-like)", "", "{:.3f}", "mean FA where FA > 0.2 inside the mask"),
    ("wm_like_volume_ml", "WM-like volume", "ml", "{:.0f}", "volume with FA > 0.2 inside the mask"),
    ("md_median", "MD median (mask)", "10⁻³ mm²/s", "{:.3f}", "median MD inside the brain mask"),
    ("md_mean_wm", "MD mean (WM-like)", "10⁻³ mm²/s", "{:.3f}", "mean MD where FA > 0.2"),
    ("registration_similarity", "Registration similarity", "", "{:.3f}",
     "correlation of template-space FA with the template target inside the template brain"),
    ("n_nonfinite_in_mask", "Non-finite FA/MD voxels", "", "{:d}", "NaN/inf inside the mask"),
]


def write_qc_json(out_root, source: dv.Source, metrics: Mapping, **extra) -> Path:
    """The ``desc-qc`` JSON of one run: ``metrics`` (as ``qc_metrics`` returns them) plus ``extra``."""
    return dv.write_json(dv.qc_json(out_root, source), {**metrics, **extra})


# --- figures -------------------------------------------------------------------

FIGURE_CAPTIONS = {
    "b0_mask": "Mean b0 with the brain-mask outline (red). The outline should follow the brain edge: "
               "no cut-off cortex or cerebellum, no large pieces of skull or eye.",
    "fa": "Fractional anisotropy. White matter bright and symmetric; no stripes (bad volumes), "
          "no speckle (noise or a failed fit).",
    "md": "Mean diffusivity (0–3·10⁻³ mm²/s). CSF bright, tissue uniform grey.",
    "colour_fa": "Colour FA: |principal eigenvector| × FA, red = left–right (corpus callosum), green = "
                 "anterior–posterior (cingulum, optic radiations), blue = inferior–superior "
                 "(corticospinal tract). Wrong colours in those tracts mean flipped or permuted b-vectors.",
    "motion": "Rigid head motion (each volume registered to its leave-one-out model prediction, b0s to the "
              "mean b0): translations (solid, mm) and "
              "rotations (dashed, degrees); framewise displacement with the outlier threshold, outliers "
              "circled.",
    "registration": "Template-space FA on the network's grid with the MNI152NLin2009aSym brain (cyan) and "
                    "white-matter (red) outlines; the subject's white matter should sit inside the red "
                    "contours and its brain edge on the cyan one.",
}
FIGURE_ORDER = ("b0_mask", "fa", "md", "colour_fa", "motion", "registration")


def render_figures(mean_b0, mask, fa, md, v1, params, fd, affine, *, fd_outlier_mm: float = 0.5,
                   template_fa=None, template_affine=None, template_cfg=None,
                   n_slices: int = 12) -> dict[str, bytes]:
    """PNG bytes of every report figure of one run.

    Native-space inputs share ``affine``; ``v1`` is (X, Y, Z, 3) (or DIPY
    ``evecs``, (X, Y, Z, 3, 3)). ``template_fa`` on ``template_affine`` (the
    output grid) gives the registration figure; the template outlines are
    drawn from ``bids_adhd.dmri.template``. Missing inputs (None) skip their
    figure.
    """
    from . import figures as F

    out: dict[str, bytes] = {}
    if mean_b0 is not None:
        out["b0_mask"] = F.b0_mask_figure(mean_b0, mask, affine, n=n_slices)
    if fa is not None:
        out["fa"] = F.fa_figure(fa, mask, affine, n=n_slices)
    if md is not None:
        out["md"] = F.md_figure(md, mask, affine, n=n_slices)
    if fa is not None and v1 is not None:
        out["colour_fa"] = F.colour_fa_figure(fa, v1, mask, affine, n=n_slices)
    if params is not None:
        p = np.asarray(params, float).reshape(-1, 6)
        f = framewise_displacement(p) if fd is None else np.asarray(fd, float)
        out["motion"] = F.motion_figure(p, f, fd_outlier_mm)
    if template_fa is not None:
        from ..dmri import template as T

        shape = np.asarray(template_fa).shape[:3]
        grid = np.asarray(template_affine if template_affine is not None
                          else T.template_grid(template_cfg)[1], float)
        target, tmask = T.target_on_grid(shape, grid)
        wm = target >= T.FA_WEIGHTS["wm"] * 0.5 + T.FA_WEIGHTS["gm"] * 0.5    # P(WM) ≈ 0.5 boundary
        out["registration"] = F.registration_figure(template_fa, grid, tmask, wm, n=6)
    return out


def report_run_from_files(summary: Mapping) -> dict:
    """A ``write_report`` run entry from a ``RunDerivatives`` summary (paths + QC numbers)."""
    import nibabel as nib

    files = summary["files"]

    def load(key, dtype=np.float32):
        p = files.get(key)
        if not p or not os.path.exists(p):
            return None, None
        img = nib.load(p)
        return np.asarray(img.get_fdata(dtype=np.float32), dtype=dtype), img.affine

    b0, affine = load("b0")
    mask, _ = load("mask")
    fa, fa_aff = load("fa")
    md, _ = load("md")
    v1, _ = load("v1")
    std_fa, std_aff = load("std_fa")
    affine = affine if affine is not None else fa_aff
    params = fd = None
    if files.get("motion") and os.path.exists(files["motion"]):
        table = np.loadtxt(files["motion"], skiprows=1, delimiter="\t", ndmin=2)
        params = table[:, :6]
        fd = table[:, 6] if table.shape[1] > 6 else None
    qc = dict(summary.get("qc") or {})
    figures = render_figures(b0, mask if mask is not None else (fa > 0 if fa is not None else None),
                             fa, md, v1, params, fd, affine,
                             fd_outlier_mm=qc.get("fd_threshold_mm", 0.5),
                             template_fa=std_fa, template_affine=std_aff)
    source = summary.get("source") or {}
    return {"label": summary.get("label") or dv.Source(**source).prefix, "source": source,
            "metrics": qc, "figures": figures}


# --- HTML ----------------------------------------------------------------------

_CSS = """
body{font-family:-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:0;color:#222;background:#fafafa}
header{background:#1f2d3d;color:#fff;padding:14px 24px}
header h1{margin:0;font-size:22px} header p{margin:4px 0 0;font-size:13px;color:#c8d3df}
main{padding:8px 24px 40px;max-width:1200px}
section{background:#fff;border:1px solid #ddd;border-radius:6px;margin:18px 0;padding:12px 18px}
h2{font-size:18px;margin:6px 0 10px} h3{font-size:15px;margin:18px 0 6px}
table{border-collapse:collapse;font-size:13px;margin:6px 0}
th,td{border-bottom:1px solid #e4e4e4;padding:3px 10px;text-align:left}
th{background:#f0f3f6} td.num{text-align:right;font-variant-numeric:tabular-nums}
tr.warn td{background:#fff1e0} td.desc{color:#666}
figure{margin:10px 0 18px} figure img{max-width:100%;border:1px solid #ccc}
figcaption{font-size:12.5px;color:#444;max-width:1000px;margin-top:4px}
.note{font-size:12.5px;color:#555} nav a{margin-right:14px}
"""


def _fmt(value, fmt: str, key: str) -> str:
    if value is None:
        return "n/a"
    try:
        if key.startswith("md_"):
            value = float(value) * 1e3
        if "{:d}" in fmt:
            value = int(value)
        return fmt.format(value)
    except (TypeError, ValueError):
        return html.escape(str(value))


def _warnings(m: Mapping) -> set[str]:
    bad = set()
    if (m.get("max_fd") or 0) > WARN["max_fd"]:
        bad.add("max_fd")
    n = m.get("n_volumes") or 0
    if n and (m.get("n_outlier_volumes") or 0) / n > WARN["n_outlier_volumes_fraction"]:
        bad.add("n_outlier_volumes")
    if m.get("snr") is not None and m["snr"] < WARN["snr"]:
        bad.add("snr")
    if m.get("registration_similarity") is not None and m["registration_similarity"] < WARN["registration_similarity"]:
        bad.add("registration_similarity")
    if (m.get("n_nonfinite_in_mask") or 0) > 0:
        bad.add("n_nonfinite_in_mask")
    return bad


def qc_table_html(m: Mapping) -> str:
    bad = _warnings(m)
    rows = ["<table><tr><th>Measure</th><th>Value</th><th>Unit</th><th>Meaning</th></tr>"]
    for key, label, unit, fmt, desc in QC_FIELDS:
        if key not in m:
            continue
        cls = ' class="warn"' if key in bad else ""
        rows.append(f"<tr{cls}><td>{html.escape(label)}</td><td class=\"num\">{_fmt(m[key], fmt, key)}</td>"
                    f"<td>{html.escape(unit)}</td><td class=\"desc\">{html.escape(desc)}</td></tr>")
    if m.get("outlier_volumes"):
        rows.append(f"<tr><td>Outlier volume indices</td><td class=\"num\" colspan=\"3\">"
                    f"{html.escape(', '.join(str(i) for i in m['outlier_volumes']))}</td></tr>")
    if m.get("dropout_volumes"):
        rows.append(f"<tr><td>Volumes with dropout slices</td><td class=\"num\" colspan=\"3\">"
                    f"{html.escape(', '.join(str(i) for i in m['dropout_volumes']))}</td></tr>")
    rows.append("</table>")
    return "\n".join(rows)


_img = img_tag


def _run_title(run: Mapping) -> str:
    src = run.get("source") or {}
    parts = []
    for key, name in (("session", "session"), ("acquisition", "acq"), ("direction", "dir"), ("run", "run")):
        if src.get(key):
            parts.append(f"{name} {src[key]}")
    label = run.get("label") or ""
    return f"{label}" + (f" ({', '.join(parts)})" if parts else "")


def _anchor(run: Mapping, i: int) -> str:
    label = str(run.get("label") or f"run{i}")
    return "run-" + "".join(c if c.isalnum() or c in "-_" else "-" for c in label)


def errors_html(crashes: Sequence[Mapping]) -> str:
    """The "Errors" section: one row per crash file (``derivatives.read_crash``'s dicts) of this run."""
    rows = "".join(f"<tr><td>{html.escape(str(c.get('node', '?')))}</td><td>{html.escape(str(c.get('error', '')))}"
                   f"</td><td><code>{html.escape(str(c.get('file', '')))}</code></td></tr>" for c in crashes)
    return ('<section id="errors"><h2>Errors</h2><p class="note">Processing failed; the crash files (with the '
            "full traceback) are in this subject's <code>log/&lt;run-id&gt;/</code> folder.</p>"
            f"<table><tr><th>Node</th><th>Error</th><th>Crash file</th></tr>{rows}</table></section>")


def report_html(subject: str, runs: Sequence[Mapping], crashes: Sequence[Mapping] = ()) -> str:
    """The report as one HTML string (no external resources: figures are data: URIs); ``crashes``
    (``derivatives.read_crash``'s dicts) adds an "Errors" section first."""
    now = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    out = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
           f"<title>bids_adhd QC: sub-{html.escape(subject)}</title>", f"<style>{_CSS}</style></head><body>",
           f"<header><h1>sub-{html.escape(subject)} — diffusion MRI quality control</h1>"
           f"<p>bids_adhd {html.escape(__version__)} · {len(runs)} run(s) · generated {now}</p></header><main>"]
    if crashes:
        out.append(errors_html(crashes))
    # summary across runs
    out.append("<section><h2>Summary</h2><table><tr><th>Run</th><th>Volumes</th><th>Mean FD (mm)</th>"
               "<th>Max FD (mm)</th><th>Outliers</th><th>SNR</th><th>Mask (ml)</th><th>FA WM-like</th>"
               "<th>Registration r</th></tr>")
    for i, run in enumerate(runs):
        m = run.get("metrics") or {}
        bad = _warnings(m)
        cells = []
        for key, fmt in (("n_volumes", "{:d}"), ("mean_fd", "{:.3f}"), ("max_fd", "{:.3f}"),
                         ("n_outlier_volumes", "{:d}"), ("snr", "{:.1f}"), ("mask_volume_ml", "{:.0f}"),
                         ("fa_mean_wm", "{:.3f}"), ("registration_similarity", "{:.3f}")):
            style = ' style="background:#fff1e0"' if key in bad else ""
            cells.append(f'<td class="num"{style}>{_fmt(m.get(key), fmt, key)}</td>')
        out.append(f'<tr><td><a href="#{_anchor(run, i)}">{html.escape(_run_title(run))}</a></td>'
                   + "".join(cells) + "</tr>")
    out.append("</table><p class=\"note\">Shaded cells exceed a warning threshold (max FD &gt; "
               f"{WARN['max_fd']:g} mm, more than {int(WARN['n_outlier_volumes_fraction'] * 100)} % outlier "
               f"volumes, SNR &lt; {WARN['snr']:g}, registration r &lt; {WARN['registration_similarity']:g}). "
               "Images are shown in neurological convention (patient left on image left); axial slices "
               "run inferior to superior. See docs/qc.md for every measure.</p></section>")
    for i, run in enumerate(runs):
        out.append(f'<section id="{_anchor(run, i)}"><h2>{html.escape(_run_title(run))}</h2>')
        out.append("<h3>QC measures</h3>")
        out.append(qc_table_html(run.get("metrics") or {}))
        figs = run.get("figures") or {}
        names = [n for n in FIGURE_ORDER if n in figs] + [n for n in figs if n not in FIGURE_ORDER]
        for name in names:
            caption = FIGURE_CAPTIONS.get(name, name)
            out.append(f"<figure>{_img(figs[name], name)}<figcaption><b>{html.escape(name)}</b> — "
                       f"{html.escape(caption)}</figcaption></figure>")
        out.append("</section>")
    out.append("</main></body></html>")
    return "\n".join(out) + "\n"


def write_report(out_root, subject: str, runs: Sequence[Mapping], crashes: Sequence[Mapping] = ()) -> Path:
    """Write ``sub-<subject>.html`` (``derivatives.report_html``) atomically; return its path.

    ``runs``: one mapping per DWI run with ``label`` (e.g. the BIDS prefix),
    ``source`` (the ``derivatives.Source`` entities, optional), ``metrics``
    (``qc_metrics``'s dict) and ``figures`` (``render_figures``'s dict). The
    per-run ``desc-qc`` JSON is written by ``write_qc_json`` (the participant
    workflow's derivatives sink calls it with the same ``metrics``).
    """
    subject = str(subject)
    if subject.startswith("sub-"):
        subject = subject[4:]
    runs = [dict(r, source=(vars(r["source"]) if isinstance(r.get("source"), dv.Source) else r.get("source")))
            for r in runs]
    return dv.write_text(dv.report_html(out_root, subject), report_html(subject, runs, crashes))
