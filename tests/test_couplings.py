import numpy as np
import pytest
import torch

from latentflow.errors import LatentflowError
from latentflow.flow.couplings import (
    ExactOTCoupling,
    IndependentCoupling,
    SinkhornOTCoupling,
    make_coupling,
    squared_cost,
)


def planted_permutation(batch: int, seed: int = 0):
    """Data points far apart, noise = data shuffled and slightly moved: OT must undo the shuffle."""
    generator = torch.Generator().manual_seed(seed)
    x1 = torch.randn(batch, 3, 4, 4, generator=generator) * 10
    permutation = torch.randperm(batch, generator=generator)
    x0 = x1[permutation] + 0.01 * torch.randn(x1.shape, generator=generator)
    return x0, x1, permutation


@pytest.mark.parametrize("solver", ["assignment", "lsa", "emd"])
def test_exact_ot_recovers_a_planted_permutation(solver):
    x0, x1, permutation = planted_permutation(64)
    pairing = ExactOTCoupling(solver=solver)(x0, x1)
    # x1 keeps its order; row i of the pairing uses the noise that was planted next to x1[i]
    assert torch.equal(pairing.x1_index, torch.arange(64))
    assert torch.equal(permutation[pairing.x0_index], torch.arange(64))
    assert pairing.cost < 0.01**2 * 48 * 2


def test_exact_ot_returns_a_permutation_and_the_optimal_cost():
    generator = torch.Generator().manual_seed(1)
    x0, x1 = torch.randn(40, 2, generator=generator), torch.randn(40, 2, generator=generator)
    pairing = ExactOTCoupling()(x0, x1)
    assert sorted(pairing.x0_index.tolist()) == list(range(40))
    emd = ExactOTCoupling(solver="emd")(x0, x1)
    assert pairing.cost == pytest.approx(emd.cost, rel=1e-6)
    assert pairing.cost < IndependentCoupling()(x0, x1).cost


@pytest.mark.parametrize("shape", [(2,), (4, 8, 8)])
def test_default_exact_solver_reaches_the_scipy_optimum_at_training_batch_size(shape):
    # batch 256 is past WARM_START_MIN_SIZE: the default solver runs warm-started
    generator = torch.Generator().manual_seed(6)
    x0, x1 = torch.randn(256, *shape, generator=generator), 2 * torch.randn(256, *shape, generator=generator) + 1
    default, plain = ExactOTCoupling()(x0, x1), ExactOTCoupling(solver="lsa")(x0, x1)
    assert sorted(default.x0_index.tolist()) == list(range(256))
    assert default.cost == pytest.approx(plain.cost, rel=1e-6)


def test_class_aware_exact_pairs_stay_within_labels():
    x0, x1, _ = planted_permutation(30, seed=2)
    labels = torch.arange(30) % 3
    pairing = ExactOTCoupling(class_aware=True)(x0, x1, labels)
    assert torch.equal(pairing.labels, labels[pairing.x1_index])
    assert sorted(pairing.x0_index.tolist()) == list(range(30))
    assert sorted(pairing.x1_index.tolist()) == list(range(30))
    # each label group got exactly as many noise rows as it has data rows
    for value in range(3):
        assert int((pairing.labels == value).sum()) == 10


def test_sinkhorn_pairs_come_from_the_plan():
    x0, x1, permutation = planted_permutation(32, seed=3)
    pairing = SinkhornOTCoupling(reg=1e-3)(x0, x1, generator=torch.Generator().manual_seed(0))
    assert pairing.x0.shape == x0.shape
    # with tiny regularisation the plan is nearly the planted permutation
    matched = (permutation[pairing.x0_index] == pairing.x1_index).float().mean()
    assert matched > 0.95


def test_sinkhorn_large_reg_approaches_independent_pairs():
    generator = torch.Generator().manual_seed(4)
    x0, x1 = torch.randn(16, 2, generator=generator), torch.randn(16, 2, generator=generator)
    plan = SinkhornOTCoupling(reg=1e3).plan(squared_cost(x0, x1).double().numpy())
    np.testing.assert_allclose(plan, np.full((16, 16), 1 / 256), rtol=1e-2)


def test_couplings_refuse_mismatched_batches():
    with pytest.raises(LatentflowError, match="same sample shape"):
        ExactOTCoupling()(torch.zeros(4, 2), torch.zeros(4, 3))
    with pytest.raises(LatentflowError, match="same size"):
        ExactOTCoupling()(torch.zeros(3, 2), torch.zeros(4, 2))
    with pytest.raises(LatentflowError, match="labels must have shape"):
        ExactOTCoupling()(torch.zeros(4, 2), torch.zeros(4, 2), torch.zeros(3))
    with pytest.raises(LatentflowError, match="choose one of"):
        make_coupling("hungarian")
    with pytest.raises(LatentflowError, match="exact OT solver"):
        ExactOTCoupling(solver="auction")
    for reg in (0.0, float("nan"), float("inf")):  # NaN failed in a loader worker, printed with its traceback
        with pytest.raises(LatentflowError, match="sinkhorn reg must be > 0 and finite"):
            SinkhornOTCoupling(reg=reg)
