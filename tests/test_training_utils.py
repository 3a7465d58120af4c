"""Known answers for the training loop's parts: EMA, learning rate, label dropout, pairing, logs, checkpoints."""

from __future__ import annotations

import math

import pytest
import torch

from latentflow.errors import LatentflowError
from latentflow.flow.couplings import make_coupling
from latentflow.flow.objectives import TrainingBatch, make_objective
from latentflow.io import image_grid
from latentflow.train.checkpoint import find_checkpoint, publish, temporary_dir, verify_checkpoint
from latentflow.train.config import OptimConfig
from latentflow.train.ema import EMA
from latentflow.train.logs import CsvLog
from latentflow.train.optim import cpu_fused_optimizer, learning_rate
from latentflow.train.pairing import PairingTransform, drop_labels, global_ot_pairing


def test_ema_follows_the_closed_form() -> None:
    model = torch.nn.Linear(2, 2)
    ema = EMA(model, decay=0.9, warmup=False)
    start = model.weight.detach().clone()
    with torch.no_grad():
        model.weight.fill_(1.0)
    for _ in range(3):
        ema.update(model)
    torch.testing.assert_close(ema.model.weight, 1.0 + (start - 1.0) * 0.9**3)
    restored = EMA(model, decay=0.9)
    restored.load_state_dict(ema.state_dict())
    assert restored.updates == 3 and torch.equal(restored.model.weight, ema.model.weight)


def test_ema_warmup_decay() -> None:
    ema = EMA(torch.nn.Linear(1, 1), decay=0.9999, warmup=True)
    assert ema.current_decay() == pytest.approx(0.1)
    ema.updates = 10**6
    assert ema.current_decay() == 0.9999


