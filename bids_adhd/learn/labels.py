"""Who the group level analyses: label mapping, phenotype files, QC-based exclusion.

No torch here (plain Python over the BIDS tables and the participant level's
QC JSON files), so it is cheap to import and to test.

* **Labels** (:func:`read_label_values`, :func:`map_labels`): the label column
  comes from ``participants.tsv`` or from ``--label-file`` (a BIDS
  ``phenotype/*.tsv`` or any TSV with ``participant_id``); covariates (``age``,
  ``sex``, ``site``, ...) from either, merged on ``participant_id``.
  ``--positive`` and ``--negative`` take values or shell-style patterns
  (:func:`fnmatch.fnmatchcase`, case-sensitive); a subject matching neither is
  excluded; without ``--negative`` every other value is negative. ``n/a`` and
  empty cells are unlabelled, never negative.
* **QC exclusion** (:func:`parse_rule`, :func:`qc_exclusions`): each
  ``--qc-exclude`` expression is read with Python's own parser (:mod:`ast`) and
  evaluated by walking a whitelist of node types (comparisons, ``and``/``or``/
  ``not``, + - * /, numbers and QC metric names): nothing is ever passed to
  ``eval``. A run is excluded when any rule is true for its ``desc-qc`` JSON.
"""
from __future__ import annotations

import ast
import fnmatch
import json
import logging
import operator
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from .. import derivatives as dv
from ..errors import DataError, MissingInputError, UsageError

LOG = logging.getLogger("bids_adhd.group")

#: The numeric keys of the participant level's ``*_desc-qc_dwi.json`` (``reports.participant.qc_metrics``),
#: documented in docs/qc.md. ``--qc-exclude`` also accepts any other numeric key found in the QC files
#: (keys later versions add).
QC_METRICS = ("n_volumes", "mean_fd", "max_fd", "fd_threshold_mm", "n_outlier_volumes",
              "max_abs_translation_mm", "max_abs_rotation_deg", "snr", "noise_sigma", "mean_b0_in_mask",
              "noise_background_voxels", "mask_volume_ml", "mask_voxels", "fa_mean", "fa_median", "fa_p95",
              "fa_mean_wm", "wm_like_volume_ml", "wm_fa_threshold", "md_median", "md_mean_wm",
              "registration_similarity", "n_nonfinite_in_mask")

MAX_RULE_CHARS = 300


@dataclass(frozen=True)
class LabelSpec:
    """The group level's input selection, as given on the command line."""

    column: str = "diagnosis"
    positive: tuple = ("ADHD",)
    negative: tuple | None = None            # None: every other value is negative
    label_file: str | None = None
    qc_exclude: tuple = ()

    def to_dict(self) -> dict:
        return {"label_column": self.column, "positive": list(self.positive),
                "negative": None if self.negative is None else list(self.negative),
                "label_file": self.label_file, "qc_exclude": list(self.qc_exclude)}


def _sub(pid: str) -> str:
    return pid[4:] if pid.startswith("sub-") else pid


# --- label tables ----------------------------------------------------------------------

def resolve_label_file(path: str, bids_dir: Path) -> Path:
    """``--label-file``: as given, else relative to BIDS_DIR, else to BIDS_DIR/phenotype."""
    p = Path(path).expanduser()
    for cand in ([p] if p.is_absolute() else [p, Path(bids_dir) / p, Path(bids_dir) / "phenotype" / p]):
        if cand.is_file():
            return cand.resolve()
    raise MissingInputError(f"--label-file {path} not found (looked as given, in {bids_dir} and in "
                            f"{Path(bids_dir) / 'phenotype'})")


