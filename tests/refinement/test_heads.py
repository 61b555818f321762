"""NNA head: layout of the official MIM-Refiner head, shapes, parameter count, init, validation."""

from __future__ import annotations

import math

import pytest
import torch
from scipy import stats
from torch import nn

from mimprobe.refinement import HeadConfig, NNAHead

SMALL = HeadConfig(hidden_dim=48, proj_dim=16, predictor_hidden_dim=40)


@pytest.fixture(autouse=True)
def _seeded():
    torch.manual_seed(0)


def test_forward_shapes_and_project_predict_agree():
    torch.manual_seed(0)
    head = NNAHead(24, SMALL)
    x = torch.randn(6, 24)
    projection, prediction = head(x)
    assert projection.shape == (6, 16) and prediction.shape == (6, 16)
    assert projection.dtype == prediction.dtype == torch.float32
    # forward is exactly predict(project(x)); eval mode so that BatchNorm uses the same (running) statistics
    head.eval()
    projection, prediction = head(x)
    torch.testing.assert_close(projection, head.project(x), rtol=0, atol=0)
    torch.testing.assert_close(prediction, head.predict(projection), rtol=0, atol=0)
    # unnormalised outputs: the final BatchNorm does not put rows on the unit sphere
    assert not torch.allclose(prediction.norm(dim=-1), torch.ones(6))


def test_layout_follows_the_official_head():
    head = NNAHead(24, SMALL)
    kinds = [type(m) for m in head.projector]
    assert kinds == [nn.Linear, nn.BatchNorm1d, nn.GELU, nn.Linear, nn.BatchNorm1d, nn.GELU, nn.Linear, nn.BatchNorm1d]
    assert [type(m) for m in head.predictor] == [nn.Linear, nn.BatchNorm1d, nn.GELU, nn.Linear, nn.BatchNorm1d]
    linears = [m for m in head.modules() if isinstance(m, nn.Linear)]
    norms = [m for m in head.modules() if isinstance(m, nn.BatchNorm1d)]
    assert len(linears) == len(norms) == 5
    assert all(m.bias is None for m in linears)          # every linear feeds a BatchNorm: no bias
    assert all(m.affine for m in norms)                  # official: plain (affine) BatchNorm1d everywhere
    assert [(m.in_features, m.out_features) for m in linears] == [(24, 48), (48, 48), (48, 16), (16, 40), (40, 16)]


def test_parameter_count_of_the_default_config():
    d, hidden, proj, pred_hidden = 1024, 2048, 256, 4096   # ViT-L block width and the official sizes
    head = NNAHead(d, HeadConfig())
    expected = (d * hidden + 2 * hidden            # Linear(d, H) + BN(H)
                + hidden * hidden + 2 * hidden     # Linear(H, H) + BN(H)
                + hidden * proj + 2 * proj         # Linear(H, P) + BN(P)
                + proj * pred_hidden + 2 * pred_hidden   # Linear(P, Q) + BN(Q)
                + pred_hidden * proj + 2 * proj)         # Linear(Q, P) + BN(P)
    assert sum(p.numel() for p in head.parameters()) == expected == 8_930_304


def test_head_init_is_xavier_uniform():
    torch.manual_seed(0)
    head = NNAHead(384, HeadConfig(hidden_dim=512, proj_dim=128, predictor_hidden_dim=768))
    linears = [m for m in head.modules() if isinstance(m, nn.Linear)]
    assert len(linears) == 5
    for linear in linears:
        fan_out, fan_in = linear.weight.shape
        bound = math.sqrt(6 / (fan_in + fan_out))
        w = linear.weight.detach().flatten().double()
        assert w.abs().max().item() <= bound
        assert w.abs().max().item() > 0.99 * bound          # reaches the edge: not a normal of the same variance
        assert w.var().item() == pytest.approx(bound ** 2 / 3, rel=0.03)
        assert abs(w.mean().item()) < 0.01 * bound
        # the whole distribution: uniform on (-bound, bound)
        assert stats.kstest(w.numpy(), stats.uniform(loc=-bound, scale=2 * bound).cdf).pvalue > 1e-3
    for norm in (m for m in head.modules() if isinstance(m, nn.BatchNorm1d)):
        assert torch.equal(norm.weight, torch.ones_like(norm.weight))
        assert torch.equal(norm.bias, torch.zeros_like(norm.bias))


def test_truncnormal_head_init_is_still_an_option():
    torch.manual_seed(0)
    head = NNAHead(512, HeadConfig(hidden_dim=512, proj_dim=64, predictor_hidden_dim=512, init="truncnormal"))
    weights = torch.cat([m.weight.flatten() for m in head.modules() if isinstance(m, nn.Linear)])
    assert weights.std().item() == pytest.approx(0.02, rel=0.02)
    # Xavier-uniform here would have std sqrt(6 / 1024 / 3) = 0.044 and no tail past its bound 0.077
    assert (weights.abs() > 3 * 0.02).float().mean().item() == pytest.approx(0.0027, abs=0.0006)
    with pytest.raises(ValueError, match="config.init"):
        NNAHead(8, HeadConfig(init="kaiming"))


def test_gradients_reach_every_parameter():
    head = NNAHead(24, SMALL)
    projection, prediction = head(torch.randn(8, 24))
    (projection.square().mean() + prediction.sin().mean()).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in head.parameters())


@pytest.mark.parametrize(("in_dim", "config", "message"), [
    (0, SMALL, "in_dim must be an integer >= 1, got 0"),
    (True, SMALL, "in_dim must be an integer >= 1, got True"),
    (16.0, SMALL, "in_dim must be an integer >= 1, got 16.0"),
    (16, HeadConfig(hidden_dim=0), "config.hidden_dim must be an integer >= 1, got 0"),
    (16, HeadConfig(proj_dim=-3), "config.proj_dim must be an integer >= 1, got -3"),
    (16, HeadConfig(predictor_hidden_dim=0), "config.predictor_hidden_dim must be an integer >= 1, got 0"),
    (16, {"hidden_dim": 8}, "config must be a HeadConfig, got dict"),
])
def test_bad_arguments_raise_exact_messages(in_dim, config, message):
    with pytest.raises(ValueError) as info:
        NNAHead(in_dim, config)
    assert str(info.value) == message


def test_bad_input_shapes_are_named():
    head = NNAHead(24, SMALL)
    with pytest.raises(ValueError, match=r"NNAHead expects \(batch, 24\) features, got shape \(4, 23\)"):
        head(torch.randn(4, 23))
    with pytest.raises(ValueError, match=r"the predictor expects \(batch, 16\) projections, got shape \(4, 24\)"):
        head.predict(torch.randn(4, 24))


def test_config_is_frozen():
    with pytest.raises(AttributeError):
        HeadConfig().proj_dim = 128
