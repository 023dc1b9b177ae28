"""The TimeRefine model: frame features in, a refinement sequence and a regressed moment out.

Pieces (DESIGN.md section 1):

- a visual adapter: per-dimension standardisation of the frame features, then Linear(feature_dim -> LLM
  width). The statistics come from the training features (``fit_feature_stats``) and travel in the
  checkpoint. Random-weight CLIP embeddings are nearly identical from frame to frame, and unstandardised
  the model cannot even fit its training set; real CLIP features are unharmed by it;
- a causal LM from ``timerefine.llm.load_llm``, with the four TimeRefine tokens added, and LoRA through
  peft (``lora_r = 0`` trains the whole LLM, which the small default needs). In LoRA runs the new tokens'
  embedding rows (input and output) are trained through peft's ``trainable_token_indices``, so a checkpoint
  holds those rows and not the whole embedding matrix;
- the auxiliary head: Linear(hidden -> 2) + sigmoid on the last hidden state at the input position of every
  ``<offset>`` token, regressing the ground truth (start / D, end / D);
- optionally (``frame_loss_weight > 0``) a frame relevance head: Linear(hidden -> 1) on the last hidden state
  of every frame slot, trained with binary cross-entropy to say whether the frame lies inside the ground
  truth. In the question-first layout the frames see the question, and this dense signal (100 targets a
  query instead of a few digit tokens) is what makes a small LLM trained from scratch learn to ground; at
  inference it gives a fourth answer, ``frames``;
- optionally, frame time embeddings (``time_embedding``): each frame slot gets, added to its adapted
  features, the LLM's own embedding of the tokens its bin is written with (``digits``), or a learned vector
  per frame (``learned``), so that "when" is something the answer can copy.

``loss, parts = model(batch)`` gives cross-entropy on the answer tokens + ``l1_weight`` * mean L1 of the head
(a batch without ``<offset>`` adds exactly 0) + ``frame_loss_weight`` * the frames' mean BCE;
``model.generate(features, queries, durations)`` decodes greedily, inside the answer grammar unless asked
not to, and returns the prediction fields of DESIGN.md section 3, in seconds.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from peft import LoraConfig, PeftModel, get_peft_model
from torch import nn
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from timerefine.batching import IGNORE_INDEX, Batch, Sample, make_batch, special_token_id
from timerefine.grammar import AnswerGrammar
from timerefine.llm import DEFAULT_LLM, load_llm
from timerefine.timecodec import (
    NUM_BINS,
    OFFSET,
    PROMPT_LAYOUTS,
    SEG_END,
    SIGN_TOKENS,
    SPECIAL_TOKENS,
    TIME_TOKENS,
    VIDEO_FIRST,
)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
TIME_EMBEDDINGS = ("none", "digits", "learned")


@dataclass
class ModelConfig:
    """Everything needed to rebuild the model; stored in every checkpoint.

    The defaults are the paper's method and what checkpoints written before an option existed meant
    (video-first prompt, digits, no frame head, no time embedding); ``TrainConfig`` holds the defaults
    that train best. The paper's LoRA setting is ``lora_r=64`` with the default alpha 128, dropout 0.05 and
    all linear layers.
    """

    llm: str = DEFAULT_LLM  # what --llm takes: "tiny-llama", a GGUF file or folder, an HF directory, a hub id
    feature_dim: int = 768  # CLIP ViT-L/14 image_embeds
    num_frames: int = NUM_BINS  # frames per video, one per time bin
    lora_r: int = 0  # 0: train the whole LLM
    lora_alpha: int = 128
    lora_dropout: float = 0.05
    lora_target_modules: str | list[str] = "all-linear"
    l1_weight: float = 1.0  # lambda: weight of the head's mean L1 (0 with K = 1 is the direct baseline)
    max_new_tokens: int = 192  # K = 8 with a digit-per-token tokenizer needs about 170
    refine_steps: int | None = None  # K the model was trained to answer with: generation drafts such answers
    dtype: str = "float32"  # dtype of the LLM's weights; training on GPU keeps float32 and autocasts
    bf16_autocast: bool = True  # on CUDA, run forward and generate under bfloat16 autocast
    encoder: str | None = None  # the feature encoder (id + revision), recorded for the checkpoint
    video_decoder: str | None = None  # what decoded the features' videos ("decord" / "pyav"): predict's
    prompt_layout: str = VIDEO_FIRST  # or "question-first": the frames after the question
    frame_loss_weight: float = 0.0  # weight of the frame relevance BCE; 0: no frame head
    time_embedding: str = "none"  # "digits" or "learned": tell each frame slot its time
    time_tokens: bool = False  # write bins and signs as single tokens (<35>, <+>) instead of digits
    query_conditioning: bool = False  # add a projection of the prompt's mean token embedding to every frame

    def __post_init__(self) -> None:
        if self.dtype not in _DTYPES:
            raise ValueError(f"dtype must be one of {sorted(_DTYPES)}, got {self.dtype!r}")
        if self.prompt_layout not in PROMPT_LAYOUTS:
            raise ValueError(f"prompt_layout must be one of {PROMPT_LAYOUTS}, got {self.prompt_layout!r}")
        if self.time_embedding not in TIME_EMBEDDINGS:
            raise ValueError(f"time_embedding must be one of {TIME_EMBEDDINGS}, got {self.time_embedding!r}")
        if self.frame_loss_weight < 0:
            raise ValueError(f"frame_loss_weight must be >= 0, got {self.frame_loss_weight}")
        if self.lora_r < 0:
            raise ValueError(f"lora_r must be >= 0 (0 trains the whole LLM), got {self.lora_r}")
        self.llm = str(self.llm)

    @property
    def torch_dtype(self) -> torch.dtype:
        return _DTYPES[self.dtype]


def fit_feature_stats(features: Iterable[np.ndarray | torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-dimension mean and std over every frame of the given videos' features ((T, dim) arrays, or one
    (N, T, dim) array), accumulated in float64 so that millions of frames stream through in constant memory.

    Dimensions that never vary get std 1: standardising them would divide by zero for no benefit.
    """
    total = total_sq = None
    count = 0
    for item in features:
        # np.array copies: feature rows read from Arrow are read-only views, which torch refuses to wrap.
        is_tensor = isinstance(item, torch.Tensor)
        values = item.double() if is_tensor else torch.from_numpy(np.array(item, np.float64))
        frames = values.reshape(-1, values.shape[-1])
        total = frames.sum(0) if total is None else total + frames.sum(0)
        total_sq = frames.square().sum(0) if total_sq is None else total_sq + frames.square().sum(0)
        count += frames.shape[0]
    if not count:
        raise ValueError("fit_feature_stats needs at least one frame")
    mean = total / count
    std = (total_sq / count - mean.square()).clamp(min=0).sqrt()
    std = torch.where(std > 1e-6 * mean.abs().clamp(min=1.0), std, torch.ones_like(std))
    return mean.float(), std.float()


