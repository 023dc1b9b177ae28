"""What a training run is: its configuration, its data (features joined with annotations) and the
answer each query is trained on. Plain Python and PyTorch; the loop that uses them is ``timerefine.loop``.

Training targets depend only on (seed, qid[, epoch]) through ``timecodec.noise_rng``, never on which
worker sees a query or in which order, so that the optimisation is the same for any worker count.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from dataclasses import MISSING, asdict, dataclass, field, fields
from typing import Any

import torch

from timerefine.batching import Sample
from timerefine.data.annotations import Query, read_annotations
from timerefine.data.storage import Storage
from timerefine.features import FeatureRow, load_features
from timerefine.llm import DEFAULT_LLM
from timerefine.model import TIME_EMBEDDINGS, ModelConfig, TimeRefineModel, fit_feature_stats
from timerefine.timecodec import PROMPT_LAYOUTS, QUESTION_FIRST, Schedule, make_target, noise_rng

GROUPS = ("data", "method", "optimisation")


def _option(group: str, help: str, default: Any = MISSING, choices: Sequence[str] | None = None) -> Any:
    """A training option: its CLI flag (``--name-with-dashes``), its YAML key and its field are one name;
    ``help``, ``group`` and ``choices`` are read by the train job's parser."""
    metadata = {"group": group, "help": help, "choices": choices}
    return field(metadata=metadata) if default is MISSING else field(default=default, metadata=metadata)


