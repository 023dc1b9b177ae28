"""Ray Train's overhead: samples/s of the training job's loop against a plain PyTorch loop, side by side.

Both rows run the same function, ``timerefine.loop.train``, on the same model (the built-in LLM, full
fine-tuning, same seed), data, global batch, micro-batch, epochs and torch threads (one: what a Ray worker
holding 1 CPU gets): once in this process with the default hooks, once as the training job's Ray Train run
on ``--workers`` workers of a local Ray. Both report the same thing, each epoch's ``samples_per_s``
(optimisation steps, batching included; validation and checkpoints excluded). Epoch 1 (allocator and
kernel warm-up) is left out of both means.

A third row times the raw training step of the same LLM with nothing of ours around it: Hugging Face's own
loss on random token sequences of ``--raw-tokens`` tokens (about one of our samples: 100 frame slots, the
question and the answer), with the same LoRA (or full fine-tuning) and the same micro-batch. Our loop's ratio
to it is the cost of the adapter, the batching, the head and the per-sample loss.

On a GPU every loop runs there (bf16 autocast, one GPU a Ray worker). The issue's GPU setting is a
Qwen2-0.5B-shaped LLM with LoRA r 64:

    python bench/train.py                      # a synthetic feature table written to a temporary folder
    python bench/train.py --features F --train T --epochs 3
    python bench/train.py --llm random-qwen2-0.5b --lora-r 64 --videos 256 --global-batch-size 64 \
        --micro-batch-size 16                  # on a GPU

Target: the Ray Train loop within 15% of the plain loop at 1 worker.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import torch
from peft import LoraConfig, get_peft_model

from pipelines import train
from pipelines.compute import TrainResources
from timerefine.data.annotations import Query, write_jsonl
from timerefine.data.storage import Storage
from timerefine.encoders import resolve_encoder
from timerefine.features import STATUS_OK, feature_rows_to_table, write_feature_part
from timerefine.llm import DEFAULT_LLM, load_llm
from timerefine.loop import TrainHooks
from timerefine.loop import train as train_loop
from timerefine.training import TrainConfig, load_training_data


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--features", help="feature table (default: write a synthetic one)")
    parser.add_argument("--train", help="training annotations (with --features)")
    parser.add_argument("--videos", type=int, default=24, help="synthetic videos (4 queries each)")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--global-batch-size", type=int, default=16)
    parser.add_argument("--micro-batch-size", type=int, default=8)
    parser.add_argument("--refine-steps", type=int, default=4)
    parser.add_argument(
        "--workers", type=int, nargs="+", default=[1], help="Ray Train worker counts to run (0: none, no Ray)"
    )
    parser.add_argument("--llm", default=DEFAULT_LLM, help="what train --llm takes, e.g. random-qwen2-0.5b")
    parser.add_argument("--lora-r", type=int, default=0, help="0: full fine-tuning (the small default's)")
    parser.add_argument("--raw-tokens", type=int, default=160, help="sequence length of the raw-step row")
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")

    with tempfile.TemporaryDirectory(prefix="bench-train-") as tmp:
        folder = Path(tmp)
        features, annotations = (args.features, args.train)
        if features is None:
            features, annotations = write_synthetic(folder, args.videos)
        config = TrainConfig(
            features=str(Path(features).resolve()),
            train=str(Path(annotations).resolve()),
            schedule=str(args.refine_steps),
            epochs=args.epochs,
            global_batch_size=args.global_batch_size,
            micro_batch_size=args.micro_batch_size,
            llm=args.llm,
            lora_r=args.lora_r,
        )
        queries = len(load_training_data(config).train)
        print(f"{queries} queries, {args.epochs} epochs, K = {config.schedule}, {args.llm} on {device.type}")
        plain = f"plain PyTorch loop (1 process{', 1 thread' if device.type == 'cpu' else ''})"
        rows = {plain: plain_loop(config, device)}
        for workers in (w for w in args.workers if w > 0):
            unit = "GPU" if device.type == "cuda" else "CPU"
            rows[f"Ray Train, {workers} worker(s) x 1 {unit}"] = ray_train_loop(
                config, workers, folder, device
            )
        raw = raw_step(config, device, args.raw_tokens, steps=max(3, 2 * args.epochs))

    reference = statistics.mean(rows[plain][1:] or rows[plain])
    print(f"\n{'loop':<42} {'samples/s by epoch':<28} {'mean (ep>=2)':>12} {'vs plain':>9} {'vs raw':>7}")
    for name, rates in rows.items():
        mean = statistics.mean(rates[1:] or rates)
        by_epoch = " ".join(f"{r:.1f}" for r in rates)
        print(f"{name:<42} {by_epoch:<28} {mean:>12.2f} {mean / reference:>8.1%} {mean / raw:>6.1%}")
    what = "LoRA" if args.lora_r else "full fine-tuning"
    print(f"{f'raw HF {what} step, {args.raw_tokens} tokens':<42} {'':<28} {raw:>12.2f}")


def write_synthetic(folder: Path, videos: int) -> tuple[str, str]:
    """Random 768-d features (the default encoder's shape) and 4 queries a video with random windows."""
    rng = np.random.default_rng(0)
    encoder = resolve_encoder(None).identity
    rows, features, queries = [], {}, []
    for v in range(videos):
        video_id = f"v{v:04d}"
        features[video_id] = rng.standard_normal((100, 768)).astype(np.float16)
        rows.append({"video_id": video_id, "duration_s": 30.0, "num_frames": 300, "status": STATUS_OK})
        for q in range(4):
            start = float(rng.uniform(0, 20))
            window = (start, start + float(rng.uniform(2, 10)))
            queries.append(
                Query(f"{video_id}_{q}", video_id, 30.0, f"the object number {q} moves", (window,))
            )
    table = feature_rows_to_table(rows, features, num_frames=100, dim=768, encoder=encoder)
    write_feature_part(table, str(folder / "features"), Storage())
    write_jsonl(queries, folder / "train.jsonl")
    return str(folder / "features"), str(folder / "train.jsonl")


def plain_loop(config: TrainConfig, device: torch.device) -> list[float]:
    """The training loop in this process (default hooks: nothing kept), one thread."""
    torch.set_num_threads(1)
    history = train_loop(config, load_training_data(config), TrainHooks(device=device, log=lambda line: None))
    return [metrics["samples_per_s"] for metrics in history]


def raw_step(config: TrainConfig, device: torch.device, tokens: int, steps: int) -> float:
    """Samples/s of the bare LLM's training step: random tokens, Hugging Face's loss, the same trainable
    weights (LoRA or all) and micro-batch, bf16 autocast on a GPU; the first step is left out."""
    torch.manual_seed(config.seed)
    llm, tokenizer = load_llm(config.llm)
    if config.lora_r:
        llm = get_peft_model(
            llm, LoraConfig(r=config.lora_r, lora_alpha=2 * config.lora_r, target_modules="all-linear")
        )
    llm.to(device).train()
    optimizer = torch.optim.AdamW([p for p in llm.parameters() if p.requires_grad], lr=1e-4)
    ids = torch.randint(0, len(tokenizer), (config.micro_batch_size, tokens), device=device)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()
    for step in range(steps + 1):
        if step == 1:
            _synchronize(device)
            started = time.perf_counter()
        with autocast:
            loss = llm(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    _synchronize(device)
    return steps * config.micro_batch_size / (time.perf_counter() - started)


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def ray_train_loop(config: TrainConfig, workers: int, folder: Path, device: torch.device) -> list[float]:
    """The training job itself (``pipelines.train.fit``) on a local Ray; its own per-epoch samples/s."""
    import ray

    ray.init(num_cpus=max(2, workers), include_dashboard=False, ignore_reinit_error=True)
    try:
        job = train.TrainJobConfig(
            train=config,
            output=str(folder / "runs"),
            name=f"bench-{workers}",
            resources=TrainResources(workers, gpus_per_worker=1.0 if device.type == "cuda" else 0.0),
        )
        summary = train.fit(job, Storage())
    finally:
        ray.shutdown()
    print(json.dumps({"workers": workers, "epochs": [round(m["loss"], 4) for m in summary.epochs]}))
    return [m["samples_per_s"] for m in summary.epochs]


if __name__ == "__main__":
    main()
