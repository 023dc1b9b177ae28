"""Generation cost of TimeRefine (K = 4) against the direct baseline (K = 1), side by side.

Queries/s of batched greedy decoding (``TimeRefineModel.generate``) for two checkpoints trained on the same
data, on the same queries and features, in this process with the same torch threads. The prompt (100 frame
slots and the question) is the same for both; only the answer grows, from ``From <seg_start> s to e
<seg_end>`` (12 tokens with a digit-per-token tokenizer) to K steps of a segment and an offset (75 tokens).
Each model decodes twice: token by token (``--draft-tokens 0``) and with drafts of the answer's expected
tokens verified several per forward pass (``timerefine.grammar``); both give the same answers, and the
benchmark checks that they do. Passes alternate between the four settings so that a slow spell of a shared
machine hits them alike.

    python bench/infer.py --direct runs/direct/checkpoint_epoch_010 \\
        --refine runs/timerefine/checkpoint_epoch_010 --features FEATURES --annotations test.jsonl

Target: K = 4 costs at most 2x the direct baseline.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from timerefine.checkpoint import load_checkpoint
from timerefine.data.annotations import read_annotations
from timerefine.features import load_features
from timerefine.grammar import DEFAULT_DRAFT_TOKENS


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--direct", required=True, help="checkpoint trained with K = 1")
    parser.add_argument("--refine", required=True, help="checkpoint trained with K = 4")
    parser.add_argument("--features", required=True, help="feature table the queries' videos are in")
    parser.add_argument("--annotations", required=True, help="queries to ground")
    parser.add_argument("--queries", type=int, default=128, help="how many queries to time")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument(
        "--draft-tokens", type=int, default=DEFAULT_DRAFT_TOKENS, help="drafted tokens a pass may verify"
    )
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: a Ray actor with 1 CPU)")
    parser.add_argument("--repeats", type=int, default=3, help="timed passes over the queries per setting")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    features = load_features(args.features)
    queries = [q for q in read_annotations(args.annotations)[0] if q.video_id in features][: args.queries]
    chunks = [queries[i : i + args.batch_size] for i in range(0, len(queries), args.batch_size)]
    batches = [
        ([features[q.video_id].features for q in c], [q.query for q in c], [q.duration for q in c])
        for c in chunks
    ]
    models = {
        "direct (K = 1)": load_checkpoint(args.direct),
        "TimeRefine (K = 4)": load_checkpoint(args.refine),
    }
    settings = [(name, draft) for name in models for draft in (0, args.draft_tokens)]
    runs = {setting: Run(models[setting[0]], batches, setting[1]) for setting in settings}
    for run in runs.values():
        run.timed_pass()  # warm-up, and the answers each setting gives
    for name in models:
        plain, drafted = runs[name, 0].texts, runs[name, args.draft_tokens].texts
        agree = sum(a == b for a, b in zip(plain, drafted, strict=True))
        print(f"{name}: drafted and token-by-token answers agree on {agree} of {len(plain)} queries")
    for _ in range(args.repeats):
        for run in runs.values():
            run.timed_pass()

    print(
        f"\n{len(queries)} queries, batch {args.batch_size}, {args.threads} thread(s), "
        f"best of {args.repeats}; drafts of up to {args.draft_tokens} tokens"
    )
    header = f"{'model':<20} {'decoding':<14} {'queries/s':>10} {'answer tokens':>14} {'passes/batch':>13}"
    print(header + f" {'cost vs direct':>15}")
    for (name, draft), run in runs.items():
        direct = runs[next(iter(models)), draft]
        mode = "token by token" if draft == 0 else "drafted"
        print(
            f"{name:<20} {mode:<14} {run.rate:>10.2f} {run.answer_tokens:>14.1f} "
            f"{run.passes_per_batch:>13.1f} {direct.rate / run.rate:>14.2f}x"
        )
    for draft, mode in ((0, "token by token"), (args.draft_tokens, "drafted")):
        direct, refine = (runs[name, draft] for name in models)
        print(f"{mode}: K = 4 costs {direct.rate / refine.rate:.2f}x direct (target <= 2x)")


class Run:
    """One (model, draft length) setting: its best queries/s, answers and decoder passes per batch."""

    def __init__(self, model, batches, draft_tokens: int) -> None:
        self.model, self.batches, self.draft_tokens = model, batches, draft_tokens
        self.rate, self.texts, self.passes_per_batch, self.answer_tokens = 0.0, [], 0.0, 0.0

    def timed_pass(self) -> None:
        passes = []
        hook = self.model.causal_lm.get_decoder().register_forward_hook(lambda *_: passes.append(1))
        started = time.perf_counter()
        predictions = [
            p
            for videos, queries, durations in self.batches
            for p in self.model.generate(videos, queries, durations, max_draft_tokens=self.draft_tokens)
        ]
        elapsed = time.perf_counter() - started
        hook.remove()
        self.rate = max(self.rate, len(predictions) / elapsed)
        self.texts = [p["text"] for p in predictions]
        self.passes_per_batch = len(passes) / len(self.batches)
        tokenize = self.model.tokenizer
        self.answer_tokens = statistics.mean(
            len(tokenize(text, add_special_tokens=False)["input_ids"]) for text in self.texts
        )


if __name__ == "__main__":
    main()
