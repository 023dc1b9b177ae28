"""Is the synthetic benchmark learnable from frame-level features, and does the query matter?

Prints, side by side on the test split (and the model on train too, to tell learning from memorising):

- ``prior:fixed``: the best single normalised window fitted on train (timerefine.baselines);
- ``prior:whole``: the whole video;
- ``blind:largest-change``: per video, the contiguous frames whose features differ most from the
  video's median frame; sees the frames but not the query;
- ``blind:random event (oracle)``: one of the video's true event windows, at random: what a query-blind
  model could reach if it found every event perfectly;
- ``model:bow x frames``: a small query-aware model. A bag-of-words embedding of the query scores each
  of the 100 sampled frames (VTimeLLM's sampling) through a per-frame MLP; the answer is the contiguous
  run of frames that maximises the summed (relevance - 0.5).

Frame features are deliberately cheap and frame-level (an 8x8 thumbnail plus a 4x4x4 colour histogram
of the whole frame), standing in for a CLIP image embedding: if these can ground the queries, the task is
learnable by the real pipeline; if the query-blind rows come close, the benchmark does not test grounding.

    python bench/synth_learnability.py --data /tmp/synth500 --videos 500

generates the benchmark into ``--data`` first when it has no ``train.jsonl`` (and prints how long that took).
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from timerefine.baselines import fit_prior, score_prior
from timerefine.data.annotations import Query, read_annotations
from timerefine.data.synthetic import SPLITS, SynthConfig, generate_benchmark
from timerefine.metrics import Prediction, format_table, score
from timerefine.video import sample_frames

NUM_FRAMES = 100
THUMBNAIL = 8


@dataclass
class VideoFeatures:
    features: np.ndarray  # (NUM_FRAMES, dim) float32
    times_s: np.ndarray  # (NUM_FRAMES,) each sampled frame's presentation time
    duration_s: float


def frame_features(frames: np.ndarray) -> np.ndarray:
    """(T, H, W, 3) uint8 -> (T, 3 * THUMBNAIL**2 + 64) float32, whole-frame only."""
    count, height, width, _ = frames.shape
    rows = np.linspace(0, height, THUMBNAIL + 1).astype(int)
    cols = np.linspace(0, width, THUMBNAIL + 1).astype(int)
    block_sums = np.add.reduceat(
        np.add.reduceat(frames.astype(np.float32), rows[:-1], axis=1), cols[:-1], axis=2
    )
    block_sizes = np.diff(rows)[:, None, None] * np.diff(cols)[None, :, None]
    thumbnail = (block_sums / (255 * block_sizes)).reshape(count, -1)
    levels = frames >> 6  # 4 levels a channel, 4 x 4 x 4 colour bins
    bins = (levels[..., 0] << 4 | levels[..., 1] << 2 | levels[..., 2]).reshape(count, -1)
    offsets = np.arange(count, dtype=np.intp)[:, None] * 64
    histogram = np.bincount((bins + offsets).ravel(), minlength=count * 64).reshape(count, 64)
    return np.concatenate([thumbnail, histogram / bins.shape[1]], axis=1).astype(np.float32)


def extract(videos_dir: Path, video_ids: list[str]) -> dict[str, VideoFeatures]:
    table = {}
    for video_id in video_ids:
        sampled = sample_frames(videos_dir / f"{video_id}.mp4", NUM_FRAMES)
        table[video_id] = VideoFeatures(
            frame_features(sampled.frames), sampled.times_s.astype(np.float64), sampled.info.duration_s
        )
    return table


def standardise(table: dict[str, VideoFeatures], train_video_ids: set[str]) -> None:
    """Per-dimension standardisation with train statistics, in place: the features' raw scales differ
    (thumbnail means vs sparse histogram bins), and a distance or a small MLP should weigh them alike."""
    train_features = np.concatenate([table[video_id].features for video_id in sorted(train_video_ids)])
    mean, std = train_features.mean(axis=0), train_features.std(axis=0) + 1e-6
    for video in table.values():
        video.features = (video.features - mean) / std


def frame_labels(query: Query, times_s: np.ndarray) -> np.ndarray:
    inside = np.zeros(len(times_s), dtype=np.float32)
    for start, end in query.windows:
        inside[(times_s >= start) & (times_s < end)] = 1.0
    return inside


def best_run(gain: np.ndarray) -> tuple[int, int]:
    """The contiguous run [i, j] with the largest sum of ``gain`` (Kadane); one frame when all are < 0."""
    best, best_span = -np.inf, (0, 0)
    running, run_start = 0.0, 0
    for index, value in enumerate(gain):
        if running <= 0:
            running, run_start = 0.0, index
        running += float(value)
        if running > best:
            best, best_span = running, (run_start, index)
    return best_span


def run_to_window(span: tuple[int, int], video: VideoFeatures) -> tuple[float, float]:
    """Frames [i, j] -> seconds, each bound halfway to the neighbouring sampled frame."""
    first, last = span
    times = video.times_s
    start = 0.0 if first == 0 else (times[first - 1] + times[first]) / 2
    end = video.duration_s if last == len(times) - 1 else (times[last] + times[last + 1]) / 2
    return float(start), float(end)


class QueryFrameScorer(nn.Module):
    """Relevance of each frame to a query: <bag-of-words embedding, per-frame MLP embedding>."""

    def __init__(self, vocabulary_size: int, feature_dim: int, width: int = 64) -> None:
        super().__init__()
        self.words = nn.EmbeddingBag(vocabulary_size, width, mode="mean")
        self.frames = nn.Sequential(nn.Linear(feature_dim, width), nn.ReLU(), nn.Linear(width, width))
        self.bias = nn.Parameter(torch.zeros(1))

    def forward(
        self,
        word_ids: torch.Tensor,
        word_offsets: torch.Tensor,
        frames: torch.Tensor,
        video_index: torch.Tensor,
    ) -> torch.Tensor:
        """Logits (Q, T): frames is (V, T, dim), video_index (Q,) picks each query's video."""
        queries = self.words(word_ids, word_offsets)
        frame_embeddings = self.frames(frames).index_select(0, video_index)
        return torch.einsum("qtd,qd->qt", frame_embeddings, queries) + self.bias


