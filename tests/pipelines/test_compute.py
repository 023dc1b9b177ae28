"""Compute plans for clusters that are up and for autoscaling clusters that start empty.

The plans for machines that are up (2-CPU boxes, GPU clusters, decode nodes) are tested beside the
extraction pipeline in tests/pipelines/test_extract_features.py; these tests add explicit requests, the
predictors' plans, and the errors that say what to pass.
"""

from dataclasses import replace

import pytest

from pipelines.compute import ClusterResources, plan_extraction, plan_inference

# cluster.yaml right after `ray up`: a head that advertises no CPUs and min_workers 0 everywhere.
EMPTY_AUTOSCALING_CLUSTER = ClusterResources(cpus=0, gpus=0)


def test_an_explicit_gpu_request_on_an_empty_cluster_is_planned_as_asked_and_waits():
    plan = plan_extraction(EMPTY_AUTOSCALING_CLUSTER, encoders=4, gpus_per_encoder=1)

    assert (plan.encoders, plan.encoder_num_gpus, plan.encoder_num_cpus) == (4, 1.0, 1.0)
    assert (plan.encoder_threads, plan.decode_num_cpus, plan.write_num_cpus) == (None, 1.0, 0.25)
    args = plan.encode_args()
    assert (args["compute"].min_size, args["compute"].max_size, args["num_gpus"]) == (4, 4, 1.0)
    assert plan.describe().endswith(
        "; the job waits for the autoscaler to add nodes "
        "(the encoders need 4 CPU and 4 GPU; 0 CPU and 0 GPU are up now)"
    )


def test_an_explicit_cpu_request_on_an_empty_cluster_is_sized_for_the_nodes_to_come():
    plan = plan_extraction(EMPTY_AUTOSCALING_CLUSTER, encoders=8, gpus_per_encoder=0)

    assert (plan.encoders, plan.encoder_num_gpus, plan.encoder_num_cpus, plan.encoder_threads) == (8, 0, 1, 1)
    assert "num_gpus" not in plan.encode_args()
    assert "(the encoders need 8 CPU; 0 CPU and 0 GPU are up now)" in plan.describe()


def test_an_explicit_request_larger_than_the_gpus_up_waits_instead_of_failing():
    plan = plan_extraction(ClusterResources(cpus=16, gpus=2), encoders=3, gpus_per_encoder=1)

    assert (plan.encoders, plan.encoder_num_gpus, plan.encoder_num_cpus) == (3, 1.0, 1.0)
    assert "need 3 CPU and 3 GPU; 16 CPU and 2 GPU are up now" in plan.describe()


def test_an_explicit_request_that_fits_gets_the_automatic_plan_and_no_wait():
    cluster = ClusterResources(cpus=6, gpus=4, decode_nodes=True)
    explicit = plan_extraction(cluster, encoders=4, gpus_per_encoder=1)

    assert explicit == plan_extraction(cluster)
    assert explicit.encoder_num_cpus == 6 / 8  # half the CPUs up go to the encoders
    assert explicit.shortfall is None and "autoscaler" not in explicit.describe()
    on_two_cpus = plan_extraction(ClusterResources(cpus=2, gpus=0), encoders=2, gpus_per_encoder=0)
    assert on_two_cpus == plan_extraction(ClusterResources(cpus=2, gpus=0))


def test_an_empty_cluster_without_an_explicit_request_says_what_to_do():
    with pytest.raises(ValueError) as extraction:
        plan_extraction(EMPTY_AUTOSCALING_CLUSTER)
    with pytest.raises(ValueError) as inference:
        plan_inference(EMPTY_AUTOSCALING_CLUSTER, actors=2)  # the GPUs per actor are still unknown

    assert "feature extraction needs at least 1 CPU in the Ray cluster, found 0" in str(extraction.value)
    assert "raise min_workers in cluster.yaml" in str(extraction.value)
    assert "pass --encoders N --gpus-per-encoder G" in str(extraction.value)
    assert "inference needs at least 1 CPU" in str(inference.value)
    assert "pass --actors N --gpus-per-actor G" in str(inference.value)


def test_half_an_explicit_request_keeps_the_errors_and_names_the_missing_flag():
    with pytest.raises(ValueError, match="the Ray cluster has none: start GPU workers, or add --encoders N"):
        plan_extraction(ClusterResources(cpus=8, gpus=0), gpus_per_encoder=1)
    with pytest.raises(ValueError, match="pass --actors 3 --gpus-per-actor 1 to wait for the autoscaler"):
        plan_inference(ClusterResources(cpus=8, gpus=2), actors=3)


def test_predictors_on_a_cpu_machine_use_every_core_with_half_a_cpu_each():
    plan = plan_inference(ClusterResources(cpus=2, gpus=0))

    assert (plan.actors, plan.num_cpus, plan.num_gpus, plan.threads) == (2, 0.5, 0.0, 1)
    assert "num_gpus" not in plan.predict_args()
    assert plan.describe() == "2 predictor actor(s) on CPU (0.5 CPU each, 1 thread(s))"


