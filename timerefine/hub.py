"""Files of a saved model, from a local directory or a hub id's local cache, without importing torch.

Both the driver (which reads an encoder's ``preprocessor_config.json`` to size the decoder's crop) and the
encoder actors (which read its weights) find files this way; only ``huggingface_hub`` is imported, and only
for hub ids. Nothing is downloaded at run time when ``HF_HUB_OFFLINE`` is set: files come from the cache.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

WEIGHTS_FILE = "model.safetensors"
WEIGHTS_INDEX_FILE = "model.safetensors.index.json"


def model_file(source: str | os.PathLike, filename: str, revision: str | None = None) -> Path | None:
    """``filename`` of a saved model: in a local directory, or of a hub id at ``revision`` (None when the
    model has no such file)."""
    directory = Path(source)
    if directory.is_dir():
        path = directory / filename
        return path if path.is_file() else None
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError

    try:
        return Path(hf_hub_download(str(source), filename, revision=revision))
    except EntryNotFoundError:
        return None


def read_json(source: str | os.PathLike, filename: str, revision: str | None = None) -> tuple[dict, Path]:
    """A model's JSON file, parsed, and where it was read from."""
    path = model_file(source, filename, revision)
    if path is None:
        raise FileNotFoundError(f"{source}: no {filename}")
    try:
        return json.loads(path.read_text(encoding="utf-8")), path
    except ValueError as error:
        raise ValueError(f"{path}: not valid JSON ({error})") from None


def weight_files(source: str | os.PathLike, revision: str | None = None) -> list[Path]:
    """The safetensors files holding a model's weights: one file, or the shards its index names.

    Pickled ``.bin`` weights are refused: loading a pickle runs whatever code it names.
    """
    single = model_file(source, WEIGHTS_FILE, revision)
    if single is not None:
        return [single]
    try:
        index, index_path = read_json(source, WEIGHTS_INDEX_FILE, revision)
    except FileNotFoundError:
        raise FileNotFoundError(
            f"{source}: no {WEIGHTS_FILE} or {WEIGHTS_INDEX_FILE}; save the model with save_pretrained "
            "(safetensors is its default); pickled .bin weights are not loaded"
        ) from None
    shards = sorted(set(index.get("weight_map", {}).values()))
    paths = []
    for shard in shards:
        path = model_file(source, shard, revision)
        if path is None:
            raise FileNotFoundError(f"{index_path} names {shard}, which is missing")
        paths.append(path)
    if not paths:
        raise ValueError(f"{index_path}: its weight_map names no files")
    return paths
