"""Scores for temporal grounding: IoU, R1@{0.3, 0.5, 0.7} and mIoU, per answer mode and per refinement step.

The conventions are those of the evaluators the field reports with, so that numbers printed here can sit
beside published ones:

- IoU is overlap / (latest end - earliest start), in seconds (Moment-DETR, VTimeLLM).
- A query with several ground-truth windows is scored against the best-matching one (Moment-DETR).
- ``compat="vtimellm"`` rounds each IoU to two decimals before thresholds and means, as VTimeLLM's and
  TimeRefine's evaluation scripts do; rounding can only turn near-misses into hits, never the reverse.
- An answer that did not parse, and a query with no prediction at all, are misses with IoU 0 that stay in
  the denominator: dropping them would reward a model for failing to answer.

Plain Python and numpy: metrics are read and checked without Ray or torch.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from timerefine.data.annotations import Query

THRESHOLDS = (0.3, 0.5, 0.7)
COMPAT_MODES = (None, "vtimellm")
METRIC_KEYS = (*(f"R1@{threshold}" for threshold in THRESHOLDS), "mIoU")

Window = tuple[float, float]

# Our predictions JSONL names each answer mode by the field that carries it.
_MODE_FIELDS = {"text": "pred", "head": "pred_head", "fused": "pred_fused", "frames": "pred_frames"}


@dataclass(frozen=True)
class Prediction:
    """One query's answers, in seconds, read from either supported predictions format.

    ``parsed`` is False when the model's text answer did not parse; ``pred`` is then a miss whatever it
    holds. ``steps`` is the refinement trace (one segment per step), None when the source has no trace.
    ``pred_frames`` is the frame relevance head's answer; ``off_grammar`` says whether a constrained
    decoder had to overrule the model somewhere (None when the source does not say).
    """

    qid: str
    pred: Window | None
    parsed: bool = True
    pred_head: Window | None = None
    pred_fused: Window | None = None
    steps: tuple[Window, ...] | None = None
    video_id: str | None = None
    pred_frames: Window | None = None
    off_grammar: bool | None = None


def temporal_iou(pred: Sequence[float] | None, gt: Sequence[float]) -> float:
    """IoU of two [start, end] windows in seconds.

    A missing prediction, a window with start > end, a non-finite bound or a zero-length union score 0
    rather than raising: a broken answer is a miss, and one bad row must not stop an evaluation.
    """
    if pred is None:
        return 0.0
    pred_start, pred_end = pred
    gt_start, gt_end = gt
    if not all(math.isfinite(bound) for bound in (pred_start, pred_end, gt_start, gt_end)):
        return 0.0
    if pred_start > pred_end or gt_start > gt_end:
        return 0.0
    overlap = max(0.0, min(pred_end, gt_end) - max(pred_start, gt_start))
    union = max(pred_end, gt_end) - min(pred_start, gt_start)
    return overlap / union if union > 0 else 0.0


def best_window_iou(pred: Sequence[float] | None, gt_windows: Iterable[Sequence[float]]) -> float:
    """IoU against the best-matching ground-truth window, as Moment-DETR's evaluator scores R1."""
    return max((temporal_iou(pred, window) for window in gt_windows), default=0.0)


def read_predictions(path: str | Path) -> list[Prediction]:
    """Read a predictions JSONL file, ours or Moment-DETR's, detected from its first record.

    Ours: ``{"qid", "pred": [s, e] | null, "parsed"?, "pred_head"?, "pred_fused"?, "pred_frames"?,
    "steps"?, "off_grammar"?, ...}``. Moment-DETR: ``{"qid", "vid", "pred_relevant_windows": [[s, e,
    score], ...]}``, ranked, so the first window is the top-1 answer. A line that does not fit the file's
    format raises a ValueError naming the file and line, because a silently skipped line would shift every
    score computed from the file. A file with no record at all is an error too: scored, it would give 0
    everywhere, which reads as a model that answered wrong rather than as a missing file.
    """
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{path}: is a folder; expected a predictions file (JSONL)")
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no such predictions file") from None

    def records() -> Iterable[tuple[int, Any]]:
        for line_number, line in enumerate(data.split(b"\n"), start=1):
            if not line.strip():
                continue
            try:
                yield line_number, json.loads(line.decode("utf-8"))
            except UnicodeDecodeError as error:
                where = f"{path}:{line_number}"
                raise ValueError(f"{where}: not UTF-8 text (byte {error.start} of the line)") from None
            except json.JSONDecodeError as error:
                raise ValueError(
                    f"{path}:{line_number}: invalid JSON at column {error.colno}: {error.msg}"
                ) from None

    predictions = parse_predictions(records(), str(path))
    if not predictions:
        raise ValueError(f"{path}: no predictions in the file (it is empty)")
    return predictions


