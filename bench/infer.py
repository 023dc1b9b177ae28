"""Generation cost of TimeRefine (K = 4) against the direct baseline (K = 1), side by side.

Queries/s of batched greedy decoding (``TimeRefineModel.generate``) for two checkpoints trained on the same
data, on the same queries and features, in this process with the same torch threads. The prompt (100 frame
slots and the question) is the same for both; only the answer grows, from ``From <seg_start> s to e
<seg_end>`` to K steps of a segment and an offset, decoded token by token with the KV cache.

    python bench/infer.py --direct runs/direct/checkpoint_epoch_010 \
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

from timerefine.data.annotations import read_annotations
from timerefine.features import load_features
from timerefine.model import load_checkpoint


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--direct", required=True, help="checkpoint trained with K = 1")
    parser.add_argument("--refine", required=True, help="checkpoint trained with K = 4")
    parser.add_argument("--features", required=True, help="feature table the queries' videos are in")
    parser.add_argument("--annotations", required=True, help="queries to ground")
    parser.add_argument("--queries", type=int, default=64, help="how many queries to time")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: a Ray actor with 1 CPU)")
    parser.add_argument("--repeats", type=int, default=2, help="timed passes over the queries")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    features = load_features(args.features)
    queries = [q for q in read_annotations(args.annotations)[0] if q.video_id in features][: args.queries]
    rows = {}
    for name, checkpoint in (("direct (K = 1)", args.direct), ("TimeRefine (K = 4)", args.refine)):
        rows[name] = time_generation(load_checkpoint(checkpoint), queries, features, args)
    (direct_rate, direct_tokens), (refine_rate, refine_tokens) = rows.values()
    print(
        f"{len(queries)} queries, batch {args.batch_size}, {args.threads} thread(s), best of {args.repeats}:"
    )
    print(f"{'model':<22} {'queries/s':>10} {'answer tokens':>14} {'cost vs direct':>15}")
    for name, (rate, tokens) in rows.items():
        print(f"{name:<22} {rate:>10.2f} {tokens:>14.1f} {direct_rate / rate:>14.2f}x")
    length_ratio, cost_ratio = refine_tokens / direct_tokens, direct_rate / refine_rate
    print(f"answers {length_ratio:.2f}x longer, generation {cost_ratio:.2f}x the cost (target <= 2x)")


def time_generation(model, queries, features, args) -> tuple[float, float]:
    """Best queries/s over ``repeats`` passes (after one warm-up batch) and the mean answer length."""
    batches = [queries[i : i + args.batch_size] for i in range(0, len(queries), args.batch_size)]

    def run(batch):
        videos = [features[q.video_id].features for q in batch]
        return model.generate(videos, [q.query for q in batch], [q.duration for q in batch])

    run(batches[0])
    rates, lengths = [], []
    for _ in range(args.repeats):
        started = time.perf_counter()
        predictions = [p for batch in batches for p in run(batch)]
        rates.append(len(queries) / (time.perf_counter() - started))
    for prediction in predictions:
        lengths.append(len(model.tokenizer(prediction["text"], add_special_tokens=False)["input_ids"]))
    return max(rates), statistics.mean(lengths)


if __name__ == "__main__":
    main()
