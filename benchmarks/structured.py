"""Time channel-pruned models against their dense originals, through the module call, in one run.

For each model the script removes the lowest-L1 channels with the functional core of
``StructuredPruning`` (the head keeps its outputs), then times the dense and the pruned model on
the same input, alternating between them. Times are medians of ``torch.utils.benchmark``
measurements after a warm-up; the speedup is ``dense time / pruned time``.

Models:
- ``digits-cnn``: ``DigitsCNN()`` on a batch of 8x8 digits, 30% of the convolution filters removed
  (the recipe of ``examples/configs/digits_filter_prune.yaml``).
- ``residual-cnn``: a 32x32 CNN with two residual blocks of 64 and 128 channels, at ``--ratio``.
- ``token-mlp``: a transformer-style MLP block (384 -> 1536 -> 384) over 64 tokens, at ``--ratio``.

    python benchmarks/structured.py                 # ratio 0.5, 1 thread
    python benchmarks/structured.py --threads 2 --ratio 0.3
"""

from __future__ import annotations

import argparse
import copy
import platform
from collections.abc import Callable

import torch
import torch.nn.functional as F
from tabulate import tabulate
from torch import nn
from torch.utils import benchmark

from lightning_weightlight.demo import DigitsCNN
from lightning_weightlight.pruning import structured_core as core


class ResidualCNN(nn.Module):
    """Two stages of a residual block each, 64 then 128 channels, on 3x32x32 images."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 64, 3, padding=1, bias=False), nn.BatchNorm2d(64), nn.ReLU())
        self.block1 = self._block(64)
        self.down = nn.Sequential(nn.Conv2d(64, 128, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(128))
        self.block2 = self._block(128)
        self.head = nn.Linear(128, 10)

    @staticmethod
    def _block(width: int) -> nn.Sequential:
        return nn.Sequential(
            nn.Conv2d(width, width, 3, padding=1, bias=False),
            nn.BatchNorm2d(width),
            nn.ReLU(),
            nn.Conv2d(width, width, 3, padding=1, bias=False),
            nn.BatchNorm2d(width),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = F.relu(x + self.block1(x))
        x = F.relu(self.down(x))
        x = F.relu(x + self.block2(x))
        return self.head(x.mean(dim=(2, 3)))


class TokenMLP(nn.Module):
    """A pre-norm transformer MLP block with its residual addition and a classification head."""

    def __init__(self, dim: int = 384, hidden: int = 1536) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)
        self.head = nn.Linear(dim, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.fc2(F.gelu(self.fc1(self.norm(x))))
        return self.head(x.mean(dim=1))


def prune(
    model: nn.Module, example: torch.Tensor, ratio: float, layer_types, group_reduction: str
) -> nn.Module:
    """Return a copy of ``model`` with ``ratio`` of the channels of every prunable group removed."""
    pruned = copy.deepcopy(model)
    graph = core.build_dependency_graph(pruned, example)
    head = [name for name, module in pruned.named_modules() if isinstance(module, nn.Linear)][-1]
    groups, _ = core.prunable_groups(graph, pruned, {head}, layer_types)
    breaking = core.find_breaking_groups(pruned, example, [item.root for item in groups])
    groups = [item for item in groups if item.root not in breaking]
    scores = core.score_groups(groups, core.build_importance("l1", group_reduction))
    plan = core.plan_removal(scores, {item.root: item.channels for item in groups}, ratio)
    core.apply_plan(graph, pruned, plan)
    return pruned


def median_seconds(model: nn.Module, example: torch.Tensor, threads: int, min_run_time: float) -> float:
    timer = benchmark.Timer(
        stmt="model(example)", globals={"model": model, "example": example}, num_threads=threads
    )
    return timer.blocked_autorange(min_run_time=min_run_time).median


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--ratio", type=float, default=0.5, help="channel ratio removed (not for digits-cnn)")
    parser.add_argument("--threads", type=int, default=1, help="intra-op threads of both models")
    parser.add_argument("--repeats", type=int, default=3, help="alternating measurements of each model")
    parser.add_argument("--min-run-time", type=float, default=0.5, help="seconds per measurement")
    args = parser.parse_args()
    if not 0.0 <= args.ratio < 1.0:
        parser.error(f"--ratio: expected a value in [0, 1), but got {args.ratio}")
    torch.manual_seed(0)

    cases: list[tuple[str, Callable[[], nn.Module], torch.Tensor, float, tuple, str]] = [
        ("digits-cnn", DigitsCNN, torch.randn(256, 1, 8, 8), 0.3, (nn.Conv2d,), "first"),
        ("residual-cnn", ResidualCNN, torch.randn(32, 3, 32, 32), args.ratio, (nn.Conv2d, nn.Linear), "mean"),
        ("token-mlp", TokenMLP, torch.randn(8, 64, 384), args.ratio, (nn.Conv2d, nn.Linear), "mean"),
    ]
    rows = []
    for name, build, example, ratio, layer_types, reduction in cases:
        dense = build().eval()
        pruned = prune(dense, example[:1], ratio, layer_types, reduction).eval()
        dense_params, dense_macs = core.count_params_and_macs(dense, example[:1])
        pruned_params, pruned_macs = core.count_params_and_macs(pruned, example[:1])
        dense_times, pruned_times = [], []
        with torch.inference_mode():
            for model in (dense, pruned):
                model(example)
            for _ in range(args.repeats):
                dense_times.append(median_seconds(dense, example, args.threads, args.min_run_time))
                pruned_times.append(median_seconds(pruned, example, args.threads, args.min_run_time))
        dense_time, pruned_time = (
            sorted(dense_times)[len(dense_times) // 2],
            sorted(pruned_times)[len(pruned_times) // 2],
        )
        rows.append(
            [
                name,
                tuple(example.shape),
                ratio,
                f"{dense_params} -> {pruned_params}",
                f"{dense_macs / 1e6:.1f} -> {pruned_macs / 1e6:.1f}",
                f"{dense_time * 1e3:.3f}",
                f"{pruned_time * 1e3:.3f}",
                f"{dense_time / pruned_time:.2f}x",
            ]
        )

    print(
        f"torch {torch.__version__}, {platform.processor() or platform.machine()}, {args.threads} thread(s)"
    )
    print(
        tabulate(
            rows,
            headers=[
                "model",
                "input",
                "ratio",
                "params",
                "MMACs per sample",
                "dense ms",
                "pruned ms",
                "speedup",
            ],
        )
    )


if __name__ == "__main__":
    main()
