"""Time as text: VTimeLLM's 100 bins, TimeRefine's refinement sequences, and their parser.

A video is seen as 100 uniformly sampled frames, so a time ``t`` in a video of duration ``D`` is written as
the two-digit bin ``min(99, round(100 * t / D))`` and a bin ``b`` reads back as ``b / 100 * D`` seconds.

The direct baseline answers ``From <seg_start> 35 to 40 <seg_end>``. TimeRefine answers with K steps, each
a rough segment and the offset that moves it onto the ground truth::

    From <seg_start> 30 to 46 <offset> +05 and -06 <refine> 32 to 44 <offset> +03 and -04 <refine>
    35 to 41 <offset> +00 and -01 <refine> 35 to 40 <offset> +00 and -00 <seg_end>

Training targets draw step k's rough boundaries from Gaussians around the ground truth whose width
``sigma_k`` shrinks to 0, so the model learns to correct its own coarse guess. K = 1 with sigma = [0] is the
direct format: one code path, two settings.

Rounding is Python's ``round`` (half to even), as VTimeLLM's converter does, so bins match its targets.

Two spellings of the same answer exist. Digits (the paper's text, above) suit tokenizers that split numbers
digit by digit (Llama, Qwen2, our small default), at two tokens a bin. Time tokens write a bin as one token,
``<35>``, and a sign as ``<+>`` / ``<->``, as the released TimeRefine code does; they make a K = 4 answer
about a third as long, and each bin one decision of the model instead of two::

    From <seg_start><30> to<46><offset><+><05> and<-><06><refine> ... <seg_end>

The prompt comes in two layouts: the paper's ``video-first`` (``<video>\nDuring which frames ...?``) and
``question-first`` (the question, then the frames), in which the frames, under causal attention, see the
question they are to be judged against.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

SEG_START, SEG_END, OFFSET, REFINE = "<seg_start>", "<seg_end>", "<offset>", "<refine>"
SPECIAL_TOKENS = (SEG_START, SEG_END, OFFSET, REFINE)
VIDEO_PLACEHOLDER = "<video>"
NUM_BINS = 100
MAX_OFFSET = NUM_BINS - 1
QUESTION_TEMPLATE = "During which frames can we see {sentence}?"
PROMPT_TEMPLATE = VIDEO_PLACEHOLDER + "\n" + QUESTION_TEMPLATE  # the paper's (VTimeLLM's) video-first prompt
VIDEO_FIRST, QUESTION_FIRST = "video-first", "question-first"
PROMPT_LAYOUTS = (VIDEO_FIRST, QUESTION_FIRST)
_LAYOUT_TEMPLATES = {
    VIDEO_FIRST: PROMPT_TEMPLATE,
    QUESTION_FIRST: QUESTION_TEMPLATE + "\n" + VIDEO_PLACEHOLDER,
}

# The paper's schedules (seconds). K = 4 is its default; K = 1 is the direct baseline.
PRESETS: dict[int, tuple[float, ...]] = {
    1: (0.0,),
    2: (4.0, 0.0),
    4: (5.0, 3.0, 1.0, 0.0),
    6: (8.0, 6.0, 4.0, 2.0, 1.0, 0.0),
    8: (10.0, 8.0, 6.0, 5.0, 3.0, 2.0, 1.0, 0.0),
}
# Relative presets express the same noise as a fraction of the duration of a Charades-median (30 s) video,
# so that a 3-minute ActivityNet video gets proportionally wide rough segments instead of near-exact ones.
REFERENCE_DURATION_S = 30.0
_MAX_REDRAWS = 100

# One token a bin and one a sign, for tokenizers that add them (``--time-tokens``).
TIME_TOKENS = tuple(f"<{b:02d}>" for b in range(NUM_BINS))
PLUS_TOKEN, MINUS_TOKEN = "<+>", "<->"
SIGN_TOKENS = (PLUS_TOKEN, MINUS_TOKEN)


def time_to_bin(t: float, duration: float) -> int:
    """The two-digit bin of time ``t`` (seconds) in a video of ``duration`` seconds."""
    if duration <= 0:
        raise ValueError(f"duration must be positive, got {duration}")
    return max(0, min(MAX_OFFSET, round(NUM_BINS * t / duration)))


def bin_to_time(b: float, duration: float) -> float:
    """Seconds for bin ``b``; bins outside [0, 100] (a refined answer can overshoot) clamp to the video."""
    return min(max(b / NUM_BINS * duration, 0.0), duration)


@dataclass(frozen=True)
class Schedule:
    """Noise widths of the refinement steps, coarse to fine; the last is 0 so the last step is the truth.

    ``relative``: sigmas are fractions of the video's duration instead of seconds.
    ``contain_gt``: redraw a rough segment until it contains the ground truth (start offset >= 0, end
    offset <= 0), as the released setting does.
    ``per_epoch``: draw new noise every epoch instead of once per sample (the released setting draws once).
    """

    sigmas: tuple[float, ...]
    relative: bool = False
    contain_gt: bool = True
    per_epoch: bool = False

    def __post_init__(self) -> None:
        if not self.sigmas:
            raise ValueError("a schedule needs at least one step")
        if any(s < 0 for s in self.sigmas):
            raise ValueError(f"sigmas must be >= 0, got {self.sigmas}")
        if self.sigmas[-1] != 0:
            raise ValueError(
                f"the last sigma must be 0 (the last step is the ground truth), got {self.sigmas}"
            )
        object.__setattr__(self, "sigmas", tuple(float(s) for s in self.sigmas))

    @classmethod
    def preset(cls, k: int, *, relative: bool = False, **options: bool) -> Schedule:
        """The paper's schedule with ``k`` steps (1, 2, 4, 6, 8); ``relative`` rescales it to fractions of
        a 30 s video."""
        if k not in PRESETS:
            raise ValueError(f"no preset with K = {k}; presets: {sorted(PRESETS)}")
        sigmas = PRESETS[k]
        if relative:
            sigmas = tuple(s / REFERENCE_DURATION_S for s in sigmas)
        return cls(sigmas, relative=relative, **options)

    @classmethod
    def parse(cls, spec: str | int, **options: bool) -> Schedule:
        """Read a schedule from the command line or a sweep config.

        ``"4"`` is the K = 4 preset, ``"rel4"`` its duration-relative version, ``"5,3,1,0"`` explicit seconds
        and ``"rel:0.2,0.1,0"`` explicit fractions of the duration.
        """
        text = str(spec).strip().lower()
        relative = text.startswith("rel")
        body = text.removeprefix("rel").lstrip(":")
        try:
            if "," not in body:
                return cls.preset(int(body), relative=relative, **options)
            return cls(tuple(float(x) for x in body.split(",")), relative=relative, **options)
        except ValueError as err:
            raise ValueError(
                f"bad refinement schedule {spec!r}: {err}. Use a preset K (1, 2, 4, 6, 8), 'rel4', "
                "comma-separated sigmas in seconds ending in 0 ('5,3,1,0'), or 'rel:0.2,0.1,0'"
            ) from None

    @property
    def k(self) -> int:
        return len(self.sigmas)

    @property
    def direct(self) -> bool:
        """K = 1: the answer is the plain ``From <seg_start> s to e <seg_end>`` with no offsets."""
        return self.k == 1

    def describe(self) -> str:
        unit = "xD" if self.relative else "s"
        return f"K={self.k} sigma=[{', '.join(f'{s:g}' for s in self.sigmas)}]{unit}"


@dataclass(frozen=True)
class Step:
    """One refinement step in bins: a rough segment and the offset that moves it onto the answer."""

    rough: tuple[int, int]
    offset: tuple[int, int] = (0, 0)

    @property
    def refined(self) -> tuple[int, int]:
        return (self.rough[0] + self.offset[0], self.rough[1] + self.offset[1])


def noise_rng(seed: int, qid: str, epoch: int | None = None) -> np.random.Generator:
    """A generator private to one sample (and epoch, when noise is redrawn per epoch).

    Keyed by a stable hash rather than by position so that targets do not depend on shuffling, sharding
    or the number of workers.
    """
    key = f"{seed}\x00{qid}\x00{'' if epoch is None else epoch}".encode()
    return np.random.default_rng(int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "little"))


def make_steps(
    start_s: float, end_s: float, duration_s: float, schedule: Schedule, rng: np.random.Generator
) -> list[Step]:
    """Draw the rough segments of one training target and the offsets that correct them."""
    if not 0 <= start_s <= end_s <= duration_s:
        raise ValueError(f"need 0 <= start <= end <= duration, got ({start_s}, {end_s}, {duration_s})")
    gt = (time_to_bin(start_s, duration_s), time_to_bin(end_s, duration_s))
    steps = []
    for sigma in schedule.sigmas:
        width = sigma * duration_s if schedule.relative else sigma
        rough = _draw_rough(start_s, end_s, duration_s, width, gt, schedule.contain_gt, rng)
        offset = (_clip_offset(gt[0] - rough[0]), _clip_offset(gt[1] - rough[1]))
        steps.append(Step(rough, offset))
    return steps


def _draw_rough(
    start_s: float,
    end_s: float,
    duration_s: float,
    width: float,
    gt: tuple[int, int],
    contain_gt: bool,
    rng: np.random.Generator,
) -> tuple[int, int]:
    if width == 0:
        return gt
    for _ in range(_MAX_REDRAWS):
        a, b = rng.normal(start_s, width), rng.normal(end_s, width)
        lo, hi = max(0.0, min(a, b)), min(duration_s, max(a, b))
        rough = (time_to_bin(lo, duration_s), time_to_bin(hi, duration_s))
        if not contain_gt or (rough[0] <= gt[0] and rough[1] >= gt[1]):
            return rough
    # Containing draws have probability ~1/4 each, so this is practically unreachable; widen the last draw
    # rather than loop forever or silently break the containment promise.
    return (min(rough[0], gt[0]), max(rough[1], gt[1]))


def _clip_offset(x: int) -> int:
    return max(-MAX_OFFSET, min(MAX_OFFSET, x))


def _signed(x: int, zero_sign: str, time_tokens: bool = False) -> str:
    sign = zero_sign if x == 0 else ("+" if x > 0 else "-")
    if time_tokens:
        return f"<{sign}><{abs(x):02d}>"
    return f"{sign}{abs(x):02d}"


def _bin(b: int, time_tokens: bool) -> str:
    return f"<{b:02d}>" if time_tokens else f"{b:02d}"


def format_answer(steps: Sequence[Step], *, direct: bool = False, time_tokens: bool = False) -> str:
    """The answer text. Zero offsets are written ``+00`` at the start and ``-00`` at the end, the signs a
    contained rough segment always has, so the model sees one spelling per boundary.

    ``time_tokens`` writes bins and signs as single tokens (``<35>``, ``<+>``) and leaves out the spaces
    beside them, which a tokenizer would spend a token each on."""
    t = time_tokens
    gap = "" if t else " "  # between a special token and a bin
    if direct:
        if len(steps) != 1:
            raise ValueError("the direct format has exactly one step")
        s, e = steps[0].refined
        return f"From {SEG_START}{gap}{_bin(s, t)} to{gap}{_bin(e, t)}{gap}{SEG_END}"
    body = f"{gap}{REFINE}{gap}".join(
        f"{_bin(st.rough[0], t)} to{gap}{_bin(st.rough[1], t)}{gap}{OFFSET}{gap}"
        f"{_signed(st.offset[0], '+', t)} and{gap}{_signed(st.offset[1], '-', t)}"
        for st in steps
    )
    return f"From {SEG_START}{gap}{body}{gap}{SEG_END}"


def make_target(
    start_s: float,
    end_s: float,
    duration_s: float,
    schedule: Schedule,
    rng: np.random.Generator,
    *,
    time_tokens: bool = False,
) -> str:
    """The training answer for a ground-truth moment."""
    steps = make_steps(start_s, end_s, duration_s, schedule, rng)
    return format_answer(steps, direct=schedule.direct, time_tokens=time_tokens)


def format_prompt(sentence: str, layout: str = VIDEO_FIRST) -> str:
    """The question, with the sentence lower-cased and its final period removed (as the paper's data), and
    the ``<video>`` placeholder before it (``video-first``, the paper's) or after it (``question-first``)."""
    if layout not in _LAYOUT_TEMPLATES:
        raise ValueError(f"prompt layout must be one of {PROMPT_LAYOUTS}, got {layout!r}")
    sentence = sentence.strip().lower()
    sentence = sentence.removesuffix(".").strip()
    return _LAYOUT_TEMPLATES[layout].format(sentence=sentence)


@dataclass
class ParsedAnswer:
    """What a generated answer said. ``ok`` only when it follows the grammar to ``<seg_end>``; ``steps``
    holds every complete step read before the text stopped making sense, for the per-step trace."""

    ok: bool
    steps: list[Step] = field(default_factory=list)
    error: str | None = None

    @property
    def final_bins(self) -> tuple[int, int] | None:
        return self.steps[-1].refined if self.ok else None

    def segment_s(self, duration: float) -> tuple[float, float] | None:
        """The answer in seconds: the last step's rough + offset, clamped to the video, start <= end.
        None when the answer did not parse: it is a miss, never a guess."""
        if not self.ok:
            return None
        return _bins_to_segment(self.steps[-1].refined, duration)

    def trace_s(self, duration: float) -> list[tuple[float, float]]:
        """Every complete step's refined segment in seconds (accuracy per refinement step)."""
        return [_bins_to_segment(st.refined, duration) for st in self.steps]


def _bins_to_segment(bins: tuple[int, int], duration: float) -> tuple[float, float]:
    a, b = bin_to_time(bins[0], duration), bin_to_time(bins[1], duration)
    return (a, b) if a <= b else (b, a)


# A bin is one or two digits, or a time token; a signed offset is a sign and a bin, either spelling.
_NUMBER = r"(\d{1,2}|<\d{2}>)"
_SIGNED = r"((?:[+-]|<[+-]>)\s*(?:\d{1,2}|<\d{2}>))"
_STEP = re.compile(
    rf"^\s*{_NUMBER}\s*to\s*{_NUMBER}\s*(?:{re.escape(OFFSET)}\s*{_SIGNED}\s*and\s*{_SIGNED})?\s*$"
)


def parse_answer(text: str) -> ParsedAnswer:
    """Read a generated answer. Never raises: model output is untrusted text.

    Accepts any spacing around the special tokens (tokenizers differ in how they decode them) and ignores
    text before ``<seg_start>`` and after ``<seg_end>``. A single step may omit its offset (the direct
    format); with several steps, every step needs one.
    """
    if not isinstance(text, str):
        return ParsedAnswer(False, error=f"not text: {type(text).__name__}")
    _, sep, body = text.partition(SEG_START)
    if not sep:
        return ParsedAnswer(False, error=f"no {SEG_START}")
    body, closed, _ = body.partition(SEG_END)
    chunks = body.split(REFINE)
    steps: list[Step] = []
    for i, chunk in enumerate(chunks):
        match = _STEP.match(chunk)
        if match is None:
            last = i == len(chunks) - 1
            error = "truncated before <seg_end>" if last and not closed else f"step {i + 1} malformed"
            return ParsedAnswer(False, steps, f"{error}: {chunk.strip()[:40]!r}")
        s, e, os_, oe = match.groups()
        if os_ is None and len(chunks) > 1:
            return ParsedAnswer(False, steps, f"step {i + 1} has no {OFFSET}")
        steps.append(Step((_int(s), _int(e)), (_int(os_ or "0"), _int(oe or "0"))))
    if not closed:
        return ParsedAnswer(False, steps, f"truncated: no {SEG_END}")
    return ParsedAnswer(True, steps)


def _int(text: str) -> int:
    """A matched number in either spelling: ``35``, ``<35>``, ``-05``, ``<-><05>``."""
    return int(re.sub(r"[<>\s]", "", text))
