"""Time optimizer steps of a 4-layer, 2048-wide MLP with and without each compression callback.

Every case trains the same model on the same synthetic batch in a real ``Trainer``. The cases take
turns for several rounds in one process, so that load from other processes on a shared machine
spreads over all of them. A step is timed from ``on_train_batch_start`` to ``on_train_batch_end``
(forward, backward, optimizer step and every callback hook in between). The report gives the median
step time of each case and its ratio to the dense case.

- ``weight_pruning`` prunes to 90% at step 0 and is timed on the steps after that event, so the ratio
  is the cost per step between pruning events.
- ``dynamic_pruning`` keeps 90% sparsity and updates its masks every ``--update-every`` steps; its
  timed window covers whole update intervals, and its ratio is the mean over them.
- ``qat`` fake quantizes every Linear layer (int8 weights per channel, uint8 static inputs) from
  step 0. ``benchmarks/training_overhead_qat.py`` times the same comparison without a Trainer.

Add a case by adding an entry to ``CASES``: a function that returns the callbacks, and which steps to
time.

Run: ``python benchmarks/training_overhead.py`` (``--help`` lists the options).
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback
from tabulate import tabulate
from torch import nn
from torch.utils.data import DataLoader, Dataset

from lightning_weightlight.pruning import DynamicPruning, WeightPruning
from lightning_weightlight.quantization import QuantizationAwareTraining


class SameBatch(Dataset):
    """One fixed batch of inputs and targets, repeated ``length`` times."""

    def __init__(self, batch_size: int, width: int, length: int) -> None:
        generator = torch.Generator().manual_seed(0)
        self.batch = (
            torch.randn(batch_size, width, generator=generator),
            torch.randn(batch_size, width, generator=generator),
        )
        self.length = length

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.batch


class WideMLP(L.LightningModule):
    """Four ``width x width`` Linear layers with ReLU between them, trained on MSE.

    The optimizer is the one that ``--optimizer`` names.
    """

    def __init__(self, width: int, batch_size: int, steps: int, optimizer: str = "adam-fused") -> None:
        super().__init__()
        self.width, self.batch_size, self.steps, self.optimizer = width, batch_size, steps, optimizer
        self.layers = nn.Sequential(
            nn.Linear(width, width),
            nn.ReLU(),
            nn.Linear(width, width),
            nn.ReLU(),
            nn.Linear(width, width),
            nn.ReLU(),
            nn.Linear(width, width),
        )

    def training_step(self, batch, batch_idx):
        inputs, targets = batch
        return F.mse_loss(self.layers(inputs), targets)

    def configure_optimizers(self):
        if self.optimizer == "sgd":
            return torch.optim.SGD(self.parameters(), lr=1e-3, momentum=0.9)
        return torch.optim.Adam(self.parameters(), lr=1e-4, fused=self.optimizer == "adam-fused")

    def train_dataloader(self) -> DataLoader:
        return DataLoader(SameBatch(self.batch_size, self.width, self.steps), batch_size=None)


HOOKS = ("on_train_batch_start", "on_after_backward", "on_before_optimizer_step", "on_train_batch_end")
"""Callback hooks whose run time counts as time spent in the callback."""


class StepTimer(Callback):
    """Record the wall time of every training batch and the part of it spent in the callbacks under test."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self.callback_times: list[float] = []
        self._start = 0.0
        self._in_callbacks = 0.0

    def instrument(self, callback: Callback) -> None:
        """Time ``callback``'s hooks, and its optimizer step post-hook when it has one."""
        names = [*HOOKS, "_after_optimizer_step"]
        for name in names:
            method = getattr(callback, name, None)
            if method is None or getattr(type(callback), name, None) is getattr(Callback, name, None):
                continue
            setattr(callback, name, self._timed(method))

    def _timed(self, method: Callable) -> Callable:
        def run(*args, **kwargs):
            start = time.perf_counter()
            result = method(*args, **kwargs)
            self._in_callbacks += time.perf_counter() - start
            return result

        return run

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self._in_callbacks = 0.0
        self._start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.times.append(time.perf_counter() - self._start)
        self.callback_times.append(self._in_callbacks)


@dataclass
class Case:
    """A benchmark case: the callbacks under test and the steps whose times count."""

    callbacks: Callable[[argparse.Namespace], list[Callback]]
    timed_steps: Callable[[argparse.Namespace], range]
    note: str


def _steady_steps(args: argparse.Namespace) -> range:
    return range(args.warmup, args.steps)


