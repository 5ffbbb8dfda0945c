"""The decoders against independent truth: autograd Jacobians, FrEIA, closed forms."""

from __future__ import annotations

import math

import pytest
import torch

from cflowad.method.flows import ConditionalFlow, positional_encoding, random_rotation
from cflowad.method.train import flow_loss


def _flow(dim: int = 7, condition_dim: int = 4, blocks: int = 3, seed: int = 0) -> ConditionalFlow:
    flow = ConditionalFlow(dim, condition_dim, blocks, clamp_alpha=1.9, seed=seed).double()
    with torch.no_grad():  # move off the identity-like init so the test has teeth
        for p in flow.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return flow


def _autograd_log_det(flow: ConditionalFlow, z: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    out = []
    for zi, ci in zip(z, c, strict=True):
        jac = torch.autograd.functional.jacobian(
            lambda x, ci=ci: flow(x[None], flow.condition(ci[None]))[0][0], zi
        )
        out.append(torch.linalg.slogdet(jac).logabsdet)
    return torch.stack(out)


@pytest.mark.parametrize("dim", [2, 5, 8])
def test_log_det_matches_autograd_jacobian(dim):
    torch.manual_seed(1)
    flow = _flow(dim=dim)
    z, c = torch.randn(6, dim, dtype=torch.float64), torch.randn(6, 4, dtype=torch.float64)
    _, log_det = flow(z, flow.condition(c))
    # The rotation is stored in float32, so it is orthogonal only to ~1e-7: its log|det|
    # is that small, not exactly 0. Every other term must agree to float64 precision.
    torch.testing.assert_close(log_det, _autograd_log_det(flow, z, c), rtol=0, atol=1e-6)


def test_loss_is_equation_7_2_by_hand():
    torch.manual_seed(2)
    flow = _flow()
    z, c = torch.randn(9, 7, dtype=torch.float64), torch.randn(9, 4, dtype=torch.float64)
    u, _ = flow(z, flow.condition(c))
    by_hand = (0.5 * (u**2).sum(1) - _autograd_log_det(flow, z, c)).mean() / 7
    torch.testing.assert_close(flow_loss(flow, z, c), by_hand)
    log_p = -0.5 * (u**2).sum(1) - 3.5 * math.log(2 * math.pi) + _autograd_log_det(flow, z, c)
    torch.testing.assert_close(flow.log_prob(z, c), log_p)
    torch.testing.assert_close(
        flow_loss(flow, z, c, "logsigmoid"), -torch.nn.functional.logsigmoid(log_p / 7).mean()
    )


def test_identical_to_freia_all_in_one_block():
    freia_framework = pytest.importorskip("FrEIA.framework")
    freia_modules = pytest.importorskip("FrEIA.modules")
    torch.manual_seed(3)
    dim, cond, blocks = 9, 8, 4
    ours = _flow(dim, cond, blocks)

    def subnet(n_in: int, n_out: int) -> torch.nn.Module:
        return torch.nn.Sequential(
            torch.nn.Linear(n_in, 2 * n_in), torch.nn.ReLU(), torch.nn.Linear(2 * n_in, n_out)
        )

    theirs = freia_framework.SequenceINN(dim)
    for _ in range(blocks):
        theirs.append(
            freia_modules.AllInOneBlock,
            cond=0,
            cond_shape=(cond,),
            subnet_constructor=subnet,
            affine_clamping=1.9,
            global_affine_type="SOFTPLUS",
            permute_soft=True,
        )
    theirs = theirs.double()
    with torch.no_grad():
        for mine, other in zip(ours.blocks, theirs.module_list, strict=True):
            other.subnet[0].weight.copy_(
                torch.cat([mine.input_layer.weight, mine.condition_layer.weight], 1)
            )
            other.subnet[0].bias.copy_(mine.condition_layer.bias)
            other.subnet[2].weight.copy_(mine.output_layer.weight)
            other.subnet[2].bias.copy_(mine.output_layer.bias)
            other.global_scale.copy_(mine.global_scale.view(1, -1))
            other.global_offset.copy_(mine.global_offset.view(1, -1))
            other.w_perm.copy_(mine.rotation)
            other.w_perm_inv.copy_(mine.rotation.T)
    z, c = torch.randn(5, dim, dtype=torch.float64), torch.randn(5, cond, dtype=torch.float64)
    u_ours, det_ours = ours(z, ours.condition(c))
    u_theirs, det_theirs = theirs(z, c=[c])
    torch.testing.assert_close(u_ours, u_theirs)
    torch.testing.assert_close(det_ours, det_theirs)


def test_initial_global_scale_is_one_and_rotation_is_special_orthogonal():
    flow = ConditionalFlow(6, 4, 2, seed=0)
    block = flow.blocks[0]
    scale = 0.1 * torch.nn.functional.softplus(block.global_scale, beta=0.5)
    torch.testing.assert_close(scale, torch.ones(6))
    rotation = random_rotation(6, torch.Generator().manual_seed(0)).double()
    torch.testing.assert_close(
        rotation @ rotation.T, torch.eye(6, dtype=torch.float64), atol=1e-6, rtol=0
    )
    assert torch.linalg.det(rotation) == pytest.approx(1.0, abs=1e-5)


def test_seed_fixes_the_flow_and_leaves_global_rng_alone():
    torch.manual_seed(123)
    expected = torch.rand(1)
    torch.manual_seed(123)
    a, b = ConditionalFlow(5, 4, 2, seed=7), ConditionalFlow(5, 4, 2, seed=7)
    assert torch.rand(1) == expected
    for (name, pa), pb in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.equal(pa, pb), name
    c = ConditionalFlow(5, 4, 2, seed=8)
    assert not torch.equal(a.blocks[0].rotation, c.blocks[0].rotation)


def test_positional_encoding_closed_form():
    code = positional_encoding(8, 3, 5)
    y, x = 2, 4
    half = 4
    for i in range(0, half, 2):
        frequency = 1e4 ** (-i / half)
        assert code[i, y, x] == pytest.approx(math.sin(x * frequency), abs=1e-6)
        assert code[i + 1, y, x] == pytest.approx(math.cos(x * frequency), abs=1e-6)
        assert code[half + i, y, x] == pytest.approx(math.sin(y * frequency), abs=1e-6)
        assert code[half + i + 1, y, x] == pytest.approx(math.cos(y * frequency), abs=1e-6)


def test_loss_gradients_match_finite_differences():
    torch.manual_seed(4)
    flow = _flow(dim=6, condition_dim=4, blocks=2)
    z, c = torch.randn(5, 6, dtype=torch.float64), torch.randn(5, 4, dtype=torch.float64)
    params = list(flow.parameters())

    def loss(*values: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            for p, v in zip(params, values, strict=True):
                p.copy_(v)
        return flow_loss(flow, z, c)

    analytic = torch.autograd.grad(flow_loss(flow, z, c), params)
    start = [p.detach().clone() for p in params]
    for i, (p, g) in enumerate(zip(params, analytic, strict=True)):
        for index in torch.randperm(p.numel())[:4].tolist():
            shifted = [s.clone() for s in start]
            target = shifted[i].view(-1)
            target[index] += 1e-6
            plus = loss(*shifted)
            target[index] -= 2e-6
            minus = loss(*shifted)
            numeric = (plus - minus) / 2e-6
            torch.testing.assert_close(g.view(-1)[index], numeric, rtol=1e-5, atol=1e-8)
    loss(*start)


@pytest.mark.parametrize("dim", [40, 320])
def test_bfloat16_training_step_approximates_float32(dim):
    """Under bfloat16 autocast the loss (7.2) and its gradient stay close to float32's."""
    torch.manual_seed(0)
    flow = ConditionalFlow(dim, 128, 8, seed=0)
    with torch.no_grad():
        for p in flow.parameters():
            p.add_(0.02 * torch.randn_like(p))
    z, c = 2 * torch.randn(256, dim), torch.randn(256, 128)
    params = list(flow.parameters())
    exact = flow_loss(flow, z, c)
    exact_grad = torch.cat([g.flatten() for g in torch.autograd.grad(exact, params)])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = flow_loss(flow, z, c).float()
    mixed_grad = torch.cat([g.flatten() for g in torch.autograd.grad(mixed, params)])
    assert 0 < abs(mixed.item() - exact.item()) < 5e-3 * exact.item()
    assert torch.nn.functional.cosine_similarity(mixed_grad, exact_grad, dim=0) > 0.999
    assert mixed_grad.norm() == pytest.approx(exact_grad.norm().item(), rel=0.01)