def parse_predictions(records: Iterable[tuple[int, Any]], source: str) -> list[Prediction]:
    """Predictions from ``(line number, record)`` pairs, as ``read_predictions`` reads a file's lines;
    errors name ``source`` and the line."""
    predictions: list[Prediction] = []
    parse_record = None
    for line_number, record in records:
        try:
            if not isinstance(record, dict):
                raise ValueError(f"expected a JSON object, got {type(record).__name__}")
            if parse_record is None:
                parse_record = _detect_format(record)
            predictions.append(parse_record(record))
        except ValueError as error:
            raise ValueError(f"{source}:{line_number}: {error}") from None
    return predictions


def score(
    predictions: Iterable[Prediction], queries: Iterable[Query], compat: str | None = None
) -> dict[str, Any]:
    """Score predictions against annotated queries, joined by ``str(qid)``; percentages, two decimals.

    Returns ``{"n", "unparsed", "missing", "compat", "R1@0.3", "R1@0.5", "R1@0.7", "mIoU", "modes",
    "steps"?, "off_grammar"?}``. The top level scores the text answer. ``modes`` always holds ``text`` and
    adds ``head``, ``fused`` and ``frames`` when some prediction carries them. ``off_grammar`` counts the
    answers a constrained decoder kept inside the grammar against the model's own choice (free decoding's
    unparsed answers are among these), when the predictions say. ``steps`` (``"1"``, ``"2"``, ...) appears
    when some prediction carries a refinement trace; a trace shorter than the longest counts as a miss for the
    steps it lacks. Every block also holds ``n`` so that any of them can be printed by ``format_table``.

    ``n`` is the number of annotated queries: a query with no prediction is a miss counted in
    ``missing``, an unparsed answer a miss counted in ``unparsed``. A prediction whose qid is not in the
    annotations raises a ValueError instead of being ignored: it almost always means the predictions
    and the annotations come from different splits or files, and any score would be meaningless.
    """
    if compat not in COMPAT_MODES:
        raise ValueError(f"compat must be one of {COMPAT_MODES}, got {compat!r}")
    windows_by_qid: dict[str, tuple[Window, ...]] = {}
    for query in queries:
        qid = str(query.qid)
        if qid in windows_by_qid:
            raise ValueError(f"qid {qid!r} appears twice in the annotations; qids must be unique to join")
        windows_by_qid[qid] = query.windows
    if not windows_by_qid:
        raise ValueError("no annotated queries to score against")

    prediction_by_qid: dict[str, Prediction] = {}
    for prediction in predictions:
        qid = str(prediction.qid)
        if qid in prediction_by_qid:
            raise ValueError(f"qid {qid!r} has two predictions; keep one answer per query")
        prediction_by_qid[qid] = prediction
    if not prediction_by_qid:
        raise ValueError(
            f"no predictions to score against {len(windows_by_qid)} annotated queries: every query would be "
            "a miss"
        )
    unknown = [qid for qid in prediction_by_qid if qid not in windows_by_qid]
    if unknown:
        raise ValueError(
            f"{len(unknown)} predictions have qids absent from the annotations (first: {unknown[0]!r}); "
            "are the predictions and the annotations from the same split?"
        )

    answered = prediction_by_qid.values()
    optional = ("head", "fused", "frames")
    modes = ["text"] + [m for m in optional if any(_answer(p, m) is not None for p in answered)]
    traces = [p.steps for p in answered if p.steps is not None]
    step_count = max(len(steps) for steps in traces) if traces else None

    mode_ious: dict[str, list[float]] = {mode: [] for mode in modes}
    step_ious: list[list[float]] = [[] for _ in range(step_count or 0)]
    unparsed = missing = 0
    for qid, gt_windows in windows_by_qid.items():
        prediction = prediction_by_qid.get(qid)
        if prediction is None:
            missing += 1
        elif _answer(prediction, "text") is None:
            unparsed += 1
        for mode in modes:
            answer = _answer(prediction, mode) if prediction is not None else None
            mode_ious[mode].append(_scored_iou(answer, gt_windows, compat))
        trace = prediction.steps if prediction is not None and prediction.steps is not None else ()
        for step_index, ious in enumerate(step_ious):
            segment = trace[step_index] if step_index < len(trace) else None
            ious.append(_scored_iou(segment, gt_windows, compat))

    result: dict[str, Any] = {
        "n": len(windows_by_qid),
        "unparsed": unparsed,
        "missing": missing,
        "compat": compat,
        **_summarise(mode_ious["text"]),
    }
    result["modes"] = {mode: _block(ious) for mode, ious in mode_ious.items()}
    if any(p.off_grammar is not None for p in answered):
        result["off_grammar"] = sum(bool(p.off_grammar) for p in answered)
    if step_count is not None:
        result["steps"] = {str(index + 1): _block(ious) for index, ious in enumerate(step_ious)}
    return result


