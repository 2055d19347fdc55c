"""Emulated workers: K workers' semantics in one process, checked on a whole model and through the trainer."""

import copy

import pytest
import torch
import torch.nn.functional as F

from scalelab.config import ModelConfig, load_config
from scalelab.data import load_dataset
from scalelab.models import build_model
from scalelab.recipe.norm import set_emulated_workers
from scalelab.train import Trainer


def _grads(model):
    return [p.grad.clone() for p in model.parameters()]


@pytest.mark.parametrize("k", [2, 4])
def test_model_gradient_is_mean_of_per_worker_gradients(k):
    """A 4-block CNN with BN after every conv: the emulated-K gradient equals the mean of K workers' gradients,
    each worker a separate copy of the model seeing only its B/K share with plain BN."""
    torch.manual_seed(0)
    model = build_model(ModelConfig(name="cnn1d", width=8, depth=4), (1, 40), 10).double()
    x = torch.randn(32, 1, 40, dtype=torch.float64)
    y = torch.randint(0, 10, (32,))

    emulated = copy.deepcopy(model)
    set_emulated_workers(emulated, k)
    F.cross_entropy(emulated(x), y).backward()

    per_worker = []
    for xs, ys in zip(x.chunk(k), y.chunk(k)):
        worker = copy.deepcopy(model)
        F.cross_entropy(worker(xs), ys).backward()
        per_worker.append(_grads(worker))
    mean = [torch.stack(g).mean(0) for g in zip(*per_worker)]
    for got, want in zip(_grads(emulated), mean):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)

    # not vacuous: the plain full-batch gradient (BN over all 32) is measurably different
    plain = copy.deepcopy(model)
    F.cross_entropy(plain(x), y).backward()
    assert max((a - b).abs().max().item() for a, b in zip(_grads(plain), mean)) > 1e-4


def _run(overrides, data):
    cfg = load_config(None, ["data.name=synthetic", "data.n_train=1024", "data.n_test=256", "train.epochs=2",
                             "train.batch_size=128", "train.progress=false", "model.name=mlp",
                             "model.width=32", *overrides])
    return Trainer(cfg, None, data=data).run()


@pytest.fixture(scope="module")
def synthetic():
    cfg = load_config(None, ["data.name=synthetic", "data.n_train=1024", "data.n_test=256"])
    return load_dataset(cfg.data)


def test_k1_is_the_plain_run_and_k_changes_bn_runs(synthetic):
    plain = _run([], synthetic)
    k1 = _run(["parallel.emulate_workers=1"], synthetic)
    k4 = _run(["parallel.emulate_workers=4"], synthetic)
    assert k1["params_sha256"] == plain["params_sha256"]
    assert k4["params_sha256"] != plain["params_sha256"]  # BN statistics per worker change the training
    assert k4["emulated_workers"] == 4 and k4["global_batch"] == 128


def test_without_bn_emulation_changes_nothing(synthetic):
    # without batch statistics, K workers averaging gradients of equal shares is exactly the big batch
    plain = _run(["model.norm=none"], synthetic)
    k4 = _run(["model.norm=none", "parallel.emulate_workers=4"], synthetic)
    assert k4["params_sha256"] == plain["params_sha256"]
