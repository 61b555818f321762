"""`CrossProcessBatchNorm1d` against ``torch.nn.BatchNorm1d`` over the concatenated batch: in a process group of
one (gloo) and of two processes (each holding half the rows), outputs, gradients and running statistics; and its
variance stays exact far from zero, where E[x^2] - E[x]^2 in float32 does not."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from mimprobe.refinement.distributed import CrossProcessBatchNorm1d

FEATURES = 6


def _inputs(offset: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(32, FEATURES, generator=generator) * torch.linspace(0.5, 3.0, FEATURES) + offset
    upstream = torch.randn(32, FEATURES, generator=generator)  # d(loss)/d(output)
    return x, upstream


def _pair(momentum: float | None = 0.1) -> tuple[torch.nn.BatchNorm1d, CrossProcessBatchNorm1d]:
    reference = torch.nn.BatchNorm1d(FEATURES, momentum=momentum).double()
    with torch.no_grad():
        reference.weight.copy_(torch.linspace(0.5, 2.0, FEATURES))
        reference.bias.copy_(torch.linspace(-1.0, 1.0, FEATURES))
    ours = CrossProcessBatchNorm1d(FEATURES, momentum=momentum)
    ours.load_state_dict({key: value.float() if value.is_floating_point() else value
                          for key, value in reference.state_dict().items()})
    return reference, ours


def _run(module: torch.nn.Module, x: torch.Tensor, upstream: torch.Tensor, steps: int = 2):
    """Output, input gradient and weight/bias gradients of the last of ``steps`` forward passes."""
    for _ in range(steps):
        module.zero_grad()
        x = x.detach().requires_grad_(True)
        y = module(x)
        (y * upstream.to(y.dtype)).sum().backward()
    return y.detach().double(), x.grad.double(), module.weight.grad.double(), module.bias.grad.double()


@pytest.fixture
def group_of_one(tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'init'}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


@pytest.mark.parametrize("momentum", [0.1, None])
@pytest.mark.parametrize("offset", [0.0, 1e4])
def test_one_process_equals_batchnorm1d(group_of_one, offset, momentum):
    x, upstream = _inputs(offset)
    reference, ours = _pair(momentum)

    expected, got = _run(reference, x.double(), upstream), _run(ours, x, upstream)

    tolerance = 2e-3 if offset else 1e-5  # float32 inputs near 1e4 carry 1e-3 absolute
    for want, have in zip(expected, got):
        torch.testing.assert_close(have, want, atol=tolerance, rtol=tolerance)
    torch.testing.assert_close(ours.running_mean.double(), reference.running_mean, atol=1e-3, rtol=1e-5)
    torch.testing.assert_close(ours.running_var.double(), reference.running_var, atol=1e-3, rtol=1e-4)
    assert int(ours.num_batches_tracked) == int(reference.num_batches_tracked) == 2


def test_the_two_pass_variance_is_needed_at_a_large_offset():
    """What the test above guards against: the one-pass variance in float32 at an offset of 1e4 is off by far more
    than its tolerance (so a return to E[x^2] - E[x]^2 fails it)."""
    x, _ = _inputs(1e4)
    exact = x.double().var(0, unbiased=False)
    one_pass = (x * x).mean(0) - x.mean(0) ** 2
    assert ((one_pass.double() - exact).abs() / exact).max() > 0.05


def test_without_a_process_group_or_in_eval_it_is_batchnorm1d():
    x, upstream = _inputs()
    reference, ours = _pair()
    for want, have in zip(_run(reference, x.double(), upstream), _run(ours, x, upstream)):
        torch.testing.assert_close(have, want, atol=1e-5, rtol=1e-5)
    ours.eval(), reference.eval()
    torch.testing.assert_close(ours(x).double(), reference(x.double()), atol=1e-5, rtol=1e-5)


def _two_process_worker(rank: int, init_file: str, results: dict) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        x, upstream = _inputs(1e4)
        half = slice(rank * 16, (rank + 1) * 16)
        _, ours = _pair()
        y, x_grad, weight_grad, bias_grad = _run(ours, x[half], upstream[half])
        # each process holds its rows' gradients; DDP sums the parameter gradients over processes
        results[rank] = (y, x_grad, weight_grad, bias_grad, ours.running_mean.clone(), ours.running_var.clone())
        dist.barrier()  # no rank tears gloo down while another's last collective is in flight
    finally:
        dist.destroy_process_group()


@pytest.mark.distributed
@pytest.mark.slow  # spawns 2 processes that import torch: 28 s here under load
def test_two_processes_equal_batchnorm1d_over_the_concatenated_batch(tmp_path):
    with mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(_two_process_worker, args=(str(tmp_path / "init"), results), nprocs=2, join=True)
        results = dict(results)
    x, upstream = _inputs(1e4)
    reference, _ = _pair()
    y, x_grad, weight_grad, bias_grad = _run(reference, x.double(), upstream)

    torch.testing.assert_close(torch.cat([results[0][0], results[1][0]]), y, atol=2e-3, rtol=2e-3)
    torch.testing.assert_close(torch.cat([results[0][1], results[1][1]]), x_grad, atol=2e-3, rtol=2e-3)
    torch.testing.assert_close(results[0][2] + results[1][2], weight_grad, atol=2e-3, rtol=2e-3)
    torch.testing.assert_close(results[0][3] + results[1][3], bias_grad, atol=2e-3, rtol=2e-3)
    for rank in (0, 1):  # every process tracks the statistics of the whole batch
        torch.testing.assert_close(results[rank][4].double(), reference.running_mean, atol=1e-3, rtol=1e-5)
        torch.testing.assert_close(results[rank][5].double(), reference.running_var, atol=1e-3, rtol=1e-4)
