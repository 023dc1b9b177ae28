"""The plain-PyTorch CLIP vision tower against transformers' CLIPVisionModelWithProjection, on models that
transformers itself built and saved: vision-only, full CLIP, sharded; and what it refuses."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import pytest
import torch
from transformers import CLIPConfig, CLIPModel, CLIPVisionConfig, CLIPVisionModelWithProjection

from timerefine.clip import ClipVisionConfig, ClipVisionTower

SMALL = {
    "image_size": 32,
    "patch_size": 8,
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "projection_dim": 24,
}


def saved_vision_model(directory: Path, sharded: bool = False, **overrides) -> CLIPVisionModelWithProjection:
    """A small random CLIP vision model that transformers built and saved (in 20 KB shards if ``sharded``)."""
    torch.manual_seed(0)
    model = CLIPVisionModelWithProjection(CLIPVisionConfig(**(SMALL | overrides))).eval()
    model.save_pretrained(directory, **({"max_shard_size": "20KB"} if sharded else {}))
    return model


def assert_same_embeddings(reference: torch.nn.Module, tower: ClipVisionTower, size: int) -> None:
    pixels = torch.randn(5, 3, size, size, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        expected = reference(pixel_values=pixels).image_embeds
        actual = tower(pixels)
    assert actual.shape == expected.shape
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("hidden_act", ["quick_gelu", "gelu"])
def test_a_saved_vision_model_gives_transformers_embeddings(tmp_path, hidden_act):
    reference = saved_vision_model(tmp_path / "clip", hidden_act=hidden_act)

    tower = ClipVisionTower.from_pretrained(tmp_path / "clip")

    assert tower.config.hidden_act == hidden_act and tower.config.projection_dim == 24
    assert_same_embeddings(reference, tower, 32)


def test_a_sharded_checkpoint_loads_from_its_index(tmp_path):
    reference = saved_vision_model(tmp_path / "clip-shards", sharded=True)
    assert (tmp_path / "clip-shards" / "model.safetensors.index.json").is_file()
    assert len(list((tmp_path / "clip-shards").glob("model-*.safetensors"))) > 1

    assert_same_embeddings(reference, ClipVisionTower.from_pretrained(tmp_path / "clip-shards"), 32)


def test_a_full_clip_model_gives_its_vision_half(tmp_path):
    # openai/clip-vit-large-patch14 is saved this way: model_type "clip", the vision part's config nested.
    torch.manual_seed(0)
    text = {
        "vocab_size": 64,
        "hidden_size": 16,
        "intermediate_size": 32,
        "num_hidden_layers": 1,
        "num_attention_heads": 2,
        "max_position_embeddings": 16,
    }
    full = CLIPModel(CLIPConfig(text_config=text, vision_config=SMALL, projection_dim=24))
    full.save_pretrained(tmp_path / "full")
    assert json.loads((tmp_path / "full" / "config.json").read_text())["model_type"] == "clip"

    tower = ClipVisionTower.from_pretrained(tmp_path / "full")
    reference = CLIPVisionModelWithProjection.from_pretrained(tmp_path / "full").eval()

    assert_same_embeddings(reference, tower, 32)
    torch.testing.assert_close(tower.visual_projection.weight, full.visual_projection.weight)


def test_defaults_for_keys_a_config_leaves_out_are_transformers_defaults():
    ours = asdict(ClipVisionConfig())
    theirs = CLIPVisionConfig()
    assert ours == {key: getattr(theirs, key) for key in ours}


def test_pickled_weights_are_refused(tmp_path):
    directory = tmp_path / "old"
    directory.mkdir()
    (directory / "config.json").write_text(json.dumps({"model_type": "clip_vision_model"} | SMALL))
    (directory / "pytorch_model.bin").write_bytes(b"not loaded")

    with pytest.raises(FileNotFoundError, match=r"no model\.safetensors.*pickled \.bin weights"):
        ClipVisionTower.from_pretrained(directory)


def test_weights_that_do_not_fit_the_config_name_the_tensor(tmp_path):
    saved_vision_model(tmp_path / "clip")
    config = json.loads((tmp_path / "clip" / "config.json").read_text())
    (tmp_path / "clip" / "config.json").write_text(json.dumps(config | {"projection_dim": 16}))

    with pytest.raises(ValueError, match=r"visual_projection\.weight has shape \(24, 32\).*\(16, 32\)"):
        ClipVisionTower.from_pretrained(tmp_path / "clip")


def test_a_model_that_is_not_clip_is_refused(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "siglip_vision_model"}))

    with pytest.raises(ValueError, match="not a CLIP vision model"):
        ClipVisionTower.from_pretrained(tmp_path)


def test_loading_an_encoder_imports_no_transformers_and_reading_its_preprocessing_no_torch(tmp_path):
    saved_vision_model(tmp_path / "clip")
    (tmp_path / "clip" / "preprocessor_config.json").write_text(
        json.dumps(
            {
                "size": {"shortest_edge": 32},
                "crop_size": {"height": 32, "width": 32},
                "resample": 3,
                "image_mean": [0.5] * 3,
                "image_std": [0.5] * 3,
            }
        )
    )
    script = f"""
import sys
from timerefine.encoders import ClipImageEncoder, ClipPreprocessing, resolve_encoder
ref = resolve_encoder({str(tmp_path / "clip")!r})
ClipPreprocessing.from_pretrained(ref.path)
print("torch" in sys.modules)
ClipImageEncoder(ref, threads=1)
print("transformers" in sys.modules)
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["False", "False"]
