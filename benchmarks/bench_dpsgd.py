"""DP-SGD training throughput against non-private training of the same model, and against Opacus.

Models: an MLP 784-256-10 and a small CNN on 1x28x28 inputs, expected batch
256 (Poisson sampling rate 256/n), on random data. Baseline, measured in the
same run: plain SGD with batches of 256. Compared: ours (the one-pass fast
path for Linear and Conv2d layers, what training uses for these models),
our torch.func vmap + grad per-example path (the fallback for other
layers), and Opacus 1.6 in its hooks, functorch and ghost-clipping modes. Throughput is
examples per second over the same number of steps after one warm-up step.
Each contender is measured REPEATS times, the contenders taking turns (so a
slow spell of the machine hits them all alike), and the median is reported.
"""

from __future__ import annotations

import statistics
import time
import warnings

import torch
from torch import nn
from torch.nn import functional as F

from consortium.learning.specs import TrainSettings
from consortium.learning.training import TrainingData, train_local
from consortium.privacy import dpsgd
from consortium.privacy.dpsgd import secure_generator, train_dp_sgd

N, BATCH, STEPS, REPEATS = 256 * 12, 256, 10, 5


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(784, 256), nn.ReLU(), nn.Linear(256, 10))


def cnn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(32 * 7 * 7, 64), nn.ReLU(), nn.Linear(64, 10),
    )


def data(kind: str) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    X = torch.randn(N, 784, generator=g) if kind == "mlp" else torch.randn(N, 1, 28, 28, generator=g)
    return X, torch.randint(0, 10, (N,), generator=g)


def plain(make, X, y) -> float:
    settings = TrainSettings(epochs=1, batch_size=BATCH, lr=0.05)
    model = make()
    train_local(model, TrainingData.of(X[:BATCH], y[:BATCH]), settings, seed=0)  # warm-up
    t0 = time.perf_counter()
    train_local(model, TrainingData.of(X[: BATCH * STEPS], y[: BATCH * STEPS]), settings, seed=0)
    return BATCH * STEPS / (time.perf_counter() - t0)


def ours(make, X, y, *, vmap: bool = False) -> float:
    if vmap:  # the same training, with the fast path declared unsupported
        saved, dpsgd.fast_path_supported = dpsgd.fast_path_supported, lambda model: False
        try:
            return ours(make, X, y)
        finally:
            dpsgd.fast_path_supported = saved
    settings = TrainSettings(epochs=1, batch_size=BATCH, lr=0.05)
    model, q = make(), BATCH / N
    kw = dict(sampling_rate=q, noise_multiplier=1.0, clip=1.0, generator=secure_generator(0))
    train_dp_sgd(model, TrainingData.of(X, y), settings, steps=1, **kw)
    t0 = time.perf_counter()
    train_dp_sgd(model, TrainingData.of(X, y), settings, steps=STEPS, **kw)
    return BATCH * STEPS / (time.perf_counter() - t0)


def opacus(make, X, y, mode: str) -> float:
    warnings.filterwarnings("ignore", module="opacus")
    warnings.filterwarnings("ignore", message="Full backward hook")
    from opacus import PrivacyEngine

    model = make()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(X, y), batch_size=BATCH)
    engine = PrivacyEngine()
    criterion = nn.CrossEntropyLoss()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        made = engine.make_private(
            module=model, optimizer=opt, data_loader=loader, criterion=criterion,
            noise_multiplier=1.0, max_grad_norm=1.0, grad_sample_mode=mode, poisson_sampling=True,
        )
    if mode == "ghost":
        model, opt, criterion, loader = made
    else:
        model, opt, loader = made
    batches = iter(loader)

    def step() -> int:
        xb, yb = next(batches)
        opt.zero_grad()
        loss = criterion(model(xb), yb) if mode == "ghost" else F.cross_entropy(model(xb), yb)
        loss.backward()
        opt.step()
        return len(xb)

    step()
    t0 = time.perf_counter()
    seen = sum(step() for _ in range(STEPS))
    return seen / (time.perf_counter() - t0)


def main() -> list[tuple[str, float, str]]:
    rows: list[tuple[str, float, str]] = []
    for kind, make in (("MLP 784-256-10", mlp), ("small CNN", cnn)):
        X, y = data("mlp" if make is mlp else "cnn")
        contenders = {
            "non-private SGD": lambda: plain(make, X, y),
            "consortium DP-SGD": lambda: ours(make, X, y),
            "torch.func vmap + grad": lambda: ours(make, X, y, vmap=True),
            **{f"opacus 1.6 {mode}": (lambda mode=mode: opacus(make, X, y, mode)) for mode in ("hooks", "functorch", "ghost")},
        }
        rates: dict[str, list[float]] = {name: [] for name in contenders}
        failed: dict[str, str] = {}
        for _ in range(REPEATS):
            for name, run in contenders.items():
                if name in failed:
                    continue
                try:
                    rates[name].append(run())
                except Exception as exc:  # a mode that does not support the model is reported, not hidden
                    failed[name] = type(exc).__name__
        median = {name: statistics.median(r) for name, r in rates.items() if r}
        base, ours_rate = median["non-private SGD"], median["consortium DP-SGD"]
        for name, rate in median.items():
            tag = "  [baseline]" if name == "non-private SGD" else ""
            rows.append((f"{kind}: {name} (examples/s, median of {REPEATS}){tag}", rate, f"{rate / base:.2f}x"))
        for name, why in failed.items():
            rows.append((f"{kind}: {name} (failed: {why})", float("nan"), ""))
        best = max((r for name, r in median.items() if name.startswith("opacus")), default=0.0)
        if best:
            rows.append((f"{kind}: consortium vs best opacus mode", ours_rate / best, f"{ours_rate / best:.2f}x"))
    return rows


if __name__ == "__main__":
    for name, value, ratio in main():
        print(f"{name:70s} {value:>12.4g}  {ratio}")
