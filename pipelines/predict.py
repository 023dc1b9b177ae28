"""Ground one query in one video: decode, encode with the checkpoint's encoder, generate. No Ray needed.

Two doors, one job: ``timerefine predict ...`` and ``python pipelines/predict.py ...``.

The video goes through the extraction's own stages (``timerefine.decoder``: sampling in an isolated
decoder process, CLIP preprocessing, the encoder), so its features are made exactly as the training
features were. The encoder is the one the checkpoint records (``--encoder`` overrides it).

Prints the moment in seconds and the refinement trace, or with ``--json`` one object in the predictions
format of DESIGN.md section 3 (``windows`` is empty: there is no ground truth).

Exit status: 0 with a moment, 1 when the model's answer did not parse, 2 when the inputs cannot be used.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

if not __package__:  # `python pipelines/predict.py`: run it inside its package
    import _script  # noqa: F401

import numpy as np
import pyarrow.fs as pafs

from timerefine.data.storage import Storage, video_id_from_uri
from timerefine.encoders import RANDOM_ENCODERS, EncoderRef, resolve_encoder

from . import jobs

NAME = "predict"


@dataclass
class PredictConfig:
    checkpoint: str  # checkpoint directory (local or s3://)
    video: str  # video file (local path or s3:// URI)
    query: str  # the sentence to ground
    json: bool = False  # print one predictions-format JSON object instead of the description
    encoder: str | None = None  # CLIP hub id or local dir (default: the checkpoint's encoder)
    free_decoding: bool = False  # decode without the answer grammar (the paper's)
    decode_timeout: float = 120.0  # seconds for decoding
    cluster: jobs.ClusterOptions = field(default_factory=jobs.ClusterOptions)


@dataclass
class PredictResult:
    record: dict[str, Any]  # one record of the predictions format (``windows`` empty)

    @property
    def exit_code(self) -> int:
        return jobs.EXIT_OK if self.record["parsed"] else jobs.EXIT_INCOMPLETE


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True, help="checkpoint directory (local or s3://)")
    parser.add_argument("--video", required=True, help="video file (local path or s3:// URI)")
    parser.add_argument("--query", required=True, help="the sentence to ground")
    parser.add_argument("--json", action="store_true", help="print one predictions-format JSON object")
    parser.add_argument("--encoder", help="CLIP hub id or local dir (default: the checkpoint's encoder)")
    parser.add_argument(
        "--free-decoding",
        action="store_true",
        help="decode without the answer grammar (the paper's behaviour): the answer may then not parse",
    )
    parser.add_argument("--decode-timeout", type=float, default=120.0, help="seconds for decoding")
    jobs.add_storage_arguments(parser)


def config_from_args(args: argparse.Namespace) -> PredictConfig:
    return PredictConfig(
        checkpoint=args.checkpoint,
        video=args.video,
        query=args.query,
        json=args.json,
        encoder=args.encoder,
        free_decoding=args.free_decoding,
        decode_timeout=args.decode_timeout,
        cluster=jobs.cluster_from_args(args),
    )


def run(config: PredictConfig) -> PredictResult:
    """Predict one query; raises ``jobs.JobError`` when the checkpoint or the video cannot be used."""
    from timerefine.checkpoint import check_checkpoint, fetch_checkpoint, load_checkpoint

    storage = config.cluster.storage()
    check_checkpoint(config.checkpoint, storage)  # both inputs are checked before a model loads
    check_video_file(config.video, storage)
    with tempfile.TemporaryDirectory(prefix="timerefine-ckpt-") as staging:
        model = load_checkpoint(fetch_checkpoint(config.checkpoint, storage, Path(staging)))
    encoder = encoder_for(model.config.encoder, config.encoder)
    features, duration = encode_video(
        config.video,
        encoder,
        model.config.num_frames,
        storage,
        config.decode_timeout,
        model.config.video_decoder,
    )
    prediction = model.generate([features], [config.query], [duration], constrained=not config.free_decoding)
    video_id = video_id_from_uri(config.video)
    record = {
        "qid": video_id,
        "video_id": video_id,
        "query": config.query,
        "duration": duration,
        "windows": [],
        **prediction[0],
    }
    print(json.dumps(record) if config.json else describe(record))
    return PredictResult(record)


def check_video_file(uri: str, storage: Storage) -> None:
    """Refuse a video path that names nothing, a folder or an empty file (decoding would say so too, but
    only after the model and the encoder have loaded)."""
    filesystem, path = storage.resolve(uri)
    info = filesystem.get_file_info(path)
    if info.type == pafs.FileType.NotFound:
        raise FileNotFoundError(f"{uri}: no such video file")
    if info.type != pafs.FileType.File:
        raise ValueError(f"{uri}: is a folder; --video takes one video file")
    if info.size == 0:
        raise ValueError(f"{uri}: the file is empty (0 bytes)")


def encoder_for(recorded: str | None, override: str | None) -> EncoderRef:
    """The encoder to make features with: ``override``, else the one named (id@revision) in the checkpoint,
    refusing a local or built-in encoder whose files changed since: its features would differ."""
    if override:
        return resolve_encoder(override)
    if not recorded:
        raise ValueError("the checkpoint does not name the encoder its features came from; pass --encoder")
    name, _, revision = recorded.rpartition("@")
    if name not in RANDOM_ENCODERS and not Path(name).is_dir():
        return EncoderRef(name, revision)  # a hub id, pinned to the recorded revision
    current = resolve_encoder(name)
    if current.revision != revision:
        raise ValueError(
            f"the checkpoint was trained on features of {recorded}, but {name} is now revision "
            f"{current.revision}; its features would differ (pass --encoder to use it anyway)"
        )
    return current


def encode_video(
    uri: str,
    encoder_ref: EncoderRef,
    num_frames: int,
    storage: Storage,
    timeout_s: float,
    recorded_decoder: str | None = None,
) -> tuple[np.ndarray, float]:
    """(num_frames, dim) features of the video and its duration in seconds, made by the extraction's own
    per-video stages and the decoder the checkpoint's features came from (so exactly as the training
    features were: PyAV's frames differ slightly from decord's)."""
    from timerefine.decoder import DecodeSettings, IsolatedDecoder, decode_video
    from timerefine.encoders import ClipImageEncoder

    encoder = ClipImageEncoder(encoder_ref)
    # A table decord made read what decord could not with PyAV: "auto" does the same.
    settings = DecodeSettings.for_encoder(
        encoder.preprocessing,
        num_frames=num_frames,
        timeout_s=timeout_s,
        decoder="pyav" if recorded_decoder == "pyav" else "auto",
    )
    decoder = IsolatedDecoder(settings)
    try:
        decoded = decode_video(video_id_from_uri(uri), uri, storage, decoder)
    finally:
        decoder.close()
    if not decoded.ok:
        raise jobs.JobError(f"cannot decode {uri}: {decoded.error}")
    return encoder.encode(decoded.frames), float(decoded.duration_s)


def describe(record: dict[str, Any]) -> str:
    """The prediction for a person: the moment, then how each refinement step got there."""
    lines = [f"query: {record['query']!r} in {record['video_id']} ({record['duration']:.2f} s)"]
    if record["parsed"]:
        start, end = record["pred"]
        lines.append(f"moment: {start:.2f} s to {end:.2f} s")
    else:
        lines.append("moment: none (the answer did not parse; it counts as a miss)")
    for index, (start, end) in enumerate(record["steps"], start=1):
        lines.append(f"  after step {index}: {start:.2f} s to {end:.2f} s")
    for mode in ("pred_head", "pred_fused", "pred_frames"):
        if record.get(mode) is not None:
            lines.append(f"{mode.removeprefix('pred_')}: {record[mode][0]:.2f} s to {record[mode][1]:.2f} s")
    lines.append(f"answer: {record['text']}")
    if record.get("off_grammar"):
        lines.append("(the model's own choice left the answer grammar; decoding kept it inside)")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(jobs.main(sys.modules[__name__]))