def format_table(rows: Mapping[str, Mapping[str, Any]]) -> str:
    """A fixed-width table of several metric dicts (priors beside models), one row per name.

    A block without some metric (for instance ``n``) shows ``-`` there rather than failing, so that
    sub-blocks and hand-made rows print too.
    """
    name_width = max([len("name"), *(len(name) for name in rows)])
    header = f"{'name':<{name_width}}  {'n':>6}" + "".join(f"  {key:>7}" for key in METRIC_KEYS)
    lines = [header, "-" * len(header)]
    for name, metrics in rows.items():
        count = metrics.get("n")
        line = f"{name:<{name_width}}  {'-' if count is None else count:>6}"
        for key in METRIC_KEYS:
            value = metrics.get(key)
            line += f"  {'-' if value is None else f'{value:.2f}':>7}"
        lines.append(line)
    return "\n".join(lines)


def _scored_iou(window: Window | None, gt_windows: Iterable[Sequence[float]], compat: str | None) -> float:
    iou = best_window_iou(window, gt_windows)
    return round(iou, 2) if compat == "vtimellm" else iou


def _answer(prediction: Prediction, mode: str) -> Window | None:
    if mode == "text":
        return prediction.pred if prediction.parsed else None
    return getattr(prediction, _MODE_FIELDS[mode])


def _summarise(ious: list[float]) -> dict[str, float]:
    # Percent as (fraction) * 100, then two decimals: the order Moment-DETR's evaluator uses, so that
    # its reference numbers are reproduced to the last digit.
    values = np.asarray(ious, dtype=np.float64)
    summary = {
        f"R1@{threshold}": round(float(np.mean(values >= threshold)) * 100, 2) for threshold in THRESHOLDS
    }
    summary["mIoU"] = round(float(np.mean(values)) * 100, 2)
    return summary


def _block(ious: list[float]) -> dict[str, float | int]:
    return {"n": len(ious), **_summarise(ious)}


def _detect_format(record: Mapping[str, Any]) -> Callable[[Mapping[str, Any]], Prediction]:
    if "pred_relevant_windows" in record:
        return _parse_moment_detr_record
    if "pred" in record:
        return _parse_timerefine_record
    raise ValueError(
        "neither a timerefine prediction (no 'pred' field) nor a Moment-DETR one "
        "(no 'pred_relevant_windows' field)"
    )


def _parse_timerefine_record(record: Mapping[str, Any]) -> Prediction:
    qid = _qid(record)
    if "pred" not in record:
        raise ValueError("missing field 'pred' (write null for an answer that did not parse)")
    pred = _window(record["pred"], "pred")
    parsed = record.get("parsed", True)
    if not isinstance(parsed, bool):
        raise ValueError(f"field 'parsed' must be true or false, got {parsed!r}")
    steps = record.get("steps")
    if steps is not None:
        if not isinstance(steps, list):
            raise ValueError(f"field 'steps' must be a list of [start, end], got {steps!r}")
        steps = tuple(_window(step, f"steps[{index}]") for index, step in enumerate(steps))
        if any(step is None for step in steps):
            raise ValueError("field 'steps' holds a null segment; list only the steps that were decoded")
    off_grammar = record.get("off_grammar")
    if off_grammar is not None and not isinstance(off_grammar, bool):
        raise ValueError(f"field 'off_grammar' must be true, false or absent, got {off_grammar!r}")
    return Prediction(
        qid=qid,
        pred=pred,
        parsed=parsed and pred is not None,
        pred_head=_window(record.get("pred_head"), "pred_head"),
        pred_fused=_window(record.get("pred_fused"), "pred_fused"),
        steps=steps,
        video_id=record.get("video_id"),
        pred_frames=_window(record.get("pred_frames"), "pred_frames"),
        off_grammar=off_grammar,
    )


def _parse_moment_detr_record(record: Mapping[str, Any]) -> Prediction:
    qid = _qid(record)
    ranked = record["pred_relevant_windows"]
    if not isinstance(ranked, list):
        raise ValueError(f"field 'pred_relevant_windows' must be a list, got {ranked!r}")
    if ranked and not (isinstance(ranked[0], list) and len(ranked[0]) >= 2):
        raise ValueError(f"pred_relevant_windows[0] must be [start, end, score], got {ranked[0]!r}")
    top1 = _window(ranked[0][:2], "pred_relevant_windows[0]") if ranked else None
    return Prediction(qid=qid, pred=top1, parsed=top1 is not None, video_id=record.get("vid"))


def _qid(record: Mapping[str, Any]) -> str:
    qid = record.get("qid")
    if qid is None or isinstance(qid, bool) or not isinstance(qid, str | int):
        raise ValueError(f"field 'qid' must be a string or an integer, got {qid!r}")
    return str(qid)


def _window(value: Any, field: str) -> Window | None:
    if value is None:
        return None
    if (
        not isinstance(value, list | tuple)
        or len(value) != 2
        or not all(isinstance(bound, int | float) and not isinstance(bound, bool) for bound in value)
    ):
        raise ValueError(f"field {field!r} must be [start, end] in seconds or null, got {value!r}")
    return float(value[0]), float(value[1])
