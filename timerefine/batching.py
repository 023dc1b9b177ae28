"""From (frame features, query, target answer) to the padded tensors the model consumes.

One row of a batch is ``prompt-before-video | num_frames video slots | prompt-after-video | answer``:

- the prompt is ``format_prompt(query, layout)`` wrapped in the tokenizer's chat template when it has one
  (Qwen and SmolLM2 instruct models do), else in ``PLAIN_TEMPLATE``; the ``<video>`` placeholder (before
  the question in the paper's video-first layout, after it in question-first) is cut out and replaced by
  ``num_frames`` slots that the model fills with the adapted frame features;
- the answer (the training target text, absent at inference) follows directly. Only its tokens are
  labelled, so cross-entropy never trains the model to predict the question; no EOS is appended because
  decoding stops at ``<seg_end>``, the answer's last token;
- every ``<offset>`` token of the answer is marked, and the row carries its ground-truth window as fractions
  of the duration, the auxiliary head's regression target at each of those positions.

Training batches are padded on the right, generation batches on the left (so that every row's next token
goes in the same column). Position ids come from the attention mask, so both give the same positions.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields
from typing import Literal

import numpy as np
import torch
from transformers import PreTrainedTokenizerBase

from timerefine.timecodec import OFFSET, SPECIAL_TOKENS, VIDEO_FIRST, VIDEO_PLACEHOLDER, format_prompt

IGNORE_INDEX = -100  # label of positions that take no part in the cross-entropy (PyTorch's default)

# For tokenizers without a chat template (the tiny default, base models): Vicuna's turn markers, which
# VTimeLLM's prompts use too. ``bos`` is the tokenizer's bos token, or nothing when it has none.
PLAIN_TEMPLATE = "{bos}USER: {question}\nASSISTANT:"


@dataclass
class Sample:
    """One query on one video. ``target`` and ``window`` are the training answer and the ground truth it was
    made from (seconds); both are None at inference."""

    features: np.ndarray | torch.Tensor  # (num_frames, feature_dim), any float dtype
    query: str
    duration: float
    target: str | None = None
    window: tuple[float, float] | None = None


@dataclass
class Batch:
    """Padded tensors for ``B`` rows of length ``L``; see the module docstring for the row layout."""

    input_ids: torch.Tensor  # (B, L) long; video slots and padding hold the pad id
    attention_mask: torch.Tensor  # (B, L) long, 0 on padding
    position_ids: torch.Tensor  # (B, L) long, counting real tokens only
    video_mask: torch.Tensor  # (B, L) bool, exactly num_frames True per row, in frame order
    labels: torch.Tensor  # (B, L) long: the token at that position on answer tokens, else IGNORE_INDEX
    offset_mask: torch.Tensor  # (B, L) bool: input positions of answer <offset> tokens
    prompt_mask: torch.Tensor  # (B, L) bool: the prompt's text tokens (the question and its template)
    features: torch.Tensor  # (B, num_frames, feature_dim) float32
    window_fractions: torch.Tensor  # (B, 2) float32: (start, end) / duration, zeros where unknown
    durations: torch.Tensor  # (B,) float32, seconds

    def to(self, device: torch.device | str) -> Batch:
        return Batch(**{f.name: getattr(self, f.name).to(device) for f in fields(self)})

    def __len__(self) -> int:
        return self.input_ids.shape[0]


def prompt_text(tokenizer: PreTrainedTokenizerBase, query: str, layout: str = VIDEO_FIRST) -> str:
    """The full prompt as text, ``<video>`` placeholder included, ending where the answer begins."""
    question = format_prompt(query, layout)
    if tokenizer.chat_template:
        messages = [{"role": "user", "content": question}]
        return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return PLAIN_TEMPLATE.format(bos=tokenizer.bos_token or "", question=question)


def special_token_id(tokenizer: PreTrainedTokenizerBase, token: str) -> int:
    """The id of one of TimeRefine's tokens, which must encode as exactly that single token."""
    ids = tokenizer(token, add_special_tokens=False)["input_ids"]
    if len(ids) != 1:
        raise ValueError(
            f"{token!r} is not a single token of this tokenizer (it encodes as {ids}); add "
            f"{SPECIAL_TOKENS} as special tokens first (TimeRefineModel does)"
        )
    return ids[0]


