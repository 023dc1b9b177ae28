"""CLIP's vision tower with its projection, in plain PyTorch, loaded from a saved model's safetensors.

Why not transformers' ``CLIPVisionModelWithProjection``: importing its modelling code costs an encoder
actor seconds before it encodes a frame (it pulls in ``torch._dynamo`` and transformers' masking code;
5.9 s of a 6.4 s start on one quiet core, against 0.1 s for this module), and every extraction job pays
that once per actor. The network is small enough to write down, and the weights are the same file: this
module reads the parameter names transformers writes (``vision_model.*``, ``visual_projection.weight``)
from ``model.safetensors`` or a sharded index, of a vision-only model or of a full CLIP model (its text
tower ignored), and gives the same ``image_embeds`` (tests/test_clip.py compares the two).

Configs are read the way transformers reads them: a ``clip_vision_model`` config, or the
``vision_config`` of a ``clip`` one, with transformers' defaults for keys a config leaves out.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F
from torch import nn

from timerefine.hub import read_json, weight_files


@dataclass(frozen=True)
class ClipVisionConfig:
    """The keys of transformers' ``CLIPVisionConfig`` that shape the network, with its defaults."""

    hidden_size: int = 768
    intermediate_size: int = 3072
    projection_dim: int = 512
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    num_channels: int = 3
    image_size: int = 224
    patch_size: int = 32
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5

    @classmethod
    def from_dict(cls, config: dict, source: str | os.PathLike = "config.json") -> ClipVisionConfig:
        if config.get("model_type") == "clip":  # a full CLIP model: its vision half
            config = config.get("vision_config") or {}
        elif config.get("model_type") not in (None, "clip_vision_model"):
            raise ValueError(
                f"{source}: model_type {config.get('model_type')!r} is not a CLIP vision model "
                "(expected clip_vision_model or clip)"
            )
        known = {field.name for field in fields(cls)}
        parsed = cls(**{key: value for key, value in config.items() if key in known})
        if parsed.hidden_act not in _ACTIVATIONS:
            raise ValueError(
                f"{source}: hidden_act {parsed.hidden_act!r} is not one of {sorted(_ACTIVATIONS)}"
            )
        if parsed.hidden_size % parsed.num_attention_heads:
            raise ValueError(f"{source}: hidden_size is not a multiple of num_attention_heads")
        return parsed


def _quick_gelu(x: torch.Tensor) -> torch.Tensor:
    return x * torch.sigmoid(1.702 * x)


_ACTIVATIONS = {
    "quick_gelu": _quick_gelu,
    "gelu": F.gelu,
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
}


class _Attention(nn.Module):
    def __init__(self, config: ClipVisionConfig) -> None:
        super().__init__()
        width = config.hidden_size
        self.heads = config.num_attention_heads
        self.q_proj, self.k_proj = nn.Linear(width, width), nn.Linear(width, width)
        self.v_proj, self.out_proj = nn.Linear(width, width), nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, length, width = x.shape
        q, k, v = (
            proj(x).view(batch, length, self.heads, -1).transpose(1, 2)
            for proj in (self.q_proj, self.k_proj, self.v_proj)
        )
        attended = F.scaled_dot_product_attention(q, k, v)  # no mask: every patch sees every patch
        return self.out_proj(attended.transpose(1, 2).reshape(batch, length, width))


class _Mlp(nn.Module):
    def __init__(self, config: ClipVisionConfig) -> None:
        super().__init__()
        self.fc1 = nn.Linear(config.hidden_size, config.intermediate_size)
        self.fc2 = nn.Linear(config.intermediate_size, config.hidden_size)
        self.activation = _ACTIVATIONS[config.hidden_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.activation(self.fc1(x)))


class _Layer(nn.Module):
    """A pre-norm transformer block, named as transformers names CLIP's so the weights load by name."""

    def __init__(self, config: ClipVisionConfig) -> None:
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.self_attn = _Attention(config)
        self.layer_norm2 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = _Mlp(config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class _Embeddings(nn.Module):
    def __init__(self, config: ClipVisionConfig) -> None:
        super().__init__()
        width, patch = config.hidden_size, config.patch_size
        self.class_embedding = nn.Parameter(torch.zeros(width))
        self.patch_embedding = nn.Conv2d(config.num_channels, width, patch, stride=patch, bias=False)
        self.position_embedding = nn.Embedding((config.image_size // patch) ** 2 + 1, width)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        patches = self.patch_embedding(pixels).flatten(2).transpose(1, 2)  # (B, patches, width)
        cls = self.class_embedding.to(patches.dtype).expand(len(patches), 1, -1)
        return torch.cat([cls, patches], dim=1) + self.position_embedding.weight


class _Encoder(nn.Module):
    def __init__(self, config: ClipVisionConfig) -> None:
        super().__init__()
        self.layers = nn.ModuleList(_Layer(config) for _ in range(config.num_hidden_layers))


class _VisionModel(nn.Module):
    def __init__(self, config: ClipVisionConfig) -> None:
        super().__init__()
        self.embeddings = _Embeddings(config)
        self.pre_layrnorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)  # sic, as saved
        self.encoder = _Encoder(config)
        self.post_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)


class ClipVisionTower(nn.Module):
    """Pixels (B, 3, S, S), normalised as CLIP's processor does, to ``image_embeds`` (B, projection_dim):
    the class token's final state, layer-normed and projected."""

    def __init__(self, config: ClipVisionConfig) -> None:
        super().__init__()
        self.config = config
        self.vision_model = _VisionModel(config)
        self.visual_projection = nn.Linear(config.hidden_size, config.projection_dim, bias=False)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        model = self.vision_model
        x = model.pre_layrnorm(model.embeddings(pixels))
        for layer in model.encoder.layers:
            x = layer(x)
        return self.visual_projection(model.post_layernorm(x[:, 0]))

    @classmethod
    def from_pretrained(cls, source: str | os.PathLike, revision: str | None = None) -> ClipVisionTower:
        """Load from a local directory or a hub id (its files from the local hub cache at ``revision``)."""
        from safetensors import safe_open

        config = ClipVisionConfig.from_dict(*read_json(source, "config.json", revision))
        tower = cls(config)
        expected = tower.state_dict()
        loaded: set[str] = set()
        for weights in weight_files(source, revision):
            with safe_open(weights, framework="pt") as tensors:
                for name in tensors.keys():  # noqa: SIM118 (safe_open is not a mapping)
                    if name not in expected:
                        continue  # a full CLIP model's text tower, or buffers like position_ids
                    tensor = tensors.get_tensor(name)
                    if tensor.shape != expected[name].shape:
                        raise ValueError(
                            f"{weights}: {name} has shape {tuple(tensor.shape)} where config.json "
                            f"implies {tuple(expected[name].shape)}"
                        )
                    expected[name].copy_(tensor)
                    loaded.add(name)
        missing = sorted(set(expected) - loaded)
        if missing:
            raise ValueError(
                f"{source}: the weights lack {len(missing)} tensor(s) of the vision tower, e.g. {missing[0]}"
            )
        return tower.eval()
