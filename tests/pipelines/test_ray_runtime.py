"""The in-process cluster's workers import torch on their main thread before running anything."""

import sys


def test_workers_import_torch_before_any_task(ray_cluster):
    import ray

    @ray.remote(num_cpus=0)
    def torch_state() -> tuple[bool, bool]:
        # This task never imports torch itself: only the setup hook can have done it.
        module = sys.modules.get("torch")
        return module is not None, hasattr(module, "types")

    assert ray.get([torch_state.remote() for _ in range(3)]) == [(True, True)] * 3
