"""Do a TimeRefine model's refinement steps read the frames, or copy the segment written before them?

    python bench/refinement_probe.py CHECKPOINT --data runs/quality/synth400-seed0 [--shift 8] [--split test]

A trained model's own answer says how good its steps are, not why. This probe writes the beginning of the
answer for the model (the first step, or only its rough segment) and lets it decode the rest, greedy and
free, from the same frames and question:

- the truth as step 1: what the later steps keep of a perfect start;
- step 1's rough segment widened by ``--shift`` bins on each side (a segment that contains the truth, like
  every training target): the right offsets are +shift and -shift;
- the whole of step 1 widened (offsets 0): whether the later steps notice a segment that is too wide;
- step 1 shifted by +-shift bins (offsets 0): whether the later steps move it back.

For each, the final answer's mIoU (in bins), the mIoU after every step, and how much of the forced error
is left in the final answer ("left": 100% means every later token copied the error, 0% means it was
corrected). Scored on the split's queries against their first window; the frames and question are the
model's usual inputs, only the answer's opening is forced.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from timerefine.batching import Sample
from timerefine.metrics import temporal_iou
from timerefine.model import TimeRefineModel
from timerefine.timecodec import NUM_BINS, OFFSET, REFINE, SEG_START, parse_answer, time_to_bin

Bins = tuple[int, int]


@torch.no_grad()
def continue_answers(
    model: TimeRefineModel,
    features: Sequence[np.ndarray],
    queries: Sequence[str],
    durations: Sequence[float],
    prefixes: Sequence[str],
    max_new_tokens: int | None = None,
) -> list[str]:
    """Each answer as ``prefix + what the model writes after it``, greedy and free (no grammar), with the
    KV cache; decoding stops at the model's stop tokens, as ``TimeRefineModel.generate`` does (with an
    empty prefix the text is exactly ``generate(..., constrained=False)``'s)."""
    # The head's targets are not used here; make_batch wants a window beside an <offset>.
    samples = [
        Sample(f, q, float(d), target=p, window=(0.0, 0.0) if OFFSET in p else None)
        for f, q, d, p in zip(features, queries, durations, prefixes, strict=True)
    ]
    batch = model.make_batch(samples, padding_side="left").to(model.device)
    decoder = model.causal_lm.get_decoder()
    lm_head = model.causal_lm.get_output_embeddings()
    embed_tokens = model.causal_lm.get_input_embeddings()
    stop_ids = model.stop_ids()
    budget = max_new_tokens or model.config.max_new_tokens
    generated: list[list[int]] = [[] for _ in samples]
    finished = [False] * len(samples)
    was_training = model.training
    model.eval()
    try:
        with model.autocast():
            attention_mask, position = batch.attention_mask, batch.position_ids[:, -1]
            out = decoder(
                inputs_embeds=model.embed(batch),
                attention_mask=attention_mask,
                position_ids=batch.position_ids,
                use_cache=True,
            )
            for _ in range(budget):
                tokens = lm_head(out.last_hidden_state[:, -1]).argmax(dim=-1)
                for row, token in enumerate(tokens.tolist()):
                    if not finished[row]:
                        generated[row].append(token)
                        finished[row] = token in stop_ids or len(generated[row]) >= budget
                if all(finished):
                    break
                attention_mask = torch.cat([attention_mask, torch.ones_like(attention_mask[:, :1])], dim=1)
                position = position + 1
                out = decoder(
                    inputs_embeds=embed_tokens(tokens[:, None]),
                    attention_mask=attention_mask,
                    position_ids=position[:, None],
                    cache=out.cache,
                    use_cache=True,
                )
    finally:
        model.train(was_training)
    return [
        prefix + model.tokenizer.decode(tokens, skip_special_tokens=False)
        for prefix, tokens in zip(prefixes, generated, strict=True)
    ]


@dataclass(frozen=True)
class Probe:
    """An answer opening written for the model, and how far its final segment is off in the forced way."""

    name: str
    prefix: Callable[[Bins], str]
    error: Callable[[Bins, Bins], float] | None  # (segment, truth) -> bins off in the forced direction
    forced: Callable[[Bins], Bins] | None  # (truth) -> the segment the opening forces


def _clamp(b: int) -> int:
    return min(max(b, 0), NUM_BINS - 1)


def _opening(segment: Bins, offsets: bool) -> str:
    rough = f"From {SEG_START} {segment[0]:02d} to {segment[1]:02d} {OFFSET}"
    return f"{rough} +00 and -00 {REFINE}" if offsets else rough


