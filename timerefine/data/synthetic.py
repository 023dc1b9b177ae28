"""A synthetic temporal-grounding benchmark: real H.264 videos of scripted events, one query per event.

Each video shows 2-4 events over a background whose colour drifts slowly. An event is one large object
(0.6 of the frame's short side across) with a colour and a shape that no other event in the video uses,
doing one thing ("the red circle moves to the left", "a blue star spins around"). The object is on screen
only during its event, so the ground-truth window is exactly the span in which a frame-level feature
(a CLIP embedding of the whole frame, or even a colour histogram) sees it. The other events are the
distractors: a query-blind model can find *an* event, but only the query says which one.

Why it is built this way (see DESIGN.md, "Known traps"): a benchmark of small sprites that stay on screen
among distractors was unlearnable from frame features; models memorised train and stayed at the
query-blind prior on test. Large objects, present only during their event, with colour and shape unique
within the video, make the task learnable from frame features, and several events per video make the
query necessary.

Timing follows Charades-STA train (../shared/data/annotation_statistics.md): video durations and moment
lengths (as a fraction of the duration) are drawn from its quantiles, about a fifth of the moments start
at 0 and some end at the video's end, the rest start uniformly where they fit. Times lie on the frame grid.

Everything is a pure function of (seed, video index): video ``i`` draws from its own random stream, so the
benchmark does not depend on the worker count or the order in which workers finish.

Outputs of :func:`generate_benchmark` under ``out_dir``::

    videos/<video_id>.mp4          H.264, yuv420p
    {train,val,test}.jsonl         our JSONL (one query a line, with qid and split)
    {train,val,test}.txt           Charades-STA style: ``VID start end##sentence``
    durations.csv                  ``id,length`` (what a Charades-STA reader needs for durations)
"""

from __future__ import annotations

import colorsys
import concurrent.futures
import csv
import math
import multiprocessing
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw
from tqdm import tqdm

from timerefine.data.annotations import Query, write_jsonl
from timerefine.video import write_video

SPLITS = ("train", "val", "test")

# Inverse CDFs as (probability, value) knots, linearly interpolated. The inner knots are Charades-STA
# train's q05 / q25 / median / q75 / q95; the outer ones bound the tails (video durations to [12, 60] s,
# as the benchmark is meant for ~30 s clips; moment fractions to Charades' observed max of ~0.5).
DURATION_QUANTILES_S = (
    (0.0, 12.0),
    (0.05, 18.3),
    (0.25, 27.9),
    (0.5, 30.6),
    (0.75, 32.5),
    (0.95, 42.9),
    (1.0, 60.0),
)
MOMENT_FRACTION_QUANTILES = (
    (0.0, 0.08),
    (0.05, 0.129),
    (0.25, 0.19),
    (0.5, 0.251),
    (0.75, 0.342),
    (0.95, 0.458),
    (1.0, 0.508),
)
# How a moment is placed: Charades-STA train has 19% of its moments starting at 0 and 16% ending at (or
# past) the video's end. Placements that collide with an earlier event are redrawn, which shifts the
# shares a little: with these values 21% of the moments start at 0 and 18% end at the video's end.
P_START_AT_ZERO = 0.19
P_END_AT_DURATION = 0.14
MIN_MOMENT_S = 1.5
# Events may overlap by at most this fraction of the shorter one: a little, as actions in real videos do,
# but never so much that two objects share most of a window.
MAX_OVERLAP = 0.15
EVENTS_PER_VIDEO = (2, 3, 4)
EVENTS_PER_VIDEO_P = (0.3, 0.45, 0.25)

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "orange": (245, 140, 0),
    "yellow": (245, 225, 20),
    "green": (30, 170, 50),
    "cyan": (0, 200, 220),
    "blue": (30, 70, 230),
    "purple": (140, 40, 200),
    "pink": (250, 110, 190),
    "white": (250, 250, 250),
    "black": (15, 15, 15),
}
SHAPES = ("circle", "square", "triangle", "star", "diamond", "cross", "hexagon")