class Batch:
    """All queries of a split as tensors (a few hundred queries: one batch)."""

    def __init__(self, queries: list[Query], table: dict[str, VideoFeatures], vocabulary: dict[str, int]):
        video_ids = sorted({q.video_id for q in queries})
        row = {video_id: k for k, video_id in enumerate(video_ids)}
        self.videos = [table[video_id] for video_id in video_ids]
        self.frames = torch.from_numpy(np.stack([v.features for v in self.videos]))
        self.video_index = torch.tensor([row[q.video_id] for q in queries])
        ids = [[vocabulary[w] for w in q.query.lower().split() if w in vocabulary] for q in queries]
        self.word_ids = torch.tensor([i for words in ids for i in words], dtype=torch.long)
        self.word_offsets = torch.tensor(
            np.cumsum([0] + [len(words) for words in ids[:-1]]), dtype=torch.long
        )
        self.labels = torch.from_numpy(
            np.stack([frame_labels(q, table[q.video_id].times_s) for q in queries])
        )

    def logits(self, model: QueryFrameScorer) -> torch.Tensor:
        return model(self.word_ids, self.word_offsets, self.frames, self.video_index)


def train_model(batch: Batch, vocabulary_size: int, steps: int, seed: int) -> QueryFrameScorer:
    torch.manual_seed(seed)
    model = QueryFrameScorer(vocabulary_size, batch.frames.shape[-1])
    optimiser = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=1e-2)
    for _ in range(steps):
        optimiser.zero_grad()
        loss = F.binary_cross_entropy_with_logits(batch.logits(model), batch.labels)
        loss.backward()
        optimiser.step()
    return model.eval()


