"""CompressionReport: measured numbers and every output form, on float models with known zeros."""

from __future__ import annotations

import copy
import json

import lightning as L
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from torchmetrics.classification import MulticlassAccuracy

from lightning_weightlight.export import load_compressed
from lightning_weightlight.report import CompressionReport, CompressionReportCallback, measure_latency


def make_pair() -> tuple[nn.Module, nn.Module, DataLoader]:
    torch.manual_seed(0)
    dense = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4)).eval()
    pruned = copy.deepcopy(dense)
    with torch.no_grad():
        pruned[0].weight[:, :8] = 0.0  # exactly half of the first layer's 512 weights
    inputs = torch.randn(40, 16)
    targets = dense(inputs).argmax(dim=1)  # the dense model is right on every sample
    return dense, pruned, DataLoader(TensorDataset(inputs, targets), batch_size=16)


@pytest.fixture(scope="module")
def report() -> CompressionReport:
    dense, pruned, loader = make_pair()
    return CompressionReport(dense, pruned, loader, batch_sizes=[1, 8], warmup=1, repeats=3)


def test_report_counts_parameters_and_zeros(report):
    assert report.dense.parameters == 16 * 32 + 32 + 32 * 4 + 4
    assert report.compressed.parameters == report.dense.parameters
    assert report.dense.parameters - report.compressed.nonzero_parameters == 256


def test_report_metric_of_each_model(report):
    _, pruned, loader = make_pair()
    inputs, targets = loader.dataset.tensors
    expected = (pruned(inputs).argmax(dim=1) == targets).float().mean().item()

    assert report.dense.metric == 1.0
    assert report.compressed.metric == pytest.approx(expected)
    assert report.ratios()["metric_change"] == pytest.approx(expected - 1.0)


def test_report_layers_sparsity(report):
    layers = {layer.name: layer for layer in report.layers}

    assert list(layers) == ["0", "2"]
    assert layers["0"].sparsity == 0.5
    assert layers["0"].dense_sparsity == 0.0
    assert layers["0"].kernel == "dense"
    assert layers["0"].bits == 32
    assert layers["0"].shape == "32x16"


def test_report_sizes_and_latency(report):
    assert report.dense.size_bytes > 16 * 32 * 4
    assert report.compressed.zipped_bytes < report.compressed.size_bytes
    assert report.compressed.zipped_bytes < report.dense.zipped_bytes  # zeros compress well
    assert set(report.dense.latency_ms) == {1, 8}
    assert all(value > 0 for value in report.compressed.latency_ms.values())


def test_report_json_round_trip(report, tmp_path):
    text = report.to_json(tmp_path / "report.json")
    data = json.loads((tmp_path / "report.json").read_text())

    assert json.loads(text) == data
    assert data["metric_name"] == "accuracy"
    assert data["layers"][0]["sparsity"] == 0.5
    assert data["dense"]["latency_ms"].keys() == {"1", "8"}


def test_report_tables(report):
    markdown = report.to_markdown()
    table = report.to_table()

    assert "| accuracy" in markdown
    assert "latency batch 8 (ms)" in table
    assert "50.0%" in table
    assert str(report) == table


def test_report_files_and_plot(report, tmp_path):
    paths = report.save(tmp_path / "out")

    assert sorted(path.name for path in paths.values()) == ["report.json", "report.md", "report.png"]
    assert paths["plot"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_report_logger_metrics(report):
    metrics = report.metrics()

    assert metrics["compression/accuracy_dense"] == 1.0
    assert metrics["compression/sparsity/0"] == 0.5
    assert "compression/latency_ms_batch_8_compressed" in metrics


def test_report_torchmetrics_metric():
    dense, pruned, loader = make_pair()
    metric = MulticlassAccuracy(num_classes=4, average="macro")

    report = CompressionReport(dense, pruned, loader, metric=metric, batch_sizes=[1], warmup=0, repeats=1)

    assert report.metric_name == "MulticlassAccuracy"
    assert report.dense.metric == pytest.approx(1.0)


def test_report_restores_training_mode():
    dense, pruned, loader = make_pair()
    dense.train()

    CompressionReport(dense, pruned, loader, batch_sizes=[1], warmup=0, repeats=1)

    assert dense.training
    assert not pruned.training


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"batch_sizes": []}, "batch_sizes: expected a non-empty list"),
        ({"batch_sizes": [0]}, "batch_sizes: expected a non-empty list"),
        ({"repeats": 0}, "repeats: expected an integer of at least 1"),
        ({"metric": "accuracy"}, "metric: expected a torchmetrics Metric"),
    ],
)
def test_report_rejects_bad_arguments(kwargs, message):
    dense, pruned, loader = make_pair()
    with pytest.raises((ValueError, TypeError), match=message):
        CompressionReport(dense, pruned, loader, **kwargs)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"repeats": 0}, "repeats: expected an integer of at least 1, but got 0"),
        ({"threads": 0}, "threads: expected an integer of at least 1 or None, but got 0"),
        ({"warmup": -1}, "warmup: expected an integer of at least 0, but got -1"),
        ({"batch_rows": 2.5}, "batch_rows: expected an integer of at least 1, but got 2.5"),
        ({"max_batches": 0}, "max_batches: expected an integer of at least 1 or None, but got 0"),
        ({"dataloader": "train"}, "dataloader: expected 'val' or 'test'"),
    ],
)
def test_report_callback_rejects_bad_arguments(kwargs, message):
    # Raised when the callback is built, before any training.
    with pytest.raises(ValueError, match=message):
        CompressionReportCallback(**kwargs)


