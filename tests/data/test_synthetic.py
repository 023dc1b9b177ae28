from collections import Counter

import numpy as np
import pytest

from timerefine.data.annotations import read_annotations
from timerefine.data.synthetic import (
    COLOURS,
    SHAPES,
    SPLITS,
    SynthConfig,
    VideoSpec,
    assign_splits,
    generate_benchmark,
    make_video_spec,
    render_video,
    video_id_for,
    video_rng,
)
from timerefine.video import sample_frames

# A small raster keeps rendering and encoding fast; the script (times, events) does not depend on it.
SMALL = {"width": 64, "height": 48, "fps": 5.0}


def specs(count: int, seed: int = 0, **config) -> list[VideoSpec]:
    synth = SynthConfig(videos=count, seed=seed, **{**SMALL, **config})
    return [make_video_spec(video_id_for(i), video_rng(seed, i), synth) for i in range(count)]


@pytest.fixture(scope="module")
def benchmark(tmp_path_factory):
    """Five videos, rendered in this process."""
    out = tmp_path_factory.mktemp("synth")
    summary = generate_benchmark(out, SynthConfig(videos=5, seed=7, workers=1, **SMALL), progress=False)
    return out, summary


def test_specs_are_a_function_of_seed_and_index():
    assert specs(20, seed=1) == specs(20, seed=1)
    assert specs(20, seed=1) != specs(20, seed=2)
    # Video i does not depend on how many videos are drawn.
    assert specs(5, seed=1) == specs(20, seed=1)[:5]


def test_spec_timing_follows_charades_sta():
    drawn = specs(400)
    durations = np.array([s.duration_s for s in drawn])
    starts = np.array([e.start_s / s.duration_s for s in drawn for e in s.events])
    ends = np.array([e.end_s / s.duration_s for s in drawn for e in s.events])
    events_per_video = np.array([len(s.events) for s in drawn])
    # Charades-STA train: median duration 30.6 s, median moment 0.251 of the video, 19% start at 0,
    # 16% end at the video's end, 2.3-2.8 queries a video.
    assert 28.5 <= np.median(durations) <= 32.5
    assert durations.min() >= 12 and durations.max() <= 60
    assert 0.22 <= np.median(ends - starts) <= 0.29
    assert 0.14 <= np.mean(starts == 0) <= 0.27
    assert 0.11 <= np.mean(ends == 1) <= 0.24
    assert 0.28 <= np.median(starts) <= 0.42
    assert events_per_video.min() >= 2 and 2.3 <= events_per_video.mean() <= 3.2


def test_spec_timing_is_close_to_the_real_charades_sta_train(shared_data):
    folder = shared_data / "annotations" / "charades_sta"
    real, _ = read_annotations(folder / "charades_sta_train.txt", durations=folder / "Charades_v1_train.csv")
    real_fraction = np.array([(q.windows[0][1] - q.windows[0][0]) / q.duration for q in real])
    real_start_at_zero = np.mean([q.windows[0][0] == 0 for q in real])
    drawn = [(e, s.duration_s) for s in specs(400) for e in s.events]
    fraction = np.array([(e.end_s - e.start_s) / duration for e, duration in drawn])
    assert np.median(fraction) == pytest.approx(np.median(real_fraction), abs=0.03)
    assert np.mean(fraction) == pytest.approx(np.mean(real_fraction), abs=0.03)
    assert np.mean([e.start_s == 0 for e, _ in drawn]) == pytest.approx(real_start_at_zero, abs=0.05)


def test_each_query_names_one_event_of_its_video():
    for spec in specs(200):
        words_of = [set(e.query.split()) for e in spec.events]
        assert len({e.query for e in spec.events}) == len(spec.events)
        for event, words in zip(spec.events, words_of, strict=True):
            assert {event.colour, event.shape} <= words
            other_names = {
                name for o in spec.events if o is not event for name in (o.colour, o.shape, o.new_colour)
            }
            assert not words & other_names
            assert event.colour in COLOURS and event.shape in SHAPES
        # Events overlap little: at most 15% of the shorter one.
        for i, a in enumerate(spec.events):
            for b in spec.events[i + 1 :]:
                overlap = min(a.end_s, b.end_s) - max(a.start_s, b.start_s)
                assert overlap <= 0.15 * min(a.end_s - a.start_s, b.end_s - b.start_s) + 1e-9


def test_queried_object_is_on_screen_exactly_during_its_window():
    config = SynthConfig(videos=6, **SMALL)
    frame_pixels = config.width * config.height
    for spec in specs(6):
        frames = render_video(spec, config)
        times = np.arange(len(frames)) / config.fps
        assert len(frames) == round(spec.duration_s * config.fps)
        for k, event in enumerate(spec.events):
            colours = [event.colour] + ([event.new_colour] if event.new_colour else [])
            pixels = sum(np.all(frames == COLOURS[c], axis=-1).sum(axis=(1, 2)) for c in colours)
            inside = (times >= event.start_s) & (times < event.end_s)
            assert pixels[~inside].sum() == 0, f"{spec.video_id} event {k} visible outside its window"
            drawn_later = [o for o in spec.events[k + 1 :]]
            for t, count in zip(times[inside], pixels[inside], strict=True):
                unoccluded = not any(o.visible_at(t) for o in drawn_later)
                if event.visible_at(t) and unoccluded:
                    assert count >= 0.04 * frame_pixels, f"{spec.video_id} event {k} too small at {t} s"
                if not event.visible_at(t):  # a blink's off phase
                    assert count == 0
            # Visible from the first frame of the window on: the bounds are where the frame changes.
            first = int(np.argmax(inside))
            assert pixels[first] > 0 or any(o.visible_at(times[first]) for o in drawn_later)


