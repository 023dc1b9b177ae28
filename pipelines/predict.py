"""Ground one query in one video: decode, encode with the checkpoint's encoder, generate. No Ray needed.

Two doors, one job: ``timerefine predict ...`` and ``python pipelines/predict.py ...``.

The video goes through the extraction's own stages (``timerefine.features``: sampling in an isolated
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
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np

from timerefine.cli import run_job
from timerefine.data.storage import Storage, StorageError, video_id_from_uri
from timerefine.encoders import RANDOM_ENCODERS, EncoderRef, resolve_encoder

EXIT_OK, EXIT_UNPARSED, EXIT_UNUSABLE = 0, 1, 2


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True, help="checkpoint directory (local or s3://)")
    parser.add_argument("--video", required=True, help="video file (local path or s3:// URI)")
    parser.add_argument("--query", required=True, help="the sentence to ground")
    parser.add_argument("--json", action="store_true", help="print one predictions-format JSON object")
    parser.add_argument("--encoder", help="CLIP hub id or local dir (default: the checkpoint's encoder)")
    parser.add_argument("--decode-timeout", type=float, default=120.0, help="seconds for decoding")
    parser.add_argument("--endpoint-url", help="S3-compatible endpoint (or AWS_ENDPOINT_URL)")


def run(args: argparse.Namespace) -> int:
    """Predict; returns the exit status (see the module docstring)."""
    from timerefine.model import load_checkpoint
    from timerefine.training import fetch_checkpoint

    try:
        storage = Storage(endpoint_url=args.endpoint_url)
        with tempfile.TemporaryDirectory(prefix="timerefine-ckpt-") as staging:
            model = load_checkpoint(fetch_checkpoint(args.checkpoint, storage, Path(staging)))
        encoder = encoder_for(model.config.encoder, args.encoder)
        features, duration = encode_video(args.video, encoder, model.config.num_frames, storage, args)
    except (StorageError, ValueError, FileNotFoundError) as error:
        print(f"[predict] error: {error}", file=sys.stderr)
        return EXIT_UNUSABLE

    prediction = model.generate([features], [args.query], [duration])[0]
    video_id = video_id_from_uri(args.video)
    record = {
        "qid": video_id,
        "video_id": video_id,
        "query": args.query,
        "duration": duration,
        "windows": [],
        **prediction,
    }
    print(json.dumps(record) if args.json else describe(record))
    return EXIT_OK if prediction["parsed"] else EXIT_UNPARSED


def main(argv: list[str] | None = None) -> int:
    return run_job(sys.modules[__name__], argv)


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
    uri: str, encoder_ref: EncoderRef, num_frames: int, storage: Storage, args: argparse.Namespace
) -> tuple[np.ndarray, float]:
    """(num_frames, dim) features of the video and its duration in seconds, made as the extraction makes
    them."""
    import pyarrow as pa

    from timerefine.encoders import ClipImageEncoder
    from timerefine.features import (
        DECODED_SCHEMA,
        STATUS_OK,
        DecodeSettings,
        IsolatedDecoder,
        decode_video,
        encode_videos,
    )

    encoder = ClipImageEncoder(encoder_ref)
    settings = DecodeSettings.for_encoder(
        encoder.preprocessing, num_frames=num_frames, timeout_s=args.decode_timeout
    )
    decoder = IsolatedDecoder(settings)
    try:
        decoded = decode_video(video_id_from_uri(uri), uri, storage, decoder)
    finally:
        decoder.close()
    if decoded["status"] != STATUS_OK:
        raise ValueError(f"cannot decode {uri}: {decoded['error']}")
    table = encode_videos(encoder, pa.Table.from_pylist([decoded], schema=DECODED_SCHEMA), num_frames, 256)
    row = table.to_pylist()[0]
    if row["status"] != STATUS_OK:
        raise ValueError(f"cannot encode {uri}: {row['error']}")
    features = table.column("features").combine_chunks().to_numpy_ndarray()[0]
    return features, float(decoded["duration_s"])


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
    for mode in ("pred_head", "pred_fused"):
        if record[mode] is not None:
            lines.append(f"{mode.removeprefix('pred_')}: {record[mode][0]:.2f} s to {record[mode][1]:.2f} s")
    lines.append(f"answer: {record['text']}")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
