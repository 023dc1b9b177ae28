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
  ``<offset>`` token, regressing the ground truth (start / D, end / D).

``loss, parts = model(batch)`` gives cross-entropy on the answer tokens + ``l1_weight`` * mean L1 of the head
(a batch without ``<offset>`` adds exactly 0); ``model.generate(features, queries, durations)`` decodes
greedily and returns the prediction fields of DESIGN.md section 3, in seconds.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from timerefine.batching import IGNORE_INDEX, Batch, Sample, make_batch, special_token_id
from timerefine.drafting import DEFAULT_DRAFT_TOKENS, AnswerDrafter
from timerefine.llm import DEFAULT_LLM, load_llm
from timerefine.timecodec import NUM_BINS, OFFSET, SEG_END, SPECIAL_TOKENS, parse_answer

CHECKPOINT_FORMAT = 1
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class ModelConfig:
    """Everything needed to rebuild the model; stored in every checkpoint.

    The defaults suit the small default LLM on a CPU (full fine-tuning). The paper's setting is
    ``lora_r=64`` with the default alpha 128, dropout 0.05 and all linear layers.
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

    def __post_init__(self) -> None:
        if self.dtype not in _DTYPES:
            raise ValueError(f"dtype must be one of {sorted(_DTYPES)}, got {self.dtype!r}")
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
    """Adapter + causal LM (+ LoRA) + auxiliary head. Build it with ``from_config`` or ``load_checkpoint``."""

    def __init__(self, config: ModelConfig, llm: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> None:
        super().__init__()
        self.config = config
        self.tokenizer = tokenizer
        token_ids = _add_time_tokens(llm, tokenizer)
        embeddings = llm.get_input_embeddings().weight
        hidden_size = embeddings.shape[1]
        output_rms = embeddings.detach().float().square().mean().sqrt().item()
        self.adapter = VisualAdapter(config.feature_dim, hidden_size, output_rms)
        self.head = nn.Linear(hidden_size, 2)
        self.llm = _with_lora(llm, config, token_ids) if config.lora_r > 0 else llm
        self.seg_end_id = special_token_id(tokenizer, SEG_END)
        self.offset_id = special_token_id(tokenizer, OFFSET)
        self._answer_drafter: tuple[int, AnswerDrafter | None] | None = None

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
            self.tokenizer, samples, num_frames=self.config.num_frames, padding_side=padding_side
        )

    # -----------------------------------------------------------------------------------------------------
    # Training

    def forward(self, batch: Batch, reduction: str = "mean") -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The training loss and its parts (detached): ``loss``, ``ce``, ``l1``, ``num_offsets``.

        Cross-entropy is the mean over the batch's answer tokens; ``l1`` is the mean absolute error over
        every coordinate of every head prediction, and exactly 0 (with zero gradients, so DDP sees every
        parameter used) when the batch holds no ``<offset>``.

        ``reduction="sample"`` gives (B,) tensors instead: each sample's mean over its own answer tokens and
        its own head predictions. A trainer that averages these weights every sample equally, however its
        batches are cut, which keeps the optimisation independent of the worker count.
        """
        if reduction not in ("mean", "sample"):
            raise ValueError(f"reduction must be 'mean' or 'sample', got {reduction!r}")
        predicts_answer = batch.labels[:, 1:] != IGNORE_INDEX  # logits at i predict the token at i + 1
        if not predicts_answer.any():
            raise ValueError("the batch has no answer tokens to learn from: give every Sample a target")
        with self._autocast():
            hidden = self._run_decoder(self._embed(batch), batch.attention_mask, batch.position_ids)
            logits = self.causal_lm.get_output_embeddings()(hidden[:, :-1][predicts_answer])
            fractions = self._head_fractions(hidden[batch.offset_mask])
        token_ce = F.cross_entropy(logits.float(), batch.labels[:, 1:][predicts_answer], reduction="none")
        targets = batch.window_fractions[:, None, :].expand(-1, batch.offset_mask.shape[1], -1)
        errors = (fractions - targets[batch.offset_mask]).abs()
        if reduction == "sample":
            ce = _row_means(token_ce, predicts_answer)
            l1 = _row_means(errors.mean(dim=-1), batch.offset_mask)
        else:
            ce = token_ce.mean()
            l1 = errors.sum() / max(errors.numel(), 1)
        loss = ce + self.config.l1_weight * l1
        parts = {
            "loss": loss.detach(),
            "ce": ce.detach(),
            "l1": l1.detach(),
            "num_offsets": torch.tensor(fractions.shape[0]),
        }
        return loss, parts

    # -----------------------------------------------------------------------------------------------------
    # Inference

    @torch.no_grad()
    def generate(
        self,
        features: Sequence[np.ndarray | torch.Tensor] | torch.Tensor,
        queries: Sequence[str],
        durations: Sequence[float],
        *,
        max_new_tokens: int | None = None,
        max_draft_tokens: int = DEFAULT_DRAFT_TOKENS,
    ) -> list[dict[str, Any]]:
        """Ground each query in its video by greedy decoding; deterministic, in eval mode.

        Per query: ``text`` (the answer up to and including ``<seg_end>``), ``parsed`` (whether it follows
        the grammar), ``steps`` (every complete step's refined segment), ``pred`` (the text's answer),
        ``pred_head`` (the head at the last generated ``<offset>``) and ``pred_fused`` (the mean of the two;
        when only one exists, fused is that one, so a query counts as answered in fused mode whenever either
        part answered), each [start, end] in seconds or None. A model trained with ``l1_weight = 0`` has no
        head answer and no fused one: its head never learnt anything.

        ``max_draft_tokens``: how many drafted tokens (``timerefine.drafting``) one forward pass may verify;
        0 decodes one token per pass. It changes the cost, not the answer.
        """
        samples = [Sample(f, q, float(d)) for f, q, d in zip(features, queries, durations, strict=True)]
        batch = self.make_batch(samples, padding_side="left").to(self.device)
        was_training = self.training
        self.eval()
        try:
            rows, head_fractions = self._greedy_decode(
                batch, max_new_tokens or self.config.max_new_tokens, max_draft_tokens
            )
        finally:
            self.train(was_training)
        predictions = []
        for row, fractions, duration in zip(rows, head_fractions.tolist(), durations, strict=True):
            text = self.tokenizer.decode(row, skip_special_tokens=False)
            head = fractions if self.config.l1_weight > 0 else None
            predictions.append(_prediction(text, head, float(duration)))
        return predictions

    def _greedy_decode(
        self, batch: Batch, max_new_tokens: int, max_draft_tokens: int
    ) -> tuple[list[list[int]], torch.Tensor]:
        """Each row's generated ids (up to its stop token) and the head's fractions at its last generated
        ``<offset>`` (NaN when none), decoding from embeddings with the KV cache.

        Every pass feeds each unfinished row its last generated token followed by its draft; the logits at
        those positions give the model's own choice after each, so the draft's longest prefix that matches
        them is accepted, with the model's token after it. Rows advance independently: what a row rejects
        stays in the cache but is masked out of attention, and each row keeps its own position ids.
        """
        decoder = self.causal_lm.get_decoder()
        lm_head = self.causal_lm.get_output_embeddings()
        embed_tokens = self.causal_lm.get_input_embeddings()
        drafter = self._drafter() if max_draft_tokens > 0 else None
        stop_ids = self._stop_ids()
        size, pad_id = len(batch), self.tokenizer.pad_token_id
        generated: list[list[int]] = [[] for _ in range(size)]
        finished = [False] * size
        head_fractions = torch.full((size, 2), float("nan"), device=self.device)

        def drafts() -> list[list[int]]:
            budgets = (min(max_draft_tokens, max_new_tokens - len(row) - 1) for row in generated)
            return [
                drafter.draft(row, budget) if drafter is not None and not done else []
                for row, done, budget in zip(generated, finished, budgets, strict=True)
            ]

        # First pass: the prompt, then the draft of the answer's opening (the same for every row). Column 0
        # of the verified span is the prompt's last token, not a generated one.
        draft = drafts()
        opening = torch.tensor(draft, dtype=torch.long, device=self.device).reshape(size, -1)
        fed_ids = torch.cat([batch.input_ids[:, -1:], opening], dim=1)
        next_position = batch.position_ids[:, -1].clone()  # the position of fed_ids[:, 0]
        drafted = next_position[:, None] + 1 + torch.arange(opening.shape[1], device=self.device)
        attention_mask = torch.cat([batch.attention_mask, torch.ones_like(opening)], dim=1)
        with self._autocast():
            out = decoder(
                inputs_embeds=torch.cat([self._embed(batch), embed_tokens(opening)], dim=1),
                attention_mask=attention_mask,
                position_ids=torch.cat([batch.position_ids, drafted], dim=1),
                use_cache=True,
            )
            first_generated_column = 1
            while True:
                span = fed_ids.shape[1]
                hidden = out.last_hidden_state[:, -span:]
                choices = lm_head(hidden).argmax(dim=-1).tolist()  # choices[r][j]: the token after column j
                is_offset = (fed_ids == self.offset_id).tolist()
                kept = [span] * size  # columns each row keeps; a finished row's were masked when fed
                head_rows, head_columns = [], []
                for r in range(size):
                    if finished[r]:
                        continue
                    accepted = 0
                    while accepted < len(draft[r]) and draft[r][accepted] == choices[r][accepted]:
                        accepted += 1
                    kept[r] = accepted + 1
                    offsets = [j for j in range(first_generated_column, accepted + 1) if is_offset[r][j]]
                    if offsets:
                        head_rows.append(r)
                        head_columns.append(offsets[-1])
                    for token in [*draft[r][:accepted], choices[r][accepted]]:
                        generated[r].append(token)
                        if token in stop_ids or len(generated[r]) >= max_new_tokens:
                            finished[r] = True
                            break
                # One tensor operation each (not one a row): on a GPU every small operation is a launch.
                kept_columns = torch.tensor(kept, device=self.device)
                rejected = torch.arange(span, device=self.device) >= kept_columns[:, None]
                attention_mask[:, -span:] = attention_mask[:, -span:].masked_fill(rejected, 0)
                next_position += kept_columns  # a finished row's position no longer matters
                if head_rows:  # the head reads only the accepted <offset> columns that are a row's last
                    head_fractions[head_rows] = self._head_fractions(hidden[head_rows, head_columns])
                if all(finished):
                    break
                draft, first_generated_column = drafts(), 0
                width = 1 + max(len(d) for d in draft)
                fed, valid = [], []
                for row, row_draft, done in zip(generated, draft, finished, strict=True):
                    tokens = [] if done else [row[-1], *row_draft]
                    fed.append(tokens + [pad_id] * (width - len(tokens)))
                    valid.append([1] * len(tokens) + [0] * (width - len(tokens)))
                fed_ids = torch.tensor(fed, device=self.device)
                attention_mask = torch.cat([attention_mask, attention_mask.new_tensor(valid)], dim=1)
                out = decoder(
                    inputs_embeds=embed_tokens(fed_ids),
                    attention_mask=attention_mask,
                    position_ids=next_position[:, None] + torch.arange(width, device=self.device),
                    cache=out.cache,
                    use_cache=True,
                )
        return generated, head_fractions

    def _drafter(self) -> AnswerDrafter | None:
        if self.config.refine_steps is None:
            return None
        if self._answer_drafter is None or self._answer_drafter[0] != self.config.refine_steps:
            steps = self.config.refine_steps
            self._answer_drafter = (steps, AnswerDrafter.for_tokenizer(self.tokenizer, steps))
        return self._answer_drafter[1]

    def _stop_ids(self) -> set[int]:
        # <seg_end> ends an answer; an EOS first means the answer will not parse, so decoding on is wasted.
        eos = self.tokenizer.eos_token_id
        return {self.seg_end_id} | ({eos} if eos is not None else set())

    # -----------------------------------------------------------------------------------------------------
    # Shared pieces

    def _embed(self, batch: Batch) -> torch.Tensor:
        """Token embeddings with the adapted frame features written into the video slots, in frame order."""
        embeddings = self.causal_lm.get_input_embeddings()(batch.input_ids)
        frames = self.adapter(batch.features).to(embeddings.dtype)
        return embeddings.masked_scatter(batch.video_mask[..., None], frames)

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

    def _head_fractions(self, hidden: torch.Tensor) -> torch.Tensor:
        """(N, 2) float32 fractions of the duration from (N, hidden) last hidden states."""
        return torch.sigmoid(self.head(hidden.to(self.head.weight.dtype)).float())

    def _autocast(self) -> AbstractContextManager:
        if self.device.type == "cuda" and self.config.bf16_autocast:
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return nullcontext()

    # -----------------------------------------------------------------------------------------------------
    # Checkpoint state

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """The tensors a checkpoint's ``weights.safetensors`` holds: adapter (with its feature statistics) and
        head, plus in LoRA runs the LoRA matrices and the new tokens' embedding rows. In full fine-tuning the
        LLM is saved whole, with ``save_pretrained``, beside it."""
        state = {f"adapter.{k}": v for k, v in self.adapter.state_dict().items()}
        state |= {f"head.{k}": v for k, v in self.head.state_dict().items()}
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


