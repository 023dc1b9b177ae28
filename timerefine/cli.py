"""The ``timerefine`` command: one entry point for every job.

Library commands (convert, score, baseline, synth) run here. The Ray jobs live in ``pipelines/``
(installed as ``timerefine_jobs``), so that ``ray job submit -- python pipelines/<job>.py`` and
``timerefine <job>`` run the same code; this module only dispatches to them (``pipelines/jobs.py`` holds
their protocol), importing a job only when its subcommand is chosen, so ``timerefine score`` never pays
for importing Ray or torch.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType

from timerefine.errors import INPUT_ERRORS, check_output_path, describe

# subcommand -> (module, one-line help). The module provides add_arguments(parser) and run(args).
RAY_JOBS: dict[str, tuple[str, str]] = {
    "extract": ("extract_features", "extract CLIP features from videos (local or s3://) with Ray Data"),
    "train": ("train", "fine-tune a grounding model with Ray Train (DDP)"),
    "evaluate": ("evaluate", "score a checkpoint on annotations with Ray Data batch inference"),
    "predict": ("predict", "ground one query in one video (local path or s3://)"),
    "sweep": ("sweep", "sweep refinement schedule x L1 weight with Ray Tune (ASHA)"),
    "report": ("report", "write report.md and a plot for a finished sweep"),
    "demo": ("demo", "the whole pipeline on synthetic videos, on a local Ray cluster"),
}
# The jobs' package: installed as timerefine_jobs; in a checkout that is not installed, pipelines/.
JOB_PACKAGES = ("timerefine_jobs", "pipelines")


def _add_annotation_args(parser: argparse.ArgumentParser, flag: str, help: str) -> None:
    parser.add_argument(
        flag,
        required=True,
        help=help + " (Charades-STA txt, ActivityNet json, "
        "QVHighlights jsonl or our jsonl; detected from content)",
    )


def _add_format_args(parser: argparse.ArgumentParser) -> None:
    from timerefine.data.annotations import FORMATS

    parser.add_argument("--format", choices=FORMATS, help="annotation format (default: detect from content)")
    parser.add_argument(
        "--durations",
        nargs="+",
        metavar="CSV",
        help="Charades metadata CSV(s) (id, length) for formats without durations (train and test)",
    )


def _read(path: str, args: argparse.Namespace):
    from timerefine.data.annotations import read_annotations, read_durations

    durations = {vid: d for csv in args.durations or [] for vid, d in read_durations(csv).items()}
    queries, summary = read_annotations(path, format=args.format, durations=durations or None)
    print(summary.describe(), file=sys.stderr)
    return queries


def _emit_metrics(metrics: dict, name: str, output: str | None) -> None:
    from timerefine.metrics import format_table

    print(format_table({name: metrics}))
    if output:
        Path(output).parent.mkdir(parents=True, exist_ok=True)
        Path(output).write_text(json.dumps(metrics, indent=2) + "\n")
        print(f"wrote {output}", file=sys.stderr)


def cmd_convert(args: argparse.Namespace) -> int:
    from timerefine.data.annotations import write_jsonl

    check_output_path(args.output)
    n = write_jsonl(_read(args.input, args), args.output)
    print(f"wrote {n} queries to {args.output}", file=sys.stderr)
    return 0


def cmd_score(args: argparse.Namespace) -> int:
    from timerefine.metrics import read_predictions, score

    if args.output:
        check_output_path(args.output)
    queries = _read(args.annotations, args)
    metrics = score(read_predictions(args.predictions), queries, compat=args.compat)
    _emit_metrics(metrics, Path(args.predictions).name, args.output)
    return 0


def cmd_baseline(args: argparse.Namespace) -> int:
    from timerefine.baselines import fit_prior, score_prior

    if args.output:
        check_output_path(args.output)
    train = _read(args.fit, args)
    test = _read(args.annotations, args)
    prior = fit_prior(args.kind, train, seed=args.seed, objective=args.objective)
    metrics = score_prior(prior, test, compat=args.compat)
    window = f" [{prior.window[0]:.2f}, {prior.window[1]:.2f}]" if prior.window else ""
    _emit_metrics(metrics, f"prior {args.kind}{window}", args.output)
    return 0


def cmd_synth(args: argparse.Namespace) -> int:
    from timerefine.data.synthetic import SynthConfig, generate_benchmark

    check_output_path(args.output, folder=True)
    summary = generate_benchmark(
        args.output, SynthConfig(videos=args.videos, seed=args.seed, workers=args.workers)
    )
    print(summary.format() if hasattr(summary, "format") else summary, file=sys.stderr)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="timerefine", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser(
        "convert", help="convert annotations (Charades-STA, ActivityNet, QVHighlights) to our JSONL"
    )
    p.add_argument("input")
    p.add_argument("-o", "--output", required=True, help="output JSONL")
    _add_format_args(p)
    p.set_defaults(func=cmd_convert)

    p = sub.add_parser("score", help="score predictions (ours or Moment-DETR's) against annotations")
    p.add_argument("--predictions", required=True)
    _add_annotation_args(p, "--annotations", "ground truth")
    _add_format_args(p)
    p.add_argument(
        "--compat", choices=["vtimellm"], help="round each IoU to two decimals, as VTimeLLM reports"
    )
    p.add_argument("-o", "--output", help="write metrics JSON here")
    p.set_defaults(func=cmd_score)

    p = sub.add_parser("baseline", help="score a query-blind prior (the floor every model must beat)")
    p.add_argument("kind", choices=["fixed", "whole", "random"])
    _add_annotation_args(p, "--fit", "training annotations the prior is fitted on")
    _add_annotation_args(p, "--annotations", "test annotations")
    _add_format_args(p)
    p.add_argument("--compat", choices=["vtimellm"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--objective",
        default="mIoU",
        choices=["mIoU", "R1@0.3", "R1@0.5", "R1@0.7"],
        help="what the fixed window maximises on the training set (the published Charades prior [0, 0.35] "
        "is the R1@0.7 optimum)",
    )
    p.add_argument("-o", "--output", help="write metrics JSON here")
    p.set_defaults(func=cmd_baseline)

    p = sub.add_parser("synth", help="write the synthetic benchmark: real MP4s + train/val/test annotations")
    p.add_argument("-o", "--output", required=True, help="output directory")
    p.add_argument("--videos", type=int, default=500)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=int, default=0, help="render processes (0: one per CPU)")
    p.set_defaults(func=cmd_synth)

    for name, (_, help) in RAY_JOBS.items():
        sub.add_parser(name, help=help)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    # Ray jobs own their arguments: parse the subcommand name first, then hand the rest to the job.
    if argv and argv[0] in RAY_JOBS:
        module_name = RAY_JOBS[argv[0]][0]
        package = _job_package()
        job = importlib.import_module(f"{package.__name__}.{module_name}")
        return package.jobs.main(job, argv[1:], prog=f"timerefine {argv[0]}")
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except INPUT_ERRORS as error:  # bad input: one clear line, no traceback
        print(f"timerefine {args.command}: error: {describe(error)}", file=sys.stderr)
        return 2


def _job_package() -> ModuleType:
    for name in JOB_PACKAGES:
        try:
            package = importlib.import_module(name)
            importlib.import_module(f"{name}.jobs")
            return package
        except ModuleNotFoundError as error:
            if error.name not in (name, f"{name}.jobs"):
                raise
    raise ModuleNotFoundError(f"none of the job packages {JOB_PACKAGES} is importable: reinstall timerefine")


if __name__ == "__main__":
    sys.exit(main())