class VisualAdapter(nn.Module):
    """Standardise each feature dimension, then project frames into the LLM's embedding space.

    The projection starts at the scale of the LLM's token embeddings (``output_rms``), so that frames neither
    drown the text nor vanish in it whatever the LLM.
    """

    def __init__(self, feature_dim: int, hidden_size: int, output_rms: float) -> None:
        super().__init__()
        self.register_buffer("feature_mean", torch.zeros(feature_dim))
        self.register_buffer("feature_std", torch.ones(feature_dim))
        self.proj = nn.Linear(feature_dim, hidden_size)
        nn.init.normal_(self.proj.weight, std=output_rms / math.sqrt(feature_dim))
        nn.init.zeros_(self.proj.bias)

    def set_feature_stats(self, mean: torch.Tensor, std: torch.Tensor) -> None:
        if mean.shape != self.feature_mean.shape or std.shape != self.feature_std.shape:
            raise ValueError(
                f"feature statistics of shape {tuple(mean.shape)} / {tuple(std.shape)} do not match the "
                f"adapter's feature_dim {self.feature_mean.shape[0]}"
            )
        if (std <= 0).any():
            raise ValueError("feature std must be positive in every dimension")
        self.feature_mean.copy_(mean)
        self.feature_std.copy_(std)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.proj((features.float() - self.feature_mean) / self.feature_std)