def test_learning_rate_warmup_then_cosine() -> None:
    optim = OptimConfig(lr=1.0, warmup_steps=4, schedule="cosine", min_lr_ratio=0.1)
    assert [learning_rate(s, optim, 104) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert learning_rate(54, optim, 104) == pytest.approx(0.1 + 0.9 * 0.5)
    assert learning_rate(104, optim, 104) == pytest.approx(0.1)
    assert learning_rate(7, OptimConfig(lr=2.0), 10) == 2.0


def test_label_dropout_uses_the_null_class_at_the_given_rate() -> None:
    labels = torch.zeros(20_000, dtype=torch.long)
    dropped = drop_labels(labels, 0.1, null_class=5, generator=torch.Generator().manual_seed(0))
    assert set(dropped.unique().tolist()) == {0, 5}
    assert math.isclose(float((dropped == 5).float().mean()), 0.1, abs_tol=0.01)
    assert drop_labels(None, 0.1, 5, torch.Generator()) is None


def test_pairing_transform_is_deterministic_per_batch() -> None:
    transform = PairingTransform(make_objective("otcfm"), seed=0, rank=0, num_classes=3, label_dropout=0.0, pair=True)
    batch = {"latents": torch.randn(6, 4, 2, 2), "labels": torch.arange(6) % 3, "batch_index": 7}
    first, second = transform(batch), transform(batch)
    assert isinstance(first, TrainingBatch) and torch.equal(first.x_t, second.x_t)
    other = transform({**batch, "batch_index": 8})
    assert not torch.equal(first.x0, other.x0)
    assert first.ot_cost is not None and torch.equal(first.x1, batch["latents"])  # exact OT keeps data order
    lean = PairingTransform(make_objective("otcfm"), seed=0, rank=0, num_classes=3, label_dropout=0.0, pair=True,
                            keep_endpoints=False)(batch)
    assert lean.x0 is None and lean.x1 is None and lean.ot_cost == first.ot_cost
    assert torch.equal(lean.x_t, first.x_t) and torch.equal(lean.target, first.target)


def test_global_pairing_in_one_process_is_the_exact_plan() -> None:
    x1 = torch.randn(8, 3)
    result = global_ot_pairing(x1, None, make_coupling("exact"), lambda x: x, 0,
                               torch.Generator().manual_seed(1), torch.Generator().manual_seed(2))
    assert sorted(result.noise_index.tolist()) == list(range(8))
    noise = torch.randn(x1.shape, generator=torch.Generator().manual_seed(1))
    identity_cost = float((noise - x1).square().sum(1).mean())
    assert result.global_cost <= identity_cost + 1e-6
    assert torch.equal(result.pairing.x0, noise[result.noise_index])


def test_csv_log_resume_drops_rows_after_the_checkpoint(tmp_path) -> None:
    log = CsvLog(tmp_path / "log.csv", resume_step=None)
    for step in (1, 2, 3):
        log.append({"step": step, "loss": 0.5 / step})
    CsvLog(tmp_path / "log.csv", resume_step=2)
    rows = CsvLog.read(tmp_path / "log.csv")
    assert [r["step"] for r in rows] == ["1", "2"] and float(rows[1]["loss"]) == 0.25
    # a log written before the error column: a resume rewrites it with every column, the rows kept
    (tmp_path / "log.csv").write_text("step,loss,grad_norm,lr,images_per_s,ot_cost,skipped_steps,straightness\n"
                                      "1,0.5,1.0,0.001,10.0,,0,\n2,0.25,1.0,0.001,10.0,,0,\n")
    CsvLog(tmp_path / "log.csv", resume_step=2).append({"step": 3, "loss": 0.9, "error": 12.5})
    rows = CsvLog.read(tmp_path / "log.csv")
    assert [(r["step"], r["loss"], r["error"], r["grad_norm"]) for r in rows] == [
        ("1", "0.5", "", "1.0"), ("2", "0.25", "", "1.0"), ("3", "0.9", "12.5", "")]


def test_checkpoints_publish_atomically_and_keep_the_newest(tmp_path) -> None:
    for step in (1, 2, 3):
        folder = temporary_dir(tmp_path, step)
        folder.mkdir(parents=True)
        (folder / "weights.bin").write_bytes(b"x" * step)
        publish(folder, step, keep=2)
    assert [p.name for p in sorted((tmp_path / "checkpoints").iterdir())] == ["step-00000002", "step-00000003"]
    assert find_checkpoint(tmp_path, "latest").step == 3
    (tmp_path / "checkpoints" / "step-00000003" / "weights.bin").unlink()
    with pytest.raises(LatentflowError, match="step-00000003 is corrupt: file weights.bin is missing"):
        verify_checkpoint(tmp_path / "checkpoints" / "step-00000003")
    assert find_checkpoint(tmp_path, "latest").step == 2
    with pytest.raises(LatentflowError, match="does not exist"):
        find_checkpoint(tmp_path, str(tmp_path / "nope"))


def test_image_grid_layout() -> None:
    images = torch.stack([torch.full((3, 2, 2), v) for v in (0.0, 1.0, 0.5)])  # one value range: [0, 1]
    grid = image_grid(images, padding=0)
    assert grid.size == (4, 4)
    assert grid.getpixel((0, 0)) == (0, 0, 0) and grid.getpixel((2, 0)) == (255, 255, 255)
    assert grid.getpixel((0, 2)) == (128, 128, 128) and grid.getpixel((2, 2)) == (0, 0, 0)


def test_fused_cpu_adamw_takes_the_same_steps_as_the_default() -> None:
    from latentflow.train.optim import make_adamw

    optim = OptimConfig(lr=1e-2, weight_decay=0.1, betas=[0.8, 0.95], eps=1e-6)
    torch.manual_seed(0)
    models = [torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.GELU(), torch.nn.Linear(7, 3)) for _ in range(2)]
    models[1].load_state_dict(models[0].state_dict())
    initial = models[0][0].weight.detach().clone()
    fused, plain = make_adamw(models[0], optim, fused_on_cpu=True), make_adamw(models[1], optim, fused_on_cpu=False)
    assert fused.param_groups[0]["fused"] and not plain.param_groups[0]["fused"]
    assert fused.param_groups[0]["betas"] == (0.8, 0.95) and fused.param_groups[0]["weight_decay"] == 0.1
    inputs = torch.randn(16, 5)
    for _ in range(5):
        for model, optimizer in zip(models, (fused, plain)):
            optimizer.zero_grad()
            model(inputs).square().mean().backward()
            optimizer.step()
    for a, b in zip(models[0].parameters(), models[1].parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert (models[0][0].weight - initial).abs().max() > 1e-3  # the steps did move the weights
    assert cpu_fused_optimizer(torch.optim.Adam, models[0].parameters(), lr=1e-3).param_groups[0]["fused"]
