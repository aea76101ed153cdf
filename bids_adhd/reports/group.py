"""The group-level report: ROC curves, training curves, metrics tables, one self-contained HTML.

``write_group_report(group_dir, results, folds, final)`` writes
``group/figures/roc.png``, ``group/figures/training_curves.png``, the
statistics' figures (:mod:`bids_adhd.reports.group_stats`) and
``group/report.html`` (the PNGs embedded as base64; no external files or
scripts). When the encoder was not pre-trained the report opens with a red
banner saying so.
"""
from __future__ import annotations

import html
from pathlib import Path

import numpy as np

from .. import derivatives as dv
from .common import figure_png, fmt, img_tag, pyplot


_plt = pyplot


_png = figure_png


def roc_figure(results: dict) -> bytes:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(4.6, 4.4))
    ax.plot([0, 1], [0, 1], ls="--", color="0.6", lw=1, label="chance")
    for i, (roc, f) in enumerate(zip(results["roc"]["folds"], results["folds"])):
        if roc:
            auc = f.get("auc")
            ax.plot(roc["fpr"], roc["tpr"], lw=1, alpha=0.55,
                    label=f"fold {f['fold']} (AUC {auc:.2f})" if auc is not None else f"fold {f['fold']}")
    pooled = results["roc"]["pooled"]
    if pooled:
        auc = results["pooled"].get("auc")
        ax.plot(pooled["fpr"], pooled["tpr"], lw=2.5, color="k",
                label=f"pooled out-of-fold (AUC {auc:.2f})" if auc is not None else "pooled")
    ax.set_xlabel("1 - specificity (false positive rate)")
    ax.set_ylabel("sensitivity (true positive rate)")
    ax.set_xlim(-0.02, 1.02)
    ax.set_ylim(-0.02, 1.02)
    ax.set_aspect("equal")
    ax.legend(fontsize=7, loc="lower right")
    ax.set_title("ROC, cross-validated", fontsize=10)
    return _png(fig)


def training_figure(folds: list[dict], final: dict | None) -> bytes:
    plt = _plt()
    runs = [(f"fold {f['fold']}", f.get("history", [])) for f in folds]
    if final:
        runs.append(("final", final.get("history", [])))
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.4))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, (name, hist) in enumerate(runs):
        c = colors[i % len(colors)]
        ep = [h for h in hist if h.get("stage") == "finetune"]
        head = [h for h in hist if h.get("stage") == "head"]
        xs = [h["epoch"] for h in ep]
        if head:   # the head warm-up is drawn at epoch 0
            xs = [0] + xs
            ep = head + ep
        axes[0].plot(xs, [h.get("train_loss") for h in ep], color=c, lw=1, label=f"{name} train")
        if any(h.get("val_loss") is not None for h in ep):
            axes[0].plot(xs, [h.get("val_loss") for h in ep], color=c, lw=1, ls="--", label=f"{name} val")
            axes[1].plot(xs, [h.get("val_auc") if h.get("val_auc") is not None else np.nan for h in ep],
                         color=c, lw=1, marker="o", ms=2, label=name)
    axes[0].set_xlabel("epoch (0 = head warm-up)")
    axes[0].set_ylabel("class-weighted cross-entropy")
    axes[0].set_title("loss: training (solid), inner validation (dashed)", fontsize=9)
    axes[1].set_xlabel("epoch")
    axes[1].set_ylabel("inner-validation AUC")
    axes[1].set_ylim(-0.02, 1.02)
    axes[1].set_title("inner-validation AUC (few subjects: noisy)", fontsize=9)
    axes[0].legend(fontsize=6, ncol=2)
    axes[1].legend(fontsize=6)
    fig.tight_layout()
    return _png(fig)


_f = fmt


_img = img_tag


def _counts(d: dict) -> str:
    return ", ".join(f"{html.escape(str(v))}: {n}" for v, n in d.items()) or "none"


def _kept(fold: dict) -> str:
    """Which parts of the kept state were trained: 'head only' or 'head + LoRA' with the update norm."""
    rel = fold.get("lora_update_rel_norm")
    if rel is None:
        return "n/a"
    return "head only (0)" if rel == 0 else f"head + LoRA ({rel:.2e})"


