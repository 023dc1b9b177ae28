"""The CLIP encoder: the default's save_pretrained round trip, preprocessing against transformers'
CLIPImageProcessor, and features against transformers' own model on single images."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import CLIPImageProcessor, CLIPVisionModelWithProjection

from timerefine.cache import LOCKS
from timerefine.encoders import (
    DEFAULT_ENCODER,
    RANDOM_ENCODERS,
    VIT_L_14_ENCODER,
    ClipImageEncoder,
    ClipPreprocessing,
    EncoderRef,
    build_random_encoder,
    resolve_encoder,
)
from timerefine.video import sample_frames


@pytest.fixture(scope="module")
def encoder_home(tmp_path_factory: pytest.TempPathFactory):
    """TIMEREFINE_HOME in a temporary folder, so the default encoder is built there, once per module."""
    home = tmp_path_factory.mktemp("timerefine_home")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("TIMEREFINE_HOME", str(home))
        yield home


@pytest.fixture(scope="module")
def tiny_encoder(encoder_home) -> ClipImageEncoder:
    return ClipImageEncoder(None, threads=1)


@pytest.fixture(scope="module")
def real_frames(sample_videos) -> np.ndarray:
    """16 frames of a real 192x108 H.264 clip at native size (smaller than the 128 px input: upscaled)."""
    return sample_frames(sample_videos["counter_wide_ntsc"], 16).frames


def test_default_encoder_is_built_once_and_loaded_through_from_pretrained(encoder_home, tiny_encoder):
    ref = resolve_encoder(None)
    directory = build_random_encoder()

    assert ref.name == DEFAULT_ENCODER
    assert ref.path == str(directory)
    assert directory.parent == encoder_home / "encoders"
    assert ref.identity == f"{DEFAULT_ENCODER}@{ref.revision}"
    assert len(ref.revision) == 12 and int(ref.revision, 16) >= 0
    assert resolve_encoder(DEFAULT_ENCODER) == ref  # the revision is a function of config and seed
    assert build_random_encoder() == directory  # built once, then found
    # No staging folder left beside it; the cache's locks live apart, in .locks/.
    assert [path.name for path in directory.parent.iterdir() if path.name.startswith(".")] == [LOCKS]

    config = json.loads((directory / "config.json").read_text())
    assert (config["image_size"], config["patch_size"], config["projection_dim"]) == (128, 16, 768)
    assert tiny_encoder.preprocessing.resize_short == tiny_encoder.preprocessing.crop_size == 128
    assert tiny_encoder.dim == 768
    assert tiny_encoder.identity == ref.identity


def test_a_built_in_encoder_is_built_from_its_config_by_name(encoder_home, monkeypatch) -> None:
    # The ViT-L/14-shaped one (300M parameters, a 1.2 GB build) is for GPU benchmarks; here the same path
    # runs on a small config registered under another name.
    vit_l = RANDOM_ENCODERS[VIT_L_14_ENCODER]
    assert (vit_l["image_size"], vit_l["patch_size"], vit_l["hidden_size"]) == (224, 14, 1024)
    assert (vit_l["num_hidden_layers"], vit_l["projection_dim"]) == (24, 768)
    small = RANDOM_ENCODERS[DEFAULT_ENCODER] | {"image_size": 64, "num_hidden_layers": 1}
    monkeypatch.setitem(RANDOM_ENCODERS, "timerefine/test-clip", small)
    ref = resolve_encoder("timerefine/test-clip")
    assert Path(ref.path).name == f"test-clip-{ref.revision}"
    assert ref.revision != resolve_encoder(None).revision  # the revision follows the config
    encoder = ClipImageEncoder(ref, threads=1)
    assert encoder.preprocessing.crop_size == 64 and encoder.identity == ref.identity
    frames = np.random.default_rng(0).integers(0, 256, (3, 64, 64, 3), dtype=np.uint8)
    features = encoder.encode(frames)
    assert features.shape == (3, 768) and features.dtype == np.float16 and np.isfinite(features).all()


def test_default_encoder_weights_are_reproducible(tmp_path, tiny_encoder):
    rebuilt = CLIPVisionModelWithProjection.from_pretrained(build_random_encoder(cache_dir=tmp_path))

    expected = tiny_encoder.model.state_dict()
    for name, weights in rebuilt.state_dict().items():
        assert torch.equal(weights, expected[name]), name


def assert_matches_clip_image_processor(frames: np.ndarray, size: int) -> None:
    processor = CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size})
    ours = ClipPreprocessing(size, size, tuple(processor.image_mean), tuple(processor.image_std))

    expected = processor(images=list(frames), return_tensors="pt").pixel_values
    actual = ours(frames)

    assert actual.shape == expected.shape == (len(frames), 3, size, size)
    assert (actual - expected).abs().max().item() < 1e-2


@pytest.mark.parametrize("size", [128, 224])
def test_batched_preprocessing_matches_clip_image_processor(real_frames, size):
    assert_matches_clip_image_processor(real_frames, size)  # 192x108: upscaled


def test_batched_preprocessing_matches_clip_image_processor_on_the_charades_clip(shared_data):
    frames = sample_frames(shared_data / "videos" / "charades_Y1HGC.mp4", 8).frames  # 480x270: downscaled
    assert_matches_clip_image_processor(frames, 224)


def test_preprocessing_reads_the_processor_config_of_a_saved_model(tmp_path, tiny_encoder):
    # openai/clip-vit-large-patch14 stores both sizes as plain ints.
    (tmp_path / "preprocessor_config.json").write_text(
        json.dumps(
            {
                "image_processor_type": "CLIPImageProcessor",
                "size": 224,
                "crop_size": 224,
                "resample": 3,
                "image_mean": [0.48145466, 0.4578275, 0.40821073],
                "image_std": [0.26862954, 0.26130258, 0.27577711],
            }
        )
    )
    preprocessing = ClipPreprocessing.from_pretrained(tmp_path)

    assert (preprocessing.resize_short, preprocessing.crop_size) == (224, 224)
    assert preprocessing.mean == pytest.approx((0.48145466, 0.4578275, 0.40821073))
    assert ClipPreprocessing.from_pretrained(tiny_encoder.ref.path).crop_size == 128


def test_preprocessing_rejects_a_config_that_is_not_clips(tmp_path):
    (tmp_path / "preprocessor_config.json").write_text(
        json.dumps({"size": {"height": 224, "width": 224}, "crop_size": 224, "image_mean": [0] * 3})
    )
    with pytest.raises(ValueError, match=r"preprocessor_config\.json must describe CLIP"):
        ClipPreprocessing.from_pretrained(tmp_path)


def test_decoder_resized_frames_are_only_cropped(real_frames):
    preprocessing = ClipPreprocessing(108, 96, (0.5,) * 3, (0.5,) * 3)

    cropped = preprocessing.resize_and_crop(real_frames)  # 192x108: the short side already fits

    assert cropped.shape == (16, 96, 96, 3)
    np.testing.assert_array_equal(cropped, real_frames[:, 6:102, 48:144])


@pytest.mark.parametrize("short_side", [108, 72])  # cropped only / resized, then cropped
def test_frames_are_cropped_into_the_callers_array(real_frames, short_side):
    preprocessing = ClipPreprocessing(short_side, 64, (0.5,) * 3, (0.5,) * 3)
    out = np.zeros((16, 64, 64, 3), dtype=np.uint8)

    returned = preprocessing.resize_and_crop(real_frames, out=out)

    assert returned is out
    np.testing.assert_array_equal(out, preprocessing.resize_and_crop(real_frames))
    with pytest.raises(ValueError, match="out must have the frames' shape"):
        preprocessing.resize_and_crop(real_frames, out=np.zeros((16, 96, 96, 3), dtype=np.uint8))
    with pytest.raises(ValueError, match="out must have the frames' shape"):  # not one frame broadcast
        preprocessing.resize_and_crop(real_frames[:1], out=out)


def test_features_match_a_direct_single_image_forward(tiny_encoder, real_frames):
    processor = CLIPImageProcessor.from_pretrained(tiny_encoder.ref.path)
    reference = CLIPVisionModelWithProjection.from_pretrained(tiny_encoder.ref.path).eval()  # transformers'
    cropped = tiny_encoder.preprocessing.resize_and_crop(real_frames)

    features = tiny_encoder.encode(cropped, batch_size=5)  # batches of 5, 5, 5, 1

    assert features.shape == (16, 768) and features.dtype == np.float16
    with torch.inference_mode():
        for index in (0, 7, 15):
            pixels = processor(images=real_frames[index], return_tensors="pt").pixel_values
            expected = reference(pixel_values=pixels).image_embeds[0].numpy()
            scale = np.abs(expected).max()
            assert np.abs(features[index].astype(np.float32) - expected).max() < 2e-3 * scale


def test_encode_rejects_frames_that_were_not_cropped(tiny_encoder, real_frames):
    with pytest.raises(ValueError, match=r"\(N, 128, 128, 3\) uint8"):
        tiny_encoder.encode(real_frames)


def test_a_local_directory_is_pinned_by_the_hash_of_its_files(tmp_path, tiny_encoder):
    copy = shutil.copytree(tiny_encoder.ref.path, tmp_path / "my-clip")
    ref = resolve_encoder(str(copy))

    assert ref == EncoderRef(str(copy), ref.revision, str(copy))
    assert ref.revision == resolve_encoder(str(copy)).revision
    weights = copy / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1] + b"\0")
    assert resolve_encoder(str(copy)).revision != ref.revision


def test_a_missing_encoder_directory_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="neither a directory holding a saved CLIP model"):
        resolve_encoder(str(tmp_path / "missing" / "clip"))