def _add_time_tokens(llm: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """Register the four TimeRefine tokens as special tokens (a no-op when present) and make room for them
    in the embeddings; returns their ids."""
    tokenizer.add_special_tokens(
        {"extra_special_tokens": list(SPECIAL_TOKENS)}, replace_extra_special_tokens=False
    )
    if len(tokenizer) > llm.get_input_embeddings().num_embeddings:
        llm.resize_token_embeddings(len(tokenizer))
    return [special_token_id(tokenizer, token) for token in SPECIAL_TOKENS]


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


def _prediction(text: str, head_fractions: list[float] | None, duration: float) -> dict[str, Any]:
    """The prediction fields; ``head_fractions`` is None for a model without a trained head, which then has
    neither a head answer nor a fused one (not even the text answer standing in for fused)."""
    parsed = parse_answer(text)
    text_segment = parsed.segment_s(duration)
    head_segment = fused = None
    if head_fractions is not None and not any(math.isnan(f) for f in head_fractions):
        head_segment = tuple(sorted(min(max(f, 0.0), 1.0) * duration for f in head_fractions))
    if text_segment is not None and head_segment is not None:
        fused = tuple((a + b) / 2 for a, b in zip(text_segment, head_segment, strict=True))
    elif head_fractions is not None:
        fused = text_segment or head_segment
    return {
        "text": text,
        "parsed": parsed.ok,
        "steps": [list(segment) for segment in parsed.trace_s(duration)],
        "pred": _as_list(text_segment),
        "pred_head": _as_list(head_segment),
        "pred_fused": _as_list(fused),
    }


def _as_list(segment: tuple[float, ...] | None) -> list[float] | None:
    return None if segment is None else list(segment)


# ---------------------------------------------------------------------------------------------------------
# Checkpoints


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
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    save_file(model.trainable_state_dict(), directory / "weights.safetensors")
    model.tokenizer.save_pretrained(directory / "tokenizer")
    if model.full_finetune:
        model.causal_lm.save_pretrained(directory / "llm")
    meta = _CheckpointMeta(
        model=asdict(model.config),
        full_llm=model.full_finetune,
        base_llm=model.config.llm,
        encoder=model.config.encoder,
    )
    (directory / "timerefine.json").write_text(json.dumps(asdict(meta), indent=2) + "\n")
    return directory


def load_checkpoint(
    directory: str | Path, *, device: torch.device | str = "cpu", home: Path | None = None
) -> TimeRefineModel:
    """The model ``save_checkpoint`` wrote, in eval mode (call ``.train()`` to resume training). LoRA
    checkpoints rebuild their base LLM from ``config.llm``, which must still resolve to the same weights (a
    hub id, a path, a GGUF or the default)."""
    directory = Path(directory)
    meta_path = directory / "timerefine.json"
    if not meta_path.is_file():
        raise FileNotFoundError(f"{meta_path} not found: {directory} is not a timerefine checkpoint")
    meta = _CheckpointMeta(**json.loads(meta_path.read_text()))
    if meta.format != CHECKPOINT_FORMAT:
        raise ValueError(
            f"{meta_path}: checkpoint format {meta.format}, this version reads {CHECKPOINT_FORMAT}"
        )
    config = ModelConfig(**meta.model)
    tokenizer = AutoTokenizer.from_pretrained(directory / "tokenizer")
    if meta.full_llm:
        llm = AutoModelForCausalLM.from_pretrained(directory / "llm", dtype=config.torch_dtype)
    else:
        llm, _ = load_llm(config.llm, dtype=config.torch_dtype, home=home)
    model = TimeRefineModel(config, llm, tokenizer)
    model.load_trainable_state_dict(load_file(directory / "weights.safetensors"))
    return model.to(device).eval()