def model_predictions(model: QueryFrameScorer, batch: Batch, queries: list[Query]) -> list[Prediction]:
    with torch.no_grad():
        relevance = torch.sigmoid(batch.logits(model)).numpy()
    predictions = []
    for query, scores, video_row in zip(queries, relevance, batch.video_index.tolist(), strict=True):
        window = run_to_window(best_run(scores - 0.5), batch.videos[video_row])
        predictions.append(Prediction(qid=query.qid, pred=window, video_id=query.video_id))
    return predictions


def largest_change_predictions(queries: list[Query], table: dict[str, VideoFeatures]) -> list[Prediction]:
    """Query-blind: the run of frames standing out most from the video's typical (median) frame."""
    window_of = {}
    for video_id in {q.video_id for q in queries}:
        video = table[video_id]
        deviation = np.linalg.norm(video.features - np.median(video.features, axis=0), axis=1)
        window_of[video_id] = run_to_window(best_run(deviation - deviation.mean()), video)
    return [Prediction(qid=q.qid, pred=window_of[q.video_id], video_id=q.video_id) for q in queries]


def random_event_predictions(queries: list[Query], seed: int) -> list[Prediction]:
    """Query-blind with an oracle for events: one of the video's ground-truth windows, drawn at random.

    The ceiling of any query-blind detector, however well it finds events: only the query says which.
    """
    windows_of: dict[str, list[tuple[float, float]]] = {}
    for query in queries:
        windows_of.setdefault(query.video_id, []).extend(query.windows)
    rng = np.random.default_rng(seed)
    return [
        Prediction(qid=q.qid, pred=windows_of[q.video_id][rng.integers(len(windows_of[q.video_id]))])
        for q in queries
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True, help="benchmark directory (generated if empty)")
    parser.add_argument("--videos", type=int, default=500, help="videos to generate when --data is empty")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workers", type=int, default=0, help="render processes (0: one per CPU)")
    parser.add_argument("--steps", type=int, default=100, help="full-batch training steps")
    args = parser.parse_args()

    if not (args.data / "train.jsonl").exists():
        summary = generate_benchmark(
            args.data, SynthConfig(videos=args.videos, seed=args.seed, workers=args.workers)
        )
        print(summary.format())
    splits = {split: read_annotations(args.data / f"{split}.jsonl")[0] for split in SPLITS}
    video_ids = sorted({q.video_id for queries in splits.values() for q in queries})

    started = time.perf_counter()
    table = extract(args.data / "videos", video_ids)
    print(f"features: {len(video_ids)} videos x {NUM_FRAMES} frames in {time.perf_counter() - started:.1f} s")

    train, test = splits["train"], splits["test"]
    standardise(table, {q.video_id for q in train})
    vocabulary = {w: k for k, w in enumerate(sorted({w for q in train for w in q.query.lower().split()}))}
    train_batch, test_batch = Batch(train, table, vocabulary), Batch(test, table, vocabulary)
    started = time.perf_counter()
    model = train_model(train_batch, len(vocabulary), args.steps, args.seed)
    elapsed = time.perf_counter() - started
    print(f"model: {args.steps} full-batch steps on {len(train)} train queries in {elapsed:.1f} s")

    rows = {
        "prior:fixed (fit on train)": score_prior(fit_prior("fixed", train), test),
        "prior:whole": score_prior(fit_prior("whole", train), test),
        "blind:largest-change": score(largest_change_predictions(test, table), test),
        "blind:random event (oracle)": score(random_event_predictions(test, args.seed), test),
        "model:bow x frames (train)": score(model_predictions(model, train_batch, train), train),
        "model:bow x frames (test)": score(model_predictions(model, test_batch, test), test),
    }
    counts = ", ".join(
        f"{split} {len({q.video_id for q in qs})} videos / {len(qs)} queries" for split, qs in splits.items()
    )
    print(f"benchmark {args.data}: {counts}")
    print(format_table(rows))


if __name__ == "__main__":
    main()