def make_batch(
    tokenizer: PreTrainedTokenizerBase,
    samples: Sequence[Sample],
    *,
    num_frames: int,
    padding_side: Literal["left", "right"] = "right",
    prompt_layout: str = VIDEO_FIRST,
) -> Batch:
    """Tokenize and pad ``samples`` into one batch (right padding for training, left for generation), with
    the frames before the question (``video-first``, the paper's) or after it (``question-first``)."""
    if not samples:
        raise ValueError("cannot make a batch of zero samples")
    offset_id = special_token_id(tokenizer, OFFSET)
    pad_id = tokenizer.pad_token_id
    if pad_id is None:
        raise ValueError(
            "the tokenizer has no pad token; load it with timerefine.llm.load_llm, which sets one"
        )
    rows = [
        _encode(tokenizer, sample, num_frames, pad_id, offset_id, index, prompt_layout)
        for index, sample in enumerate(samples)
    ]
    length = max(len(row.ids) for row in rows)

    def pad(values: list, fill: object) -> list:
        gap = [fill] * (length - len(values))
        return gap + values if padding_side == "left" else values + gap

    attention_mask = torch.tensor([pad([1] * len(row.ids), 0) for row in rows])
    return Batch(
        input_ids=torch.tensor([pad(row.ids, pad_id) for row in rows]),
        attention_mask=attention_mask,
        position_ids=(attention_mask.cumsum(dim=1) - 1).clamp(min=0),
        video_mask=torch.tensor([pad(row.is_video, False) for row in rows]),
        labels=torch.tensor([pad(row.labels, IGNORE_INDEX) for row in rows]),
        offset_mask=torch.tensor([pad(row.is_offset, False) for row in rows]),
        prompt_mask=torch.tensor([pad(row.is_prompt, False) for row in rows]),
        features=_stack_features(samples, num_frames),
        window_fractions=torch.tensor(
            [_window_fractions(s, i) for i, s in enumerate(samples)], dtype=torch.float32
        ),
        durations=torch.tensor([float(s.duration) for s in samples], dtype=torch.float32),
    )


@dataclass
class _Row:
    ids: list[int]
    is_video: list[bool]
    labels: list[int]
    is_offset: list[bool]
    is_prompt: list[bool]


def _encode(
    tokenizer: PreTrainedTokenizerBase,
    sample: Sample,
    num_frames: int,
    pad_id: int,
    offset_id: int,
    index: int,
    layout: str,
) -> _Row:
    pieces = prompt_text(tokenizer, sample.query, layout).split(VIDEO_PLACEHOLDER)
    if len(pieces) != 2:
        raise ValueError(
            f"sample {index}: the prompt must hold {VIDEO_PLACEHOLDER} exactly once, but query "
            f"{sample.query!r} (or the chat template) adds another; remove it from the query"
        )
    before, after = (tokenizer(piece, add_special_tokens=False)["input_ids"] for piece in pieces)
    answer = [] if sample.target is None else tokenizer(sample.target, add_special_tokens=False)["input_ids"]
    prompt = [*before, *[pad_id] * num_frames, *after]
    return _Row(
        ids=prompt + answer,
        is_video=[False] * len(before) + [True] * num_frames + [False] * (len(after) + len(answer)),
        labels=[IGNORE_INDEX] * len(prompt) + answer,
        is_offset=[False] * len(prompt) + [token == offset_id for token in answer],
        is_prompt=[True] * len(before) + [False] * num_frames + [True] * len(after) + [False] * len(answer),
    )


def _stack_features(samples: Sequence[Sample], num_frames: int) -> torch.Tensor:
    # np.array copies: feature rows read from Arrow are read-only views, which torch refuses to wrap.
    tensors = [
        f.float() if isinstance(f, torch.Tensor) else torch.from_numpy(np.array(f, np.float32))
        for f in (sample.features for sample in samples)
    ]
    for index, (sample, tensor) in enumerate(zip(samples, tensors, strict=True)):
        if tensor.ndim != 2 or tensor.shape[0] != num_frames or tensor.shape[1] != tensors[0].shape[1]:
            raise ValueError(
                f"sample {index} (query {sample.query!r}) has features of shape {tuple(tensor.shape)}; the "
                f"model expects ({num_frames}, {tensors[0].shape[-1]}): extract features with {num_frames} "
                "frames per video using the encoder the model was configured for"
            )
    return torch.stack(tensors).float()


def _window_fractions(sample: Sample, index: int) -> tuple[float, float]:
    if sample.window is None:
        if sample.target is not None and OFFSET in sample.target:
            raise ValueError(
                f"sample {index} (query {sample.query!r}): its target has {OFFSET} tokens but no "
                "ground-truth window for the auxiliary head; pass Sample(window=(start_s, end_s))"
            )
        return (0.0, 0.0)
    if sample.duration <= 0:
        raise ValueError(
            f"sample {index} (query {sample.query!r}): duration must be positive, got {sample.duration}"
        )
    start, end = (min(max(t / sample.duration, 0.0), 1.0) for t in sample.window)
    return (start, end)