def who_html(results: dict) -> str:
    """The report's first section: who was analysed, and who was left out and why."""
    esc = html.escape
    sel = results.get("inputs") or {}
    if not sel:
        return ""
    neg_name, pos_name = sel["class_names"]
    an, wm = sel["values_analysed"], sel["values_with_maps"]
    neg_rule = (f"<code>--negative {esc(' '.join(sel['negative']))}</code>" if sel.get("negative") is not None
                else "<b>no <code>--negative</code> given: every value not matching <code>--positive</code> is "
                     "negative</b>")
    items = [f"<li>Labels: column <code>{esc(sel['label_column'])}</code> of <code>{esc(sel['label_source'])}"
             "</code>.</li>",
             f"<li>Positive class <b>{esc(pos_name)}</b> (<code>--positive {esc(' '.join(sel['positive']))}</code>):"
             f" {_counts(an['positive'])}.</li>",
             f"<li>Negative class <b>{esc(neg_name)}</b> ({neg_rule}): {_counts(an['negative'])}.</li>",
             f"<li>Excluded, value in neither class: {_counts(wm['excluded'])}.</li>"]
    if sel.get("unmatched_patterns"):
        items.append(f"<li>Patterns matching no value: {esc(', '.join(sel['unmatched_patterns']))}.</li>")
    rules = sel.get("qc_exclude") or []
    items.append("<li>QC exclusion rules: " + (", ".join(f"<code>{esc(r)}</code>" for r in rules) or "none")
                 + ".</li>")
    n_ex = sel.get("n_excluded", {})
    head = (f"<p>{sel['n_analysed']} subjects analysed of {sel['n_with_maps']} with template-space maps "
            f"(left out: {n_ex.get('no_maps', 0)} without maps, {n_ex.get('no_label', 0)} without a label, "
            f"{n_ex.get('label_value', 0)} with a value in neither class, {n_ex.get('qc', 0)} run(s) by QC rules;"
            " every one is listed in <code>excluded.tsv</code>).</p>")
    und = sel.get("qc_undecided") or []
    if und:
        items.append(f"<li>Kept, a QC rule could not decide (a metric is null) for {len(und)} run(s): "
                     + esc("; ".join(f"{r['run']}: {r['detail']}" for r in und[:20])) + ".</li>")
    shown, cap = results.get("excluded", []), 200
    rows = "".join(f"<tr><td>{esc(r['participant_id'])}</td><td>{esc(r['run'])}</td><td>{esc(r['reason'])}</td>"
                   f"<td>{esc(r['detail'])}</td></tr>" for r in shown[:cap])
    more = f"<p>… and {len(shown) - cap} more rows in <code>excluded.tsv</code>.</p>" if len(shown) > cap else ""
    table = (f"<table><tr><th>participant</th><th>run</th><th>reason</th><th>detail</th></tr>{rows}</table>{more}"
             if rows else "")
    return f"<h2>Who was analysed</h2>\n{head}\n<ul>{''.join(items)}</ul>\n{table}"


