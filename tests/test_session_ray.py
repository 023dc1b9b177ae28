"""The session's Ray is handed back idle: a test that leaves CPUs held is named and the cluster replaced."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.integration


def test_a_test_that_leaves_a_cpu_held_is_named_and_the_cluster_replaced(ray_session):
    import ray

    @ray.remote(num_cpus=1)
    class Holder:
        def ready(self) -> bool:
            return True

    holder = Holder.remote()
    assert ray.get(holder.ready.remote(), timeout=120)
    first_address = ray_session.address
    with pytest.raises(RuntimeError, match=r"left 1 of the session Ray's CPUs held"):
        ray_session.give_back_or_replace(timeout_s=2)
    assert ray_session.address != first_address
    assert ray_session.held_cpus(timeout_s=0) == 0
    assert ray.cluster_resources()["CPU"] == 2

    replaced = ray_session.address  # a test that gave everything back leaves the cluster as it is
    ray_session.give_back_or_replace(timeout_s=5)
    assert ray_session.address == replaced and ray.is_initialized()