def read_label_values(bids_dir: Path, spec: LabelSpec) -> tuple[dict, dict, str]:
    """subject → label value (None: n/a or empty); subject → merged row (covariates); the table's name.

    With ``spec.label_file`` the labels come from that file only; its other
    columns override ``participants.tsv``'s for the same subject. IDs in it that
    match no subject of the dataset, or a column missing, are ``DataError`` (65).
    """
    from ..bids import read_participants, read_table

    need_tsv = (Path(bids_dir) / "participants.tsv").is_file() or not spec.label_file
    base = {_sub(r["participant_id"]): r for r in read_participants(bids_dir)} if need_tsv else {}
    source, rows = "participants.tsv", base
    if spec.label_file:
        path = resolve_label_file(spec.label_file, bids_dir)
        source = str(path)
        rows = {}
        for r in read_table(path):
            s = _sub(r["participant_id"])
            if s in rows:
                raise DataError(f"{path} lists subject {s} twice (as sub-{s} and {s}); one row per participant")
            rows[s] = r
        folders = {p.name[4:] for p in Path(bids_dir).glob("sub-*") if p.is_dir()}
        unknown = sorted(set(rows) - set(base) - folders)
        if unknown:
            raise DataError(f"{path} has {len(unknown)} participant_id(s) that match no subject of {bids_dir} "
                            f"(neither in participants.tsv nor a sub-* folder): {_few(unknown)}")
    if not rows:
        raise DataError(f"{source} has a header but no participant rows")
    header = set().union(*(r.keys() for r in rows.values()))
    if spec.column not in header:
        cols = sorted(header - {"participant_id"})
        raise DataError(f"{Path(source).name} has no column {spec.column!r} (columns: {', '.join(cols) or 'none'});"
                        " pass the diagnosis column with --label-column")
    values = {s: r.get(spec.column) for s, r in rows.items()}
    merged = {s: {**base.get(s, {}), **{k: v for k, v in rows.get(s, {}).items() if v is not None}}
              for s in set(base) | set(rows)}
    return values, merged, source


def _few(items, n: int = 5) -> str:
    items = list(items)
    return ", ".join(items[:n]) + (f" and {len(items) - n} more" if len(items) > n else "")


# --- label mapping ---------------------------------------------------------------------

@dataclass
class LabelMapping:
    """Each subject's fate: ``labels`` 1/0 for the two classes; the rest are left out."""

    labels: dict                              # subject → 0/1 (only the mapped ones)
    unlabelled: list                          # value n/a or empty
    excluded: dict                            # subject → value matching neither class
    class_names: tuple                        # (negative, positive)
    values: dict                              # subject → value (every labelled one)
    negative_rule: str                        # "listed" (--negative) or "everything else"
    unmatched_patterns: list = field(default_factory=list)


def _match(value: str, patterns) -> list[str]:
    return [p for p in patterns if fnmatch.fnmatchcase(value, p)]


def _class_name(patterns, matched: set) -> str:
    return next(iter(matched)) if len(matched) == 1 else ",".join(patterns)


def map_labels(values: dict, spec: LabelSpec) -> LabelMapping:
    """Map label values to classes (see the module docstring); errors are ``DataError`` (65)."""
    col, pos, neg = spec.column, tuple(spec.positive), spec.negative
    present = sorted({v for v in values.values() if v is not None})
    both = [v for v in present if _match(v, pos) and neg is not None and _match(v, neg)]
    if both:
        raise DataError(f"{col} value {both[0]!r} matches both --positive ({', '.join(_match(both[0], pos))}) "
                        f"and --negative ({', '.join(_match(both[0], neg))}); make the patterns disjoint")
    pos_vals = {v for v in present if _match(v, pos)}
    if not pos_vals:
        raise DataError(f"no subject has {col} matching --positive {' '.join(pos)} (values: "
                        f"{_few(present, 12) or 'none'}); one class only: pass the positive class with --positive")
    neg_vals = {v for v in present if v not in pos_vals and (neg is None or _match(v, neg))}
    if not neg_vals:
        what = f"matching --negative {' '.join(neg)}" if neg is not None else "outside the positive class"
        raise DataError(f"no subject has {col} {what} (values: {_few(present, 12)}): one class only, nothing to "
                        "classify against")
    unmatched = [p for p in pos if not any(_match(v, [p]) for v in present)]
    unmatched += [p for p in (neg or ()) if not any(_match(v, [p]) for v in present)]
    for p in unmatched:
        LOG.warning("the pattern %r matches no %s value (values: %s)", p, col, _few(present, 12))
    positive = _class_name(pos, pos_vals)
    negative = (_class_name(neg, neg_vals) if neg is not None
                else (next(iter(neg_vals)) if len(neg_vals) == 1 else f"non-{positive}"))
    if negative == positive:
        negative = f"{negative} (negative)"
    labels = {s: int(v in pos_vals) for s, v in values.items() if v in pos_vals or v in neg_vals}
    return LabelMapping(labels=labels, unlabelled=sorted(s for s, v in values.items() if v is None),
                        excluded={s: v for s, v in values.items() if v is not None and s not in labels},
                        class_names=(negative, positive), values={s: v for s, v in values.items() if v is not None},
                        negative_rule="listed" if neg is not None else "everything else",
                        unmatched_patterns=unmatched)