def probes(shift: int) -> list[Probe]:
    def wider(g: Bins) -> Bins:
        return (_clamp(g[0] - shift), _clamp(g[1] + shift))

    def moved(d: int) -> Callable[[Bins], Bins]:
        return lambda g: (_clamp(g[0] + d), _clamp(g[1] + d))

    def outward(s: Bins, g: Bins) -> float:
        return ((g[0] - s[0]) + (s[1] - g[1])) / 2

    def along(d: int) -> Callable[[Bins, Bins], float]:
        return lambda s, g: np.sign(d) * ((s[0] - g[0]) + (s[1] - g[1])) / 2

    rows = [
        Probe("own answer", lambda g: "", None, None),
        Probe("step 1 = the truth", lambda g: _opening(g, True), None, None),
        Probe(f"step 1's rough widened {shift} bins", lambda g: _opening(wider(g), False), outward, wider),
        Probe(f"step 1 widened {shift} bins, offsets 0", lambda g: _opening(wider(g), True), outward, wider),
    ]
    for d in (shift, -shift):
        rows.append(
            Probe(
                f"step 1 moved {d:+d} bins, offsets 0",
                lambda g, d=d: _opening(moved(d)(g), True),
                along(d),
                moved(d),
            )
        )
    return rows


def score_probe(probe: Probe, texts: Sequence[str], truths: Sequence[Bins]) -> dict:
    finals, per_step, left, forced = [], [], [], []
    for text, truth in zip(texts, truths, strict=True):
        answer = parse_answer(text)
        if answer.final_bins is None:
            finals.append(0.0)  # a miss, counted
            continue
        finals.append(temporal_iou(answer.final_bins, truth))
        per_step.append([temporal_iou(step.refined, truth) for step in answer.steps])
        if probe.error is not None:
            left.append(probe.error(answer.final_bins, truth))
            forced.append(probe.error(probe.forced(truth), truth))
    steps = max((len(s) for s in per_step), default=0)
    return {
        "mIoU": 100 * float(np.mean(finals)),
        "parsed": len(per_step),
        "steps": [100 * float(np.mean([s[i] for s in per_step if len(s) > i])) for i in range(steps)],
        "forced_bins": float(np.mean(forced)) if forced else None,
        "left_bins": float(np.mean(left)) if left else None,
    }


def main() -> None:
    from pipelines.jobs import quiet_console

    quiet_console()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint")
    parser.add_argument(
        "--data",
        type=Path,
        default=Path("runs/quality/synth400-seed0"),
        help="a benchmark folder: features/ and SPLIT.jsonl (bench/quality.py's)",
    )
    parser.add_argument("--split", default="test")
    parser.add_argument("--shift", type=int, default=8, help="bins the forced openings are off by")
    args = parser.parse_args()

    from timerefine.checkpoint import load_checkpoint
    from timerefine.data.annotations import read_annotations
    from timerefine.features import load_features

    torch.set_num_threads(1)
    model = load_checkpoint(args.checkpoint)
    queries = read_annotations(args.data / f"{args.split}.jsonl")[0]
    table = load_features(str(args.data / "features"))
    features = [table[q.video_id].features for q in queries]
    truths = [
        (time_to_bin(q.windows[0][0], q.duration), time_to_bin(q.windows[0][1], q.duration)) for q in queries
    ]
    print(f"{args.checkpoint}: {len(queries)} {args.split} queries, K = {model.config.refine_steps}")
    print(
        f"{'forced opening':<38} {'final mIoU':>10} {'parsed':>7}  {'after each step':<28} "
        f"{'forced':>7} {'left':>7}"
    )
    for probe in probes(args.shift):
        texts = continue_answers(
            model,
            features,
            [q.query for q in queries],
            [q.duration for q in queries],
            [probe.prefix(t) for t in truths],
        )
        row = score_probe(probe, texts, truths)
        steps = " / ".join(f"{x:.1f}" for x in row["steps"])
        forced = "" if row["forced_bins"] is None else f"{row['forced_bins']:+.2f}"
        left = "" if row["left_bins"] is None else f"{row['left_bins']:+.2f}"
        print(
            f"{probe.name:<38} {row['mIoU']:>10.2f} {row['parsed']:>7}  {steps:<28} {forced:>7} {left:>7}",
            flush=True,
        )


if __name__ == "__main__":
    main()
