"""The feature-extraction job on a real local Ray cluster: local folders and S3 (SeaweedFS), error rows,
resume, retries, exit codes, the ``ray job submit`` door (the script run as a subprocess), and the
compute plan it runs with."""

from __future__ import annotations

import shutil
import subprocess
import sys
import threading
from collections import Counter
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.dataset as pads
import pytest
import yaml
from s3server import prepare_seaweedfs, start_seaweedfs

from pipelines import extract_features, jobs
from pipelines.compute import DECODE_BLOCK_BYTES, DECODE_TASK_MEMORY, ClusterResources, plan_extraction
from timerefine.data.storage import Storage
from timerefine.decoder import DecodeSettings, IsolatedDecoder, decode_video, shared_decoder
from timerefine.encoders import ClipImageEncoder, resolve_encoder
from timerefine.features import (
    STATUS_ERROR,
    STATUS_OK,
    load_features,
    read_feature_table,
    table_metadata,
)
from timerefine.video import primary_decoder

REPO = Path(__file__).resolve().parents[2]
GOOD = ("counter_10fps", "vfr_offset", "rotated_90")
BROKEN = ("zero_byte", "truncated", "not_video")


def extract(*argv: str) -> int:
    return jobs.main(extract_features, ["--encoders", "1", *argv])


