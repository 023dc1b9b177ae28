"""Does it learn to ground? The direct baseline, refinement alone and TimeRefine, trained on the same data
with the same budget, beside the query-blind priors, on train and on test, in one table.

    python bench/quality.py --videos 400 --epochs 40          # 33 min on 2 quiet cores; one table at the end
    python bench/quality.py --videos 400 --epochs 20 --set time_tokens=false   # any TrainConfig option
    python bench/quality.py --refinement-schedule 2,1,0.5,0 --train-seed 1     # less noise, another seed

Renders the synthetic benchmark and extracts its features once (``timerefine synth`` and the extraction
job on a local Ray, reused by later runs in the same ``--workdir``), then trains the three models with the
library's loop (``timerefine.loop.train``, no Ray, one thread each, as many at a time as there are cores):

- direct: K = 1, lambda = 0 (``From <seg_start> 35 to 40 <seg_end>``);
- refinement only: K = 4 (sigma 5, 3, 1, 0 s; ``--refinement-schedule`` changes it for both), lambda = 0;
- TimeRefine: K = 4, lambda = 1 (the auxiliary L1 head on every ``<offset>``).

Everything else is TrainConfig's defaults (the ones that measure best for the built-in LLM) unless
``--set`` changes it for all three. Each model is scored after its last epoch (no selection on val) on the
test split and on as many training queries, every answer mode (text, head, fused, frames) and after every
refinement step; its validation and training-subset mIoU after every epoch are the learning curves.
Results land in ``<workdir>/quality.json``, each model's last checkpoint in ``<workdir>/checkpoints/``
(``bench/refinement_probe.py`` reads them).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import shutil
import signal
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def models(refinement_schedule: str = "4") -> dict[str, dict[str, Any]]:
    """Name -> what differs from the shared configuration. The two refinement models share a schedule
    (the paper's K = 4 by default), so the pair compares only the L1 weight."""
    from timerefine.timecodec import Schedule

    steps = f"K={Schedule.parse(refinement_schedule).k}"
    if refinement_schedule != "4":  # not the preset: say which noise
        steps += f" sigma {refinement_schedule}"
    return {
        "direct (K=1)": {"schedule": "1", "l1_weight": 0.0},
        f"refinement only ({steps}, L1 0)": {"schedule": refinement_schedule, "l1_weight": 0.0},
        f"TimeRefine ({steps}, L1 1)": {"schedule": refinement_schedule, "l1_weight": 1.0},
    }


def main() -> None:
    from pipelines.jobs import quiet_console

    quiet_console()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--videos", type=int, default=400)
    parser.add_argument("--seed", type=int, default=0, help="of the benchmark (and of training)")
    parser.add_argument("--train-seed", type=int, help="of training, on the same benchmark (default: --seed)")
    parser.add_argument(
        "--refinement-schedule",
        default="4",
        help="of the two refinement models: a preset K (4: sigma 5,3,1,0 s) or sigmas in seconds, 2,1,0.5,0",
    )
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--workdir", type=Path, default=Path("runs/quality"))
    parser.add_argument("--set", nargs="*", default=[], metavar="OPTION=VALUE", help="TrainConfig options")
    parser.add_argument("--parallel", type=int, default=len(os.sched_getaffinity(0)), help="models at once")
    args = parser.parse_args()

    data = args.workdir / f"synth{args.videos}-seed{args.seed}"
    features = prepare(data, args.videos, args.seed)
    options = dict(_option(item) for item in args.set)
    from timerefine.training import TrainConfig

    base = TrainConfig(
        features=str(features),
        train=str(data / "train.jsonl"),
        val=str(data / "val.jsonl"),
        epochs=args.epochs,
        seed=args.seed if args.train_seed is None else args.train_seed,
        **options,
    )
    configs = {name: replace(base, **changes) for name, changes in models(args.refinement_schedule).items()}
    started = time.monotonic()
    context = multiprocessing.get_context("spawn")  # a fresh interpreter: one torch thread each
    pool = ProcessPoolExecutor(
        args.parallel, mp_context=context, initializer=_die_with_parent, initargs=(os.getpid(),)
    )
    with pool:
        jobs = {
            name: pool.submit(
                train_and_score, asdict(config), str(data), str(args.workdir / "checkpoints" / _slug(name))
            )
            for name, config in configs.items()
        }
        results = {name: job.result() for name, job in jobs.items()}
    results = {
        "priors": priors(data),
        "models": results,
        "shared": asdict(base),
        "seconds": time.monotonic() - started,
    }
    (args.workdir / "quality.json").write_text(json.dumps(results, indent=1) + "\n")
    print(render(results))


def prepare(data: Path, videos: int, seed: int) -> Path:
    """The benchmark's videos and annotations, and its feature table (extracted once, on a local Ray)."""
    from pipelines.extract_features import ExtractConfig
    from pipelines.extract_features import run as extract
    from timerefine.data.synthetic import SynthConfig, generate_benchmark

    if not (data / "test.jsonl").is_file():
        print(generate_benchmark(data, SynthConfig(videos=videos, seed=seed), progress=False).format())
    features = data / "features"
    extract(ExtractConfig(input=str(data / "videos"), output=str(features), progress_every=100))
    return features


def priors(data: Path) -> dict[str, dict[str, Any]]:
    from timerefine.baselines import fit_prior, score_prior
    from timerefine.data.annotations import read_annotations

    train, _ = read_annotations(data / "train.jsonl")
    test, _ = read_annotations(data / "test.jsonl")
    rows = {}
    for kind in ("fixed", "whole", "random"):
        prior = fit_prior(kind, train, seed=0)
        window = f" [{prior.window[0]:.2f}, {prior.window[1]:.2f}]" if prior.window else ""
        rows[f"prior: {kind}{window}"] = {
            "test": score_prior(prior, test),
            "train": score_prior(prior, train),
        }
    return rows


def train_and_score(config: dict[str, Any], data: str, checkpoint: str) -> dict[str, Any]:
    """In a child process: train one model with the library's loop, keep its last epoch's checkpoint in
    ``checkpoint`` (for bench/refinement_probe.py), then score it on test and train."""
    import torch

    from timerefine.checkpoint import load_checkpoint
    from timerefine.data.annotations import read_annotations
    from timerefine.loop import TrainHooks, train
    from timerefine.metrics import Prediction, score
    from timerefine.training import TrainConfig, load_training_data, train_score_subset

    torch.set_num_threads(1)
    config = TrainConfig.from_dict(config)
    dataset = load_training_data(config)
    folder = Path(checkpoint)
    shutil.rmtree(folder, ignore_errors=True)  # an earlier run's

    def keep_last(metrics, write_checkpoint) -> None:
        if metrics["epoch"] == config.epochs:
            write_checkpoint(folder)

    started = time.monotonic()
    history = train(config, dataset, TrainHooks(report=keep_last, log=lambda line: None))
    seconds = time.monotonic() - started
    model = load_checkpoint(folder)
    test = read_annotations(Path(data) / "test.jsonl")[0]
    train_queries = train_score_subset(dataset.train, len(test))  # as many as test, as the demo scores
    scores = {}
    for split, queries in (("test", test), ("train", train_queries)):
        predictions = []
        for start in range(0, len(queries), 32):
            chunk = queries[start : start + 32]
            answers = model.generate(
                [dataset.features[q.video_id].features for q in chunk],
                [q.query for q in chunk],
                [q.duration for q in chunk],
            )
            predictions += [
                Prediction(
                    q.qid, a["pred"], a["parsed"], a["pred_head"], a["pred_fused"],
                    tuple(map(tuple, a["steps"])) or None, pred_frames=a.get("pred_frames"),
                    off_grammar=a.get("off_grammar"),
                )
                for q, a in zip(chunk, answers, strict=True)
            ]  # fmt: skip
        scores[split] = score(predictions, queries)
    return {"history": history, "scores": scores, "train_seconds": seconds}


def render(results: dict[str, Any]) -> str:
    keys = ("R1@0.3", "R1@0.5", "R1@0.7", "mIoU")
    lines = [f"{'model / answer':<44} {'train mIoU':>10} " + " ".join(f"{'test ' + k:>12}" for k in keys)]
    lines.append("-" * len(lines[0]))
    for name, prior in results["priors"].items():
        lines.append(
            f"{name:<44} {prior['train']['mIoU']:>10.2f} "
            + " ".join(f"{prior['test'][k]:>12.2f}" for k in keys)
        )
    for name, result in results["models"].items():
        test, train = result["scores"]["test"], result["scores"]["train"]
        for mode, block in test["modes"].items():
            label = f"{name}: {mode}"
            lines.append(
                f"{label:<44} {train['modes'][mode]['mIoU']:>10.2f} "
                + " ".join(f"{block[k]:>12.2f}" for k in keys)
            )
        if "steps" in test:
            steps = " / ".join(f"{block['mIoU']:.2f}" for block in test["steps"].values())
            lines.append(f"{'  after each step (test mIoU)':<44} {steps}")
    lines.append("")
    lines.append("learning curves, val mIoU by epoch (text / frames), and train-subset mIoU (text):")
    for name, result in results["models"].items():
        curve = " ".join(_curve_point(m) for m in result["history"])
        lines.append(f"  {name}: {curve}")
    minutes = results["seconds"] / 60
    lines.append(f"\n{minutes:.0f} min in all; last-epoch models, no selection on val")
    return "\n".join(lines)


def _die_with_parent(parent: int) -> None:
    """A training process ends when the benchmark does: a SIGTERM to the benchmark (a job runner's stop)
    once left its three trainings running for an hour, orphaned. Linux only; elsewhere Ctrl-C reaches the
    whole process group anyway."""
    if sys.platform == "linux":
        import ctypes

        pr_set_pdeathsig = 1
        ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGKILL)
        if os.getppid() != parent:  # the benchmark ended before this line ran
            os._exit(1)


def _slug(name: str) -> str:
    """A model's name as a folder name: ``TimeRefine (K=4, L1 1)`` -> ``timerefine-k-4-l1-1``."""
    return "-".join("".join(c if c.isalnum() else " " for c in name.lower()).split())


def _option(item: str) -> tuple[str, Any]:
    """``key=value``, the value read as JSON (numbers, true, false, null), else as a string (5,3,1,0)."""
    key, _, value = item.partition("=")
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value


def _curve_point(metrics: dict[str, Any]) -> str:
    text, frames, train = (metrics.get(k, 0) for k in ("val_mIoU", "val_frames_mIoU", "train_mIoU"))
    return f"{metrics['epoch']}:{text:.0f}/{frames:.0f}/{train:.0f}"


if __name__ == "__main__":
    main()