def test_predictors_beside_other_jobs_reserve_the_cpus_they_are_given():
    # the demo's four evaluation jobs on 2 CPUs (one model scored while the other trains): half a CPU each
    plan = plan_inference(ClusterResources(cpus=2, gpus=0), actors=1, cpus_per_actor=0.5)

    assert (plan.actors, plan.num_cpus, plan.threads) == (1, 0.5, 1)
    assert plan_inference(ClusterResources(cpus=2, gpus=0), actors=1).num_cpus == 1.0  # the default rule
    with pytest.raises(ValueError, match="--cpus-per-actor must be > 0, got 0"):
        plan_inference(ClusterResources(cpus=2, gpus=0), cpus_per_actor=0)


def test_predictors_on_gpus_one_a_gpu_share_unless_forced_onto_cpus():
    cluster = ClusterResources(cpus=16, gpus=4)

    assert (plan_inference(cluster).actors, plan_inference(cluster).num_gpus) == (4, 1.0)
    assert plan_inference(cluster, gpus_per_actor=0.5).actors == 8
    forced = plan_inference(cluster, actors=3, gpus_per_actor=0)
    assert (forced.actors, forced.num_gpus, forced.threads) == (3, 0.0, 1)


def test_an_explicit_predictor_request_on_an_empty_cluster_is_planned_as_asked_and_waits():
    plan = plan_inference(EMPTY_AUTOSCALING_CLUSTER, actors=2, gpus_per_actor=1)

    assert (plan.actors, plan.num_cpus, plan.num_gpus, plan.threads) == (2, 1.0, 1.0, None)
    args = plan.predict_args()
    assert (args["compute"].min_size, args["compute"].max_size, args["num_gpus"]) == (2, 2, 1.0)
    assert plan.describe() == (
        "2 predictor actor(s) on 1 GPU (1 CPU each); the job waits for the autoscaler to add nodes "
        "(the actors need 2 CPU and 2 GPU; 0 CPU and 0 GPU are up now)"
    )


@pytest.mark.parametrize(
    ("plan", "size_flag", "gpus_flag"),
    [(plan_extraction, "--encoders", "--gpus-per-encoder"), (plan_inference, "--actors", "--gpus-per-actor")],
)
def test_impossible_requests_are_refused_even_when_explicit(plan, size_flag, gpus_flag):
    with pytest.raises(ValueError, match=f"{size_flag} must be at least 1, got 0"):
        plan(EMPTY_AUTOSCALING_CLUSTER, 0, 1)
    with pytest.raises(ValueError, match=f"{gpus_flag} must be >= 0, got -1"):
        plan(EMPTY_AUTOSCALING_CLUSTER, 2, -1)


def test_decode_tasks_take_seconds_of_videos_shared_out_over_the_cpus_in_bounded_blocks():
    from pipelines.compute import DECODE_BLOCK_BYTES, DECODE_VIDEOS_PER_BLOCK, DECODE_VIDEOS_PER_TASK
    from timerefine.decoder import DecodeSettings

    compute = plan_extraction(ClusterResources(cpus=16, gpus=1))  # one encoder: 1 CPU; writes 0.25
    small, vit_l = DecodeSettings(crop_size=128, resize_short=128), DecodeSettings(crop_size=224)
    huge = DecodeSettings(num_frames=2000, crop_size=448, resize_short=448)  # one video is over the budget

    assert compute.decode_parallelism == 14
    assert compute.videos_per_decode_task(14 * 100 * 7) == DECODE_VIDEOS_PER_TASK == 100
    assert compute.videos_per_decode_task(140) == 10  # fewer than 100 a CPU: an equal share each
    assert compute.videos_per_decode_task(3) == 1
    # More than 100 a CPU: whole rounds of equal tasks, none decoding alone at the end.
    assert compute.videos_per_decode_task(14 * 100 + 1) == 51  # 2 rounds of 14 tasks, not 14 + 1
    assert compute.videos_per_decode_task(10_000) == 90  # 8 rounds
    two_cpus = replace(compute, decode_parallelism=2)
    assert two_cpus.videos_per_decode_task(400) == 100 and two_cpus.videos_per_decode_task(250) == 63
    assert compute.videos_per_decode_block(small.frame_bytes) == 6  # 4.9 MB a video at 128 px
    assert compute.videos_per_decode_block(vit_l.frame_bytes) == 2  # 15 MB a video at 224 px
    assert compute.videos_per_decode_block(DECODE_BLOCK_BYTES // 100) == DECODE_VIDEOS_PER_BLOCK == 8
    assert compute.videos_per_decode_block(huge.frame_bytes) == 1
    waiting = plan_extraction(EMPTY_AUTOSCALING_CLUSTER, encoders=4, gpus_per_encoder=1)
    assert waiting.decode_parallelism == 1  # nothing up yet: long tasks, whatever comes
