"""The model cache under concurrency and damage: built once by one of many processes, rebuilt when broken.

The racing processes are real ones, forked together from one launcher process that has imported torch and
transformers (8 fresh interpreters would spend 8 s of CPU each importing them), released by one barrier so
that they ask for the same entries within milliseconds of each other, as the ranks of a training run do on
a fresh machine.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from safetensors.torch import load_file

from timerefine.cache import LOCKS, MANIFEST, cached_build, incomplete_reason
from timerefine.encoders import DEFAULT_ENCODER, ClipImageEncoder, build_random_encoder
from timerefine.llm import DEFAULT_LLM, TinyLlmSpec, load_llm, tiny_llm_dir

SMALL_SPEC = TinyLlmSpec(hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64)

# The launcher: import everything, fork N processes that wait at one barrier, then each resolves and loads
# both built-in models as a training rank and an encoder actor do, and prints what it loaded.
_RACE = textwrap.dedent(
    """
    import json, logging, multiprocessing, sys
    import torch
    from timerefine.encoders import ClipImageEncoder
    from timerefine.llm import DEFAULT_LLM, load_llm, resolve_llm

    def racer(barrier):
        logging.basicConfig(level=logging.INFO, format="%(name)s %(message)s")
        torch.set_num_threads(1)
        barrier.wait()
        model, tokenizer = load_llm(DEFAULT_LLM)
        encoder = ClipImageEncoder(None, threads=1)
        line = json.dumps({
            "llm": resolve_llm(DEFAULT_LLM),
            "llm_weight_sum": float(model.get_input_embeddings().weight.double().sum()),
            "vocabulary": len(tokenizer),
            "encoder": encoder.ref.path,
            "encoder_dim": encoder.dim,
        })
        # One write a line: print() writes the text and its newline apart, which unbuffered
        # (PYTHONUNBUFFERED) are two writes to the shared pipe, and another racer's line can land between.
        sys.stdout.write(line + "\\n")
        sys.stdout.flush()

    if __name__ == "__main__":
        fork = multiprocessing.get_context("fork")  # nothing ran in torch yet: no thread pool to inherit
        processes = int(sys.argv[1])
        barrier = fork.Barrier(processes)
        racers = [fork.Process(target=racer, args=(barrier,)) for _ in range(processes)]
        for process in racers:
            process.start()
        for process in racers:
            process.join()
        codes = [process.exitcode for process in racers]
        print(json.dumps({"exit_codes": codes}), flush=True)
        sys.exit(0 if not any(codes) else 1)
    """
)


def race(home: Path, processes: int) -> tuple[list[dict], list[int], str]:
    """What each of ``processes`` racing processes loaded, their exit codes, and their log lines."""
    env = {**os.environ, "TIMEREFINE_HOME": str(home), "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, "-c", _RACE, str(processes)], env=env, capture_output=True, text=True, timeout=300
    )
    lines = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    codes = next(line["exit_codes"] for line in lines if "exit_codes" in line)
    return [line for line in lines if "llm" in line], codes, result.stderr


@pytest.mark.integration
def test_eight_processes_building_the_default_llm_and_encoder_at_once_all_load_them(tmp_path: Path) -> None:
    home = tmp_path / "home"
    loaded, codes, logs = race(home, 8)

    assert codes == [0] * 8, logs[-3000:]
    assert len(loaded) == 8
    llm_dir, encoder_dir = tiny_llm_dir(home=home), build_random_encoder(cache_dir=home / "encoders")
    assert {entry["llm"] for entry in loaded} == {str(llm_dir)}
    assert {entry["encoder"] for entry in loaded} == {str(encoder_dir)}
    assert len({entry["llm_weight_sum"] for entry in loaded}) == 1  # the same weights in every process
    assert {(entry["vocabulary"], entry["encoder_dim"]) for entry in loaded} == {
        (loaded[0]["vocabulary"], 768)
    }
    # Each entry was built exactly once, by one of the eight; the other seven waited and loaded it.
    assert logs.count(f"built cache entry {llm_dir}") == 1
    assert logs.count(f"built cache entry {encoder_dir}") == 1
    assert incomplete_reason(llm_dir) is None and incomplete_reason(encoder_dir) is None
    # Nothing half-built is left beside the entries; the locks live apart, in .locks/.
    for cache in (home / "llms", home / "encoders"):
        assert sorted(path.name for path in cache.iterdir() if path.name.startswith(".")) == [LOCKS]


def test_an_llm_entry_missing_its_config_or_weights_is_rebuilt_on_next_use(tmp_path: Path) -> None:
    directory = tiny_llm_dir(SMALL_SPEC, home=tmp_path)
    original = load_file(directory / "model.safetensors")

    (directory / "config.json").unlink()
    assert incomplete_reason(directory) == "config.json is missing"
    assert tiny_llm_dir(SMALL_SPEC, home=tmp_path) == directory
    assert (directory / "config.json").is_file()

    weights = directory / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])  # truncated by hand
    assert "model.safetensors has" in incomplete_reason(directory)
    tiny_llm_dir(SMALL_SPEC, home=tmp_path)
    rebuilt = load_file(weights)
    assert rebuilt.keys() == original.keys()
    assert all((rebuilt[name] == original[name]).all() for name in original)  # the same model again

    # The broken state once found in the wild: the tokenizer published, no config, no weights.
    for path in directory.iterdir():
        if not path.name.startswith("tokenizer"):
            path.unlink()
    assert incomplete_reason(directory) == f"no {MANIFEST}: its build never finished"
    model, tokenizer = load_llm(tiny_llm_dir(SMALL_SPEC, home=tmp_path), home=tmp_path)
    assert model.config.hidden_size == SMALL_SPEC.hidden_size and len(tokenizer) > 256
    assert not [path for path in directory.parent.iterdir() if path.name.startswith(".tiny-")]


def test_the_default_entries_are_rebuilt_when_their_weights_are_deleted(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("TIMEREFINE_HOME", str(tmp_path))
    llm_dir, encoder_dir = tiny_llm_dir(), build_random_encoder()
    (llm_dir / "model.safetensors").unlink()
    (encoder_dir / "model.safetensors").unlink()

    model, _ = load_llm(DEFAULT_LLM)
    encoder = ClipImageEncoder(DEFAULT_ENCODER, threads=1)
    assert model.config.hidden_size == TinyLlmSpec().hidden_size
    assert encoder.ref.path == str(encoder_dir) and (encoder_dir / "model.safetensors").is_file()
    assert incomplete_reason(llm_dir) is None and incomplete_reason(encoder_dir) is None


def test_a_build_that_cannot_be_loaded_back_is_never_published(tmp_path: Path) -> None:
    def tokenizer_only(staging: Path) -> None:
        (staging / "tokenizer.json").write_text("{}")

    target = tmp_path / "cache" / "entry"
    with pytest.raises(ValueError, match=r"no \*\.safetensors weights"):
        cached_build(target, tokenizer_only)
    assert not target.exists()
    assert sorted(path.name for path in target.parent.iterdir()) == [LOCKS]  # no staging folder left
