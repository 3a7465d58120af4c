"""Property tests (hypothesis): couplings and image preprocessing on arbitrary inputs."""

import io

import numpy as np
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image
from scipy.optimize import linear_sum_assignment

from latentflow.data.preprocess import PreprocessConfig, preprocess_bytes
from latentflow.flow.assignment import solve_assignment
from latentflow.flow.couplings import ExactOTCoupling, SinkhornOTCoupling, squared_cost

FAST = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@st.composite
def batches(draw):
    """Noise and data batches of any size and sample shape, with duplicated rows and optional labels."""
    batch = draw(st.integers(1, 24))
    shape = tuple(draw(st.lists(st.integers(1, 3), min_size=1, max_size=3)))
    generator = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    x0 = torch.randn(batch, *shape, generator=generator, dtype=torch.float64)
    x1 = torch.randn(batch, *shape, generator=generator, dtype=torch.float64)
    duplicates = draw(st.integers(0, batch - 1))
    x1[:duplicates] = x1[-1]  # repeated data points
    labels = None
    if draw(st.booleans()):
        labels = torch.tensor(draw(st.lists(st.integers(0, 3), min_size=batch, max_size=batch)))
    return x0, x1, labels


@FAST
@given(batches(), st.booleans())
def test_exact_coupling_is_a_permutation_with_minimal_cost(data, class_aware):
    x0, x1, labels = data
    pairing = ExactOTCoupling(class_aware=class_aware)(x0, x1, labels)
    assert sorted(pairing.x0_index.tolist()) == list(range(len(x0)))
    assert torch.equal(pairing.x1_index, torch.arange(len(x1)))
    assert torch.equal(pairing.x0, x0[pairing.x0_index]) and torch.equal(pairing.x1, x1)
    if labels is not None:
        assert torch.equal(pairing.labels, labels)
    if not class_aware or labels is None:
        # no single swap of two partners lowers the total cost (a necessary condition of optimality)
        cost = squared_cost(pairing.x0, pairing.x1).double()
        diagonal = cost.diagonal()
        swapped = cost + cost.T - diagonal.unsqueeze(0) - diagonal.unsqueeze(1)
        assert float(swapped.min()) >= -1e-6 * (1 + float(cost.max()))


@FAST
@given(batches(), st.integers(0, 2))
def test_warm_started_assignment_has_the_optimal_cost(data, rounding):
    x0, x1, _ = data
    cost = squared_cost(x0, x1).double().numpy().round(rounding)  # rounding adds ties
    assigned = solve_assignment(cost, warm_start=True)
    assert sorted(assigned.tolist()) == list(range(len(cost)))
    rows, columns = linear_sum_assignment(cost)
    total, best = cost[np.arange(len(cost)), assigned].sum(), cost[rows, columns].sum()
    assert abs(total - best) <= 1e-12 * len(cost) * (1 + float(np.abs(cost).max()))


@FAST
@given(batches())
def test_sinkhorn_pairs_are_valid_rows_and_respect_labels(data):
    x0, x1, labels = data
    pairing = SinkhornOTCoupling(reg=0.1, class_aware=True)(x0, x1, labels, torch.Generator().manual_seed(0))
    assert pairing.x0.shape == x0.shape and pairing.x1.shape == x1.shape
    assert int(pairing.x0_index.max()) < len(x0) and int(pairing.x1_index.max()) < len(x1)
    if labels is not None:
        assert torch.equal(pairing.labels, labels[pairing.x1_index])


MODES = ["1", "L", "LA", "P", "RGB", "RGBA", "CMYK", "I;16", "I", "F"]


@st.composite
def images(draw):
    mode = draw(st.sampled_from(MODES))
    width, height = draw(st.integers(1, 90)), draw(st.integers(1, 90))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    image = Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8), "RGB")
    if mode in ("I;16", "I", "F"):
        image = Image.fromarray(rng.integers(0, 65536, (height, width), dtype=np.uint16)).convert(mode) \
            if mode != "F" else Image.fromarray(rng.random((height, width), dtype=np.float32), "F")
    else:
        image = image.convert(mode)
    file_format = draw(st.sampled_from(["PNG", "TIFF"] + (["JPEG"] if mode in ("L", "RGB", "CMYK") else [])))
    if mode in ("F", "I", "CMYK"):  # formats that can store these modes
        file_format = draw(st.sampled_from(["TIFF", "JPEG"])) if mode == "CMYK" else "TIFF"
    buffer = io.BytesIO()
    image.save(buffer, format=file_format)
    return buffer.getvalue(), (width, height)


@FAST
@given(images(), st.sampled_from([8, 16, 64]))
def test_any_mode_size_and_aspect_becomes_a_square_rgb_crop(data, resolution):
    encoded, size = data
    result = preprocess_bytes(encoded, PreprocessConfig(resolution=resolution))
    assert result.pixels.shape == (resolution, resolution, 3) and result.pixels.dtype == np.uint8
    assert tuple(result.original_size) == size
