"""Evaluate a checkpoint with Ray Data batch inference: predictions.jsonl and metrics.json.

Two doors, one job: ``timerefine evaluate ...`` and
``ray job submit --working-dir . -- python pipelines/evaluate.py ...``.

The stream: the annotation rows whose video has an ok feature row (driver) -> predictor actors, each
holding the model and the feature table, loaded once, generating a batch of queries at a time -> the
driver, which writes ``predictions.jsonl`` in annotation order (DESIGN.md section 3) into ``--output``
(a folder or an s3:// prefix) and scores exactly those records with ``timerefine.metrics``: the text
answer, the head, their fusion, the frames answer, and every refinement step. A query whose video has no
features gets no prediction; the score counts it as a miss (``missing``), never drops it. Resources are
chosen in ``pipelines.compute``.

Exit status: 0 when the metrics were written, 2 when the input cannot be used or the pipeline failed.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

if not __package__:  # `python pipelines/evaluate.py` (what ray job submit runs): run it inside its package
    import _script  # noqa: F401

import pyarrow as pa

from timerefine.data.annotations import Query, read_annotations
from timerefine.data.storage import Storage, join_uri
from timerefine.grammar import DEFAULT_DRAFT_TOKENS

from . import jobs
from .compute import ClusterResources, InferenceCompute, plan_inference, ray_connection

NAME = "evaluate"
logger = logging.getLogger("timerefine.evaluate")

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
        ("pred_frames", _SEGMENT),
        ("off_grammar", pa.bool_()),
    ]
)


@dataclass
class EvaluateConfig:
    checkpoint: str  # checkpoint directory (local or s3://)
    features: str  # feature table folder or s3:// prefix
    annotations: str  # annotations to evaluate on (any format)
    output: str  # folder or s3:// prefix for predictions.jsonl and metrics.json
    durations: str | None = None  # Charades metadata CSV, for annotations without durations
    batch_size: int = 32  # queries per generate call
    draft_tokens: int = DEFAULT_DRAFT_TOKENS  # drafted tokens a forward pass may verify (0: one a pass)
    free_decoding: bool = False  # decode without the answer grammar (the paper's): answers may not parse
    actors: int | None = None  # predictor actors (default: one per GPU, or per CPU)
    gpus_per_actor: float | None = None  # 0 forces CPU predictors
    cpus_per_actor: float | None = None  # CPUs a predictor reserves (default: half a logical CPU, at most 1)
    compat: str | None = None  # "vtimellm": round each IoU to two decimals first
    name: str | None = None  # labels the console lines, [evaluate NAME], of jobs run side by side
    cluster: jobs.ClusterOptions = field(default_factory=jobs.ClusterOptions)

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ValueError(f"--batch-size must be >= 1, got {self.batch_size}")
        if self.draft_tokens < 0:
            raise ValueError(f"--draft-tokens must be >= 0, got {self.draft_tokens}")
        if self.cpus_per_actor is not None and self.cpus_per_actor <= 0:
            raise ValueError(f"--cpus-per-actor must be > 0, got {self.cpus_per_actor:g}")


@dataclass
class EvaluateResult:
    predictions: str  # URI of predictions.jsonl
    metrics_file: str  # URI of metrics.json
    metrics: dict[str, Any]  # what metrics.json holds
    exit_code: int = field(default=jobs.EXIT_OK, repr=False)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True, help="checkpoint directory (local or s3://)")
    parser.add_argument("--features", required=True, help="feature table folder or s3:// prefix")
    parser.add_argument("--annotations", required=True, help="annotations to evaluate on (any format)")
    parser.add_argument("--durations", help="Charades metadata CSV, for annotations without durations")
    parser.add_argument("--output", required=True, help="folder or s3:// prefix for the two files")
    parser.add_argument("--batch-size", type=int, default=32, help="queries per generate call")
    parser.add_argument(
        "--draft-tokens",
        type=int,
        default=DEFAULT_DRAFT_TOKENS,
        help=f"drafted answer tokens one forward pass may verify (default {DEFAULT_DRAFT_TOKENS}; 0: one "
        "token a pass). Changes the speed, not the answers",
    )
    parser.add_argument(
        "--free-decoding",
        action="store_true",
        help="decode without the answer grammar (the paper's behaviour): an answer may then not parse",
    )
    parser.add_argument("--actors", type=int, help="predictor actors (default: one per GPU or CPU)")
    parser.add_argument("--gpus-per-actor", type=float, help="0 forces CPU predictors")
    parser.add_argument(
        "--cpus-per-actor", type=float, help="CPUs each predictor reserves (default: half a CPU, at most 1)"
    )
    parser.add_argument("--compat", choices=["vtimellm"], help="round each IoU to two decimals, as VTimeLLM")
    parser.add_argument("--name", help="label of its console lines, [evaluate NAME], beside other jobs")
    jobs.add_cluster_arguments(parser)


def config_from_args(args: argparse.Namespace) -> EvaluateConfig:
    cluster = jobs.cluster_from_args(args)
    storage = cluster.storage()
    return EvaluateConfig(
        checkpoint=storage.canonical(args.checkpoint),
        features=storage.canonical(args.features),
        annotations=storage.canonical(args.annotations),
        output=storage.canonical(args.output),
        durations=storage.canonical(args.durations) if args.durations else None,
        batch_size=args.batch_size,
        draft_tokens=args.draft_tokens,
        free_decoding=args.free_decoding,
        actors=args.actors,
        gpus_per_actor=args.gpus_per_actor,
        cpus_per_actor=args.cpus_per_actor,
        compat=args.compat,
        name=args.name,
        cluster=cluster,
    )


def run(config: EvaluateConfig) -> EvaluateResult:
    """Evaluate; raises ``jobs.JobError`` when the input cannot be used or the pipeline failed."""
    from timerefine.checkpoint import check_checkpoint
    from timerefine.features import ok_video_ids
    from timerefine.metrics import format_table, parse_predictions, score
    from timerefine.reporting import metric_rows

    say = jobs.console(NAME, config.name)
    # Every input is checked before Ray starts, and before torch is imported (timerefine.training).
    storage = config.cluster.storage()
    check_checkpoint(config.checkpoint, storage)
    queries, read = read_annotations(config.annotations, durations=config.durations, storage=storage)
    say(read.describe())
    ok, _ = ok_video_ids(config.features, storage)
    jobs.check_output_folder(config.output, storage)

    from timerefine.training import join_queries

    joined, join = join_queries(queries, ok, "evaluation")
    if not joined:
        raise jobs.JobError(
            f"none of the {len(queries)} queries of {config.annotations} is on a video with features in "
            f"{config.features}: nothing to evaluate"
        )
    say(join.describe() + (" (scored as misses)" if join.skipped else ""))
    try:
        with ray_connection(config.cluster):
            compute = plan_inference(
                ClusterResources.of_running_cluster(),
                config.actors,
                config.gpus_per_actor,
                config.cpus_per_actor,
            )
            say(compute.describe())
            records = predict(joined, config, storage, compute)
    except Exception as error:
        logger.exception("evaluation failed")
        raise jobs.JobError(f"the pipeline failed ({error})") from error

    predictions_uri = join_uri(config.output, PREDICTIONS_FILE)
    metrics_uri = join_uri(config.output, METRICS_FILE)
    storage.write_bytes(predictions_uri, "".join(json.dumps(r) + "\n" for r in records).encode())
    predictions = parse_predictions(enumerate(records, start=1), predictions_uri)
    metrics = score(predictions, queries, compat=config.compat)
    storage.write_bytes(metrics_uri, (json.dumps(metrics, indent=2) + "\n").encode())
    say(f"scores on {config.annotations}:\n" + format_table(metric_rows(metrics)))
    if "off_grammar" in metrics:
        say(
            f"answers kept inside the answer grammar against the model's own choice: "
            f"{metrics['off_grammar']} of {len(records)} (free decoding could fail to parse these)"
        )
    else:
        say(f"answers that did not parse: {metrics['unparsed']} of {len(records)}")
    say(f"wrote {predictions_uri} and {metrics_uri}")
    return EvaluateResult(predictions_uri, metrics_uri, metrics)


def progress(config: EvaluateConfig) -> str:
    """What an interrupted evaluation leaves (the job protocol's line after an interrupt)."""
    return (
        f"nothing was written to {config.output} (its files come once every query is answered); rerun the "
        "same command to evaluate"
    )


# ---------------------------------------------------------------------------------------------------------
# The Ray wiring


class Predictor:
    """A predictor actor: loads the checkpoint and the feature table once, then grounds batches of queries."""

    def __init__(self, config: EvaluateConfig, threads: int | None) -> None:
        import torch

        from timerefine.checkpoint import fetch_checkpoint, load_checkpoint
        from timerefine.features import load_features

        if threads is not None:
            torch.set_num_threads(threads)
        device = "cuda" if torch.cuda.is_available() else "cpu"
        storage = config.cluster.storage()
        with tempfile.TemporaryDirectory(prefix="timerefine-ckpt-") as staging:
            self.model = load_checkpoint(
                fetch_checkpoint(config.checkpoint, storage, Path(staging)), device=device
            )
        self.features = load_features(config.features, storage)
        self.config = config

    def __call__(self, batch: pa.Table) -> pa.Table:
        rows = batch.to_pylist()
        predictions = self.model.generate(
            [self.features[row["video_id"]].features for row in rows],
            [row["query"] for row in rows],
            [row["duration"] for row in rows],
            max_draft_tokens=self.config.draft_tokens,
            constrained=not self.config.free_decoding,
        )
        return pa.Table.from_pylist(
            [row | prediction for row, prediction in zip(rows, predictions, strict=True)],
            schema=PREDICTION_SCHEMA,
        )


def predict(
    queries: list[Query], config: EvaluateConfig, storage: Storage, compute: InferenceCompute
) -> list[dict[str, Any]]:
    """Ground every query with a pool of predictor actors; records in the order of ``queries``.

    Each batch is a block of ``batch_size`` consecutive queries, so which queries share a batch (and so
    their padding) never depends on scheduling: the same run gives the same answers, bit for bit.
    """
    import ray

    if not queries:
        return []
    items = [query.to_dict() | {"duration": float(query.duration)} for query in queries]
    for item in items:
        item.pop("split", None)
    size = config.batch_size
    blocks = [pa.Table.from_pylist(items[i : i + size]) for i in range(0, len(items), size)]
    dataset = ray.data.from_arrow(blocks).map_batches(
        Predictor,
        batch_size=None,  # a whole block a call
        batch_format="pyarrow",
        fn_constructor_kwargs={"config": config, "threads": compute.threads},
        **compute.predict_args(),
    )
    batches = dataset.iter_batches(batch_size=None, batch_format="pyarrow")
    by_qid = {row["qid"]: _plain(row) for batch in batches for row in batch.to_pylist()}
    return [by_qid[query.qid] for query in queries]


def _plain(row: dict[str, Any]) -> dict[str, Any]:
    """A predictions record without the fields its model does not have (no frame head: no pred_frames)."""
    return {key: value for key, value in row.items() if value is not None or key in _ALWAYS}


_ALWAYS = {"pred", "pred_head", "pred_fused", "windows", "steps", "text", "parsed"}


if __name__ == "__main__":
    sys.exit(jobs.main(sys.modules[__name__]))