# Query phrasings per action; "{colour}" is the new colour of a colour change.
ACTION_PHRASES: dict[str, tuple[str, ...]] = {
    "move_left": ("moves to the left", "slides to the left", "travels left"),
    "move_right": ("moves to the right", "slides to the right", "travels right"),
    "move_up": ("moves up", "rises to the top", "floats upward"),
    "move_down": ("moves down", "sinks to the bottom", "drops downward"),
    "grow": ("grows bigger", "gets larger", "expands"),
    "shrink": ("shrinks", "gets smaller", "becomes small"),
    "spin": ("spins around", "rotates", "twirls"),
    "blink": ("blinks", "flashes on and off", "flickers"),
    "change_colour": ("turns {colour}", "changes colour to {colour}", "becomes {colour}"),
    "enter_left": ("enters from the left", "comes in from the left"),
    "enter_right": ("enters from the right", "comes in from the right"),
    "leave_left": ("leaves to the left", "exits on the left"),
    "leave_right": ("leaves to the right", "exits on the right"),
}
ACTIONS = tuple(ACTION_PHRASES)

# Object diameter at scale 1, as a fraction of the frame's short side: big enough that a whole-frame
# feature changes when the object appears.
OBJECT_SIZE = 0.6
GROW_SCALES = (0.7, 1.3)
BLINK_PERIOD_S = 0.6
BLINK_ON_S = 0.4
# Entering / leaving takes this long (at most 30% of the event); the object starts (or ends) half visible
# at the frame's edge, so it is on screen for the whole window.
SLIDE_S = 1.5
# No shape reaches further than this from its centre, in unit radii (a square's corners reach 1.13).
SHAPE_EXTENT = 1.15


@dataclass
class SynthConfig:
    """How many videos, from which seed, and the raster they are rendered at."""

    videos: int = 500
    seed: int = 0
    width: int = 160
    height: int = 120
    fps: float = 10.0
    split_fractions: tuple[float, float, float] = (0.8, 0.1, 0.1)
    workers: int = 0  # render processes; 0 = os.cpu_count(), 1 = in this process

    def __post_init__(self) -> None:
        if self.videos < 1:
            raise ValueError(f"SynthConfig.videos must be >= 1, got {self.videos}")
        if self.seed < 0:
            raise ValueError(f"SynthConfig.seed must be >= 0, got {self.seed}")
        if self.width < 16 or self.height < 16 or self.width % 2 or self.height % 2:
            raise ValueError(
                f"SynthConfig width and height must be even and >= 16 (H.264 yuv420p), "
                f"got {self.width}x{self.height}"
            )
        if self.fps <= 0:
            raise ValueError(f"SynthConfig.fps must be > 0, got {self.fps}")
        fractions = tuple(float(f) for f in self.split_fractions)
        if len(fractions) != len(SPLITS) or min(fractions) < 0 or not math.isclose(sum(fractions), 1.0):
            raise ValueError(
                f"SynthConfig.split_fractions must be three non-negative numbers (train, val, test) summing "
                f"to 1, got {self.split_fractions}"
            )
        self.split_fractions = fractions  # type: ignore[assignment]
        if self.workers < 0:
            raise ValueError(f"SynthConfig.workers must be >= 0, got {self.workers}")


@dataclass(frozen=True)
class Keyframe:
    """Where an object is at one moment; positions are fractions of the frame's width and height."""

    time_s: float
    x: float
    y: float
    scale: float = 1.0
    angle_deg: float = 0.0


@dataclass(frozen=True)
class Event:
    """One object doing one action from ``start_s`` to ``end_s``; it is on screen only then."""

    colour: str
    shape: str
    action: str
    start_s: float
    end_s: float
    query: str
    keyframes: tuple[Keyframe, ...]  # piecewise-linear path, first at start_s, last at end_s
    new_colour: str | None = None  # for change_colour: the colour from the event's midpoint on

    def visible_at(self, time_s: float) -> bool:
        if not self.start_s <= time_s < self.end_s:
            return False
        return self.action != "blink" or (time_s - self.start_s) % BLINK_PERIOD_S < BLINK_ON_S

    def colour_at(self, time_s: float) -> str:
        if self.new_colour is not None and time_s >= (self.start_s + self.end_s) / 2:
            return self.new_colour
        return self.colour


