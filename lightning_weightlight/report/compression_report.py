"""``CompressionReport``: what compression gained and what it cost, measured on real data.

The report compares a dense model with its compressed version. It measures the metric on a
dataloader (top-1 accuracy unless a torchmetrics metric is given) and the size of the saved file,
also zipped, because TensorFlow Model Optimization reports the zipped size for compressed models.
It counts parameters, lists per-layer sparsity, pattern, bit width and kernel, and times the
median latency at given batch sizes. It renders as a terminal table, markdown, JSON and a PNG plot.
"""

from __future__ import annotations

import json
import os
import statistics
import tempfile
import time
import zipfile
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import safetensors.torch
import torch
from tabulate import tabulate
from torch import nn

from lightning_weightlight.export import save_compressed
from lightning_weightlight.export.modules import is_deploy_module
from lightning_weightlight.export.serialization import split_shared_tensors

FLOAT_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Embedding)


@dataclass
class ModelSummary:
    """Measurements of one model: metric, file sizes in bytes, parameter counts, median latency in ms."""

    metric: float | None
    size_bytes: int
    zipped_bytes: int
    parameters: int
    nonzero_parameters: int
    latency_ms: dict[int, float] = field(default_factory=dict)


@dataclass
class LayerSummary:
    """One weight layer of the compressed model and the sparsity of the same layer in the dense model."""

    name: str
    module: str
    kernel: str
    pattern: str
    bits: int
    sparsity: float
    dense_sparsity: float | None
    shape: str


def _float_view(module: nn.Module) -> nn.Module:
    return module.to_float() if is_deploy_module(module) and hasattr(module, "to_float") else module


def _count_parameters(model: nn.Module) -> tuple[int, int]:
    """Count logical parameters (a deploy layer counts as its float weight and bias) and the non-zero ones."""
    total = nonzero = 0
    for module in model.modules():
        if is_deploy_module(module):
            tensors = [t for t in _float_view(module).parameters() if t is not None]
        else:
            tensors = list(module.parameters(recurse=False))
        for tensor in tensors:
            total += tensor.numel()
            nonzero += int(torch.count_nonzero(tensor.detach()))
    return total, nonzero


def _weight_layers(model: nn.Module) -> dict[str, nn.Module]:
    return {
        name: module
        for name, module in model.named_modules()
        if name and (is_deploy_module(module) or type(module) in FLOAT_LAYERS)
    }


def _weight_sparsity(module: nn.Module) -> float:
    weight = _float_view(module).weight.detach()
    return 1.0 - int(torch.count_nonzero(weight)) / max(1, weight.numel())


def _describe_layer(name: str, module: nn.Module, dense: nn.Module | None) -> LayerSummary:
    weight = _float_view(module).weight
    deploy = is_deploy_module(module)
    return LayerSummary(
        name=name,
        module=type(module).__name__,
        kernel=str(getattr(module, "kernel", "dense")) if deploy else "dense",
        pattern=str(getattr(module, "pattern", "dense")) if deploy else "dense",
        bits=int(getattr(module, "bits", 32)) if deploy else 32,
        sparsity=float(getattr(module, "sparsity", _weight_sparsity(module))),
        dense_sparsity=_weight_sparsity(dense) if dense is not None and hasattr(dense, "weight") else None,
        shape="x".join(str(size) for size in weight.shape),
    )


def _file_sizes(model: nn.Module) -> tuple[int, int]:
    with tempfile.TemporaryDirectory() as directory:
        path = Path(directory) / "model.safetensors"
        try:
            save_compressed(model, path)
        except TypeError:
            # A trained model with QAT modules cannot be described in a compressed file, but its
            # tensors still give its size: the same safetensors layout without our metadata.
            tensors, _ = split_shared_tensors(model.state_dict())
            safetensors.torch.save_file(tensors, path)
        archive = Path(directory) / "model.zip"
        with zipfile.ZipFile(archive, "w", compression=zipfile.ZIP_DEFLATED) as handle:
            handle.write(path, arcname=path.name)
        return path.stat().st_size, archive.stat().st_size


def _split_batch(batch: Any) -> tuple[Any, Any]:
    if isinstance(batch, (tuple, list)) and len(batch) >= 2:
        return batch[0], batch[1]
    raise TypeError(
        f"CompressionReport: expected batches of (inputs, targets), but got {type(batch).__name__}"
    )


