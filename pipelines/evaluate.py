"""Evaluate a checkpoint with Ray Data batch inference: predictions.jsonl and metrics.json.

Two doors, one job: ``timerefine evaluate ...`` and
``ray job submit --working-dir . -- python pipelines/evaluate.py ...``.

The stream: the annotation rows whose video has an ok feature row (driver) -> predictor actors, each
holding the model and the feature table, loaded once, generating a batch of queries at a time -> the
driver, which writes ``predictions.jsonl`` in annotation order (DESIGN.md section 3) and scores the
written file with ``timerefine.metrics.score``: the text answer, the head, their fusion, and every
refinement step. A query whose video has no features gets no prediction; the score counts it as a miss
(``missing``), never drops it. Resources are chosen in ``timerefine.compute``.

Exit status: 0 when the metrics were written, 2 when the input cannot be used or the pipeline failed.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
import tempfile
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script (ray job submit): make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import pyarrow as pa

from timerefine.cli import run_job
from timerefine.compute import ClusterResources, InferenceCompute, plan_inference, ray_connection
from timerefine.data.annotations import Query, read_annotations
from timerefine.data.storage import Storage, StorageError
from timerefine.drafting import DEFAULT_DRAFT_TOKENS

logger = logging.getLogger("timerefine.evaluate")

EXIT_OK, EXIT_UNUSABLE = 0, 2
PREDICTIONS_FILE, METRICS_FILE = "predictions.jsonl", "metrics.json"

_SEGMENT = pa.list_(pa.float64())
PREDICTION_SCHEMA = pa.schema(
    [
        ("qid", pa.string()),
        ("video_id", pa.string()),
        ("query", pa.string()),
        ("duration", pa.float64()),
        ("windows", pa.list_(_SEGMENT)),
        ("text", pa.string()),
        ("parsed", pa.bool_()),
        ("steps", pa.list_(_SEGMENT)),
        ("pred", _SEGMENT),
        ("pred_head", _SEGMENT),
        ("pred_fused", _SEGMENT),
    ]
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True, help="checkpoint directory (local or s3://)")
    parser.add_argument("--features", required=True, help="feature table folder or s3:// prefix")
    parser.add_argument("--annotations", required=True, help="annotations to evaluate on (any format)")
    parser.add_argument("--durations", help="Charades metadata CSV, for annotations without durations")
    parser.add_argument("--output", required=True, help="folder for predictions.jsonl and metrics.json")
    parser.add_argument("--batch-size", type=int, default=32, help="queries per generate call")
    parser.add_argument(
        "--draft-tokens",
        type=int,
        default=DEFAULT_DRAFT_TOKENS,
        help=f"drafted answer tokens one forward pass may verify (default {DEFAULT_DRAFT_TOKENS}; 0: one "
        "token a pass). Changes the speed, not the answers",
    )
    parser.add_argument("--actors", type=int, help="predictor actors (default: one per GPU or CPU)")
    parser.add_argument("--gpus-per-actor", type=float, help="0 forces CPU predictors")
    parser.add_argument("--compat", choices=["vtimellm"], help="round each IoU to two decimals, as VTimeLLM")
    parser.add_argument("--address", help="Ray cluster address (default: start a local Ray)")
    parser.add_argument("--endpoint-url", help="S3-compatible endpoint (or AWS_ENDPOINT_URL)")


def run(args: argparse.Namespace) -> int:
    """Evaluate; returns the exit status (see the module docstring)."""
    from timerefine.features import STATUS_OK, read_feature_table
    from timerefine.metrics import format_table, read_predictions, score
    from timerefine.training import join_queries

    try:
        if args.batch_size < 1:
            raise ValueError(f"--batch-size must be >= 1, got {args.batch_size}")
        if args.draft_tokens < 0:
            raise ValueError(f"--draft-tokens must be >= 0, got {args.draft_tokens}")
        storage = Storage(endpoint_url=args.endpoint_url)
        features = storage.canonical(args.features)
        queries, read = read_annotations(args.annotations, durations=args.durations, storage=storage)
        print(f"[evaluate] {read.describe()}", flush=True)
        table = read_feature_table(features, storage, columns=["video_id", "status"])
        statuses = zip(table.column("video_id").to_pylist(), table.column("status").to_pylist(), strict=True)
        joined, join = join_queries(queries, {v for v, s in statuses if s == STATUS_OK}, "evaluation")
        print(f"[evaluate] {join.describe()}" + (" (scored as misses)" if join.skipped else ""), flush=True)
    except (StorageError, ValueError, FileNotFoundError) as error:
        print(f"[evaluate] error: {error}", file=sys.stderr)
        return EXIT_UNUSABLE

    try:
        with ray_connection(args.address):
            compute = plan_inference(ClusterResources.of_running_cluster(), args.actors, args.gpus_per_actor)
            print(f"[evaluate] {compute.describe()}", flush=True)
            records = predict(
                joined, args.checkpoint, features, storage, compute, args.batch_size, args.draft_tokens
            )
    except Exception as error:
        logger.exception("evaluation failed")
        print(f"[evaluate] error: the pipeline failed ({error})", file=sys.stderr)
        return EXIT_UNUSABLE

    output = Path(args.output)
    output.mkdir(parents=True, exist_ok=True)
    predictions_path = output / PREDICTIONS_FILE
    predictions_path.write_text("".join(json.dumps(record) + "\n" for record in records))
    metrics = score(read_predictions(predictions_path), queries, compat=args.compat)
    (output / METRICS_FILE).write_text(json.dumps(metrics, indent=2) + "\n")
    print(format_table(metric_rows(metrics)))
    print(f"[evaluate] wrote {predictions_path} and {output / METRICS_FILE}")
    return EXIT_OK


def main(argv: list[str] | None = None) -> int:
    return run_job(sys.modules[__name__], argv)


def metric_rows(metrics: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The table's rows: each answer mode, then accuracy after each refinement step."""
    rows = {f"answer: {mode}": block for mode, block in metrics["modes"].items()}
    rows |= {f"after step {step}": block for step, block in metrics.get("steps", {}).items()}
    return rows