@dataclass(frozen=True)
class VideoSpec:
    """The script of one video: independent of the raster it is rendered at (times in seconds)."""

    video_id: str
    duration_s: float
    background_start: tuple[int, int, int]  # RGB at t = 0, drifting linearly to background_end
    background_end: tuple[int, int, int]
    events: tuple[Event, ...]  # sorted by start; drawn in this order

    def queries(self, split: str | None = None) -> list[Query]:
        """One query per event; qids are ``<video_id>_q<k>`` in event order."""
        return [
            Query(
                qid=f"{self.video_id}_q{k}",
                video_id=self.video_id,
                duration=self.duration_s,
                query=event.query,
                windows=((event.start_s, event.end_s),),
                split=split,
            )
            for k, event in enumerate(self.events)
        ]


@dataclass
class SynthSummary:
    """What :func:`generate_benchmark` wrote."""

    out_dir: Path
    videos: dict[str, int]  # split -> number of videos
    queries: dict[str, int]  # split -> number of queries
    elapsed_s: float
    files: dict[str, Path] = field(default_factory=dict)  # e.g. "train.jsonl" -> path

    def format(self) -> str:
        per_split = ", ".join(f"{s} {self.videos[s]} videos / {self.queries[s]} queries" for s in SPLITS)
        return (
            f"wrote {sum(self.videos.values())} videos and {sum(self.queries.values())} queries to "
            f"{self.out_dir} in {self.elapsed_s:.1f} s ({per_split})"
        )


def video_rng(seed: int, index: int) -> np.random.Generator:
    """Video ``index``'s own random stream: the same whatever the video count or worker order."""
    return np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(0, index)))


def video_id_for(index: int) -> str:
    return f"synth{index:05d}"


def make_video_spec(video_id: str, rng: np.random.Generator, config: SynthConfig) -> VideoSpec:
    """Script one video: its duration, background drift, events and their queries."""
    num_frames = max(1, round(_draw_from_quantiles(rng, DURATION_QUANTILES_S) * config.fps))
    duration_s = num_frames / config.fps
    windows = _draw_windows(rng, num_frames, config.fps)
    # Colours and shapes are drawn without replacement, so each names one event within the video; a colour
    # change needs a second colour that no other event uses either.
    n_colours = len(windows) + 1  # one spare, used only by a colour change
    colours = [str(c) for c in rng.choice(list(COLOURS), size=n_colours, replace=False)]
    shapes = [str(s) for s in rng.choice(SHAPES, size=len(windows), replace=False)]
    spare_colour = colours.pop()
    events = []
    for (start_s, end_s), colour, shape in zip(windows, colours, shapes, strict=True):
        actions = [a for a in ACTIONS if not (shape == "circle" and a == "spin")]  # it would look still
        if spare_colour is None:
            actions.remove("change_colour")
        action = str(rng.choice(actions))
        new_colour = spare_colour if action == "change_colour" else None
        if new_colour is not None:
            spare_colour = None
        events.append(
            Event(
                colour=colour,
                shape=shape,
                action=action,
                start_s=start_s,
                end_s=end_s,
                query=_phrase_query(rng, colour, shape, action, new_colour),
                keyframes=_keyframes(rng, action, start_s, end_s, config.width, config.height),
                new_colour=new_colour,
            )
        )
    background_start, background_end = _background_colours(rng)
    return VideoSpec(video_id, duration_s, background_start, background_end, tuple(events))


def render_video(spec: VideoSpec, config: SynthConfig) -> np.ndarray:
    """Frames ``(N, H, W, 3)`` uint8 at ``config``'s raster; frame ``i`` shows time ``i / fps``."""
    num_frames = round(spec.duration_s * config.fps)
    frames = np.empty((num_frames, config.height, config.width, 3), dtype=np.uint8)
    start = np.asarray(spec.background_start, dtype=np.float64)
    end = np.asarray(spec.background_end, dtype=np.float64)
    radius_unit_px = OBJECT_SIZE * min(config.width, config.height) / 2
    for i in range(num_frames):
        time_s = i / config.fps
        drift = time_s / spec.duration_s
        background = tuple(round(c) for c in start + (end - start) * drift)
        image = Image.new("RGB", (config.width, config.height), background)
        draw = ImageDraw.Draw(image)
        for event in spec.events:
            if event.visible_at(time_s):
                polygon = _object_polygon(event, time_s, config.width, config.height, radius_unit_px)
                draw.polygon(polygon, fill=COLOURS[event.colour_at(time_s)])
        frames[i] = np.asarray(image)
    return frames