def _evaluate(model: nn.Module, batches: Sequence[Any], metric: Any | None) -> float | None:
    if not batches:
        return None
    if metric is not None:
        metric = metric.clone()
        metric.reset()
    correct = count = 0
    with torch.inference_mode():
        for batch in batches:
            inputs, targets = _split_batch(batch)
            outputs = model(inputs)
            if metric is not None:
                metric.update(outputs, targets)
            else:
                correct += int((outputs.argmax(dim=-1) == targets).sum())
                count += targets.numel()
    if metric is not None:
        return float(metric.compute())
    return correct / max(1, count)


def _make_input(sample: torch.Tensor, batch_size: int) -> torch.Tensor:
    index = torch.arange(batch_size) % sample.shape[0]
    return sample[index].contiguous()


def measure_latency(
    model: nn.Module, inputs: torch.Tensor, *, warmup: int = 5, repeats: int = 20, threads: int | None = 1
) -> float:
    """Measure the median wall time of ``model(inputs)`` in milliseconds after ``warmup`` calls.

    ``threads`` sets ``torch.set_num_threads`` for the measurement (``None`` keeps the current value).
    """
    previous = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        times = []
        with torch.inference_mode():
            for _ in range(warmup):
                model(inputs)
            for _ in range(repeats):
                start = time.perf_counter()
                model(inputs)
                times.append(time.perf_counter() - start)
        return statistics.median(times) * 1000.0
    finally:
        torch.set_num_threads(previous)


