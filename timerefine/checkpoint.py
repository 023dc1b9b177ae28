"""Checkpoints: a model's files, and a run's training state beside them. Nothing pickled is ever loaded.

A checkpoint directory (DESIGN.md section 3) holds ``timerefine.json`` (the model config, the base LLM,
the feature encoder, the format), ``weights.safetensors`` (``TimeRefineModel.trainable_state_dict``),
``tokenizer/`` and, for full fine-tuning, ``llm/`` (``save_pretrained``). A training run adds the
optimiser's tensors (``optimizer.safetensors``) and its scalars and the trainer's position
(``trainer_state.json``), which is what a resumed run continues from.

torch and transformers are imported where weights are read or written: a job checks its ``--checkpoint``
(``check_checkpoint``) before it starts Ray or loads a model, and should not pay seconds of imports to
refuse a wrong path.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pyarrow.fs as pafs

from timerefine.data.storage import Storage, join_uri

if TYPE_CHECKING:
    import torch

    from timerefine.model import TimeRefineModel

CHECKPOINT_FORMAT = 1
META_FILE = "timerefine.json"
WEIGHTS_FILE = "weights.safetensors"
OPTIMIZER_FILE = "optimizer.safetensors"
TRAINER_STATE_FILE = "trainer_state.json"
# What a checkpoint a run can resume from holds (the tokenizer is a folder).
TRAINING_CHECKPOINT_ENTRIES = (META_FILE, WEIGHTS_FILE, "tokenizer", OPTIMIZER_FILE, TRAINER_STATE_FILE)


@dataclass
class _CheckpointMeta:
    model: dict[str, Any]
    full_llm: bool  # the LLM is saved whole in llm/ (full fine-tuning); else rebuilt from model["llm"]
    format: int = CHECKPOINT_FORMAT
    base_llm: str = ""
    encoder: str | None = None


def save_checkpoint(model: TimeRefineModel, directory: str | Path) -> Path:
    """Write ``directory`` with ``timerefine.json`` (config, base LLM, encoder), ``weights.safetensors``
    (``trainable_state_dict``), ``tokenizer/`` and, for full fine-tuning, ``llm/`` (safetensors)."""
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    save_file(model.trainable_state_dict(), directory / WEIGHTS_FILE)
    model.tokenizer.save_pretrained(directory / "tokenizer")
    if model.full_finetune:
        model.causal_lm.save_pretrained(directory / "llm")
    meta = _CheckpointMeta(
        model=asdict(model.config),
        full_llm=model.full_finetune,
        base_llm=model.config.llm,
        encoder=model.config.encoder,
    )
    (directory / META_FILE).write_text(json.dumps(asdict(meta), indent=2) + "\n")
    return directory


def load_checkpoint(
    directory: str | Path, *, device: torch.device | str = "cpu", home: Path | None = None
) -> TimeRefineModel:
    """The model ``save_checkpoint`` wrote, in eval mode (call ``.train()`` to resume training). LoRA
    checkpoints rebuild their base LLM from ``config.llm``, which must still resolve to the same weights (a
    hub id, a path, a GGUF or the default)."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from timerefine.llm import load_llm
    from timerefine.model import ModelConfig, TimeRefineModel

    directory = Path(directory)
    meta_path = directory / META_FILE
    if not meta_path.is_file():
        raise FileNotFoundError(f"{meta_path} not found: {directory} is not a timerefine checkpoint")
    meta = _parse_meta(meta_path.read_bytes(), str(meta_path))
    config = ModelConfig(**meta.model)
    tokenizer = AutoTokenizer.from_pretrained(directory / "tokenizer")
    if meta.full_llm:
        llm = AutoModelForCausalLM.from_pretrained(directory / "llm", dtype=config.torch_dtype)
    else:
        llm, _ = load_llm(config.llm, dtype=config.torch_dtype, home=home)
    model = TimeRefineModel(config, llm, tokenizer)
    model.load_trainable_state_dict(load_file(directory / WEIGHTS_FILE))
    return model.to(device).eval()


def check_checkpoint(uri: str, storage: Storage) -> None:
    """Refuse, without loading a weight, what is not a checkpoint this version reads: a job checks its
    ``--checkpoint`` this way before starting Ray or loading a model."""
    kind = storage.file_type(uri)
    if kind == pafs.FileType.NotFound:
        raise FileNotFoundError(f"{uri}: no such checkpoint folder")
    if kind != pafs.FileType.Directory:
        raise ValueError(
            f"{uri}: is a file; a checkpoint is a folder ({META_FILE}, {WEIGHTS_FILE}, tokenizer/)"
        )
    meta_uri, weights_uri = join_uri(uri, META_FILE), join_uri(uri, WEIGHTS_FILE)
    if storage.file_type(meta_uri) != pafs.FileType.File:
        raise ValueError(f"{uri}: not a timerefine checkpoint (no {META_FILE})")
    _parse_meta(storage.read_bytes(meta_uri), meta_uri)
    if storage.file_type(weights_uri) != pafs.FileType.File:
        raise ValueError(f"{uri}: incomplete checkpoint, {WEIGHTS_FILE} is missing")