def generate_benchmark(out_dir: str | Path, config: SynthConfig, progress: bool = True) -> SynthSummary:
    """Render and encode every video (in parallel), then write the annotations of every split.

    Annotations are written last, so a benchmark whose annotation files exist has all its videos (and
    ``write_video`` is atomic, so no reader sees a half-written one).
    """
    started = time.perf_counter()
    out_dir = Path(out_dir)
    videos_dir = out_dir / "videos"
    videos_dir.mkdir(parents=True, exist_ok=True)
    specs = [
        make_video_spec(video_id_for(i), video_rng(config.seed, i), config) for i in range(config.videos)
    ]
    splits = assign_splits(config.videos, config.split_fractions, config.seed)

    workers = config.workers or os.cpu_count() or 1
    jobs = [(spec, config, videos_dir / f"{spec.video_id}.mp4") for spec in specs]
    with tqdm(total=len(jobs), desc="synth videos", unit="video", disable=not progress) as bar:
        if workers == 1:
            for job in jobs:
                _render_and_write(*job)
                bar.update()
        else:
            # spawn, not fork: the caller may hold threads (torch, Ray) that a fork would copy mid-state.
            context = multiprocessing.get_context("spawn")
            with concurrent.futures.ProcessPoolExecutor(workers, mp_context=context) as pool:
                futures = {pool.submit(_render_and_write, *job): job[2] for job in jobs}
                for future in concurrent.futures.as_completed(futures):
                    if future.exception() is not None:
                        pool.shutdown(cancel_futures=True)  # do not render the rest for nothing
                        raise RuntimeError(f"could not write {futures[future]}") from future.exception()
                    bar.update()

    files: dict[str, Path] = {}
    video_counts: dict[str, int] = {}
    query_counts: dict[str, int] = {}
    for split in SPLITS:
        split_specs = [spec for spec, s in zip(specs, splits, strict=True) if s == split]
        queries = [q for spec in split_specs for q in spec.queries(split)]
        files[f"{split}.jsonl"] = out_dir / f"{split}.jsonl"
        write_jsonl(queries, files[f"{split}.jsonl"])
        files[f"{split}.txt"] = out_dir / f"{split}.txt"
        _write_charades_txt(queries, files[f"{split}.txt"])
        video_counts[split] = len(split_specs)
        query_counts[split] = len(queries)
    files["durations.csv"] = out_dir / "durations.csv"
    _write_durations_csv(specs, files["durations.csv"])
    files["videos"] = videos_dir
    return SynthSummary(out_dir, video_counts, query_counts, time.perf_counter() - started, files)


def assign_splits(num_videos: int, fractions: Sequence[float], seed: int) -> list[str]:
    """A seeded split of video indices with exact counts (largest remainder); every split with a positive
    fraction gets at least one video when there are enough videos to go round."""
    exact = [f * num_videos for f in fractions]
    counts = [math.floor(x) for x in exact]
    if num_videos >= sum(f > 0 for f in fractions):
        for k, f in enumerate(fractions):
            if f > 0 and counts[k] == 0:
                counts[k] = 1
    while sum(counts) > num_videos:  # the minimum of one overshot: take back from the largest
        counts[counts.index(max(counts))] -= 1
    by_remainder = sorted(range(len(fractions)), key=lambda k: counts[k] - exact[k])
    for k in by_remainder[: num_videos - sum(counts)]:
        counts[k] += 1
    labels = [split for split, count in zip(SPLITS, counts, strict=True) for _ in range(count)]
    rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(1,)))  # not any video's stream
    return [labels[k] for k in rng.permutation(num_videos)]


def _render_and_write(spec: VideoSpec, config: SynthConfig, path: Path) -> None:
    write_video(path, render_video(spec, config), config.fps)


def _draw_from_quantiles(rng: np.random.Generator, knots: Sequence[tuple[float, float]]) -> float:
    probabilities, values = zip(*knots, strict=True)
    return float(np.interp(rng.random(), probabilities, values))