def test_benchmark_files_round_trip(benchmark):
    out, summary = benchmark
    assert sum(summary.videos.values()) == 5
    durations = {}
    for line in (out / "durations.csv").read_text().splitlines()[1:]:
        video_id, length = line.split(",")
        durations[video_id] = float(length)
    assert sorted(durations) == [video_id_for(i) for i in range(5)]
    all_qids = []
    for split in SPLITS:
        from_jsonl, jsonl_summary = read_annotations(out / f"{split}.jsonl")
        from_txt, txt_summary = read_annotations(out / f"{split}.txt", durations=out / "durations.csv")
        assert len(from_jsonl) == summary.queries[split] == len(from_txt)
        assert jsonl_summary.clamped_end == txt_summary.clamped_end == jsonl_summary.rejected == 0
        assert len({q.video_id for q in from_jsonl}) == summary.videos[split]
        assert [(q.video_id, q.query, q.windows, q.duration) for q in from_jsonl] == [
            (q.video_id, q.query, q.windows, q.duration) for q in from_txt
        ]
        for query in from_jsonl:
            assert query.split == split
            assert query.duration == durations[query.video_id]
            assert all(0 <= s < e <= query.duration for s, e in query.windows)
        all_qids += [q.qid for q in from_jsonl]
    assert len(all_qids) == len(set(all_qids)) == sum(summary.queries.values())
    assert summary.files["videos"] == out / "videos"
    assert "5 videos" in summary.format()


def test_videos_decode_with_the_right_frames_and_duration(benchmark):
    out, _ = benchmark
    config = SynthConfig(videos=5, seed=7, **SMALL)
    for i in (0, 3):
        spec = make_video_spec(video_id_for(i), video_rng(7, i), config)
        rendered = render_video(spec, config)
        decoded = sample_frames(out / "videos" / f"{spec.video_id}.mp4", num_samples=len(rendered))
        assert decoded.info.num_frames == len(rendered)
        assert decoded.info.duration_s == pytest.approx(spec.duration_s, abs=1 / config.fps)
        assert (decoded.info.width, decoded.info.height) == (config.width, config.height)
        assert np.allclose(decoded.times_s, np.arange(len(rendered)) / config.fps, atol=1e-3)
        # Lossy, but the large flat objects survive: small mean error, same picture.
        error = np.abs(decoded.frames.astype(np.int16) - rendered.astype(np.int16))
        assert error.mean() < 6
    assert sorted(p.name for p in (out / "videos").iterdir()) == [f"{video_id_for(i)}.mp4" for i in range(5)]


def test_generation_does_not_depend_on_worker_count(benchmark, tmp_path):
    out, _ = benchmark
    generate_benchmark(tmp_path, SynthConfig(videos=5, seed=7, workers=2, **SMALL), progress=False)
    for name in [f"{s}.{ext}" for s in SPLITS for ext in ("jsonl", "txt")] + ["durations.csv"]:
        assert (tmp_path / name).read_bytes() == (out / name).read_bytes(), name
    for i in range(5):
        video = f"{video_id_for(i)}.mp4"
        here = sample_frames(tmp_path / "videos" / video, num_samples=20).frames
        there = sample_frames(out / "videos" / video, num_samples=20).frames
        assert np.array_equal(here, there), video


def test_splits_have_exact_seeded_counts():
    splits = assign_splits(500, (0.8, 0.1, 0.1), seed=0)
    assert Counter(splits) == {"train": 400, "val": 50, "test": 50}
    assert splits == assign_splits(500, (0.8, 0.1, 0.1), seed=0)
    assert splits != assign_splits(500, (0.8, 0.1, 0.1), seed=1)
    # A handful of videos still gets every split.
    assert Counter(assign_splits(5, (0.8, 0.1, 0.1), seed=0)) == {"train": 3, "val": 1, "test": 1}
    assert Counter(assign_splits(7, (0.5, 0.5, 0.0), seed=0)) == {"train": 4, "val": 3}


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"width": 161}, "even"),
        ({"videos": 0}, "videos"),
        ({"split_fractions": (0.8, 0.1)}, "split_fractions"),
        ({"split_fractions": (0.8, 0.3, -0.1)}, "split_fractions"),
        ({"fps": 0}, "fps"),
    ],
)
def test_bad_config_is_refused_with_the_field_named(overrides, message):
    with pytest.raises(ValueError, match=message):
        SynthConfig(**overrides)