def copy_videos(sample_videos: dict[str, Path], names, folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name in names:
        shutil.copy(sample_videos[name], folder / sample_videos[name].name)
    return folder


def part_files(folder: Path) -> dict[str, float]:
    return {path.name: path.stat().st_mtime for path in folder.glob("part-*.parquet")}


def raw_rows(folder: Path) -> list[tuple[str, str]]:
    """Every row of every part file, before the reader keeps one per video."""
    table = pads.dataset(str(folder), format="parquet").to_table(columns=["video_id", "status"])
    return list(zip(table.column("video_id").to_pylist(), table.column("status").to_pylist(), strict=True))


def ids_in(part: Path) -> set[str]:
    return set(pd.read_parquet(part, columns=["video_id"]).video_id)


def assert_ok_row(row: dict, features: np.ndarray, num_frames: int = 100) -> None:
    assert row["status"] == STATUS_OK and row["error"] is None
    assert features.shape == (num_frames, 768) and np.isfinite(features).all()
    times = np.asarray(row["frame_times_s"])
    assert len(times) == num_frames and (np.diff(times) >= 0).all()
    assert times[0] >= 0 and times[-1] <= row["duration_s"]


@pytest.mark.integration
def test_a_local_folder_becomes_a_table_with_error_rows_and_resumes(
    ray_cluster, sample_videos, tmp_path, capsys
):
    videos = copy_videos(sample_videos, GOOD + BROKEN, tmp_path / "videos")
    output = tmp_path / "features"

    assert extract("--input", str(videos), "--output", str(output), "--videos-per-file", "2") == 0

    printed = capsys.readouterr().out
    assert "[extract] 6/6 videos (3 ok, 3 failed)" in printed
    assert "done in" in printed and "3 ok, 3 failed, 0 skipped" in printed
    table = read_feature_table(str(output))
    rows = {row["video_id"]: row for row in table.drop_columns(["features"]).to_pylist()}
    assert sorted(rows) == sorted(GOOD + BROKEN)
    encoder = resolve_encoder(None).identity
    decoder = primary_decoder("auto")
    assert table_metadata(table.schema) == {
        "version": 1, "encoder": encoder, "num_frames": 100, "dim": 768, "decoder": decoder
    }  # fmt: skip
    assert {row["encoder"] for row in rows.values()} == {encoder}
    assert {video_id: rows[video_id]["decoder"] for video_id in GOOD} == dict.fromkeys(GOOD, decoder)
    features = load_features(str(output))
    assert sorted(features) == sorted(GOOD)
    for video_id in GOOD:
        assert_ok_row(rows[video_id], features[video_id].features.astype(np.float32))
    for video_id in BROKEN:
        assert rows[video_id]["status"] == STATUS_ERROR and rows[video_id]["error"]
        assert rows[video_id]["decoder"] is None
    plain = pd.read_parquet(output)  # plain pandas, no timerefine, no Ray
    assert len(plain) == 6
    assert plain.set_index("video_id").loc["counter_10fps", "features"].shape == (100 * 768,)

    # A rerun skips everything and writes nothing.
    parts = part_files(output)
    assert len(parts) == 3
    assert extract("--input", str(videos), "--output", str(output)) == 0
    assert "0 to extract, 3 already done, 3 failed before (--retry-errors" in capsys.readouterr().out
    assert part_files(output) == parts

    # A lost part (a run killed before writing it) is re-extracted; --retry-errors retries failed videos,
    # whose new rows replace the old ones: plain pyarrow reads one row a video.
    lost = next(output / name for name in parts if ids_in(output / name) & set(GOOD))
    lost_ids = ids_in(lost)
    lost.unlink()
    assert extract("--input", str(videos), "--output", str(output), "--retry-errors") == 0
    redone = lost_ids | set(BROKEN)
    printed = capsys.readouterr().out
    assert f"{len(redone)} to extract, {6 - len(redone)} already done, 0 failed before" in printed
    assert Counter(raw_rows(output)) == Counter({(v, rows[v]["status"]): 1 for v in rows})
    assert read_feature_table(str(output)).num_rows == 6

    # The same output with another frame count would mix incomparable features: refused.
    assert extract("--input", str(videos), "--output", str(output), "--num-frames", "50") == 2
    assert "holds features of" in capsys.readouterr().err
    # So would another decoder (frames differ slightly): refused, saying how to resume.
    other = "pyav" if decoder == "decord" else "decord"
    assert extract("--input", str(videos), "--output", str(output), "--decoder", other, "--retry-errors") == 2
    assert f"holds frames decoded by {decoder}" in (err := capsys.readouterr().err)
    assert f"Pass --decoder {decoder} to resume" in err


@pytest.mark.integration
def test_a_decoder_hang_is_an_error_row_and_nothing_succeeding_exits_1(
    ray_cluster, sample_videos, tmp_path, capsys
):
    videos = copy_videos(sample_videos, ["counter_wide_ntsc"], tmp_path / "videos")
    output = tmp_path / "features"

    code = extract("--input", str(videos), "--output", str(output), "--decode-timeout", "0.001")

    assert code == 1
    row = read_feature_table(str(output)).to_pylist()[0]
    assert (row["video_id"], row["status"]) == ("counter_wide_ntsc", STATUS_ERROR)
    assert row["error"] == "decoding took longer than 0.001 s; stopped"
    assert "failed counter_wide_ntsc: decoding took longer" in capsys.readouterr().out


def test_duplicate_video_ids_are_refused_before_any_work(sample_videos, tmp_path, capsys):
    for folder, name, suffix in (("a", "counter_short", ".mp4"), ("b", "vfr_offset", ".mkv")):
        (tmp_path / folder).mkdir()
        shutil.copy(sample_videos[name], tmp_path / folder / f"clip{suffix}")

    assert extract("--input", str(tmp_path), "--output", str(tmp_path / "out")) == 2
    assert "two videos share the id 'clip'" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


@pytest.mark.integration
def test_the_script_extracts_the_charades_clip_on_a_running_cluster(ray_cluster, shared_data, tmp_path):
    """The ``ray job submit -- python pipelines/extract_features.py`` door: a script and a cluster address."""
    listing = tmp_path / "videos.txt"
    listing.write_text(f"{shared_data / 'videos' / 'charades_Y1HGC.mp4'}\n")
    output = tmp_path / "features"
    command = [sys.executable, "pipelines/extract_features.py", "--address", ray_cluster, "--encoders", "1"]

    done = subprocess.run(
        [*command, "--input", str(listing), "--output", str(output)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )

    assert done.returncode == 0, done.stderr[-3000:]
    assert "1 ok, 0 failed" in done.stdout
    row = load_features(str(output))["charades_Y1HGC"]
    assert row.features.shape == (100, 768) and row.features.dtype == np.float16
    assert row.num_frames == 460 and row.fps == pytest.approx(15, abs=0.1)
    assert row.duration_s == pytest.approx(30.6, abs=0.1)
    assert row.frame_times_s[0] == 0 and row.frame_times_s[-1] == pytest.approx(30.6, abs=0.15)


@pytest.mark.integration
def test_s3_to_s3_with_keys_only_in_the_driver(
    ray_cluster, s3_server, sample_videos, shared_data, tmp_path, monkeypatch
):
    """The cluster's workers started without AWS variables: the driver's static keys must travel."""
    uploads = {"charades_Y1HGC.mp4": shared_data / "videos" / "charades_Y1HGC.mp4"}
    uploads |= {sample_videos[name].name: sample_videos[name] for name in ("counter_short", "not_video")}
    for name, path in uploads.items():
        s3_server.upload("videos", f"run1/{name}", path)
    for name, value in s3_server.env().items():
        monkeypatch.setenv(name, value)

    code = extract("--input", "s3://videos/run1/", "--output", "s3://features/run1")

    assert code == 0
    table = read_feature_table("s3://features/run1", Storage())
    statuses = dict(zip(*table.select(["video_id", "status"]).to_pydict().values(), strict=True))
    assert statuses == {"charades_Y1HGC": STATUS_OK, "counter_short": STATUS_OK, "not_video": STATUS_ERROR}
    charades = load_features("s3://features/run1")["charades_Y1HGC"]
    assert charades.uri == "s3://videos/run1/charades_Y1HGC.mp4"
    assert charades.features.shape == (100, 768) and charades.duration_s == pytest.approx(30.6, abs=0.1)
    objects = s3_server.client().list_objects_v2(Bucket="features", Prefix="run1/")["Contents"]
    files = [item["Key"] for item in objects if not item["Key"].endswith("/")]  # pyarrow's folder markers
    assert files and all(key.startswith("run1/part-") and key.endswith(".parquet") for key in files)


@pytest.mark.integration
def test_wrong_credentials_stop_the_job_with_a_clear_error(s3_server, tmp_path, monkeypatch, capsys):
    for name, value in s3_server.env().items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong-secret-000")

    assert extract("--input", "s3://videos/run1/", "--output", str(tmp_path / "out")) == 2

    err = capsys.readouterr().err
    assert "refused the credentials" in err and "AWS_ACCESS_KEY_ID" in err
    assert "wrong-secret-000" not in err and s3_server.secret_key not in err


@pytest.mark.integration
def test_the_job_waits_for_an_s3_endpoint_that_refuses_connections_at_first(
    ray_cluster, sample_videos, tmp_path, monkeypatch
):
    late = prepare_seaweedfs(tmp_path / "late-s3", "AKIDLATESERVER", "late-secret-321")
    for name, value in late.env().items():
        monkeypatch.setenv(name, value)
    videos = copy_videos(sample_videos, ["counter_short"], tmp_path / "videos")
    starter = threading.Timer(3.0, start_seaweedfs, args=(late,), kwargs={"buckets": ("late",)})
    starter.start()  # the job's first S3 request meets a closed port
    try:
        code = extract("--input", str(videos), "--output", "s3://late/features")
        starter.join()
        committed = read_feature_table("s3://late/features", Storage()).to_pylist()
    finally:
        starter.join()
        late.stop()
    assert code == 0
    assert [(row["video_id"], row["status"]) for row in committed] == [("counter_short", STATUS_OK)]


def test_a_two_cpu_machine_decodes_and_encodes_in_one_actor_a_core_and_leaves_cpus_to_the_tasks():
    plan = plan_extraction(ClusterResources(cpus=2, gpus=0))

    assert (plan.encoders, plan.encoder_num_cpus, plan.encoder_threads, plan.fused) == (2, 0.5, 1, True)
    assert plan.encoder_num_gpus == 0 and "num_gpus" not in plan.encode_args()
    assert plan.encoders * plan.encoder_num_cpus + plan.write_num_cpus <= 2  # no decode tasks: fused
    assert plan.decode_args()["memory"] == DECODE_TASK_MEMORY
    assert plan.encode_args()["compute"].min_size == plan.encode_args()["compute"].max_size == 2


def test_gpu_clusters_get_one_encoder_per_gpu_share():
    plan = plan_extraction(ClusterResources(cpus=16, gpus=4))
    half = plan_extraction(ClusterResources(cpus=16, gpus=4), gpus_per_encoder=0.5)
    forced_cpu = plan_extraction(ClusterResources(cpus=16, gpus=4), encoders=3, gpus_per_encoder=0)

    assert (plan.encoders, plan.encode_args()["num_gpus"], plan.fused) == (4, 1.0, False)
    assert (plan.encoder_num_cpus, plan.decode_num_cpus, plan.encoder_threads) == (1.0, 1.0, None)
    assert (half.encoders, half.encode_args()["num_gpus"]) == (8, 0.5)
    assert (forced_cpu.encoders, forced_cpu.encoder_num_gpus, forced_cpu.fused) == (3, 0.0, True)
    assert "num_gpus" not in forced_cpu.encode_args()


def test_decode_tasks_go_to_labelled_decode_nodes_only_when_the_cluster_has_them():
    with_decoders = plan_extraction(ClusterResources(cpus=64, gpus=4, decode_nodes=True))
    without = plan_extraction(ClusterResources(cpus=64, gpus=4))
    assert with_decoders.decode_args()["label_selector"] == {"timerefine.io/role": "decode"}
    assert "label_selector" not in without.decode_args()
    assert "label_selector" not in with_decoders.encode_args()  # encoders stay on the GPU nodes
    cluster = yaml.safe_load((Path(__file__).resolve().parents[2] / "cluster.yaml").read_text())
    labels = [t.get("labels", {}) for t in cluster["available_node_types"].values()]
    assert {"timerefine.io/role": "decode"} in labels  # the label cluster.yaml gives its CPU decode nodes


def test_impossible_plans_are_refused_with_the_reason():
    with pytest.raises(ValueError, match="exceed the cluster's 2 GPUs"):
        plan_extraction(ClusterResources(cpus=8, gpus=2), encoders=3)
    with pytest.raises(ValueError, match="the Ray cluster has none"):
        plan_extraction(ClusterResources(cpus=8, gpus=0), gpus_per_encoder=1)


@pytest.mark.integration
def test_gpu_plans_decode_in_tasks_and_cpu_plans_in_the_encoder_actors(ray_cluster, capsys):
    """Ray fuses a task stage into an actor stage with equal resources: on GPUs decoding must stay in tasks
    (their CPUs feed the GPUs); on CPUs decoding runs inside the actors by design, and writing stays apart."""
    settings = DecodeSettings(num_frames=4, resize_short=128, crop_size=128)
    videos = extract_features.video_dataset({"a": "/v/a.mp4"})
    encoder = resolve_encoder(None)
    physical = {}
    for name, resources in (
        ("gpu", ClusterResources(cpus=8, gpus=1)),
        ("cpu", ClusterResources(cpus=2, gpus=0)),
    ):
        plan = plan_extraction(resources)
        features = extract_features.add_extraction(videos, Storage(), encoder, settings, plan, batch_size=8)
        extract_features.add_writing(features, "/out", Storage(), plan, videos_per_file=4).explain()
        physical[name] = capsys.readouterr().out.split("Physical Plan (Optimized)")[1]

    assert "TaskPoolMapOperator[MapBatches(decode_stage)]" in physical["gpu"]
    assert "ActorPoolMapOperator[MapBatches(EncodeStage)]" in physical["gpu"]
    assert "ActorPoolMapOperator[MapBatches(ExtractStage)]" in physical["cpu"]
    assert "decode_stage" not in physical["cpu"] and "EncodeStage" not in physical["cpu"]
    for plan in physical.values():
        assert "TaskPoolMapOperator[MapBatches(write_stage)]" in plan


@pytest.mark.integration
def test_the_gpu_layouts_separate_stages_run_end_to_end_on_cpus(ray_cluster, sample_videos, tmp_path):
    """Decode tasks of several videos handing blocks to an encoder actor, as on GPU nodes (here on CPUs):
    every video comes out once, with features or its reason, features equal to the fused layout's."""
    names = (*GOOD, *BROKEN)
    todo = {name: str(sample_videos[name]) for name in names}
    settings = DecodeSettings(num_frames=NUM_FRAMES, resize_short=128, crop_size=128)
    encoder = resolve_encoder(None)
    fused = plan_extraction(ClusterResources(cpus=2, gpus=0), encoders=1)
    # 1 decode CPU + half a CPU's encoder + a write task's quarter fit 2 CPUs; 2 decode tasks of 3 videos.
    apart = replace(fused, fused=False, decode_parallelism=2)
    assert apart.videos_per_decode_task(len(todo)) == 3
    tables, features_of = {}, {}
    for name, plan in (("apart", apart), ("fused", fused)):
        output = tmp_path / name
        features = extract_features.add_extraction(
            extract_features.video_dataset(todo), Storage(), encoder, settings, plan, batch_size=8
        )
        written = extract_features.add_writing(features, str(output), Storage(), plan, videos_per_file=4)
        statuses = Counter(row["status"] for row in written.take_all())
        assert statuses == {STATUS_OK: len(GOOD), STATUS_ERROR: len(BROKEN)}
        tables[name] = read_feature_table(str(output)).sort_by("video_id")
        features_of[name] = load_features(str(output), dtype=np.float32)

    assert tables["apart"].column("video_id").to_pylist() == sorted(names)  # each video once
    assert tables["apart"].column("status") == tables["fused"].column("status")
    assert tables["apart"].column("error") == tables["fused"].column("error")
    assert sorted(features_of["apart"]) == sorted(features_of["fused"]) == sorted(GOOD)
    apart_features, fused_features = (
        np.stack([features_of[name][video].features for video in GOOD]) for name in ("apart", "fused")
    )
    np.testing.assert_allclose(apart_features, fused_features, atol=2e-3 * np.abs(fused_features).max())


@pytest.mark.integration
def test_a_long_decode_task_hands_on_blocks_of_bounded_size(ray_cluster, sample_videos):
    """Six 224-px videos in one task, handed on two at a time (30 MB): Ray Data joins and splits them into
    blocks under twice DECODE_BLOCK_BYTES (with its default target, 128 MB, they would leave as one 90 MB)."""
    settings = DecodeSettings(num_frames=100)  # 224 px: 15 MB a video
    plan = plan_extraction(ClusterResources(cpus=2, gpus=1))  # 1 CPU left to decode: one task for all
    assert plan.videos_per_decode_task(6) == 6 and plan.videos_per_decode_block(settings.frame_bytes) == 2
    todo = {f"copy{index}": str(sample_videos["counter_10fps"]) for index in range(6)}
    decoded = extract_features.add_decoding(extract_features.video_dataset(todo), Storage(), settings, plan)
    bundles = list(decoded.iter_internal_ref_bundles())

    assert sum(bundle.num_rows() for bundle in bundles) == 6 and len(bundles) > 1
    assert all(bundle.size_bytes() < 2 * DECODE_BLOCK_BYTES for bundle in bundles)


# ---------------------------------------------------------------------------------------------------------
# The encode stage's Arrow batches, without Ray

NUM_FRAMES = 12


@pytest.fixture(scope="module")
def tiny_encoder(tmp_path_factory: pytest.TempPathFactory) -> ClipImageEncoder:
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("TIMEREFINE_HOME", str(tmp_path_factory.mktemp("timerefine_home")))
        return ClipImageEncoder(None, threads=1)


def test_a_decode_task_hands_its_videos_on_a_block_at_a_time_in_order(sample_videos):
    names = ("counter_10fps", "not_video", "rotated_90", "zero_byte", "vfr_offset")
    videos = pa.table({"video_id": list(names), "uri": [str(sample_videos[name]) for name in names]})
    settings = DecodeSettings(num_frames=NUM_FRAMES, resize_short=128, crop_size=128)
    try:
        blocks = extract_features.decode_stage(videos, Storage(), settings, videos_per_block=2)
        first = next(blocks)  # handed on before the task's other videos are decoded
        assert first.column("video_id").to_pylist() == ["counter_10fps", "not_video"]
        rest = list(blocks)
    finally:
        shared_decoder(settings).close()

    assert [block.column("video_id").to_pylist() for block in rest] == [
        ["rotated_90", "zero_byte"],
        ["vfr_offset"],
    ]
    decoded = pa.concat_tables([first, *rest])
    assert decoded.schema == extract_features.DECODED_SCHEMA
    assert decoded.column("status").to_pylist() == [
        STATUS_OK,
        STATUS_ERROR,
        STATUS_OK,
        STATUS_ERROR,
        STATUS_OK,
    ]
    _, frames = extract_features.decoded_videos(rest[1], 128, NUM_FRAMES)
    expected = decode_video("vfr_offset", videos["uri"][4].as_py(), Storage(), shared_decoder(settings))
    shared_decoder(settings).close()
    np.testing.assert_array_equal(frames, expected.frames)


def test_a_batch_decodes_straight_into_one_array_of_its_ok_videos_frames(sample_videos):
    names = ("not_video", "counter_10fps", "zero_byte", "rotated_90")
    videos = pa.table({"video_id": list(names), "uri": [str(sample_videos[name]) for name in names]})
    decoder = IsolatedDecoder(DecodeSettings(num_frames=NUM_FRAMES, resize_short=128, crop_size=128))
    try:
        decoded, frames = extract_features.decode_videos(videos, Storage(), decoder)
        alone = [decode_video(name, str(sample_videos[name]), Storage(), decoder) for name in names[1::2]]
    finally:
        decoder.close()

    assert [video.ok for video in decoded] == [False, True, False, True]
    assert frames.shape == (2 * NUM_FRAMES, 128, 128, 3) and frames.flags.c_contiguous
    np.testing.assert_array_equal(frames, np.concatenate([video.frames for video in alone]))
    # Each video was decoded into its place, not joined afterwards.
    assert np.shares_memory(decoded[1].frames, frames[:NUM_FRAMES])
    assert np.shares_memory(decoded[3].frames, frames[NUM_FRAMES:])


def test_decoded_videos_cross_as_arrow_and_encode_into_the_feature_schema(tiny_encoder, sample_videos):
    paths = [sample_videos["counter_10fps"], sample_videos["not_video"], sample_videos["rotated_90"]]
    settings = DecodeSettings(num_frames=NUM_FRAMES, resize_short=128, crop_size=128)
    decoders = [IsolatedDecoder(replace(settings, decoder=name)) for name in ("pyav", "auto", "auto")]
    try:  # each row says which decoder read its file, whatever the table's is
        videos = [
            decode_video(path.stem, str(path), Storage(), decoder)
            for path, decoder in zip(paths, decoders, strict=True)
        ]
    finally:
        for decoder in decoders:
            decoder.close()
    decoded = extract_features.decoded_table(videos, np.concatenate([videos[0].frames, videos[2].frames]))
    assert decoded.schema == extract_features.DECODED_SCHEMA
    _, sliced = extract_features.decoded_videos(decoded.slice(1), 128, NUM_FRAMES)  # an Arrow offset
    np.testing.assert_array_equal(sliced, videos[2].frames)
    back, frames = extract_features.decoded_videos(decoded, 128, NUM_FRAMES)
    assert [video.ok for video in back] == [True, False, True]
    assert back[1].error == videos[1].error and back[2].frame_times_s == pytest.approx(
        videos[2].frame_times_s
    )
    np.testing.assert_array_equal(frames, np.concatenate([videos[0].frames, videos[2].frames]))

    table = extract_features.encode_videos(tiny_encoder, back, frames, NUM_FRAMES, 7, decoder="decord")

    assert table.column("video_id").to_pylist() == ["counter_10fps", "not_video", "rotated_90"]
    assert table.column("status").to_pylist() == [STATUS_OK, STATUS_ERROR, STATUS_OK]
    assert table.column("encoder").to_pylist() == [tiny_encoder.identity] * 3
    assert table.column("decoder").to_pylist() == ["pyav", None, primary_decoder("auto")]
    metadata = table_metadata(table.schema)
    assert metadata.pop("decoder") == "decord"  # the table's, not its rows'
    assert metadata == {"version": 1, "encoder": tiny_encoder.identity, "num_frames": NUM_FRAMES, "dim": 768}
    features = table.column("features").combine_chunks()
    assert features.is_null().to_pylist() == [False, True, False]
    expected = tiny_encoder.encode(videos[2].frames)
    stored = np.asarray(features.storage[2].as_py(), dtype=np.float16).reshape(NUM_FRAMES, 768)
    np.testing.assert_allclose(stored, expected, atol=2e-3 * np.abs(expected).max())  # fp16: batch-size noise