def _draw_windows(rng: np.random.Generator, num_frames: int, fps: float) -> list[tuple[float, float]]:
    """Event windows on the frame grid, Charades-like, overlapping each other by at most MAX_OVERLAP.

    Lengths are drawn first and placed longest first, so that only placements (not lengths) are redrawn
    when they collide: the length distribution stays Charades'. An event that finds no place is dropped.
    """
    num_events = int(rng.choice(EVENTS_PER_VIDEO, p=EVENTS_PER_VIDEO_P))
    min_frames = math.ceil(MIN_MOMENT_S * fps)
    while True:  # redraw the whole video in the rare case where fewer than two events fit
        fractions = [_draw_from_quantiles(rng, MOMENT_FRACTION_QUANTILES) for _ in range(num_events)]
        lengths = [min(num_frames, max(min_frames, round(f * num_frames))) for f in fractions]
        windows: list[tuple[int, int]] = []
        for length in sorted(lengths, reverse=True):
            for _attempt in range(100):
                placement = rng.random()
                if placement < P_START_AT_ZERO:
                    start = 0
                elif placement < P_START_AT_ZERO + P_END_AT_DURATION:
                    start = num_frames - length
                else:
                    start = int(rng.integers(0, num_frames - length + 1))
                candidate = (start, start + length)
                if all(_overlap_ok(candidate, other) for other in windows):
                    windows.append(candidate)
                    break
        if len(windows) >= 2:
            return [(start / fps, end / fps) for start, end in sorted(windows)]


def _overlap_ok(a: tuple[int, int], b: tuple[int, int]) -> bool:
    overlap = min(a[1], b[1]) - max(a[0], b[0])
    return overlap <= MAX_OVERLAP * min(a[1] - a[0], b[1] - b[0])


def _phrase_query(
    rng: np.random.Generator, colour: str, shape: str, action: str, new_colour: str | None
) -> str:
    article = "the" if rng.random() < 0.7 else "a"
    phrase = str(rng.choice(ACTION_PHRASES[action])).format(colour=new_colour)
    return f"{article} {colour} {shape} {phrase}"


def _keyframes(
    rng: np.random.Generator, action: str, start_s: float, end_s: float, width: int, height: int
) -> tuple[Keyframe, ...]:
    """The object's path for ``action``; it stays entirely inside the frame except when entering/leaving."""
    short_side = min(width, height)
    scale_max = GROW_SCALES[1] if action in ("grow", "shrink") else 1.0
    radius = SHAPE_EXTENT * scale_max * OBJECT_SIZE * short_side / 2
    margin_x, margin_y = radius / width, radius / height

    def across(margin: float, u: float) -> float:  # u in [0, 1] -> a centre keeping the object inside
        return margin + (1 - 2 * margin) * u

    x = across(margin_x, rng.random())
    y = across(margin_y, rng.random())
    near, far = across(margin_x, rng.uniform(0.0, 0.2)), across(margin_x, rng.uniform(0.8, 1.0))
    top, bottom = across(margin_y, rng.uniform(0.0, 0.2)), across(margin_y, rng.uniform(0.8, 1.0))
    slide_end = start_s + min(SLIDE_S, 0.3 * (end_s - start_s))
    slide_start = end_s - min(SLIDE_S, 0.3 * (end_s - start_s))
    rest_x = across(margin_x, rng.uniform(0.3, 0.7))

    def path(*points: tuple[float, float, float]) -> tuple[Keyframe, ...]:
        return tuple(Keyframe(t, px, py) for t, px, py in points)

    if action == "move_left":
        return path((start_s, far, y), (end_s, near, y))
    if action == "move_right":
        return path((start_s, near, y), (end_s, far, y))
    if action == "move_up":
        return path((start_s, x, bottom), (end_s, x, top))
    if action == "move_down":
        return path((start_s, x, top), (end_s, x, bottom))
    if action == "enter_left":
        return path((start_s, 0.0, y), (slide_end, rest_x, y), (end_s, rest_x, y))
    if action == "enter_right":
        return path((start_s, 1.0, y), (slide_end, rest_x, y), (end_s, rest_x, y))
    if action == "leave_left":
        return path((start_s, rest_x, y), (slide_start, rest_x, y), (end_s, 0.0, y))
    if action == "leave_right":
        return path((start_s, rest_x, y), (slide_start, rest_x, y), (end_s, 1.0, y))
    if action in ("grow", "shrink"):
        small, large = GROW_SCALES
        first, last = (small, large) if action == "grow" else (large, small)
        return (Keyframe(start_s, x, y, first), Keyframe(end_s, x, y, last))
    if action == "spin":
        seconds_per_turn = rng.uniform(2.0, 4.0)
        direction = 1 if rng.random() < 0.5 else -1
        turn_deg = direction * 360.0 * (end_s - start_s) / seconds_per_turn
        return (Keyframe(start_s, x, y), Keyframe(end_s, x, y, angle_deg=turn_deg))
    if action in ("blink", "change_colour"):
        return path((start_s, x, y), (end_s, x, y))
    raise ValueError(f"unknown action {action!r}; known: {', '.join(ACTIONS)}")


