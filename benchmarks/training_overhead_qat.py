"""Training-step cost of quantization-aware training against the float step, measured in one run.

Usage: python benchmarks/training_overhead_qat.py [--batch-size 256] [--repeats 15] [--threads 2]

The model is a 4-layer MLP, 2048 wide. A step is forward, cross-entropy, backward and an SGD
update. The QAT model fake quantizes every layer's weight (int8 per channel) and input (uint8 per
tensor, moving-average observer updating on every step). Float and QAT steps alternate, so both
see the same machine load, and the medians are compared. The target is a ratio of at most 1.5.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F
from torch import nn

from lightning_weightlight.quantization import QATConfig, prepare_qat


def build_mlp(width: int = 2048, depth: int = 4, classes: int = 10) -> nn.Sequential:
    """Build ``depth`` Linear layers (``depth - 1`` hidden layers of ``width`` with ReLU, then the head)."""
    layers: list[nn.Module] = []
    for _ in range(depth - 1):
        layers += [nn.Linear(width, width), nn.ReLU()]
    layers.append(nn.Linear(width, classes))
    return nn.Sequential(*layers)


def _step(model: nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor) -> float:
    start = time.perf_counter()
    optimizer.zero_grad(set_to_none=True)
    F.cross_entropy(model(x), y).backward()
    optimizer.step()
    return time.perf_counter() - start


def measure_qat_overhead(
    batch_size: int = 256,
    repeats: int = 15,
    warmup: int = 3,
    width: int = 2048,
    config: QATConfig | None = None,
) -> dict[str, float]:
    """Time float and QAT training steps of the 4-layer MLP, alternating, and return the medians.

    Returns:
        ``{"float_ms": ..., "qat_ms": ..., "ratio": qat / float}``, medians over ``repeats`` steps each.
    """
    torch.manual_seed(0)
    float_model = build_mlp(width).train()
    qat_model = build_mlp(width).train()
    qat_model.load_state_dict(float_model.state_dict())
    prepare_qat(qat_model, config or QATConfig())
    x = torch.randn(batch_size, width)
    y = torch.randint(0, 10, (batch_size,))
    optimizers = {
        "float": torch.optim.SGD(float_model.parameters(), lr=1e-3),
        "qat": torch.optim.SGD(qat_model.parameters(), lr=1e-3),
    }
    models = {"float": float_model, "qat": qat_model}
    times: dict[str, list[float]] = {"float": [], "qat": []}
    for index in range(warmup + repeats):
        for name in ("float", "qat"):
            elapsed = _step(models[name], optimizers[name], x, y)
            if index >= warmup:
                times[name].append(elapsed)
    float_ms = 1000 * statistics.median(times["float"])
    qat_ms = 1000 * statistics.median(times["qat"])
    return {"float_ms": float_ms, "qat_ms": qat_ms, "ratio": qat_ms / float_ms}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=256, help="samples per step")
    parser.add_argument("--repeats", type=int, default=15, help="timed steps of each kind")
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    result = measure_qat_overhead(args.batch_size, args.repeats)
    print(
        f"4x2048 MLP, batch {args.batch_size}, {args.threads} threads: "
        f"float step {result['float_ms']:.1f} ms, QAT step {result['qat_ms']:.1f} ms, "
        f"ratio {result['ratio']:.2f} (target <= 1.5)"
    )


if __name__ == "__main__":
    main()
