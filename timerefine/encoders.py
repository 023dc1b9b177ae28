"""The frozen CLIP image encoder and its preprocessing.

Frames become features the way CLIP was trained to see them: the short side resized to the processor's
``shortest_edge`` (PIL bicubic), a centre crop, then CLIP's mean and std. The work is split where the
pipeline splits it: ``ClipPreprocessing.resize_and_crop`` runs in the decode tasks, on frames the decoder
has already shrunk, so only crop-sized uint8 frames cross Ray's object store; ``normalize`` and the
forward pass run in the encoder actors, in batches, fp16 on a GPU.

Any CLIP vision tower with a projection saved by transformers (a vision-only or a full CLIP model, in
safetensors) loads from a hub id or a local directory into ``timerefine.clip.ClipVisionTower``, the same
network in plain PyTorch, which an actor loads in a tenth of a second instead of the seconds transformers'
modelling code takes to import. Without a network, the default is a small CLIP vision model built by
transformers from a config with a fixed seed, saved once with ``save_pretrained`` into a cache directory
and then loaded back through the same path as any other. Its random weights still run the real
preprocessing and forward pass; its features are only as meaningful as random weights allow (DESIGN.md
section 7). A second built-in, ``timerefine/random-clip-vit-l-14``, has ViT-L/14's shape and random
weights, for measuring encoding throughput at the paper's size on a GPU.

torch is imported where frames are encoded, not at module import: decode tasks and the driver import this
module for the preprocessing alone and should not pay seconds and hundreds of MB for torch; transformers
is imported only to build the built-in encoders.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

from timerefine.cache import cached_build, timerefine_home
from timerefine.hub import read_json

if TYPE_CHECKING:
    import torch

DEFAULT_ENCODER = "timerefine/tiny-clip-random"

# Native 128 px input with 16 px patches keeps the default fast on CPUs (one thread: 372 frames/s with 2
# layers, 205 with 4, ~8.5 for a ViT-B/32-sized model); the 768-d projection keeps tables shaped like
# ViT-L/14's. Two random layers rather than four: encoding is the CPU pipeline's slower stage, and the
# shallower random tower keeps more of what the frames show (a linear probe names the synthetic events'
# colour from their features 82% of the time, against 76% with four layers).
_TINY_CLIP_CONFIG = {
    "image_size": 128,
    "patch_size": 16,
    "hidden_size": 128,
    "intermediate_size": 512,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "projection_dim": 768,
}
_RANDOM_CLIP_SEED = 0
VIT_L_14_ENCODER = "timerefine/random-clip-vit-l-14"
# The built-in random-weight encoders, by name. ViT-L/14's shape (openai/clip-vit-large-patch14's vision
# config: 224 px, 14 px patches, 24 layers of width 1024) measures what encoding costs at the paper's size.
RANDOM_ENCODERS = {
    DEFAULT_ENCODER: _TINY_CLIP_CONFIG,
    VIT_L_14_ENCODER: {
        "image_size": 224,
        "patch_size": 14,
        "hidden_size": 1024,
        "intermediate_size": 4096,
        "num_hidden_layers": 24,
        "num_attention_heads": 16,
        "projection_dim": 768,
    },
}

_WEIGHT_SUFFIX = ".safetensors"  # pickled .bin weights are never loaded


@dataclass(frozen=True)
class EncoderRef:
    """Which encoder to load, pinned: a hub id, a local directory or ``DEFAULT_ENCODER``, plus a revision.

    The revision is the hub commit for hub ids, a hash of the files for local directories, and a hash
    of the config and seed for the default; ``identity`` is what every feature row records.
    """

    name: str
    revision: str
    path: str | None = None  # a local directory holding the files, when the driver has one

    @property
    def identity(self) -> str:
        return f"{self.name}@{self.revision}"

    def pretrained_source(self) -> tuple[str, str | None]:
        """What ``from_pretrained`` takes: (local directory, None) or (hub id, pinned revision)."""
        return (self.path, None) if self.path else (self.name, self.revision)


def resolve_encoder(name_or_path: str | None = None) -> EncoderRef:
    """Pin an encoder given by hub id, local directory or built-in name (None: the built-in default)."""
    name_or_path = name_or_path or DEFAULT_ENCODER
    if name_or_path in RANDOM_ENCODERS:
        directory = build_random_encoder(name_or_path)
        return EncoderRef(name_or_path, _random_clip_revision(name_or_path), str(directory))
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return EncoderRef(str(path.absolute()), _directory_revision(path), str(path.absolute()))
    if path.exists() or name_or_path.startswith((".", "/", "~")) or name_or_path.count("/") > 1:
        raise FileNotFoundError(
            f"encoder {name_or_path!r} is neither a directory holding a saved CLIP model "
            "(config.json, preprocessor_config.json, weights) nor a hub id like openai/clip-vit-large-patch14"
        )
    return EncoderRef(name_or_path, _hub_revision(name_or_path))


def build_random_encoder(name: str = DEFAULT_ENCODER, cache_dir: str | os.PathLike | None = None) -> Path:
    """Build a built-in encoder's directory once, safe when several processes ask at once, and rebuild it
    when found incomplete (``timerefine.cache``).

    Returns a directory that ``from_pretrained`` loads: the model's config and weights and a
    CLIPImageProcessor config whose resize and crop match the model's input size.
    """
    cache_dir = Path(cache_dir) if cache_dir is not None else timerefine_home() / "encoders"
    target = cache_dir / f"{name.rpartition('/')[2]}-{_random_clip_revision(name)}"
    return cached_build(target, lambda staging: _build_random_encoder(name, staging), _check_encoder)


def _build_random_encoder(name: str, directory: Path) -> None:
    import torch
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModelWithProjection

    config = CLIPVisionConfig(**RANDOM_ENCODERS[name])
    with torch.random.fork_rng():
        torch.manual_seed(_RANDOM_CLIP_SEED)
        model = CLIPVisionModelWithProjection(config)
    model.save_pretrained(directory)
    size = config.image_size
    processor = CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size})
    processor.save_pretrained(directory)


def _check_encoder(directory: Path) -> None:
    """Load what was built back the way ``ClipImageEncoder`` loads it."""
    from timerefine.clip import ClipVisionTower

    ClipVisionTower.from_pretrained(directory)
    ClipPreprocessing.from_pretrained(directory)


def copy_frames_into(out: np.ndarray, frames: np.ndarray) -> None:
    """Copy ``frames`` into the caller's ``out``; a shape that differs is an error (np.copyto alone would
    broadcast one frame over all of them)."""
    if out.shape != frames.shape:
        raise ValueError(f"out must have the frames' shape {frames.shape}, got {out.shape}")
    np.copyto(out, frames)


@dataclass(frozen=True)
class ClipPreprocessing:
    """CLIP's image preprocessing, as its image processor config describes it."""

    resize_short: int
    crop_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    @classmethod
    def from_pretrained(cls, source: str | os.PathLike, revision: str | None = None) -> ClipPreprocessing:
        """Read ``preprocessor_config.json`` from a local directory or a hub id (torch is not imported)."""
        config, source = read_json(source, "preprocessor_config.json", revision)
        # Older configs (openai/clip-vit-large-patch14's among them) store plain ints for both sizes.
        size, crop = config.get("size"), config.get("crop_size")
        resize_short = size if isinstance(size, int) else (size or {}).get("shortest_edge")
        crop = {"height": crop, "width": crop} if isinstance(crop, int) else (crop or {})
        resample = config.get("resample", 3)
        if (
            not resize_short
            or crop.get("height") is None
            or crop["height"] != crop.get("width")
            or resample != 3
        ):
            raise ValueError(
                f"{source}: preprocessor_config.json must describe CLIP's preprocessing (size.shortest_edge, "
                f"a square crop_size, bicubic resample 3); got size={size}, crop_size={crop}, "
                f"resample={resample}"
            )
        mean, std = tuple(config["image_mean"]), tuple(config["image_std"])
        return cls(int(resize_short), int(crop["height"]), mean, std)

    def resized_shape(self, height: int, width: int) -> tuple[int, int]:
        """(height, width) after resizing the short side, truncating the long side as transformers does."""
        if height <= width:
            return self.resize_short, int(self.resize_short * width / height)
        return int(self.resize_short * height / width), self.resize_short

    def resize_and_crop(self, frames: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        """(T, H, W, 3) uint8 -> (T, crop, crop, 3) uint8: PIL bicubic short-side resize, centre crop.

        Frames whose short side already has the target length skip the resize: the decoder resized them,
        and its rounding of the long side may differ from transformers' by a pixel, which the crop absorbs.
        ``out`` receives the crop in place of a new array (the decoder process crops straight into the
        buffer it shares with its parent, one copy of the frames fewer).
        """
        if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
            raise ValueError(f"frames must be (T, H, W, 3) uint8, got {frames.dtype} {frames.shape}")
        height, width = frames.shape[1:3]
        if min(height, width) != self.resize_short:
            height, width = self.resized_shape(height, width)
            resized = [Image.fromarray(frame).resize((width, height), Image.BICUBIC) for frame in frames]
            frames = np.stack([np.asarray(image) for image in resized])
        if min(height, width) < self.crop_size:
            raise ValueError(f"frames of {width}x{height} are smaller than the {self.crop_size} px crop")
        top, left = (height - self.crop_size) // 2, (width - self.crop_size) // 2
        cropped = frames[:, top : top + self.crop_size, left : left + self.crop_size]
        if out is None:
            return np.ascontiguousarray(cropped)
        copy_frames_into(out, cropped)
        return out

    def normalize(self, frames: np.ndarray) -> torch.Tensor:
        """(N, S, S, 3) uint8 -> (N, 3, S, S) float32 in CLIP's normalised range."""
        import torch

        # One conversion pass into a contiguous NCHW float tensor, then the scale and shift in place:
        # (x / 255 - mean) / std = x * (1 / (255 std)) - mean / std. A quarter of the time of converting,
        # permuting and dividing in separate tensors (34 -> 9 ms for 100 frames of 128 px, one thread).
        with warnings.catch_warnings():  # frames read from an Arrow buffer are read-only; only read here
            warnings.simplefilter("ignore", UserWarning)
            pixels = torch.from_numpy(np.asarray(frames)).permute(0, 3, 1, 2)
        mean = torch.tensor(self.mean, dtype=torch.float32).view(1, 3, 1, 1)
        std = torch.tensor(self.std, dtype=torch.float32).view(1, 3, 1, 1)
        normalized = torch.empty(pixels.shape, dtype=torch.float32)
        normalized.copy_(pixels)
        return normalized.mul_(1 / (255 * std)).sub_(mean / std)

    def __call__(self, frames: np.ndarray) -> torch.Tensor:
        """Full preprocessing of frames of any size, as CLIPImageProcessor does it, batched."""
        return self.normalize(self.resize_and_crop(frames))


class ClipImageEncoder:
    """A CLIP vision tower with its projection, loaded once, encoding batches of frames into ``image_embeds``.

    On a GPU the model runs in fp16; on a CPU in fp32 with ``threads`` intra-op threads (Ray actors
    sharing a small machine each take one). Features come back as float16, the feature table's type.
    """

    def __init__(
        self,
        encoder: EncoderRef | str | None = None,
        *,
        device: str | None = None,
        threads: int | None = None,
    ) -> None:
        import torch

        from timerefine.clip import ClipVisionTower

        ref = encoder if isinstance(encoder, EncoderRef) else resolve_encoder(encoder)
        source, revision = ref.pretrained_source()
        if ref.name in RANDOM_ENCODERS and not Path(source).is_dir():
            source = str(build_random_encoder(ref.name))  # a node without the driver's cache builds the same
        if threads is not None:
            torch.set_num_threads(threads)
        self.ref = ref
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.dtype = torch.float16 if self.device.type == "cuda" else torch.float32
        self.preprocessing = ClipPreprocessing.from_pretrained(source, revision=revision)
        model = ClipVisionTower.from_pretrained(source, revision=revision)
        self.model = model.to(self.device, self.dtype).eval()
        self.dim = model.config.projection_dim

    @property
    def identity(self) -> str:
        return self.ref.identity

    def encode(self, frames: np.ndarray, batch_size: int = 256) -> np.ndarray:
        """(N, S, S, 3) uint8 frames, already resized and cropped -> (N, dim) float16 ``image_embeds``."""
        import torch

        size = self.preprocessing.crop_size
        if frames.ndim != 4 or frames.shape[1:] != (size, size, 3) or frames.dtype != np.uint8:
            raise ValueError(
                f"encode takes (N, {size}, {size}, 3) uint8 frames, got {frames.dtype} {frames.shape}"
            )
        features = np.empty((len(frames), self.dim), dtype=np.float16)
        with torch.inference_mode():
            for start in range(0, len(frames), batch_size):
                pixels = self.preprocessing.normalize(frames[start : start + batch_size])
                pixels = pixels.to(self.device, self.dtype, non_blocking=True)
                embeds = self.model(pixels)
                features[start : start + len(pixels)] = embeds.to(torch.float16).cpu().numpy()
        return features


def _random_clip_revision(name: str) -> str:
    recipe = json.dumps({"config": RANDOM_ENCODERS[name], "seed": _RANDOM_CLIP_SEED}, sort_keys=True)
    return hashlib.sha256(recipe.encode()).hexdigest()[:12]


def _directory_revision(path: Path) -> str:
    """A content hash of a saved model's configs and weights: two runs share it only with the same model."""
    files = sorted(
        file
        for file in path.iterdir()
        if file.is_file() and (file.name.endswith(_WEIGHT_SUFFIX) or file.name.endswith("config.json"))
    )
    if not any(file.name.endswith(_WEIGHT_SUFFIX) for file in files):
        raise FileNotFoundError(
            f"{path}: no model weights (*.safetensors; pickled .bin files are not loaded); save the model "
            "with save_pretrained, whose default is safetensors"
        )
    digest = hashlib.sha256()
    for file in files:
        digest.update(file.name.encode())
        with file.open("rb") as stream:
            while chunk := stream.read(1 << 24):
                digest.update(chunk)
    return digest.hexdigest()[:12]


def _hub_revision(model_id: str) -> str:
    """The commit a hub id resolves to now (from the local cache when offline), pinned for every worker."""
    from huggingface_hub import hf_hub_download

    config_path = Path(hf_hub_download(model_id, "config.json"))
    return config_path.parent.name  # the cache stores files under snapshots/<commit>/