def _parse_meta(data: bytes, source: str) -> _CheckpointMeta:
    try:
        document = json.loads(data.decode("utf-8"))
    except UnicodeDecodeError as error:
        raise ValueError(f"{source}: not UTF-8 text (byte {error.start})") from None
    except json.JSONDecodeError as error:
        raise ValueError(
            f"{source}:{error.lineno}: invalid JSON at column {error.colno}: {error.msg}"
        ) from None
    try:
        meta = _CheckpointMeta(**document)
    except TypeError as error:  # not an object, or keys this version does not know
        raise ValueError(f"{source}: not a timerefine checkpoint description ({error})") from None
    if meta.format != CHECKPOINT_FORMAT:
        raise ValueError(f"{source}: checkpoint format {meta.format}, this version reads {CHECKPOINT_FORMAT}")
    return meta


# ---------------------------------------------------------------------------------------------------------
# Training state


@dataclass
class TrainerState:
    """Where a run stands after an epoch: what a resumed run needs besides weights and optimiser."""

    epoch: int  # epochs completed
    step: int  # optimiser steps taken


def fetch_checkpoint(uri: str, storage: Storage, staging: Path) -> Path:
    """A local directory with the checkpoint at ``uri``: the directory itself when it is local, else a
    copy downloaded into ``staging`` (from S3, where Ray Train stores runs on a cluster)."""
    local = storage.local_path(uri)
    if local is not None:
        if not Path(local).is_dir():
            raise FileNotFoundError(f"checkpoint {uri} is not a directory")
        return Path(local)
    filesystem, path = storage.resolve(uri)
    pafs.copy_files(
        path, str(staging), source_filesystem=filesystem, destination_filesystem=pafs.LocalFileSystem()
    )
    return staging


def save_training_state(directory: str | Path, optimizer: torch.optim.Optimizer, state: TrainerState) -> None:
    """Optimiser tensors in safetensors and everything else in JSON: no pickle, so loading runs no code."""
    import torch
    from safetensors.torch import save_file

    directory = Path(directory)
    optimizer_state = optimizer.state_dict()
    tensors, scalars = {}, {}
    for index, values in optimizer_state["state"].items():
        for name, value in values.items():
            key = f"{index}.{name}"
            if isinstance(value, torch.Tensor):
                tensors[key] = value.detach().cpu().contiguous()
            else:
                scalars[key] = value
    save_file(tensors, directory / OPTIMIZER_FILE)
    document = {
        "trainer": asdict(state),
        "optimizer": {"param_groups": optimizer_state["param_groups"], "scalars": scalars},
    }
    (directory / TRAINER_STATE_FILE).write_text(json.dumps(document, indent=2) + "\n")


def training_checkpoint_problem(directory: str | Path) -> str | None:
    """What makes ``directory`` unusable to resume a run from (None when it is complete): a file missing,
    a JSON file cut short, safetensors whose header does not match their size. Reads no tensor."""
    from safetensors import SafetensorError, safe_open

    directory = Path(directory)
    for name in TRAINING_CHECKPOINT_ENTRIES:
        if not (directory / name).exists():
            return f"{name} is missing"
    tokenizer_files = sorted(path.relative_to(directory) for path in (directory / "tokenizer").glob("*.json"))
    for name in (META_FILE, TRAINER_STATE_FILE, *tokenizer_files):
        try:
            json.loads((directory / name).read_text(encoding="utf-8"))
        except (OSError, ValueError) as error:
            return f"{name} is unreadable ({error})"
    for name in (WEIGHTS_FILE, OPTIMIZER_FILE):
        try:
            with safe_open(directory / name, framework="numpy") as tensors:
                tensors.keys()
        except (SafetensorError, OSError) as error:
            return f"{name} is unreadable ({error})"
    return None


def load_training_state(directory: str | Path, optimizer: torch.optim.Optimizer) -> TrainerState:
    """Restore the optimiser written by ``save_training_state`` and return the trainer's state."""
    from safetensors.torch import load_file

    directory = Path(directory)
    path = directory / TRAINER_STATE_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: {directory} is a model checkpoint without training state")
    document = json.loads(path.read_text())
    state: dict[int, dict[str, Any]] = {}
    entries = {**load_file(directory / OPTIMIZER_FILE), **document["optimizer"]["scalars"]}
    for key, value in entries.items():
        index, name = key.split(".", 1)
        state.setdefault(int(index), {})[name] = value
    optimizer.load_state_dict({"state": state, "param_groups": document["optimizer"]["param_groups"]})
    return TrainerState(**document["trainer"])