def class_values(mapping: LabelMapping, subjects) -> dict:
    """Per class and per excluded value, how many of ``subjects`` have each label value."""
    out = {"positive": Counter(), "negative": Counter(), "excluded": Counter()}
    for s in subjects:
        if s in mapping.labels:
            out["positive" if mapping.labels[s] else "negative"][mapping.values[s]] += 1
        elif s in mapping.excluded:
            out["excluded"][mapping.excluded[s]] += 1
    return {k: dict(sorted(v.items())) for k, v in out.items()}


# --- QC exclusion rules ----------------------------------------------------------------

_CMP = {ast.Lt: operator.lt, ast.LtE: operator.le, ast.Gt: operator.gt, ast.GtE: operator.ge,
        ast.Eq: operator.eq, ast.NotEq: operator.ne}
_BIN = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv}
_SYMBOL = {ast.Lt: "<", ast.LtE: "<=", ast.Gt: ">", ast.GtE: ">=", ast.Eq: "==", ast.NotEq: "!=",
           ast.Add: "+", ast.Sub: "-", ast.Mult: "*", ast.Div: "/"}


@dataclass(frozen=True)
class QcRule:
    text: str
    tree: ast.AST = field(compare=False, repr=False)
    names: tuple = ()


def _bad(text: str, why: str) -> UsageError:
    return UsageError(f"--qc-exclude {text!r}: {why}; write comparisons of QC metrics with numbers, e.g. "
                      "'max_fd > 3', 'snr < 10', 'n_outlier_volumes / n_volumes > 0.2' (and, or, not, parentheses)")


def _check_node(node: ast.AST, text: str, names: list) -> None:
    """Refuse every node type outside the whitelist (no calls, attributes, strings, subscripts...)."""
    if isinstance(node, ast.BoolOp) and isinstance(node.op, (ast.And, ast.Or)):
        kids = node.values
    elif isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.Not, ast.USub, ast.UAdd)):
        kids = [node.operand]
    elif isinstance(node, ast.Compare) and all(type(op) in _CMP for op in node.ops):
        kids = [node.left, *node.comparators]
    elif isinstance(node, ast.BinOp) and type(node.op) in _BIN:
        kids = [node.left, node.right]
    elif isinstance(node, ast.Name):
        names.append(node.id)
        return
    elif isinstance(node, ast.Constant) and type(node.value) in (int, float):
        return
    else:
        raise _bad(text, f"{ast.unparse(node)!r} is not allowed")
    for k in kids:
        _check_node(k, text, names)


def parse_rule(text: str) -> QcRule:
    """One ``--qc-exclude`` expression → a checked syntax tree (``UsageError``, exit 64, if it is not one)."""
    text = str(text).strip()
    if not text or len(text) > MAX_RULE_CHARS:
        raise _bad(text[:40], "empty" if not text else f"longer than {MAX_RULE_CHARS} characters")
    try:
        tree = ast.parse(text, mode="eval").body
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        raise _bad(text, "not an expression") from None
    if not (isinstance(tree, (ast.Compare, ast.BoolOp)) or isinstance(tree, ast.UnaryOp)
            and isinstance(tree.op, ast.Not)):
        raise _bad(text, "not a comparison")
    names: list = []
    _check_node(tree, text, names)
    if not names:
        raise _bad(text, "names no QC metric")
    return QcRule(text, tree, tuple(dict.fromkeys(names)))


