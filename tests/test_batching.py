"""Batching: the features sit where <video> was, only the answer is labelled, every <offset> is marked."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
import torch

from timerefine.batching import IGNORE_INDEX, PLAIN_TEMPLATE, Sample, make_batch, prompt_text
from timerefine.llm import build_tiny_tokenizer
from timerefine.timecodec import OFFSET, VIDEO_PLACEHOLDER, Schedule, format_prompt, make_target

NUM_FRAMES = 12
FEATURE_DIM = 6


@pytest.fixture(scope="module")
def tokenizer():
    return build_tiny_tokenizer()


def _sample(query: str, window: tuple[float, float], duration: float, k: int, seed: int = 0) -> Sample:
    rng = np.random.default_rng(seed)
    features = rng.normal(size=(NUM_FRAMES, FEATURE_DIM)).astype(np.float16)
    target = make_target(*window, duration, Schedule.preset(k), rng)
    return Sample(features, query, duration, target, window)


def test_features_take_the_place_of_the_video_placeholder(tokenizer) -> None:
    sample = _sample("The red circle moves to the left.", (3.0, 12.0), 30.0, k=4)
    batch = make_batch(tokenizer, [sample], num_frames=NUM_FRAMES)
    ids, video = batch.input_ids[0], batch.video_mask[0]
    slots = video.nonzero().flatten()
    assert slots.tolist() == list(
        range(slots[0].item(), slots[0].item() + NUM_FRAMES)
    )  # contiguous, in order
    before, after = prompt_text(tokenizer, sample.query).split(VIDEO_PLACEHOLDER)
    assert tokenizer.decode(ids[: slots[0]]) == before
    answer_starts = (batch.labels[0] != IGNORE_INDEX).nonzero()[0].item()
    assert tokenizer.decode(ids[slots[-1] + 1 : answer_starts]) == after
    assert (ids[video] == tokenizer.pad_token_id).all()
    torch.testing.assert_close(batch.features[0], torch.as_tensor(sample.features).float())
    assert batch.features.dtype == torch.float32


def test_only_the_answer_is_labelled_and_every_offset_is_marked(tokenizer) -> None:
    samples = [
        _sample("The blue square spins around.", (3.0, 12.0), 30.0, k=4, seed=1),
        _sample("Person opens the door.", (0.0, 20.0), 20.0, k=2, seed=2),
        _sample("The green star blinks.", (5.5, 7.25), 11.0, k=1, seed=3),
    ]
    batch = make_batch(tokenizer, samples, num_frames=NUM_FRAMES)
    offset_id = tokenizer.convert_tokens_to_ids(OFFSET)
    for row, sample in enumerate(samples):
        labelled = batch.labels[row] != IGNORE_INDEX
        # Labels are the answer itself, aligned with the input ids; nothing of the prompt or padding.
        assert tokenizer.decode(batch.labels[row][labelled]) == sample.target
        assert (batch.labels[row][labelled] == batch.input_ids[row][labelled]).all()
        assert not (labelled & ~batch.attention_mask[row].bool()).any()
        assert not (labelled & batch.video_mask[row]).any()
        assert batch.offset_mask[row].sum().item() == sample.target.count(OFFSET)
        assert (batch.input_ids[row][batch.offset_mask[row]] == offset_id).all()
        assert (batch.offset_mask[row] <= labelled).all()
    start, end = samples[0].window
    assert batch.window_fractions[0].tolist() == pytest.approx([start / 30.0, end / 30.0])
    assert batch.window_fractions[1].tolist() == [0.0, 1.0]
    assert batch.durations.tolist() == [30.0, 20.0, 11.0]


def test_left_and_right_padding_give_the_same_tokens_at_the_same_positions(tokenizer) -> None:
    samples = [
        Sample(np.zeros((NUM_FRAMES, FEATURE_DIM)), "the cat", 10.0),
        Sample(np.ones((NUM_FRAMES, FEATURE_DIM)), "a person walks in a doorway drinking some coffee.", 30.0),
    ]
    right = make_batch(tokenizer, samples, num_frames=NUM_FRAMES, padding_side="right")
    left = make_batch(tokenizer, samples, num_frames=NUM_FRAMES, padding_side="left")
    lengths = right.attention_mask.sum(1)
    assert lengths[0] < lengths[1]  # the rows really are padded
    assert (left.attention_mask[:, -1] == 1).all() and (right.attention_mask[:, 0] == 1).all()
    for row in range(2):
        real_right, real_left = right.attention_mask[row].bool(), left.attention_mask[row].bool()
        assert right.input_ids[row][real_right].tolist() == left.input_ids[row][real_left].tolist()
        assert right.position_ids[row][real_right].tolist() == list(range(lengths[row]))
        assert left.position_ids[row][real_left].tolist() == list(range(lengths[row]))
        assert right.video_mask[row][real_right].tolist() == left.video_mask[row][real_left].tolist()
    assert (left.labels == IGNORE_INDEX).all()  # no targets: nothing to learn, a generation batch


def test_the_tokenizer_chat_template_wraps_the_prompt_when_there_is_one(tokenizer) -> None:
    question = format_prompt("The Person Opens a DOOR.")
    assert question.endswith("the person opens a door?")
    plain = prompt_text(tokenizer, "The Person Opens a DOOR.")
    assert plain == PLAIN_TEMPLATE.format(bos=tokenizer.bos_token, question=question)

    tokenizer.chat_template = (
        "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}</s>{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>{% endif %}"
    )
    try:
        chat = prompt_text(tokenizer, "The Person Opens a DOOR.")
        batch = make_batch(
            tokenizer, [Sample(np.zeros((3, 2)), "The Person Opens a DOOR.", 5.0)], num_frames=3
        )
    finally:
        tokenizer.chat_template = None
    assert chat == f"<|user|>{question}</s><|assistant|>"
    assert batch.video_mask[0].sum().item() == 3
    text = tokenizer.decode(batch.input_ids[0][~batch.video_mask[0]])
    assert text == chat.replace(VIDEO_PLACEHOLDER, "")


def test_bad_samples_are_refused_with_what_to_do(tokenizer) -> None:
    good = _sample("the red circle", (1.0, 2.0), 10.0, k=4)
    with pytest.raises(ValueError, match=r"shape \(8, 6\).*\(12, 6\)"):
        make_batch(tokenizer, [good, Sample(np.zeros((8, FEATURE_DIM)), "q", 10.0)], num_frames=NUM_FRAMES)
    no_window = Sample(good.features, good.query, good.duration, good.target)
    with pytest.raises(ValueError, match="ground-truth window"):
        make_batch(tokenizer, [no_window], num_frames=NUM_FRAMES)
    with pytest.raises(ValueError, match="exactly once"):
        make_batch(tokenizer, [Sample(good.features, "what <video> shows", 10.0)], num_frames=NUM_FRAMES)
    with pytest.raises(ValueError, match="zero samples"):
        make_batch(tokenizer, [], num_frames=NUM_FRAMES)


def test_real_charades_queries_batch_with_their_targets(tokenizer, shared_data: Path) -> None:
    folder = shared_data / "annotations" / "charades_sta"
    with open(folder / "Charades_v1_test.csv", newline="") as f:
        durations = {row["id"]: float(row["length"]) for row in csv.DictReader(f)}
    samples = []
    for line_number, line in enumerate((folder / "charades_sta_test.txt").read_text().splitlines()[:64]):
        head, sentence = line.split("##")
        video_id, start, end = head.split()
        duration = durations[video_id]
        # Charades ends run past the video at times (see the data README): clamp as the readers do.
        window = (min(float(start), duration), min(float(end), duration))
        samples.append(_sample(sentence, window, duration, k=4, seed=line_number))
    batch = make_batch(tokenizer, samples, num_frames=NUM_FRAMES)
    assert batch.video_mask.sum(1).tolist() == [NUM_FRAMES] * len(samples)
    assert batch.offset_mask.sum().item() == 4 * len(samples)
    for row, sample in enumerate(samples):
        prompt = (
            ~batch.video_mask[row] & batch.attention_mask[row].bool() & (batch.labels[row] == IGNORE_INDEX)
        )
        decoded = tokenizer.decode(batch.input_ids[row][prompt])
        assert decoded == prompt_text(tokenizer, sample.query).replace(VIDEO_PLACEHOLDER, "")
        assert sample.query.lower().rstrip(".").strip() in decoded
    assert (batch.window_fractions >= 0).all() and (batch.window_fractions <= 1).all()