class CompressionReport:
    """Compare a dense model with its compressed version on a dataloader.

    Everything is measured when the report is built; both models are put in eval mode for it and
    returned to their previous mode afterwards.

    Args:
        dense_model: The reference model (float).
        compressed_model: The model after :func:`~lightning_weightlight.compress`.
        dataloader: Batches of ``(inputs, targets)``; the first batch also gives the latency inputs.
        metric: A torchmetrics metric (cloned for each model); top-1 accuracy by default.
        metric_name: Name of the metric in the tables; the metric's class name by default.
        batch_sizes: Batch sizes at which latency is measured.
        warmup: Calls before timing starts.
        repeats: Timed calls; the median is reported.
        threads: Torch threads during the latency measurement (``None`` keeps the current value).
        max_batches: Evaluate at most this many batches of ``dataloader``.

    Example:
        >>> from torch.utils.data import DataLoader, TensorDataset
        >>> model = nn.Sequential(nn.Linear(8, 4))
        >>> data = DataLoader(TensorDataset(torch.randn(16, 8), torch.randint(0, 4, (16,))), batch_size=8)
        >>> report = CompressionReport(model, model, data, batch_sizes=[1], repeats=3)
        >>> report.dense.parameters, report.compressed.parameters
        (36, 36)
    """

    def __init__(
        self,
        dense_model: nn.Module,
        compressed_model: nn.Module,
        dataloader: Iterable[Any],
        *,
        metric: Any | None = None,
        metric_name: str | None = None,
        batch_sizes: Sequence[int] = (1, 32),
        warmup: int = 5,
        repeats: int = 20,
        threads: int | None = 1,
        max_batches: int | None = None,
    ) -> None:
        batch_sizes = list(batch_sizes)
        if not batch_sizes or any(not isinstance(size, int) or size < 1 for size in batch_sizes):
            raise ValueError(
                f"batch_sizes: expected a non-empty list of positive integers, but got {batch_sizes}"
            )
        for name, value, minimum in (("warmup", warmup, 0), ("repeats", repeats, 1)):
            if not isinstance(value, int) or value < minimum:
                raise ValueError(f"{name}: expected an integer of at least {minimum}, but got {value!r}")
        if metric is not None and not callable(getattr(metric, "update", None)):
            raise TypeError(f"metric: expected a torchmetrics Metric, but got {type(metric).__name__}")
        self.metric_name = metric_name or (type(metric).__name__ if metric is not None else "accuracy")
        self.batch_sizes = batch_sizes

        batches = []
        for index, batch in enumerate(dataloader):
            if max_batches is not None and index >= max_batches:
                break
            batches.append(batch)
        if not batches:
            raise ValueError("dataloader: expected at least one batch, but got none")
        sample = _split_batch(batches[0])[0]

        modes = (dense_model.training, compressed_model.training)
        dense_model.eval()
        compressed_model.eval()
        try:
            self.dense = self._summarize(dense_model, batches, metric, sample, warmup, repeats, threads)
            self.compressed = self._summarize(
                compressed_model, batches, metric, sample, warmup, repeats, threads
            )
            dense_layers = dict(dense_model.named_modules())
            self.layers = [
                _describe_layer(name, module, dense_layers.get(name))
                for name, module in _weight_layers(compressed_model).items()
            ]
        finally:
            dense_model.train(modes[0])
            compressed_model.train(modes[1])

    def _summarize(
        self,
        model: nn.Module,
        batches: Sequence[Any],
        metric: Any | None,
        sample: torch.Tensor,
        warmup: int,
        repeats: int,
        threads: int | None,
    ) -> ModelSummary:
        size, zipped = _file_sizes(model)
        parameters, nonzero = _count_parameters(model)
        latency = {
            size_: measure_latency(
                model, _make_input(sample, size_), warmup=warmup, repeats=repeats, threads=threads
            )
            for size_ in self.batch_sizes
        }
        return ModelSummary(_evaluate(model, batches, metric), size, zipped, parameters, nonzero, latency)

    def ratios(self) -> dict[str, float]:
        """Return how many times smaller and faster the compressed model is, and its metric change."""
        ratios = {
            "size": self.dense.size_bytes / self.compressed.size_bytes,
            "zipped_size": self.dense.zipped_bytes / self.compressed.zipped_bytes,
        }
        for batch_size in self.batch_sizes:
            ratios[f"speedup_batch_{batch_size}"] = (
                self.dense.latency_ms[batch_size] / self.compressed.latency_ms[batch_size]
            )
        if self.dense.metric is not None and self.compressed.metric is not None:
            ratios["metric_change"] = self.compressed.metric - self.dense.metric
        return ratios

    def to_dict(self) -> dict[str, Any]:
        """Return the report as plain JSON-serialisable types."""
        return {
            "metric_name": self.metric_name,
            "batch_sizes": self.batch_sizes,
            "dense": asdict(self.dense),
            "compressed": asdict(self.compressed),
            "ratios": self.ratios(),
            "layers": [asdict(layer) for layer in self.layers],
        }

    def to_json(self, path: str | os.PathLike | None = None) -> str:
        """Return the report as JSON text, and write it to ``path`` when given."""
        text = json.dumps(self.to_dict(), indent=2)
        if path is not None:
            Path(path).write_text(text + "\n")
        return text

    def _summary_rows(self) -> list[list[Any]]:
        dense, compressed = self.dense, self.compressed
        rows = []
        if dense.metric is not None and compressed.metric is not None:
            change = compressed.metric - dense.metric
            rows.append(
                [self.metric_name, f"{dense.metric:.4f}", f"{compressed.metric:.4f}", f"{change:+.4f}"]
            )
        for label, before, after in (
            ("size on disk (KiB)", dense.size_bytes, compressed.size_bytes),
            ("zipped size (KiB)", dense.zipped_bytes, compressed.zipped_bytes),
        ):
            rows.append(
                [label, f"{before / 1024:.1f}", f"{after / 1024:.1f}", f"{before / after:.2f}x smaller"]
            )
        rows.append(
            [
                "parameters (non-zero)",
                f"{dense.parameters} ({dense.nonzero_parameters})",
                f"{compressed.parameters} ({compressed.nonzero_parameters})",
                "",
            ]
        )
        for size in self.batch_sizes:
            before, after = dense.latency_ms[size], compressed.latency_ms[size]
            rows.append(
                [
                    f"latency batch {size} (ms)",
                    f"{before:.3f}",
                    f"{after:.3f}",
                    f"{before / after:.2f}x faster" if after <= before else f"{after / before:.2f}x slower",
                ]
            )
        return rows

    def _layer_rows(self) -> list[list[Any]]:
        return [
            [
                layer.name,
                layer.module,
                layer.shape,
                layer.kernel,
                layer.pattern,
                layer.bits,
                f"{layer.sparsity:.1%}",
                "" if layer.dense_sparsity is None else f"{layer.dense_sparsity:.1%}",
            ]
            for layer in self.layers
        ]

    def _render(self, tablefmt: str) -> str:
        summary = tabulate(
            self._summary_rows(), headers=["", "dense", "compressed", "change"], tablefmt=tablefmt
        )
        layers = tabulate(
            self._layer_rows(),
            headers=["layer", "module", "shape", "kernel", "pattern", "bits", "sparsity", "dense sparsity"],
            tablefmt=tablefmt,
        )
        return f"{summary}\n\n{layers}"

    def to_table(self) -> str:
        """Return the report as plain-text tables for a terminal."""
        return self._render("simple")

    def to_markdown(self) -> str:
        """Return the report as markdown tables."""
        return self._render("github")

    def __str__(self) -> str:
        return self.to_table()

    def save_plot(self, path: str | os.PathLike) -> Path:
        """Draw per-layer sparsity, and metric, size and latency relative to dense, as a PNG."""
        # A Figure without pyplot draws with the Agg canvas and leaves the user's backend alone.
        from matplotlib.figure import Figure
        from matplotlib.ticker import NullFormatter, PercentFormatter

        path = Path(path)
        figure = Figure(figsize=(12, max(4.0, 0.35 * len(self.layers) + 1.5)))
        left, right = figure.subplots(1, 2)
        names = [layer.name for layer in self.layers]
        colors = {"dense": "#9e9e9e", "int8": "#1f77b4", "sparse": "#2ca02c", "sparse_int8": "#d62728"}
        positions = range(len(names))
        left.barh(
            positions,
            [100 * layer.sparsity for layer in self.layers],
            color=[colors.get(layer.kernel, "#7f7f7f") for layer in self.layers],
        )
        left.set_yticks(list(positions), names, fontsize=8)
        left.invert_yaxis()
        left.set_xlim(0, 135)
        left.set_xticks([0, 20, 40, 60, 80, 100])
        left.set_xlabel("weight sparsity (%)")
        left.set_title("Per-layer sparsity and kernel")
        for position, layer in zip(positions, self.layers):
            label = f"{layer.sparsity:.0%} {layer.kernel}, {layer.bits}-bit"
            left.text(100 * layer.sparsity + 1.5, position, label, va="center", fontsize=8)

        labels, values = [], []
        if self.dense.metric:
            labels.append(self.metric_name)
            values.append(100 * (self.compressed.metric or 0.0) / self.dense.metric)
        labels += ["size", "zipped size"]
        values += [
            100 * self.compressed.size_bytes / self.dense.size_bytes,
            100 * self.compressed.zipped_bytes / self.dense.zipped_bytes,
        ]
        for size in self.batch_sizes:
            labels.append(f"latency b={size}")
            values.append(100 * self.compressed.latency_ms[size] / self.dense.latency_ms[size])
        bars = right.bar(labels, values, color="#1f77b4")
        right.axhline(100, color="black", linewidth=1, linestyle="--", label="dense = 100%")
        right.bar_label(bars, labels=[f"{value:.0f}%" for value in values], fontsize=8)
        right.set_ylabel("compressed / dense")
        right.set_title("Compressed against dense (size and latency: lower is better)")
        right.tick_params(axis="x", labelrotation=30)
        if max(values) > 300:
            right.set_yscale("log")
            right.yaxis.set_major_formatter(PercentFormatter())
            right.yaxis.set_minor_formatter(NullFormatter())
        right.legend(fontsize=8)

        figure.tight_layout()
        path.parent.mkdir(parents=True, exist_ok=True)
        figure.savefig(path, dpi=110)
        return path

    def save(self, directory: str | os.PathLike) -> dict[str, Path]:
        """Write ``report.md``, ``report.json`` and ``report.png`` to ``directory``; return their paths."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        paths = {
            "markdown": directory / "report.md",
            "json": directory / "report.json",
            "plot": directory / "report.png",
        }
        paths["markdown"].write_text(self.to_markdown() + "\n")
        self.to_json(paths["json"])
        self.save_plot(paths["plot"])
        return paths

    def metrics(self, prefix: str = "compression/") -> dict[str, float]:
        """Return the headline numbers as flat ``{name: value}`` metrics for a Lightning logger."""
        values = {
            "size_bytes_dense": self.dense.size_bytes,
            "size_bytes_compressed": self.compressed.size_bytes,
            "zipped_bytes_dense": self.dense.zipped_bytes,
            "zipped_bytes_compressed": self.compressed.zipped_bytes,
            **self.ratios(),
        }
        if self.dense.metric is not None and self.compressed.metric is not None:
            values[f"{self.metric_name}_dense"] = self.dense.metric
            values[f"{self.metric_name}_compressed"] = self.compressed.metric
        for size in self.batch_sizes:
            values[f"latency_ms_batch_{size}_dense"] = self.dense.latency_ms[size]
            values[f"latency_ms_batch_{size}_compressed"] = self.compressed.latency_ms[size]
        for layer in self.layers:
            values[f"sparsity/{layer.name}"] = layer.sparsity
        return {prefix + key: float(value) for key, value in values.items()}