class TimeRefineModel(nn.Module):
    """Adapter + causal LM (+ LoRA) + auxiliary head (+ frame head). Build it with ``from_config`` or
    ``load_checkpoint``."""

    def __init__(self, config: ModelConfig, llm: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> None:
        super().__init__()
        self.config = config
        self.tokenizer = tokenizer
        token_ids = _add_time_tokens(llm, tokenizer, config.time_tokens)
        embeddings = llm.get_input_embeddings().weight
        hidden_size = embeddings.shape[1]
        output_rms = embeddings.detach().float().square().mean().sqrt().item()
        self.adapter = VisualAdapter(config.feature_dim, hidden_size, output_rms)
        self.head = nn.Linear(hidden_size, 2)
        # Modules that only some configurations have stay absent otherwise, so that checkpoints written
        # before they existed load unchanged.
        self.frame_head = nn.Linear(hidden_size, 1) if config.frame_loss_weight > 0 else None
        # Instruction-aware frames (as InstructBLIP's Q-Former is): each frame slot also gets the question, so
        # that matching it against the frame is a computation at that position, not one that attention must
        # first learn to route. Zero-initialised: training starts from the plain model.
        self.query_context = nn.Linear(hidden_size, hidden_size) if config.query_conditioning else None
        if self.query_context is not None:
            nn.init.zeros_(self.query_context.weight)
            nn.init.zeros_(self.query_context.bias)
        self.frame_time: FrameTimeEmbedding | None = None
        if config.time_embedding != "none":
            self.frame_time = FrameTimeEmbedding(config, tokenizer, hidden_size, output_rms)
        self.llm = _with_lora(llm, config, token_ids) if config.lora_r > 0 else llm
        self.seg_end_id = special_token_id(tokenizer, SEG_END)
        self.offset_id = special_token_id(tokenizer, OFFSET)
        self._answer_grammar: tuple[int, AnswerGrammar | None] | None = None

    @classmethod
    def from_config(cls, config: ModelConfig, home: Path | None = None) -> TimeRefineModel:
        llm, tokenizer = load_llm(config.llm, dtype=config.torch_dtype, home=home)
        return cls(config, llm, tokenizer)

    @property
    def device(self) -> torch.device:
        return self.head.weight.device

    @property
    def full_finetune(self) -> bool:
        return self.config.lora_r == 0

    @property
    def causal_lm(self) -> PreTrainedModel:
        """The transformers model, with LoRA layers in place in LoRA runs."""
        return self.llm.get_base_model() if isinstance(self.llm, PeftModel) else self.llm

    def set_feature_stats(self, mean: torch.Tensor, std: torch.Tensor) -> None:
        """Standardise features with these statistics (from ``fit_feature_stats`` on training features)."""
        self.adapter.set_feature_stats(mean.to(self.device), std.to(self.device))

    def make_batch(self, samples: Sequence[Sample], padding_side: str = "right") -> Batch:
        return make_batch(
            self.tokenizer,
            samples,
            num_frames=self.config.num_frames,
            padding_side=padding_side,
            prompt_layout=self.config.prompt_layout,
        )

    def answer_grammar(self) -> AnswerGrammar | None:
        """The token grammar of this model's answers (``timerefine.grammar``), or None when the checkpoint
        does not say how many steps it answers with or its tokenizer spells bins irregularly."""
        if self.config.refine_steps is None:
            return None
        if self._answer_grammar is None or self._answer_grammar[0] != self.config.refine_steps:
            steps = self.config.refine_steps
            self._answer_grammar = (steps, AnswerGrammar.for_tokenizer(self.tokenizer, steps))
        return self._answer_grammar[1]

    # -----------------------------------------------------------------------------------------------------
    # Training

    def forward(self, batch: Batch, reduction: str = "mean") -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The training loss and its parts (detached): ``loss``, ``ce``, ``l1``, ``frame``, ``num_offsets``.

        Cross-entropy is the mean over the batch's answer tokens; ``l1`` is the mean absolute error over
        every coordinate of every head prediction, and exactly 0 (with zero gradients, so DDP sees every
        parameter used) when the batch holds no ``<offset>``; ``frame`` is the frame head's mean binary
        cross-entropy over every frame (0 without a frame head).

        ``reduction="sample"`` gives (B,) tensors instead: each sample's mean over its own answer tokens, its
        own head predictions and its own frames. A trainer that averages these weights every sample equally,
        however its batches are cut, which keeps the optimisation independent of the worker count.
        """
        if reduction not in ("mean", "sample"):
            raise ValueError(f"reduction must be 'mean' or 'sample', got {reduction!r}")
        predicts_answer = batch.labels[:, 1:] != IGNORE_INDEX  # logits at i predict the token at i + 1
        if not predicts_answer.any():
            raise ValueError("the batch has no answer tokens to learn from: give every Sample a target")
        with self.autocast():
            hidden = self._run_decoder(self.embed(batch), batch.attention_mask, batch.position_ids)
            logits = self.causal_lm.get_output_embeddings()(hidden[:, :-1][predicts_answer])
            fractions = self.head_fractions(hidden[batch.offset_mask])
            frame_logits = self.frame_logits(hidden, batch.video_mask)
        token_ce = F.cross_entropy(logits.float(), batch.labels[:, 1:][predicts_answer], reduction="none")
        targets = batch.window_fractions[:, None, :].expand(-1, batch.offset_mask.shape[1], -1)
        errors = (fractions - targets[batch.offset_mask]).abs()
        frame_bce = torch.zeros(len(batch), device=hidden.device)
        if frame_logits is not None:
            frame_targets = frame_relevance_targets(batch.window_fractions, self.config.num_frames)
            frame_bce = F.binary_cross_entropy_with_logits(
                frame_logits, frame_targets, reduction="none"
            ).mean(dim=1)
        if reduction == "sample":
            ce = _row_means(token_ce, predicts_answer)
            l1 = _row_means(errors.mean(dim=-1), batch.offset_mask)
            frame = frame_bce
        else:
            ce = token_ce.mean()
            l1 = errors.sum() / max(errors.numel(), 1)
            frame = frame_bce.mean()
        loss = ce + self.config.l1_weight * l1 + self.config.frame_loss_weight * frame
        parts = {
            "loss": loss.detach(),
            "ce": ce.detach(),
            "l1": l1.detach(),
            "frame": frame.detach(),
            "num_offsets": torch.tensor(fractions.shape[0]),
        }
        return loss, parts

    # -----------------------------------------------------------------------------------------------------
    # Inference

    def generate(
        self,
        features: Sequence[np.ndarray | torch.Tensor] | torch.Tensor,
        queries: Sequence[str],
        durations: Sequence[float],
        **options: Any,
    ) -> list[dict[str, Any]]:
        """Ground each query in its video: ``timerefine.generation.generate`` (its options: constrained,
        max_draft_tokens, max_new_tokens)."""
        from timerefine.generation import generate

        return generate(self, features, queries, durations, **options)

    def stop_ids(self) -> set[int]:
        # <seg_end> ends an answer; an EOS first means the answer will not parse, so decoding on is wasted.
        eos = self.tokenizer.eos_token_id
        return {self.seg_end_id} | ({eos} if eos is not None else set())

    # -----------------------------------------------------------------------------------------------------
    # Shared pieces

    def embed(self, batch: Batch) -> torch.Tensor:
        """Token embeddings with the adapted frame features (plus their time embeddings) written into the
        video slots, in frame order."""
        embed_tokens = self.causal_lm.get_input_embeddings()
        embeddings = embed_tokens(batch.input_ids)
        frames = self.adapter(batch.features)
        if self.frame_time is not None:
            frames = frames + self.frame_time(embed_tokens)
        if self.query_context is not None:
            mask = batch.prompt_mask[..., None].to(embeddings.dtype)
            question = (embeddings * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1)
            frames = frames + self.query_context(question.float())[:, None, :]
        return embeddings.masked_scatter(batch.video_mask[..., None], frames.to(embeddings.dtype))

    def _run_decoder(
        self, embeddings: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor
    ) -> torch.Tensor:
        out = self.causal_lm.get_decoder()(
            inputs_embeds=embeddings,
            attention_mask=attention_mask,
            position_ids=position_ids,
            use_cache=False,
        )
        return out.last_hidden_state

    def head_fractions(self, hidden: torch.Tensor) -> torch.Tensor:
        """(N, 2) float32 fractions of the duration from (N, hidden) last hidden states."""
        return torch.sigmoid(self.head(hidden.to(self.head.weight.dtype)).float())

    def frame_logits(self, hidden: torch.Tensor, video_mask: torch.Tensor) -> torch.Tensor | None:
        """(B, num_frames) float32 relevance logits from the frame slots' last hidden states, or None
        without a frame head."""
        if self.frame_head is None:
            return None
        frames = hidden[video_mask].reshape(video_mask.shape[0], self.config.num_frames, -1)
        return self.frame_head(frames.to(self.frame_head.weight.dtype)).squeeze(-1).float()

    def autocast(self) -> AbstractContextManager:
        if self.device.type == "cuda" and self.config.bf16_autocast:
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return nullcontext()

    # -----------------------------------------------------------------------------------------------------
    # Checkpoint state

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """The tensors a checkpoint's ``weights.safetensors`` holds: adapter (with its feature statistics),
        head, and the frame head and time embedding where the model has them, plus in LoRA runs the LoRA
        matrices and the new tokens' embedding rows. In full fine-tuning the LLM is saved whole, with
        ``save_pretrained``, beside it."""
        state = {f"adapter.{k}": v for k, v in self.adapter.state_dict().items()}
        state |= {f"head.{k}": v for k, v in self.head.state_dict().items()}
        for name in ("frame_head", "frame_time", "query_context"):
            module = getattr(self, name)
            if module is not None:
                state |= {f"{name}.{k}": v for k, v in module.state_dict().items()}
        if not self.full_finetune:
            state |= {f"llm.{k}": p for k, p in self.llm.named_parameters() if p.requires_grad}
        return {k: v.detach().cpu().contiguous() for k, v in state.items()}

    def load_trainable_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        expected = set(self.trainable_state_dict())
        missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
        if missing or unexpected:
            raise ValueError(
                f"checkpoint weights do not fit this model: missing {missing[:5]}, unexpected "
                f"{unexpected[:5]} ({len(missing)} / {len(unexpected)} in all); was it saved with another "
                "LoRA setting or LLM?"
            )
        self.load_state_dict(state, strict=False)


class FrameTimeEmbedding(nn.Module):
    """What each frame slot is told about its time, added to its adapted features.

    ``digits``: the LLM's own input embedding of the tokens its bin is written with in answers: the time
    token ``<35>`` when the model has time tokens, else the tens digit's embedding plus the units digit's
    through a learned matrix (initialised to a random rotation, so that "35" and "53" differ from the
    start). Copying a frame's time into the answer then needs no new vocabulary. ``learned``: a free vector
    per frame.
    """

    def __init__(
        self, config: ModelConfig, tokenizer: PreTrainedTokenizerBase, hidden_size: int, output_rms: float
    ) -> None:
        super().__init__()
        self.kind = config.time_embedding
        frames = config.num_frames
        bins = [min(NUM_BINS - 1, (2 * i + 1) * NUM_BINS // (2 * frames)) for i in range(frames)]
        self.learned = self.units_mix = None
        if self.kind == "learned":
            self.learned = nn.Parameter(torch.randn(frames, hidden_size) * output_rms)
            return
        grammar = AnswerGrammar.for_tokenizer(tokenizer, 1)
        if grammar is None:
            raise ValueError(
                "time_embedding 'digits' needs a tokenizer that writes every bin with the same tokens "
                "(digits one by one, or time tokens); use 'learned' with this LLM"
            )
        slots = {
            slot.kind: pos
            for pos, slot in reversed(list(enumerate(grammar.template)))
            if not isinstance(slot, int)
        }
        if "bin" in slots:
            ids = [[grammar.allowed(slots["bin"])[b]] for b in bins]
        else:
            tens, units = grammar.allowed(slots["tens"]), grammar.allowed(slots["units"])
            ids = [[tens[b // 10], units[b % 10]] for b in bins]
            # A random rotation, not the identity: with the identity "35" and "53" would start out equal.
            self.units_mix = nn.Linear(hidden_size, hidden_size, bias=False)
            nn.init.orthogonal_(self.units_mix.weight)
        self.register_buffer("token_ids", torch.tensor(ids), persistent=False)

    def forward(self, embed_tokens: nn.Module) -> torch.Tensor:
        """(num_frames, hidden) time embeddings, through the LLM's current input embeddings."""
        if self.learned is not None:
            return self.learned
        embedded = embed_tokens(self.token_ids).float()
        if self.units_mix is None:
            return embedded[:, 0]
        return embedded[:, 0] + self.units_mix(embedded[:, 1])


def frame_relevance_targets(window_fractions: torch.Tensor, num_frames: int) -> torch.Tensor:
    """(B, num_frames) 1.0 where frame i's centre, (i + 0.5) / num_frames of the video, lies in the window
    (fractions of the duration), else 0.0. A window too short to hold a centre marks the frame nearest to
    its middle, so that every query has a frame to find."""
    centres = (torch.arange(num_frames, device=window_fractions.device) + 0.5) / num_frames
    start, end = window_fractions[:, :1], window_fractions[:, 1:]
    inside = (centres >= start) & (centres <= end)
    nearest = ((start + end) / 2 * num_frames).long().clamp(0, num_frames - 1)
    empty = ~inside.any(dim=1, keepdim=True)
    inside |= empty & (torch.arange(num_frames, device=window_fractions.device) == nearest)
    return inside.float()


def _add_time_tokens(
    llm: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, time_tokens: bool = False
) -> list[int]:
    """Register the four TimeRefine tokens (and, with ``time_tokens``, a token per bin and per sign) as
    special tokens (a no-op when present) and make room for them in the embeddings; returns their ids."""
    tokens = list(SPECIAL_TOKENS) + (list(TIME_TOKENS) + list(SIGN_TOKENS) if time_tokens else [])
    tokenizer.add_special_tokens({"extra_special_tokens": tokens}, replace_extra_special_tokens=False)
    if len(tokenizer) > llm.get_input_embeddings().num_embeddings:
        llm.resize_token_embeddings(len(tokenizer))
    return [special_token_id(tokenizer, token) for token in tokens]


def _with_lora(llm: PreTrainedModel, config: ModelConfig, token_ids: list[int]) -> PeftModel:
    """LoRA on ``config.lora_target_modules``, plus trainable rows for the new tokens: in the input
    embeddings, and in the output layer too when it is not tied to them (peft ties the rows otherwise)."""
    embeddings, output = llm.get_input_embeddings(), llm.get_output_embeddings()
    if output is None or output.weight is embeddings.weight:
        trainable_tokens: list[int] | dict[str, list[int]] = token_ids
    else:
        names = {id(module): name.rsplit(".", 1)[-1] for name, module in llm.named_modules()}
        trainable_tokens = {names[id(embeddings)]: token_ids, names[id(output)]: token_ids}
    lora = LoraConfig(
        r=config.lora_r,
        lora_alpha=config.lora_alpha,
        lora_dropout=config.lora_dropout,
        target_modules=config.lora_target_modules,
        trainable_token_indices=trainable_tokens,
    )
    return get_peft_model(llm, lora)


def _row_means(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per-row means of ``values``, given flat in row-major order of ``mask``'s True entries; 0 for a row
    without any."""
    rows = mask.nonzero()[:, 0]
    sums = values.new_zeros(mask.shape[0]).index_add(0, rows, values)
    return sums / mask.sum(dim=1).clamp(min=1)
