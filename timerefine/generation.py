"""Greedy decoding of grounding answers: drafted, inside the answer grammar, with every answer mode.

``generate(model, features, queries, durations)`` (also ``TimeRefineModel.generate``) decodes a batch of
queries with the KV cache and turns each answer into the prediction fields of DESIGN.md section 3:

- the text answer, read by ``timecodec.parse_answer``, and its refinement trace;
- the auxiliary head's answer at the last generated ``<offset>``, and the fused mean of the two;
- the frame relevance head's answer, ``frames_segment`` of the frame slots' logits from the prompt pass.

Decoding is constrained to the answer grammar by default (``timerefine.grammar``): every answer parses,
and ``off_grammar`` tells where the model's own choice would have left it. Drafted tokens let one forward
pass confirm several answer tokens; they change the cost, never the answer.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from timerefine.batching import Batch, Sample
from timerefine.grammar import DEFAULT_DRAFT_TOKENS, AnswerGrammar
from timerefine.timecodec import parse_answer

if TYPE_CHECKING:
    from timerefine.model import TimeRefineModel


@torch.no_grad()
def generate(
    model: TimeRefineModel,
    features: Sequence[np.ndarray | torch.Tensor] | torch.Tensor,
    queries: Sequence[str],
    durations: Sequence[float],
    *,
    max_new_tokens: int | None = None,
    max_draft_tokens: int = DEFAULT_DRAFT_TOKENS,
    constrained: bool = True,
) -> list[dict[str, Any]]:
    """Ground each query in its video by greedy decoding; deterministic, in eval mode.

    Per query: ``text`` (the answer up to and including ``<seg_end>``), ``parsed`` (whether it follows
    the grammar), ``steps`` (every complete step's refined segment), ``pred`` (the text's answer),
    ``pred_head`` (the head at the last generated ``<offset>``), ``pred_fused`` (the mean of the two;
    when only one exists, fused is that one, so a query counts as answered in fused mode whenever either
    part answered), ``pred_frames`` (the frame head's segment, ``frames_segment``), each [start, end] in
    seconds or None. A model trained with ``l1_weight = 0`` has no head answer and no fused one (its
    head never learnt anything); one without a frame head has no frames answer.

    ``constrained`` (the default) takes at every position the model's best token among those the answer
    grammar allows there (``AnswerGrammar.allowed``), so every answer parses; ``off_grammar`` then says
    whether the model's unconstrained choice left the grammar somewhere on the way, which is where free
    decoding (``constrained=False``, the paper's) could have produced an answer that does not parse.
    A model whose tokenizer has no fixed answer layout decodes free.

    ``max_draft_tokens``: how many drafted tokens (``timerefine.grammar``) one forward pass may verify;
    0 decodes one token per pass. It changes the cost, not the answer.
    """
    samples = [Sample(f, q, float(d)) for f, q, d in zip(features, queries, durations, strict=True)]
    batch = model.make_batch(samples, padding_side="left").to(model.device)
    was_training = model.training
    model.eval()
    try:
        decoded = _greedy_decode(
            model, batch, max_new_tokens or model.config.max_new_tokens, max_draft_tokens, constrained
        )
    finally:
        model.train(was_training)
    predictions = []
    for index, duration in enumerate(durations):
        text = model.tokenizer.decode(decoded.tokens[index], skip_special_tokens=False)
        head = decoded.head_fractions[index].tolist() if model.config.l1_weight > 0 else None
        frames = None if decoded.frame_logits is None else decoded.frame_logits[index]
        prediction = _prediction(text, head, frames, float(duration))
        if decoded.off_grammar is not None:
            prediction["off_grammar"] = decoded.off_grammar[index]
        predictions.append(prediction)
    return predictions


def _greedy_decode(
    model: TimeRefineModel, batch: Batch, max_new_tokens: int, max_draft_tokens: int, constrained: bool = True
) -> _Decoded:
    """Each row's generated ids (up to its stop token), the head's fractions at its last generated
    ``<offset>`` (NaN when none) and the frame head's logits, decoding from embeddings with the KV cache.

    Every pass feeds each unfinished row its last generated token followed by its draft; the logits at
    those positions give the model's own choice after each (within the grammar when constrained), so
    the draft's longest prefix that matches them is accepted, with the model's token after it. Rows
    advance independently: what a row rejects stays in the cache but is masked out of attention, and
    each row keeps its own position ids.
    """
    decoder = model.causal_lm.get_decoder()
    lm_head = model.causal_lm.get_output_embeddings()
    embed_tokens = model.causal_lm.get_input_embeddings()
    grammar = model.answer_grammar()
    constraint = _GrammarConstraint(grammar, model.device) if constrained and grammar is not None else None
    drafter = grammar if max_draft_tokens > 0 else None
    stop_ids = model.stop_ids()
    size, pad_id = len(batch), model.tokenizer.pad_token_id
    generated: list[list[int]] = [[] for _ in range(size)]
    finished = [False] * size
    off_grammar = [False] * size
    head_fractions = torch.full((size, 2), float("nan"), device=model.device)

    def drafts() -> list[list[int]]:
        budgets = (min(max_draft_tokens, max_new_tokens - len(row) - 1) for row in generated)
        return [
            drafter.draft(row, budget) if drafter is not None and not done else []
            for row, done, budget in zip(generated, finished, budgets, strict=True)
        ]

    # First pass: the prompt, then the draft of the answer's opening (the same for every row). Column 0
    # of the verified span is the prompt's last token, not a generated one.
    draft = drafts()
    opening = torch.tensor(draft, dtype=torch.long, device=model.device).reshape(size, -1)
    fed_ids = torch.cat([batch.input_ids[:, -1:], opening], dim=1)
    next_position = batch.position_ids[:, -1].clone()  # the position of fed_ids[:, 0]
    drafted = next_position[:, None] + 1 + torch.arange(opening.shape[1], device=model.device)
    attention_mask = torch.cat([batch.attention_mask, torch.ones_like(opening)], dim=1)
    with model.autocast():
        out = decoder(
            inputs_embeds=torch.cat([model.embed(batch), embed_tokens(opening)], dim=1),
            attention_mask=attention_mask,
            position_ids=torch.cat([batch.position_ids, drafted], dim=1),
            use_cache=True,
        )
        prompt_hidden = out.last_hidden_state[:, : batch.input_ids.shape[1]]
        frame_logits = model.frame_logits(prompt_hidden, batch.video_mask)
        first_generated_column = 1
        while True:
            span = fed_ids.shape[1]
            hidden = out.last_hidden_state[:, -span:]
            logits = lm_head(hidden)
            free_choices = logits.argmax(dim=-1)
            if constraint is None:
                model_choices = free_choices
            else:  # answer position of each column: the row's length so far plus the column
                lengths = torch.tensor([len(row) for row in generated], device=model.device)
                model_choices = constraint.best(
                    logits, lengths[:, None] + torch.arange(span, device=model.device)
                )
            choices = model_choices.tolist()  # choices[r][j]: the token after column j
            departs = (model_choices != free_choices).tolist()
            is_offset = (fed_ids == model.offset_id).tolist()
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
                used = 0  # the choices of columns 0 .. used - 1 became tokens of the answer
                for token in [*draft[r][:accepted], choices[r][accepted]]:
                    generated[r].append(token)
                    used += 1
                    if token in stop_ids or len(generated[r]) >= max_new_tokens:
                        finished[r] = True
                        break
                off_grammar[r] = off_grammar[r] or any(departs[r][:used])
            # One tensor operation each (not one a row): on a GPU every small operation is a launch.
            kept_columns = torch.tensor(kept, device=model.device)
            rejected = torch.arange(span, device=model.device) >= kept_columns[:, None]
            attention_mask[:, -span:] = attention_mask[:, -span:].masked_fill(rejected, 0)
            next_position += kept_columns  # a finished row's position no longer matters
            if head_rows:  # the head reads only the accepted <offset> columns that are a row's last
                head_fractions[head_rows] = model.head_fractions(hidden[head_rows, head_columns])
            if all(finished):
                break
            draft, first_generated_column = drafts(), 0
            width = 1 + max(len(d) for d in draft)
            fed, valid = [], []
            for row, row_draft, done in zip(generated, draft, finished, strict=True):
                tokens = [] if done else [row[-1], *row_draft]
                fed.append(tokens + [pad_id] * (width - len(tokens)))
                valid.append([1] * len(tokens) + [0] * (width - len(tokens)))
            fed_ids = torch.tensor(fed, device=model.device)
            attention_mask = torch.cat([attention_mask, attention_mask.new_tensor(valid)], dim=1)
            out = decoder(
                inputs_embeds=embed_tokens(fed_ids),
                attention_mask=attention_mask,
                position_ids=next_position[:, None] + torch.arange(width, device=model.device),
                cache=out.cache,
                use_cache=True,
            )
    return _Decoded(
        tokens=generated,
        head_fractions=head_fractions.cpu(),
        frame_logits=None if frame_logits is None else frame_logits.float().cpu().numpy(),
        off_grammar=off_grammar if constraint is not None else None,
    )


def frames_segment(logits: np.ndarray) -> tuple[int, int]:
    """The contiguous frames [first, last] that the relevance curve supports best.

    Read independently, frame i is inside with probability p_i = sigmoid(logit_i), so the likelihood of
    "exactly the frames of segment S are inside" is prod_{i in S} p_i * prod_{i not in S} (1 - p_i); its log
    is a constant plus the sum of the logits over S. The most likely segment is therefore the contiguous
    run with the largest summed logit (Kadane's algorithm, exact, O(T)); when every logit is negative it is
    the single most likely frame. Thresholding at 0.5 instead could return several runs, or none.
    """
    best, best_span = -math.inf, (0, 0)
    running, start = 0.0, 0
    for index, value in enumerate(np.asarray(logits, dtype=np.float64)):
        if running <= 0:
            running, start = value, index
        else:
            running += value
        if running > best:
            best, best_span = running, (start, index)
    return best_span


@dataclass
class _Decoded:
    tokens: list[list[int]]
    head_fractions: torch.Tensor  # (B, 2), NaN where no <offset> was generated
    frame_logits: np.ndarray | None  # (B, num_frames), None without a frame head
    off_grammar: list[bool] | None  # None when decoding was free


class _GrammarConstraint:
    """The answer grammar as tensors: for each answer position the allowed token ids, padded."""

    def __init__(self, grammar: AnswerGrammar, device: torch.device) -> None:
        allowed = [grammar.allowed(p) for p in range(len(grammar.template))]
        width = max(len(ids) for ids in allowed)
        self.ids = torch.tensor([ids + [ids[0]] * (width - len(ids)) for ids in allowed], device=device)
        counts = torch.tensor([len(ids) for ids in allowed], device=device)
        self.valid = torch.arange(width, device=device) < counts[:, None]

    def best(self, logits: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """(B, S) the best allowed token at answer positions ``positions`` (B, S), from (B, S, V) logits.
        Positions past the template (columns of finished rows) reuse its last entry; they are never kept."""
        positions = positions.clamp(max=self.ids.shape[0] - 1)
        ids, valid = self.ids[positions], self.valid[positions]
        scores = logits.gather(-1, ids).masked_fill(~valid, -math.inf)
        return ids.gather(-1, scores.argmax(dim=-1, keepdim=True)).squeeze(-1)


def _prediction(
    text: str, head_fractions: list[float] | None, frame_logits: np.ndarray | None, duration: float
) -> dict[str, Any]:
    """The prediction fields; ``head_fractions`` is None for a model without a trained head, which then has
    neither a head answer nor a fused one (not even the text answer standing in for fused), and
    ``frame_logits`` None for a model without a frame head."""
    parsed = parse_answer(text)
    text_segment = parsed.segment_s(duration)
    head_segment = fused = frames = None
    if head_fractions is not None and not any(math.isnan(f) for f in head_fractions):
        head_segment = tuple(sorted(min(max(f, 0.0), 1.0) * duration for f in head_fractions))
    if text_segment is not None and head_segment is not None:
        fused = tuple((a + b) / 2 for a, b in zip(text_segment, head_segment, strict=True))
    elif head_fractions is not None:
        fused = text_segment or head_segment
    if frame_logits is not None:
        first, last = frames_segment(frame_logits)
        frames = (first / len(frame_logits) * duration, (last + 1) / len(frame_logits) * duration)
    prediction = {
        "text": text,
        "parsed": parsed.ok,
        "steps": [list(segment) for segment in parsed.trace_s(duration)],
        "pred": _as_list(text_segment),
        "pred_head": _as_list(head_segment),
        "pred_fused": _as_list(fused),
    }
    if frame_logits is not None:
        prediction["pred_frames"] = _as_list(frames)
    return prediction


def _as_list(segment: tuple[float, ...] | None) -> list[float] | None:
    return None if segment is None else list(segment)