@dataclass
class TrainConfig:
    """One training run. Serialisable as a plain dict (it travels to Ray workers as ``train_loop_config``).

    ``schedule`` is what ``Schedule.parse`` reads: a preset K ("4"), "rel4", or explicit sigmas ("5,3,1,0").
    The paper trains LoRA (r 64) on a 7B LLM with lr 1e-4 and global batch 128 in the video-first layout;
    the defaults here are what measured best for the small built-in LLM trained in full from random weights
    on a CPU (README, "What makes it learn"): the question first, a frame relevance loss, a larger
    learning rate.
    """

    # data
    features: str = _option("data", "the feature table `timerefine extract` wrote (folder or s3://)")
    train: str = _option("data", "training annotations (any supported format)")
    val: str | None = _option("data", "validation annotations, scored every epoch", None)
    durations: str | None = _option("data", "Charades metadata CSV, for annotations without durations", None)
    max_val_queries: int | None = _option("data", "validate on the first N val queries only", None)
    train_score_queries: int = _option("data", "training queries scored beside val every epoch (0: none)", 64)
    # method
    llm: str = _option(
        "method", "'tiny-llama', 'random-qwen2-0.5b', a GGUF, an HF directory or hub id", DEFAULT_LLM
    )
    lora_r: int = _option("method", "LoRA rank (0: train the whole LLM)", 0)
    schedule: str = _option(
        "method", "refinement noise: a preset K (1 2 4 6 8), relK, or sigmas in seconds 5,3,1,0", "4"
    )
    contain_gt: bool = _option("method", "redraw each rough segment until it contains the ground truth", True)
    noise_per_epoch: bool = _option(
        "method", "redraw rough segments every epoch (default: once per query)", False
    )
    l1_weight: float = _option("method", "lambda, the weight of the auxiliary head's L1", 1.0)
    direct_epochs: int = _option(
        "method", "a curriculum: the first N epochs train direct answers, the rest the schedule", 0
    )
    prompt_layout: str = _option(
        "method", "frames after the question, or before it (the paper's)", QUESTION_FIRST, PROMPT_LAYOUTS
    )
    frame_loss_weight: float = _option(
        "method", "weight of the per-frame relevance loss (0: no frame head)", 4.0
    )
    time_embedding: str = _option(
        "method",
        "tell each frame slot its time: its bin's tokens, or a learned vector",
        "digits",
        TIME_EMBEDDINGS,
    )
    query_conditioning: bool = _option(
        "method", "add the question (its mean token embedding, projected) to every frame slot", True
    )
    time_tokens: bool = _option(
        "method", "a bin is one token (<35>), a sign <+> / <->, as the released code", False
    )
    # optimisation
    epochs: int = _option("optimisation", "training epochs", 30)
    global_batch_size: int = _option("optimisation", "samples per optimiser step, for any worker count", 8)
    micro_batch_size: int = _option("optimisation", "largest samples per forward pass", 8)
    learning_rate: float = _option("optimisation", "peak learning rate (warm-up, then cosine decay)", 3e-3)
    min_lr_ratio: float = _option("optimisation", "the cosine decay's floor, a fraction of the peak", 0.1)
    warmup_fraction: float = _option("optimisation", "fraction of the steps spent warming up", 0.05)
    weight_decay: float = _option("optimisation", "AdamW weight decay (matrices only)", 0.01)
    grad_clip: float = _option("optimisation", "clip the gradient norm at this (0: no clipping)", 1.0)
    seed: int = _option("optimisation", "seed of the initial weights, the order of samples and the noise", 0)
    val_batch_size: int = _option("optimisation", "queries per generate call during validation", 32)

    def __post_init__(self) -> None:
        self.schedule = str(self.schedule)  # "4" and 4 are the same preset
        # The one place a schedule is parsed: fails early, in the driver, on a bad one.
        self._noise = Schedule.parse(
            self.schedule, contain_gt=self.contain_gt, per_epoch=self.noise_per_epoch
        )
        if not 0 <= self.direct_epochs <= self.epochs:
            raise ValueError(
                f"direct_epochs must be between 0 and epochs ({self.epochs}), got {self.direct_epochs}"
            )
        for name in ("epochs", "global_batch_size", "micro_batch_size", "val_batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.learning_rate <= 0:
            raise ValueError(f"learning_rate must be > 0, got {self.learning_rate}")
        if self.l1_weight < 0:
            raise ValueError(f"l1_weight must be >= 0, got {self.l1_weight}")
        for name in ("prompt_layout", "time_embedding"):
            choices = next(f for f in fields(self) if f.name == name).metadata["choices"]
            if getattr(self, name) not in choices:
                raise ValueError(f"{name} must be one of {tuple(choices)}, got {getattr(self, name)!r}")

    def parsed_schedule(self) -> Schedule:
        """The refinement schedule (sigmas, containment, per-epoch noise), parsed once."""
        return self._noise

    def epoch_schedule(self, epoch: int) -> Schedule:
        """What epoch ``epoch`` (from 0) trains on: direct answers in the curriculum, then the schedule."""
        return Schedule.preset(1) if epoch < self.direct_epochs else self._noise

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> TrainConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown training options {unknown}; known: {sorted(known)}")
        return cls(**values)

    def model_config(
        self, feature_dim: int, encoder: str | None, max_new_tokens: int, video_decoder: str | None = None
    ) -> ModelConfig:
        return ModelConfig(
            llm=self.llm,
            feature_dim=feature_dim,
            lora_r=self.lora_r,
            l1_weight=self.l1_weight,
            max_new_tokens=max_new_tokens,
            refine_steps=self.parsed_schedule().k,
            encoder=encoder,
            video_decoder=video_decoder,
            prompt_layout=self.prompt_layout,
            frame_loss_weight=self.frame_loss_weight,
            time_embedding=self.time_embedding,
            time_tokens=self.time_tokens,
            query_conditioning=self.query_conditioning,
        )


# ---------------------------------------------------------------------------------------------------------
# Data


@dataclass
class JoinSummary:
    """How many queries found their video's features; the others are skipped, and said so."""

    split: str
    queries: int
    joined: int
    missing_videos: list[str] = field(default_factory=list)

    @property
    def skipped(self) -> int:
        return self.queries - self.joined

    def describe(self) -> str:
        text = f"{self.split}: {self.joined} of {self.queries} queries have features"
        if self.skipped:
            shown = ", ".join(self.missing_videos[:5]) + (", ..." if len(self.missing_videos) > 5 else "")
            text += (
                f"; skipped {self.skipped} whose {len(self.missing_videos)} video(s) have no ok feature row "
                f"({shown})"
            )
        return text


@dataclass
class TrainingData:
    """What every worker trains on: the feature table's ok videos and the queries that found theirs."""

    features: dict[str, FeatureRow]
    train: list[Query]
    val: list[Query]
    joins: list[JoinSummary]

    @property
    def encoder(self) -> str:
        return next(iter(self.features.values())).encoder

    @property
    def video_decoder(self) -> str | None:
        """The decoder that made the features, as a prediction must decode a new video: "pyav" when PyAV
        read every file, "decord" when decord read any (an "auto" table reads the rest with PyAV, as a
        prediction with "auto" does), None for tables that do not record it."""
        decoders = {row.decoder for row in self.features.values()} - {None}
        return None if not decoders else "pyav" if decoders == {"pyav"} else "decord"

    @property
    def feature_dim(self) -> int:
        return next(iter(self.features.values())).features.shape[1]

    def feature_stats(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Standardisation statistics from the training videos only, in a fixed order (so every rank
        computes bit-identical values)."""
        videos = sorted({q.video_id for q in self.train})
        return fit_feature_stats(self.features[v].features for v in videos)


def load_training_data(config: TrainConfig, storage: Storage | None = None) -> TrainingData:
    """Read the feature table and the annotations, and join them by video id."""
    features = load_features(config.features, storage)
    if not features:
        raise ValueError(f"{config.features}: the feature table has no video with status ok")
    video_ids = features.keys()
    train_queries = _read_queries(config.train, config.durations, storage)
    train, train_join = join_queries(train_queries, video_ids, "train")
    if not train:
        raise ValueError(
            f"no query of {config.train} has a video in {config.features}: annotation video ids must be the "
            "video file names without extension, as the feature table stores them"
        )
    joins = [train_join]
    val: list[Query] = []
    if config.val:
        val, val_join = join_queries(_read_queries(config.val, config.durations, storage), video_ids, "val")
        val = val[: config.max_val_queries]
        joins.append(val_join)
    return TrainingData(features, train, val, joins)


def _read_queries(path: str, durations: str | None, storage: Storage | None) -> list[Query]:
    return read_annotations(path, durations=durations, storage=storage)[0]


def join_queries(
    queries: Sequence[Query], video_ids: Collection[str], split: str
) -> tuple[list[Query], JoinSummary]:
    """The queries whose video has an ok row in the feature table, in their original order."""
    joined = [query for query in queries if query.video_id in video_ids]
    missing = sorted({query.video_id for query in queries if query.video_id not in video_ids})
    return joined, JoinSummary(split, len(queries), len(joined), missing)


def training_target(
    query: Query, schedule: Schedule, seed: int, epoch: int, time_tokens: bool = False
) -> str:
    """The answer text a query is trained on. Its noise depends on (seed, qid) only, or on the epoch too
    when the schedule redraws per epoch. A query with several windows is trained on its first."""
    rng = noise_rng(seed, query.qid, epoch if schedule.per_epoch else None)
    start, end = query.windows[0]
    return make_target(start, end, query.duration, schedule, rng, time_tokens=time_tokens)


def training_samples(
    queries: Sequence[Query],
    features: Mapping[str, FeatureRow],
    schedule: Schedule,
    seed: int,
    epoch: int,
    time_tokens: bool = False,
) -> list[Sample]:
    return [
        Sample(
            features=features[q.video_id].features,
            query=q.query,
            duration=q.duration,
            target=training_target(q, schedule, seed, epoch, time_tokens),
            window=q.windows[0],
        )
        for q in queries
    ]


def train_score_subset(queries: Sequence[Query], count: int) -> list[Query]:
    """``count`` training queries spread evenly over the set (every n-th), scored beside validation."""
    if count <= 0 or not queries:
        return []
    stride = max(1, len(queries) // count)
    return list(queries[::stride][:count])


def answer_token_budget(model: TimeRefineModel, targets: Sequence[str], margin: int = 8) -> int:
    """Tokens to let generation run: the longest training answer plus a margin. An untrained model rarely
    stops by itself, and decoding up to a generic cap would make each validation many times slower."""
    longest = max(len(model.tokenizer(t, add_special_tokens=False)["input_ids"]) for t in targets)
    return longest + margin