def check_metric_names(rules, known) -> None:
    """Every metric a rule names must be a QC key (``UsageError``, exit 64)."""
    known = set(known)
    for r in rules:
        unknown = [n for n in r.names if n not in known]
        if unknown:
            raise UsageError(f"--qc-exclude {r.text!r}: unknown QC metric {unknown[0]!r} (known: "
                             f"{', '.join(sorted(known))}; see docs/qc.md)")


def evaluate(rule: QcRule, metrics: dict):
    """True/False; None when a metric it needs is missing or null (the rule cannot decide)."""
    return _eval(rule.tree, metrics, rule.text)


def _eval(node, m: dict, text: str):
    if isinstance(node, ast.Constant):
        return node.value
    if isinstance(node, ast.Name):
        v = m.get(node.id)
        if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float))):
            raise DataError(f"--qc-exclude {text!r}: QC metric {node.id!r} is not a number ({v!r})")
        return v
    if isinstance(node, ast.BoolOp):
        vals = [_eval(v, m, text) for v in node.values]
        decided = [bool(v) for v in vals if v is not None]
        if isinstance(node.op, ast.And):
            return False if False in decided else (None if None in vals else True)
        return True if True in decided else (None if None in vals else False)
    if isinstance(node, ast.UnaryOp):
        v = _eval(node.operand, m, text)
        if v is None:
            return None
        return (not v) if isinstance(node.op, ast.Not) else (-v if isinstance(node.op, ast.USub) else +v)
    if isinstance(node, ast.BinOp):
        a, b = _eval(node.left, m, text), _eval(node.right, m, text)
        if a is None or b is None or (isinstance(node.op, ast.Div) and b == 0):
            return None
        return _BIN[type(node.op)](a, b)
    left = _eval(node.left, m, text)            # ast.Compare, chained: a < b < c
    for op, right_node in zip(node.ops, node.comparators):
        right = _eval(right_node, m, text)
        if left is None or right is None:
            return None
        if not _CMP[type(op)](left, right):
            return False
        left = right
    return True


def _shown(rule: QcRule, metrics: dict) -> str:
    def fmt(v):
        return "null" if v is None else (f"{v:.4g}" if isinstance(v, float) else repr(v))

    vals = ", ".join(f"{n} = {fmt(metrics.get(n))}" for n in rule.names)
    return f"{rule.text} ({vals})"


def read_qc(out_root, src) -> dict:
    path = dv.qc_json(out_root, src)
    if not path.is_file():
        raise MissingInputError(f"--qc-exclude: no QC file {path.name} for sub-{src.subject} in {out_root}; re-run "
                                "the participant level for it, or drop --qc-exclude")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError):
        raise DataError(f"{path} is not valid JSON; re-run the participant level for sub-{src.subject}") from None
    if not isinstance(data, dict):
        raise DataError(f"{path} is not a JSON object of QC metrics")
    return data


def qc_exclusions(texts, runs: dict, out_root) -> tuple[dict, list, list]:
    """Apply ``--qc-exclude`` to every run of ``runs`` (subject → [RunMaps]).

    Returns (the runs kept per subject, one row per excluded run: subject, run,
    rule, with the values; runs a rule could not decide (a null metric): kept,
    listed). Syntax and unknown metric names are checked before any decision.
    """
    rules = [parse_rule(t) for t in texts]
    if not rules:
        return dict(runs), [], []
    qc = {(s, rm.source.prefix): read_qc(out_root, rm.source) for s in sorted(runs) for rm in runs[s]}
    found = {k for d in qc.values() for k, v in d.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    check_metric_names(rules, set(QC_METRICS) | found)
    kept, excluded, undecided = {}, [], []
    for s in sorted(runs):
        for rm in runs[s]:
            m = qc[(s, rm.source.prefix)]
            hits = [r for r in rules if evaluate(r, m) is True]
            if hits:
                excluded.append({"subject": s, "run": rm.source.prefix, "rule": hits[0].text,
                                 "detail": "; ".join(_shown(r, m) for r in hits)})
                continue
            undecided += [{"subject": s, "run": rm.source.prefix, "rule": r.text, "detail": _shown(r, m)}
                          for r in rules if evaluate(r, m) is None]
            kept.setdefault(s, []).append(rm)
    return kept, excluded, undecided