# ---------------------------------------------------------------------------------------------------------
# The Ray wiring


class Predictor:
    """A predictor actor: loads the checkpoint and the feature table once, then grounds batches of queries."""

    def __init__(
        self, checkpoint: str, features: str, storage: Storage, threads: int | None, draft_tokens: int
    ) -> None:
        import torch

        from timerefine.features import load_features
        from timerefine.model import load_checkpoint
        from timerefine.training import fetch_checkpoint

        if threads is not None:
            torch.set_num_threads(threads)
        device = "cuda" if torch.cuda.is_available() else "cpu"
        with tempfile.TemporaryDirectory(prefix="timerefine-ckpt-") as staging:
            self.model = load_checkpoint(fetch_checkpoint(checkpoint, storage, Path(staging)), device=device)
        self.features = load_features(features, storage)
        self.draft_tokens = draft_tokens

    def __call__(self, batch: pa.Table) -> pa.Table:
        rows = batch.to_pylist()
        predictions = self.model.generate(
            [self.features[row["video_id"]].features for row in rows],
            [row["query"] for row in rows],
            [row["duration"] for row in rows],
            max_draft_tokens=self.draft_tokens,
        )
        return pa.Table.from_pylist(
            [row | prediction for row, prediction in zip(rows, predictions, strict=True)],
            schema=PREDICTION_SCHEMA,
        )


def predict(
    queries: list[Query],
    checkpoint: str,
    features: str,
    storage: Storage,
    compute: InferenceCompute,
    batch_size: int,
    draft_tokens: int = DEFAULT_DRAFT_TOKENS,
) -> list[dict[str, Any]]:
    """Ground every query with a pool of predictor actors; records in the order of ``queries``."""
    import ray

    if not queries:
        return []
    items = [query.to_dict() | {"duration": float(query.duration)} for query in queries]
    for item in items:
        item.pop("split", None)
    dataset = ray.data.from_items(items, override_num_blocks=math.ceil(len(items) / batch_size)).map_batches(
        Predictor,
        batch_size=batch_size,
        batch_format="pyarrow",
        fn_constructor_kwargs={
            "checkpoint": checkpoint,
            "features": features,
            "storage": storage,
            "threads": compute.threads,
            "draft_tokens": draft_tokens,
        },
        **compute.predict_args(),
    )
    batches = dataset.iter_batches(batch_size=None, batch_format="pyarrow")
    by_qid = {row["qid"]: row for batch in batches for row in batch.to_pylist()}
    return [by_qid[query.qid] for query in queries]


if __name__ == "__main__":
    sys.exit(main())