def test_latency_restores_threads():
    threads = torch.get_num_threads()
    model = nn.Linear(4, 4)

    assert measure_latency(model, torch.randn(2, 4), warmup=0, repeats=2, threads=1) > 0
    assert torch.get_num_threads() == threads


class UserRegressor(L.LightningModule):
    """A LightningModule as a user writes one: its own forward arguments, optimizer and scheduler."""

    def __init__(self, width: int = 32) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.encoder = nn.Sequential(nn.Linear(16, width), nn.ReLU(), nn.Linear(width, width))
        self.head = nn.Linear(width, 4)

    def forward(self, features: torch.Tensor, *, scale: float = 1.0) -> torch.Tensor:
        return self.head(self.encoder(features * scale))

    def training_step(self, batch, batch_idx):
        inputs, targets = batch
        loss = nn.functional.cross_entropy(self(inputs), targets)
        self.log("loss", loss)
        return loss

    def validation_step(self, batch, batch_idx):
        inputs, targets = batch
        self.log("val_loss", nn.functional.cross_entropy(self(inputs), targets))

    def configure_optimizers(self):
        optimizer = torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)
        return {"optimizer": optimizer, "lr_scheduler": torch.optim.lr_scheduler.StepLR(optimizer, 2)}


def test_report_callback_on_user_module(make_trainer, tmp_path):
    from lightning.pytorch.loggers import CSVLogger

    from lightning_weightlight.kernels import layers
    from lightning_weightlight.pruning import WeightPruning
    from lightning_weightlight.report import CompressionReportCallback

    torch.manual_seed(0)
    inputs = torch.randn(64, 16)
    data = DataLoader(TensorDataset(inputs, (inputs[:, 0] > 0).long()), batch_size=16)
    callback = CompressionReportCallback(
        batch_sizes=[1, 4],
        output_dir=str(tmp_path / "report"),
        save_path=str(tmp_path / "model.safetensors"),
        repeats=2,
    )
    trainer = make_trainer(
        max_steps=4,
        callbacks=[WeightPruning(sparsity=0.9, pattern="1x4", include="encoder.*"), callback],
        logger=CSVLogger(tmp_path),
    )

    trainer.fit(UserRegressor(), train_dataloaders=data, val_dataloaders=data)

    layers_by_name = {layer.name: layer for layer in callback.report.layers}
    assert layers_by_name["encoder.2"].sparsity == pytest.approx(0.9, abs=0.01)
    assert layers_by_name["encoder.2"].dense_sparsity == pytest.approx(0.9, abs=0.01)
    assert layers_by_name["encoder.2"].module == "SparseInt8Linear"
    assert layers_by_name["head"].module == "Int8Linear"
    assert sorted(path.name for path in (tmp_path / "report").iterdir()) == [
        "report.json",
        "report.md",
        "report.png",
    ]
    loaded = load_compressed(tmp_path / "model.safetensors")
    assert type(loaded.encoder[2]) is layers.SparseInt8Linear
    metrics = next(tmp_path.rglob("metrics.csv")).read_text()
    assert "compression/sparsity/encoder.2" in metrics
    assert "compression/accuracy_compressed" in metrics