def render_html(results: dict, folds: list[dict], final: dict | None, roc_png: bytes, train_png: bytes,
                stats_html: str = "") -> str:
    esc = html.escape
    cfg = results["config"]
    banner = ""
    if not results.get("pretrained"):
        banner = (f'<div class="banner"><b>NOT PRE-TRAINED.</b> {esc(results.get("warning", ""))}</div>')
    pooled = results["pooled"]
    METRIC_KEYS = list(results["summary"])  # the metrics in the order the group level summarised them
    head = "".join(f"<th>{k.replace('_', ' ')}</th>" for k in METRIC_KEYS) + "<th>n</th>"
    rows = [f"<tr><td><b>pooled out-of-fold</b></td>{''.join(f'<td><b>{_f(pooled[k])}</b></td>' for k in METRIC_KEYS)}"
            f"<td>{pooled['n']}</td></tr>"]
    summ = results["summary"]
    rows.append("<tr><td>mean ± SD over folds</td>" + "".join(
        f"<td>{_f(summ[k]['mean'])} ± {_f(summ[k]['sd'])}</td>" for k in METRIC_KEYS) + "<td></td></tr>")
    for f in results["folds"]:
        rows.append(f"<tr><td>fold {f['fold']}</td>" + "".join(f"<td>{_f(f[k])}</td>" for k in METRIC_KEYS)
                    + f"<td>{f['n']}</td></tr>")
    fold_rows = "".join(
        f"<tr><td>{f['fold']}</td><td>{len(f['test'])}</td><td>{len(f['inner_train'])}</td>"
        f"<td>{len(f['inner_val'])}</td><td>{f['best_epoch']}</td><td>{f['epochs_run']}</td>"
        f"<td>{_kept(f)}</td><td>{f['seconds']:.0f}</td><td><code>{esc(f['model_id'])}</code></td></tr>" for f in folds)
    preds = []
    for f in folds:
        for s in f["test"]:
            preds.append((s, f["fold"], results["class_names"][f["labels"][s]], f["predictions"][s]))
    pred_rows = "".join(f"<tr><td>sub-{esc(s)}</td><td>{k}</td><td>{esc(lab)}</td><td>{p:.3f}</td></tr>"
                        for s, k, lab, p in sorted(preds))
    model = results["model"]
    left = results.get("left_out", {})
    left_txt = ""
    if left.get("no_maps") or left.get("no_label"):
        left_txt = (f"<p>Left out: without template-space maps: {esc(', '.join(left.get('no_maps', [])) or 'none')};"
                    f" without a label: {esc(', '.join(left.get('no_label', [])) or 'none')}.</p>")
    t = results["timing"]
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>bids_adhd group report</title>
<style>
body {{ font-family: sans-serif; margin: 2em; max-width: 1100px; color: #222; }}
.banner {{ background: #b00020; color: white; padding: 1em; font-size: 1.15em; margin-bottom: 1em; }}
table {{ border-collapse: collapse; margin: 0.5em 0 1.5em 0; font-size: 0.9em; }}
td, th {{ border: 1px solid #ccc; padding: 3px 8px; text-align: right; }}
td:first-child {{ text-align: left; }}
code, pre {{ background: #f4f4f4; }}
pre {{ padding: 0.5em; overflow-x: auto; font-size: 0.8em; }}
img {{ max-width: 100%; }}
</style></head><body>
{banner}
<h1>ADHD classifier: group report</h1>
<p>Pipeline <b>{esc(cfg['name'])}</b>; {results['n_subjects']} subjects ({esc(' / '.join(results['class_names']))}),
label column <code>{esc(results['label_column'])}</code>; {len(results['folds'])}-fold subject-level stratified
cross-validation, seed {cfg['train']['seed']}. Foundation <b>{esc(model['foundation'])}</b>
({'pre-trained, sha256 ' + esc(str(model['base_weights'])[:16]) + '…' if results.get('pretrained') else 'randomly initialised'}),
adaptation <b>{esc(model['adaptation'])}</b>: {model['trainable']:,} trainable of {model['total']:,} parameters.
Device {esc(t['device'])}; total {t['total_seconds']:.0f} s.</p>
{who_html(results) or left_txt}
<h2>Metrics (positive class {esc(results['class_names'][1])}; {esc(_threshold_text(results))})</h2>
<table><tr><th></th>{head}</tr>{''.join(rows)}</table>
<h2>ROC curves</h2>
{_img(roc_png, 'ROC curves')}
{stats_html}
<h2>Training</h2>
{_img(train_png, 'training curves')}
<p>Kept state: the one with the lowest inner-validation loss; epoch 0 is the head warm-up on frozen
features, so "head only" means no LoRA update was kept (the fold is a linear probe on the frozen encoder).
‖ΔW‖/‖W‖: norm of the kept LoRA update relative to the adapted base weights.</p>
<table><tr><th>fold</th><th>test</th><th>train</th><th>inner val</th><th>best epoch</th><th>epochs run</th>
<th>kept (‖ΔW‖/‖W‖)</th><th>seconds</th><th>adapter model id</th></tr>{fold_rows}</table>
<p>Final model (all labelled subjects): <code>final/adapter.safetensors</code>, model id
<code>{esc(results['final']['model_id'])}</code>. Apply it with
<code>bids_adhd BIDS_DIR OUTPUT_DIR participant --model OUTPUT_DIR/group/final/adapter.safetensors</code>.</p>
<h2>Out-of-fold predictions</h2>
<table><tr><th>participant</th><th>fold</th><th>label</th><th>P({esc(results['class_names'][1])})</th></tr>{pred_rows}</table>
<h2>Configuration</h2>
<pre>{esc(json_dump(cfg))}</pre>
<h2>Software</h2>
<pre>{esc(json_dump(results.get('versions', {})))}</pre>
</body></html>
"""


def _threshold_text(results: dict) -> str:
    thr = results.get("threshold")
    if not thr:
        return "threshold 0.5"
    return ("calibrated probabilities, each fold's threshold chosen on its inner validation: "
            + ", ".join(f"{t:.2f}" for t in thr["folds"]))


def json_dump(obj) -> str:
    import json
    return json.dumps(obj, indent=2, default=str)


def write_group_report(group_dir, results: dict, folds: list[dict], final: dict | None = None) -> Path:
    from .group_stats import stats_sections

    group_dir = Path(group_dir)
    roc_png = roc_figure(results)
    train_png = training_figure(folds, final)
    dv.write_bytes(group_dir / "figures" / "roc.png", roc_png)
    dv.write_bytes(group_dir / "figures" / "training_curves.png", train_png)
    truth = (results.get("saliency") or {}).get("truth_mask")
    stats_html, figs = stats_sections(group_dir, results, Path(truth) if truth else None)
    for name, png in figs.items():
        dv.write_bytes(group_dir / "figures" / name, png)
    return dv.write_text(group_dir / "report.html",
                         render_html(results, folds, final, roc_png, train_png, stats_html))