def _update_intervals(args: argparse.Namespace) -> range:
    # Whole intervals only, starting at an update step after the warm-up.
    first = -(-args.warmup // args.update_every) * args.update_every
    intervals = (args.steps - first) // args.update_every
    return range(first, first + intervals * args.update_every)


CASES: dict[str, Case] = {
    "dense": Case(lambda args: [], _steady_steps, "no callback"),
    "weight_pruning": Case(
        lambda args: [WeightPruning(sparsity=0.9)],
        _steady_steps,
        "90% unstructured, pruned at step 0; steps between events",
    ),
    "dynamic_pruning": Case(
        lambda args: [
            DynamicPruning(sparsity=0.9, update_every_n_steps=args.update_every, stop_step=10 * args.steps)
        ],
        _update_intervals,
        "90%, RigL update every --update-every steps; mean over whole intervals",
    ),
    "qat": Case(
        lambda args: [QuantizationAwareTraining()],
        _steady_steps,
        "int8 fake quantization of weights and inputs from step 0 (target: at most 1.5x dense)",
    ),
}


def time_case(case: Case, args: argparse.Namespace) -> tuple[list[float], list[float]]:
    """Train one case for ``args.steps`` steps; return its timed steps' step times and callback times."""
    L.seed_everything(0, verbose=False)
    timer = StepTimer()
    callbacks = case.callbacks(args)
    for callback in callbacks:
        timer.instrument(callback)
    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=args.steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[timer, *callbacks],
    )
    trainer.fit(WideMLP(args.width, args.batch_size, args.steps, args.optimizer))
    steps = case.timed_steps(args)
    return [timer.times[step] for step in steps], [timer.callback_times[step] for step in steps]


def main(argv: list[str] | None = None) -> list[list]:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--width", type=int, default=2048, help="width of each Linear layer")
    parser.add_argument("--batch-size", type=int, default=256, help="samples per step")
    parser.add_argument("--steps", type=int, default=300, help="optimizer steps per case and round")
    parser.add_argument("--warmup", type=int, default=5, help="steps left out of the timing at the start")
    parser.add_argument(
        "--update-every",
        type=int,
        default=100,
        help="DynamicPruning's update interval in steps (100, its default)",
    )
    parser.add_argument("--rounds", type=int, default=2, help="times every case is trained, taking turns")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch intra-op threads")
    parser.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES), help="cases to run")
    parser.add_argument(
        "--optimizer",
        default="adam-fused",
        choices=["adam-fused", "adam", "sgd"],
        help="Adam with fused=True (the fastest CPU step), Adam's default step, or SGD with momentum",
    )
    args = parser.parse_args(argv)
    if "dynamic_pruning" in args.cases and not _update_intervals(args):
        parser.error(
            f"--steps: expected room for at least one whole update interval of {args.update_every} steps "
            f"after the {args.warmup} warm-up steps, but got {args.steps}; pass --steps "
            f"{-(-args.warmup // args.update_every) * args.update_every + args.update_every} or more"
        )
    torch.set_num_threads(args.threads)

    times: dict[str, list[float]] = {name: [] for name in args.cases}
    callback_times: dict[str, list[float]] = {name: [] for name in args.cases}
    for round_index in range(args.rounds):
        for name in args.cases:
            step_times, hook_times = time_case(CASES[name], args)
            times[name].extend(step_times)
            callback_times[name].extend(hook_times)
            print(
                f"round {round_index + 1}/{args.rounds}, {name}: median step "
                f"{statistics.median(times[name]) * 1e3:.1f} ms so far",
                flush=True,
            )

    dense = times.get("dense")
    rows = []
    for name in args.cases:
        median = statistics.median(times[name])
        mean = statistics.fmean(times[name])
        # Cases timed over update intervals compare means, because their update steps are part of
        # the cost; the others compare medians, which ignore steps slowed by other processes.
        if dense is None:
            ratio = "-"
        elif CASES[name].timed_steps is _update_intervals:
            ratio = f"{mean / statistics.fmean(dense):.3f}"
        else:
            ratio = f"{median / statistics.median(dense):.3f}"
        # The same steps' own split between training and callback work; a trend in the machine's
        # load shifts both parts alike, so this ratio is steadier than the one across cases.
        in_callbacks = sum(callback_times[name])
        own_ratio = f"{sum(times[name]) / (sum(times[name]) - in_callbacks):.3f}"
        rows.append([name, f"{median * 1e3:.1f}", f"{mean * 1e3:.1f}", ratio, own_ratio, CASES[name].note])
    print(
        f"{args.width}-wide 4-layer MLP, batch {args.batch_size}, {args.optimizer}, {args.threads} threads, "
        f"{args.rounds} rounds of {args.steps} steps per case"
    )
    print(
        tabulate(
            rows,
            headers=[
                "case",
                "median ms",
                "mean ms",
                "ratio to dense",
                "step / (step - hooks)",
                "what is timed",
            ],
            tablefmt="github",
        )
    )
    return rows


if __name__ == "__main__":
    main()