def _background_colours(rng: np.random.Generator) -> tuple[tuple[int, int, int], tuple[int, int, int]]:
    """Two greyish colours (low saturation, mid value): every object colour, black and white included,
    stands out against any mix of them."""
    hue = rng.random()
    colours = []
    for hue_shift in (0.0, rng.uniform(-0.25, 0.25)):
        rgb = colorsys.hsv_to_rgb((hue + hue_shift) % 1.0, rng.uniform(0.08, 0.25), rng.uniform(0.42, 0.62))
        colours.append(tuple(round(255 * c) for c in rgb))
    return colours[0], colours[1]


def _unit_outline(shape: str) -> np.ndarray:
    """The shape's outline as (K, 2) points around (0, 0), within SHAPE_EXTENT; y points down."""

    def ring(count: int, radii: Sequence[float], first_deg: float) -> np.ndarray:
        angles = np.deg2rad(first_deg + 360.0 * np.arange(count) / count)
        r = np.resize(np.asarray(radii, dtype=np.float64), count)
        return np.stack([r * np.cos(angles), r * np.sin(angles)], axis=1)

    if shape == "circle":
        return ring(48, [1.0], 0.0)
    if shape == "square":
        return ring(4, [0.8 * math.sqrt(2)], 45.0)
    if shape == "triangle":  # thin shapes reach further out, so that every shape covers a similar area
        return ring(3, [SHAPE_EXTENT], -90.0)
    if shape == "star":
        return ring(10, [SHAPE_EXTENT, 0.55], -90.0)
    if shape == "diamond":
        return np.array([(0.0, -1.0), (0.8, 0.0), (0.0, 1.0), (-0.8, 0.0)])
    if shape == "cross":
        half_width = 0.35
        arm = np.array([(-half_width, -1.0), (half_width, -1.0), (half_width, -half_width)])  # the top arm
        arms = []
        for _ in range(4):  # each next arm is the last one turned a quarter clockwise: (x, y) -> (-y, x)
            arms.append(arm)
            arm = np.stack([-arm[:, 1], arm[:, 0]], axis=1)
        return np.concatenate(arms)
    if shape == "hexagon":
        return ring(6, [1.0], 0.0)
    raise ValueError(f"unknown shape {shape!r}; known: {', '.join(SHAPES)}")


_OUTLINES = {shape: _unit_outline(shape) for shape in SHAPES}


def _object_polygon(
    event: Event, time_s: float, width: int, height: int, radius_unit_px: float
) -> list[tuple[float, float]]:
    times = [k.time_s for k in event.keyframes]

    def at(values: list[float]) -> float:
        return float(np.interp(time_s, times, values))

    x = at([k.x for k in event.keyframes]) * width
    y = at([k.y for k in event.keyframes]) * height
    radius = at([k.scale for k in event.keyframes]) * radius_unit_px
    angle = math.radians(at([k.angle_deg for k in event.keyframes]))
    cos, sin = math.cos(angle), math.sin(angle)
    outline = _OUTLINES[event.shape]
    xs = x + radius * (outline[:, 0] * cos - outline[:, 1] * sin)
    ys = y + radius * (outline[:, 0] * sin + outline[:, 1] * cos)
    return list(zip(xs.tolist(), ys.tolist(), strict=True))


def _write_charades_txt(queries: Sequence[Query], path: Path) -> None:
    lines = [f"{q.video_id} {q.windows[0][0]:.2f} {q.windows[0][1]:.2f}##{q.query}\n" for q in queries]
    path.write_text("".join(lines))


def _write_durations_csv(specs: Sequence[VideoSpec], path: Path) -> None:
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["id", "length"])
        for spec in specs:
            writer.writerow([spec.video_id, f"{spec.duration_s:.2f}"])
