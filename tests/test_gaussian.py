"""The appendix's Gaussian decoder, against scikit-learn and SciPy, and appendix A itself."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from scipy.stats import multivariate_normal
from sklearn.covariance import ledoit_wolf as sklearn_ledoit_wolf

from cflowad import CFlowAD, UserError
from cflowad.cli import main
from cflowad.method.flows import ConditionalFlow
from cflowad.method.gaussian import GaussianDecoder, ledoit_wolf
from cflowad.method.train import flow_loss

RNG = np.random.default_rng(0)


@pytest.mark.parametrize(("n", "dim"), [(200, 6), (5, 12)])  # more and fewer samples than dims
def test_ledoit_wolf_equals_scikit_learn(n, dim):
    samples = RNG.normal(size=(3, n, dim)) @ RNG.normal(size=(dim, dim))
    centred = samples - samples.mean(axis=1, keepdims=True)
    ours = ledoit_wolf(torch.from_numpy(centred)).numpy()
    for p in range(3):
        expected, _ = sklearn_ledoit_wolf(samples[p])
        np.testing.assert_allclose(ours[p], expected, rtol=1e-10, atol=1e-12)


def test_log_density_is_eq_5_2_against_scipy():
    n, positions, dim = 40, 3, 5
    features = RNG.normal(size=(n, positions, dim)) * [1, 2, 3, 0.5, 1] + 0.3
    decoder = GaussianDecoder(dim, positions)
    decoder.fit(features.astype(np.float16))  # the cache's dtype
    values = features.astype(np.float16).astype(np.float64)
    z = RNG.normal(size=(4, positions, dim))
    got = decoder.log_prob(torch.from_numpy(z).float()).double().numpy()
    for p in range(positions):
        covariance, _ = sklearn_ledoit_wolf(values[:, p])
        covariance += 1e-6 * np.diag(covariance).mean() * np.eye(dim)
        expected = multivariate_normal(values[:, p].mean(axis=0), covariance).logpdf(z[:, p])
        np.testing.assert_allclose(got[:, p], expected, rtol=1e-5, atol=1e-4)


def test_log_density_of_an_image_does_not_depend_on_its_batch():
    decoder = GaussianDecoder(4, 6)
    decoder.fit(RNG.normal(size=(30, 6, 4)))
    z = torch.randn(5, 6, 4)
    together = decoder.log_prob(z)
    alone = torch.cat([decoder.log_prob(z[i : i + 1]) for i in range(5)])
    torch.testing.assert_close(together, alone)


@pytest.mark.slow  # trains
def test_a_gaussian_model_fits_saves_loads_and_exports(texture_dataset, tmp_path):
    model = CFlowAD(decoder="gaussian", image_size=64, aspect="fixed", seed=0, device="cpu")
    model.fit(texture_dataset)
    assert model.training["decoder"] == "gaussian" and "steps" not in model.training
    images = sorted((texture_dataset / "test").glob("*/*.png"))
    before = model.predict(images)
    labels = np.array(["patch" in p.parts for p in images])
    assert before.scores[labels].mean() > before.scores[~labels].mean()
    model.save(tmp_path / "gaussian")
    meta = json.loads((tmp_path / "gaussian" / "model.json").read_text())
    assert meta["config"]["decoder"] == "gaussian"
    loaded = CFlowAD.load(tmp_path / "gaussian")
    np.testing.assert_array_equal(loaded.predict(images).scores, before.scores)
    assert loaded.describe()["decoder"] == "gaussian"
    # loading checks the decoder: a model.json that claims flows does not load these weights
    meta["config"]["decoder"] = "flow"
    (tmp_path / "gaussian" / "model.json").write_text(json.dumps(meta))
    with pytest.raises(UserError, match="weights do not match"):
        CFlowAD.load(tmp_path / "gaussian")
    # the ONNX file scores as PyTorch does
    from cflowad.engine.onnx import OnnxModel

    checked = model.export_onnx(tmp_path / "gaussian.onnx")
    assert checked["max_relative_difference"] < 1e-3
    onnx = OnnxModel(tmp_path / "gaussian.onnx")
    np.testing.assert_allclose(onnx.predict(images).scores, before.scores, rtol=1e-4, atol=1e-5)
    assert onnx.describe()["decoder"] == "gaussian"
    # products, not Einsum: ONNX Runtime's Einsum made the export slower than PyTorch
    import onnx as onnx_format

    graph = onnx_format.load(str(tmp_path / "gaussian.onnx"), load_external_data=False).graph
    assert "Einsum" not in {n.op_type for n in graph.node}


@pytest.mark.slow  # trains
def test_train_and_test_commands_name_the_decoder(texture_dataset, tmp_path, capsys):
    out = tmp_path / "m"
    assert main(["train", str(texture_dataset), "--out", str(out), "--decoder", "gaussian",
                 "--image-size", "64", "-q"]) == 0  # fmt: skip
    metrics = tmp_path / "metrics.json"
    assert main(["test", str(out), str(texture_dataset), "--json", str(metrics), "-q"]) == 0
    assert json.loads(metrics.read_text())["decoder"] == "gaussian"
    assert main(["train", str(texture_dataset), "--out", str(out), "--decoder", "pca"]) == 2
    assert "decoder='pca' must be one of flow, gaussian" in capsys.readouterr().err


@pytest.mark.slow  # trains
def test_appendix_a_a_flow_trained_on_gaussian_data_becomes_the_gaussian():
    """On z ~ N(mu, Sigma), the flow trained by eq. (7.2) approaches eq. (5.2)'s density,
    and each sample's term of eq. (6), (M^2 - E^2) / 2 + log(|det J| / det Sigma^-1/2),
    which is log p_flow(z) - log p(z), goes to zero."""
    dim = 4
    torch.manual_seed(0)
    mixing = torch.tensor(RNG.normal(size=(dim, dim)), dtype=torch.float32)
    sigma = mixing @ mixing.T + 0.5 * torch.eye(dim)
    mu = torch.tensor([1.0, -2.0, 0.5, 3.0])
    truth = torch.distributions.MultivariateNormal(mu, covariance_matrix=sigma)
    precision = torch.linalg.inv(sigma)
    log_det_sigma_inv_half = -0.5 * torch.logdet(sigma)
    flow = ConditionalFlow(dim, condition_dim=4, blocks=4, seed=0)
    condition = torch.zeros(1, 4)
    test = truth.sample((4000,))

    def eq6_terms() -> torch.Tensor:
        with torch.no_grad():
            u, log_det_j = flow(test, flow.condition(condition.expand(len(test), 4)))
            diff = test - mu
            m2 = (diff @ precision * diff).sum(dim=1)
            e2 = (u * u).sum(dim=1)
            terms = (m2 - e2) / 2 + log_det_j - log_det_sigma_inv_half
            gap = flow.log_prob(test, condition.expand(len(test), 4)) - truth.log_prob(test)
        torch.testing.assert_close(terms, gap, rtol=1e-4, atol=1e-3)  # (6) is that gap
        return terms

    before = eq6_terms().abs().mean().item()
    optimizer = torch.optim.Adam(flow.parameters(), lr=3e-3)
    for step in range(2500):
        z = truth.sample((256,))
        loss = flow_loss(flow, z, condition.expand(256, 4))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step == 1500:
            for group in optimizer.param_groups:
                group["lr"] = 5e-4
    after = eq6_terms()
    assert before > 1.0
    assert after.abs().mean().item() < 0.1 * before and after.abs().mean().item() < 0.15
    # forward KL(p || p_flow) = E_p[-gap] >= 0, near zero once converged
    assert -0.02 < -after.mean().item() < 0.05
    assert math.isfinite(after.mean().item())
