"""DP-SGD throughput on the image example's GroupNorm CNN (32x32x3, batch 256) against non-private training and Opacus.

Model: ``examples/images/cnn32.py``'s ``group_norm_cnn()`` (3 convolutions with
GroupNorm, 10 classes), on random 3x32x32 inputs, on the CPU with torch's
default thread count. One step is timed end to end, exactly 256 examples:

- non-private (the baseline, measured in the same run): forward, backward, SGD step;
- consortium DP-SGD: one ``train_dp_sgd`` call of one step on a 256-row table
  with sampling rate 1 (so the batch is exactly 256), which is what a site
  runs: sampling, per-example gradients (the one-pass path: Conv2d, GroupNorm,
  Linear), clipping, summing, noise and the optimiser step;
- Opacus 1.6 (``make_private``, batch 256 without Poisson sampling) in its
  ``hooks``, ``functorch``, ``ew`` (expanded weights) and ``ghost`` modes; a
  mode that fails on this model is reported with its error, not hidden.

Every contender runs WARMUP untimed steps, then ROUNDS timed runs of STEPS
steps each (one ``train_dp_sgd(steps=STEPS)`` call for ours), the contenders
taking turns, each round starting one contender later than the last (so a
slow spell of a shared machine hits them all alike, and none always runs
after the same neighbour); the median run is reported as examples per second.
"""

from __future__ import annotations

import importlib.util
import os
import pathlib
import statistics
import time
import warnings
from collections.abc import Callable

import torch
from torch.nn import functional as F

from consortium.learning.specs import TrainSettings
from consortium.learning.training import TrainingData
from consortium.privacy.dpsgd import secure_generator, train_dp_sgd

BATCH, WARMUP, ROUNDS, STEPS = 256, 1, 12, 1
OPACUS_MODES = ("hooks", "functorch", "ew", "ghost")


def _cnn() -> torch.nn.Module:
    path = pathlib.Path(__file__).resolve().parents[1] / "examples" / "images" / "cnn32.py"
    spec = importlib.util.spec_from_file_location("cnn32", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    torch.manual_seed(0)
    return module.group_norm_cnn(in_channels=3, n_classes=10, width=32)


def _data() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(BATCH, 3, 32, 32, generator=g), torch.randint(0, 10, (BATCH,), generator=g)


def plain(X: torch.Tensor, y: torch.Tensor) -> Callable[[], None]:
    model = _cnn()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)

    def run(steps: int) -> None:
        for _ in range(steps):
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(model(X), y).backward()
            opt.step()

    return run


def ours(X: torch.Tensor, y: torch.Tensor) -> Callable[[], None]:
    model = _cnn()
    settings = TrainSettings(epochs=1, batch_size=BATCH, lr=0.05, momentum=0.9)
    generator = secure_generator(0)

    def run(steps: int) -> None:
        train_dp_sgd(model, TrainingData.of(X, y), settings, sampling_rate=1.0, noise_multiplier=1.0, clip=1.0, steps=steps,
                     generator=generator)

    return run


def opacus_peer(X: torch.Tensor, y: torch.Tensor, mode: str) -> Callable[[], None]:
    from opacus import PrivacyEngine

    model = _cnn()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(X, y), batch_size=BATCH)
    criterion = torch.nn.CrossEntropyLoss()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        made = PrivacyEngine().make_private(
            module=model, optimizer=opt, data_loader=loader, criterion=criterion,
            noise_multiplier=1.0, max_grad_norm=1.0, grad_sample_mode=mode, poisson_sampling=False,
        )
    if mode == "ghost":
        model, opt, criterion, _ = made
    else:
        model, opt, _ = made

    def run(steps: int) -> None:
        for _ in range(steps):
            opt.zero_grad()
            out = model(X)
            (criterion(out, y) if mode == "ghost" else F.cross_entropy(out, y)).backward()
            opt.step()

    return run


def _why(exc: Exception) -> str:
    return f"{type(exc).__name__}: {str(exc).splitlines()[0][:80]}" if str(exc) else type(exc).__name__


def main() -> list[tuple[str, float, str]]:
    load_before = os.getloadavg()[0]
    X, y = _data()
    makers: dict[str, Callable[[], Callable[[int], None]]] = {
        "non-private SGD": lambda: plain(X, y),
        "consortium DP-SGD": lambda: ours(X, y),
    }
    if importlib.util.find_spec("opacus") is None:
        print("opacus not installed: the Opacus peer is skipped")
    else:
        makers.update({f"opacus 1.6 {mode}": (lambda mode=mode: opacus_peer(X, y, mode)) for mode in OPACUS_MODES})
    runs: dict[str, Callable[[int], None]] = {}
    failed: dict[str, str] = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Opacus's notices about hooks and secure RNG
        for name, make in makers.items():
            try:
                runs[name] = make()
                runs[name](WARMUP)
            except Exception as exc:  # a mode that does not support the model is reported, not hidden
                failed[name] = _why(exc)
                runs.pop(name, None)
        times: dict[str, list[float]] = {name: [] for name in runs}
        for turn in range(ROUNDS):
            order = list(runs.items())
            if not order:
                break
            for name, run in order[turn % len(order):] + order[: turn % len(order)]:
                try:
                    t0 = time.perf_counter()
                    run(STEPS)
                    times[name].append(time.perf_counter() - t0)
                except Exception as exc:
                    failed[name] = _why(exc)
                    del runs[name], times[name]
    rate = {name: BATCH * STEPS / statistics.median(t) for name, t in times.items() if t}
    if "non-private SGD" not in rate or "consortium DP-SGD" not in rate:
        return [(f"{name} (failed: {why})", float("nan"), "") for name, why in failed.items()]
    base, mine = rate["non-private SGD"], rate["consortium DP-SGD"]
    rows: list[tuple[str, float, str]] = [(
        f"torch threads (CPU; batch {BATCH} of 3x32x32; median of {ROUNDS} runs of {STEPS} step{'s' * (STEPS > 1)})",
        float(torch.get_num_threads()), "",
    ), (  # the figures are only comparable on a quiet machine: say how busy it was
        f"machine load average (1 min) before the run, then after it ({os.cpu_count()} CPUs)", load_before,
        f"{os.getloadavg()[0]:.2f}",
    )]
    for name, r in rate.items():
        tag = "  [baseline]" if name == "non-private SGD" else ""
        rows.append((f"{name} (examples/s){tag}", r, f"{r / base:.2f}x"))
    for name, why in failed.items():
        rows.append((f"{name} (failed: {why})", float("nan"), ""))
    peers = {name: r for name, r in rate.items() if name.startswith("opacus")}
    if peers:
        best = max(peers, key=lambda name: peers[name])
        rows.append((f"best opacus mode: {best.removeprefix('opacus 1.6 ')} (examples/s)", peers[best],
                     f"{peers[best] / base:.2f}x"))
        rows.append(("consortium DP-SGD / best opacus mode", mine / peers[best], f"{mine / peers[best]:.2f}x"))
    rows.append(("consortium DP-SGD / non-private", mine / base, f"{mine / base:.2f}x"))
    return rows


if __name__ == "__main__":
    for name, value, ratio in main():
        print(f"{name:80s} {value:>12.4g}  {ratio}")
