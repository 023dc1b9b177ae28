"""One video, one query, no Ray: the real Charades clip through decoding, the encoder and the model.

The model is trained (in Ray Train's local mode) on the clip's own features, extracted by the extraction
job's stages, and on its two real Charades-STA queries. It memorises their moments, so ``predict`` gives
them back only if it makes the clip's features exactly as the extraction did.
"""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from pipelines import jobs, predict, train
from timerefine import video as video_module
from timerefine.checkpoint import load_checkpoint, save_checkpoint
from timerefine.data.annotations import Query, write_jsonl
from timerefine.data.storage import Storage
from timerefine.decoder import DecodeSettings, IsolatedDecoder, decode_video
from timerefine.encoders import ClipImageEncoder, resolve_encoder
from timerefine.features import STATUS_OK, feature_rows_to_table, load_features, write_feature_part
from timerefine.metrics import temporal_iou
from timerefine.model import ModelConfig, TimeRefineModel
from timerefine.timecodec import parse_answer

CLIP = "charades_Y1HGC"
QUERIES = {  # from charades_sta_test.txt
    "a person walks in a doorway drinking some coffee.": (0.2, 9.8),
    "person drinking a glass of water.": (1.7, 12.1),
}


@pytest.fixture(scope="module")
def clip_checkpoint(shared_data, tmp_path_factory) -> str:
    folder = tmp_path_factory.mktemp("clip")
    video = str(shared_data / "videos" / f"{CLIP}.mp4")
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as a 1-CPU Ray worker; two threads crawl on a shared 2-core machine
    try:
        encoder = ClipImageEncoder(None, threads=1)
        # PyAV, not the default's decord: predict must decode as the checkpoint's features were.
        decoder = IsolatedDecoder(DecodeSettings.for_encoder(encoder.preprocessing, decoder="pyav"))
        decoded = decode_video(CLIP, video, Storage(), decoder)
        decoder.close()
        row = {"video_id": CLIP, "uri": video, "duration_s": decoded.duration_s, "status": STATUS_OK}
        row["decoder"] = decoded.decoder
        features = {CLIP: encoder.encode(decoded.frames)}
        table = feature_rows_to_table([row], features, 100, encoder.dim, encoder.identity)
        write_feature_part(table, str(folder / "features"), Storage())
        duration = decoded.duration_s
        queries = [Query(f"{CLIP}_{i}", CLIP, duration, q, (w,)) for i, (q, w) in enumerate(QUERIES.items())]
        write_jsonl(queries, folder / "clip.jsonl")
        args = [
            "--features", str(folder / "features"), "--train", str(folder / "clip.jsonl"),
            "--output", str(folder / "runs"), "--workers", "0", "--epochs", "100",
            "--global-batch-size", "2", "--refine-steps", "2", "--lr", "3e-3",
        ]  # fmt: skip
        with contextlib.redirect_stdout(io.StringIO()):
            assert jobs.main(train, args) == 0
    finally:
        torch.set_num_threads(previous_threads)
    return json.loads((folder / "runs" / "timerefine" / train.SUMMARY_FILE).read_text())["final_checkpoint"]


@pytest.mark.slow
@pytest.mark.parametrize("query", QUERIES)
def test_predict_finds_the_memorised_moment_in_the_real_clip(clip_checkpoint, shared_data, query, capsys):
    video = shared_data / "videos" / f"{CLIP}.mp4"
    args = ["--checkpoint", clip_checkpoint, "--video", str(video), "--query", query]
    code = jobs.main(predict, [*args, "--json"])
    record = json.loads(capsys.readouterr().out)
    assert code == 0, record["text"]
    assert record["video_id"] == CLIP and record["qid"] == CLIP and record["query"] == query
    assert record["duration"] == pytest.approx(30.65, abs=0.1) and record["windows"] == []
    start, end = record["pred"]
    assert 0 <= start < end <= record["duration"]
    assert temporal_iou(record["pred"], QUERIES[query]) > 0.7
    assert record["parsed"] and len(parse_answer(record["text"]).steps) == 2
    assert record["steps"][-1] == pytest.approx([start, end])
    for mode in ("pred_head", "pred_fused"):
        assert 0 <= record[mode][0] <= record[mode][1] <= record["duration"]

    assert jobs.main(predict, args) == 0
    text = capsys.readouterr().out
    assert f"moment: {start:.2f} s to {end:.2f} s" in text
    assert "after step 1:" in text and "after step 2:" in text


@pytest.mark.slow
def test_predict_decodes_with_the_decoder_of_the_checkpoints_features(clip_checkpoint, shared_data):
    model_config = load_checkpoint(clip_checkpoint).config
    assert model_config.video_decoder == "pyav"  # recorded by training, from the feature table's rows
    trained_on = load_features(str(Path(clip_checkpoint).parents[2] / "features"))[CLIP].features
    video = str(shared_data / "videos" / f"{CLIP}.mp4")
    encoder = predict.encoder_for(model_config.encoder, None)

    features, _ = predict.encode_video(video, encoder, 100, Storage(), 60.0, model_config.video_decoder)

    def gap(made: np.ndarray) -> float:
        return float(np.abs(made.astype(np.float32) - trained_on.astype(np.float32)).max())

    assert gap(features) < 2e-3  # the same frames (only float16 rounding may differ)
    if video_module.decord is not None:  # what it made before the decoder was recorded: decord's
        by_default, _ = predict.encode_video(video, encoder, 100, Storage(), 60.0, None)
        assert gap(by_default) > 5e-3  # 0.018 here: decord's frames differ by 0.17 grey levels


def test_predict_refuses_a_missing_video(tmp_path, capsys):
    untrained = TimeRefineModel.from_config(ModelConfig(encoder=resolve_encoder(None).identity))
    checkpoint = save_checkpoint(untrained, tmp_path / "checkpoint")
    args = ["--checkpoint", str(checkpoint), "--video", str(tmp_path / "none.mp4"), "--query", "anything"]
    assert jobs.main(predict, args) == 2
    assert "none.mp4" in capsys.readouterr().err
