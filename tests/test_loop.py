"""The training loop in one process: it learns, the same seed gives the same numbers bit for bit whatever
order the feature table's rows come in, and a run resumed from its last checkpoint continues exactly."""

from __future__ import annotations

import shutil
from dataclasses import replace
from pathlib import Path

import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest
import torch
from featurebench import write_feature_benchmark
from test_model import SMALL_SPEC

from timerefine.checkpoint import load_checkpoint
from timerefine.data.annotations import read_annotations
from timerefine.features import load_features
from timerefine.llm import tiny_llm_dir
from timerefine.loop import LocalCheckpoints, TrainHooks, train
from timerefine.training import TrainConfig, load_training_data


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def config(tmp_path_factory: pytest.TempPathFactory) -> TrainConfig:
    folder = tmp_path_factory.mktemp("loop")
    bench = write_feature_benchmark(
        folder,
        videos=6,
        queries_per_video=2,
        dim=16,
        encoder="test@0",
        phrases=("the red circle", "a blue star", "the green box"),
        video_prefix="v",
        window_starts=(0, 60),
        window_lengths=(10, 30),
        val_queries=4,
    )
    return TrainConfig(
        features=str(bench.features),
        train=str(bench.train),
        val=str(bench.val),
        llm=str(tiny_llm_dir(SMALL_SPEC, home=folder / "home")),
        schedule="2",
        epochs=3,
        global_batch_size=4,
        micro_batch_size=2,
        train_score_queries=4,
        time_embedding="digits",
    )


def quiet() -> TrainHooks:
    return TrainHooks(log=lambda line: None)


def test_two_runs_of_one_seed_give_the_same_losses_scores_and_answers(config: TrainConfig, tmp_path: Path):
    runs = []
    for name in ("a", "b"):
        checkpoints = LocalCheckpoints(tmp_path / name)
        history = train(config, load_training_data(config), replace(quiet(), report=checkpoints))
        runs.append((history, checkpoints))
    (first, first_checkpoints), (second, second_checkpoints) = runs
    keys = ("loss", "ce", "l1", "frame", "val_mIoU", "train_mIoU", "val_frames_mIoU")
    assert [[m[k] for k in keys] for m in first] == [[m[k] for k in keys] for m in second]
    assert first[-1]["loss"] < first[0]["loss"]  # it trains
    data = load_training_data(config)
    queries = data.val
    answers = []
    for checkpoints in (first_checkpoints, second_checkpoints):
        model = load_checkpoint(checkpoints.reported[-1][0])
        answers.append(
            model.generate(
                [data.features[q.video_id].features for q in queries],
                [q.query for q in queries],
                [q.duration for q in queries],
            )
        )
    assert answers[0] == answers[1]


def test_the_order_of_the_feature_tables_rows_changes_nothing(config: TrainConfig, tmp_path: Path):
    """Ray Data writes parts in whatever order its tasks finish: the same rows in another order must train
    the same model."""
    reordered = tmp_path / "features"
    reordered.mkdir()
    table = pads.dataset(config.features, format="parquet").to_table()
    pq.write_table(table.take(list(range(table.num_rows))[::-1]), reordered / "part-reversed.parquet")
    assert list(load_features(str(reordered))) != list(load_features(config.features))
    shorter = replace(config, epochs=1)
    expected = train(shorter, load_training_data(shorter), quiet())
    got = train(replace(shorter, features=str(reordered)), load_training_data(shorter), quiet())
    assert [m["loss"] for m in got] == [m["loss"] for m in expected]


def test_a_run_resumed_from_its_last_checkpoint_continues_where_it_stopped(
    config: TrainConfig, tmp_path: Path
):
    whole = train(config, load_training_data(config), quiet())
    checkpoints = LocalCheckpoints(tmp_path / "run")
    # The learning-rate schedule depends on the run's total epochs: stop after 2 of 3 by interrupting.
    stopped = []

    def stop_after_two(metrics, write):
        checkpoints(metrics, write)
        stopped.append(metrics["epoch"])
        if metrics["epoch"] == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(config, load_training_data(config), replace(quiet(), report=stop_after_two))
    assert stopped == [1, 2]
    shutil.rmtree(tmp_path / "run" / "checkpoint_epoch_002" / "tokenizer")  # a broken newest checkpoint ...
    (tmp_path / "run" / "checkpoint_epoch_002" / "trainer_state.json").unlink()  # ... is not complete
    resumed = train(config, load_training_data(config), replace(quiet(), resume_from=checkpoints.latest))
    assert [m["epoch"] for m in resumed] == [2, 3]
    assert [m["loss"] for m in resumed] == [m["loss"] for m in whole[1:]]


def test_train_scores_sit_beside_val_scores(config: TrainConfig):
    history = train(replace(config, epochs=1), load_training_data(config), quiet())
    (metrics,) = history
    for key in ("val_mIoU", "train_mIoU", "val_frames_mIoU", "train_frames_mIoU", "val_R1@0.5"):
        assert 0 <= metrics[key] <= 100, key
    assert len(read_annotations(config.val)[0]) == 4
