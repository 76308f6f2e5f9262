"""One shared gloo device for all process groups; the CPU shim's torch-function mode off inside a step."""
import pytest
import torch
import torch.distributed as dist
import torch.distributed.distributed_c10d as c10d

from stepwise.parallel import cpu_shim
from stepwise.parallel.gloo_device import shared_device
from stepwise.parallel.runtime import init_parallel


@pytest.fixture(scope="module")
def layout():
    return init_parallel(1, 1, seed=0)


def test_gloo_groups_share_one_device_and_still_reduce(layout):
    groups = [dist.new_group([0], backend="gloo") for _ in range(3)]
    try:
        for group in groups:
            backend = group._get_backend(torch.device("cpu"))
            assert isinstance(backend, c10d.ProcessGroupGloo)  # torch's own checks keep holding
            assert backend.options._devices[0] is shared_device()
            total = torch.full((4,), 2.0)
            dist.all_reduce(total, group=group)
            assert torch.equal(total, torch.full((4,), 2.0))
    finally:
        for group in groups:
            dist.destroy_process_group(group)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU shim is only installed without CUDA")
def test_step_scope_turns_the_mode_off_and_back_on(layout):
    from megatron.core.pipeline_parallel import schedules
    from torch.overrides import _get_current_function_mode

    assert _get_current_function_mode() is cpu_shim.MODE
    assert torch.zeros(2, device="cuda").device.type == "cpu"  # the mode maps it outside a step
    with cpu_shim.step_scope():
        assert _get_current_function_mode() is None
        with cpu_shim.step_scope():  # nested: left as it is
            assert _get_current_function_mode() is None
        count = schedules.torch.zeros([], dtype=torch.int, device="cuda")  # megatron's per-step literal
        assert count.device.type == "cpu"
        with pytest.raises((RuntimeError, AssertionError)):
            torch.zeros(2, device="cuda")  # no mode: plain torch refuses CUDA here
    assert _get_current_function_mode() is cpu_shim.MODE
