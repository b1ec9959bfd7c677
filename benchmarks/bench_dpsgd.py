"""DP-SGD training throughput against non-private training of the same model, and against Opacus.

Models: an MLP 784-256-10 and a small CNN on 1x28x28 inputs, expected batch
256 (Poisson sampling rate 256/n), on random data. Baseline, measured in the
same run: plain SGD with batches of 256. Compared: ours (the all-Linear fast
path for the MLP, torch.func vmap per-example gradients for the CNN), and
Opacus 1.6 in its hooks, functorch and ghost-clipping modes. Throughput is
examples per second over the same number of steps after one warm-up step.
"""

from __future__ import annotations

import time
import warnings

import torch
from torch import nn
from torch.nn import functional as F

from consortium.learning.training import TrainSettings, train_local
from consortium.privacy.dpsgd import secure_generator, train_dp_sgd

N, BATCH, STEPS = 256 * 12, 256, 10


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
    train_local(model, X[:BATCH], y[:BATCH], settings, seed=0)  # warm-up
    t0 = time.perf_counter()
    train_local(model, X[: BATCH * STEPS], y[: BATCH * STEPS], settings, seed=0)
    return BATCH * STEPS / (time.perf_counter() - t0)


def ours(make, X, y) -> float:
    settings = TrainSettings(epochs=1, batch_size=BATCH, lr=0.05)
    model, q = make(), BATCH / N
    kw = dict(sampling_rate=q, noise_multiplier=1.0, clip=1.0, generator=secure_generator(0))
    train_dp_sgd(model, X, y, settings, steps=1, **kw)
    t0 = time.perf_counter()
    train_dp_sgd(model, X, y, settings, steps=STEPS, **kw)
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
        base = plain(make, X, y)
        rows.append((f"{kind}: non-private SGD (examples/s)  [baseline]", base, "1.00x"))
        ours_rate = ours(make, X, y)
        rows.append((f"{kind}: consortium DP-SGD (examples/s)", ours_rate, f"{ours_rate / base:.2f}x"))
        best = 0.0
        for mode in ("hooks", "functorch", "ghost"):
            try:
                rate = opacus(make, X, y, mode)
            except Exception as exc:  # a mode that does not support the model is reported, not hidden
                rows.append((f"{kind}: opacus {mode} (failed: {type(exc).__name__})", float("nan"), ""))
                continue
            best = max(best, rate)
            rows.append((f"{kind}: opacus 1.6 {mode} (examples/s)", rate, f"{rate / base:.2f}x"))
        if best:
            rows.append((f"{kind}: consortium vs best opacus mode", ours_rate / best, f"{ours_rate / best:.2f}x"))
    return rows


if __name__ == "__main__":
    for name, value, ratio in main():
        print(f"{name:60s} {value:>12.4g}  {ratio}")
