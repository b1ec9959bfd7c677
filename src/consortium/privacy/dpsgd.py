"""DP-SGD inside a site (Abadi et al., CCS 2016), with per-example gradients from torch.func.

Each step samples every training record independently with the declared
probability (Poisson sampling: the sampling the accountant assumes), computes
each sampled example's gradient (in one forward and one backward pass for
models of Linear, Conv2d, GroupNorm and LayerNorm layers, with
``vmap(grad(...))`` for any other module), clips it to L2 norm
``clip``, sums, adds N(0, (noise_multiplier * clip)^2) noise and divides by
the *expected* batch size q * n (a data-independent denominator, as the
analysis requires). The sampling and the noise come from a generator seeded
by the operating system's CSPRNG unless a test seed is given on purpose.

The loss is the task's: any ``PerExampleLoss``, a function from the model's
outputs and the targets to one loss per example (class weights, label
smoothing, a regression loss), summed over the examples. The framework keeps
what the guarantee rests on (the sampling, the clipping, the noise and the
denominator), so a task's loss changes what is learned, never what is paid.
A module that mixes examples within a batch is refused before training
(``require_per_example``): one example's gradient would then depend on the
others, and clipping it would not bound that example's influence.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import numpy as np
import torch
from torch import nn
from torch.func import functional_call, grad, vmap
from torch.nn import functional as F

from consortium.errors import ConfigError
from consortium.learning.specs import TrainSettings
from consortium.learning.training import TrainingData, make_optimizer


def secure_generator(test_seed: int | None = None) -> torch.Generator:
    """A torch generator seeded from os.urandom, or from ``test_seed`` (test mode: not private)."""
    seed = int.from_bytes(os.urandom(8), "little") if test_seed is None else test_seed
    return torch.Generator().manual_seed(seed)


def secure_numpy_generator(test_seed: int | None = None) -> np.random.Generator:
    """A numpy generator (for integer noise) seeded from os.urandom, or from ``test_seed`` (test mode)."""
    entropy = int.from_bytes(os.urandom(32), "little") if test_seed is None else [test_seed, 0x5EC]
    return np.random.default_rng(np.random.SeedSequence(entropy))


#: (outputs, targets) -> one loss per example, shape [batch]: what a task trains on.
PerExampleLoss = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def cross_entropy(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The built-in classifiers' loss: cross-entropy of the logits, one value per example."""
    return F.cross_entropy(outputs, targets, reduction="none")


#: Modules that compute across the examples of a batch in training (their statistics are the batch's).
BATCH_MIXING = (nn.modules.batchnorm._BatchNorm, nn.SyncBatchNorm)


def require_per_example(model: nn.Module) -> None:
    """Refuse a model in which one example's output depends on the others in its batch.

    Raises:
        ConfigError: naming the first such module and the fix.
    """
    for name, module in model.named_modules():
        if isinstance(module, BATCH_MIXING):
            raise ConfigError(
                f"module '{name or type(model).__name__}' ({type(module).__name__}) mixes the examples of a batch, "
                "so clipping one example's gradient cannot bound its influence under DP-SGD: replace it with "
                "GroupNorm or LayerNorm (or train without record-level DP)"
            )


def per_example_gradients(
    model: nn.Module, loss: PerExampleLoss = cross_entropy,
) -> Callable[[dict, torch.Tensor, torch.Tensor], dict[str, torch.Tensor]]:
    """A function (params, X, y) -> {name: [batch, *shape]} of each example's gradient of ``loss``."""

    def loss_one(params: dict, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        out = functional_call(model, params, (x.unsqueeze(0),))
        return loss(out, y.unsqueeze(0)).sum()

    return vmap(grad(loss_one), in_dims=(None, 0, 0))


def clip_and_sum(grads: dict[str, torch.Tensor], clip: float) -> dict[str, torch.Tensor]:
    """Scale each example's gradient to L2 norm at most ``clip`` (over all parameters), then sum."""
    batch = next(iter(grads.values())).shape[0]
    sq = torch.zeros(batch)
    for g in grads.values():
        sq += g.reshape(batch, -1).pow(2).sum(dim=1)
    factor = (clip / (sq.sqrt() + 1e-12)).clamp(max=1.0)
    return {n: torch.einsum("b,b...->...", factor, g) for n, g in grads.items()}


#: Layers the one-pass path covers; any other trainable parameter sends a model to the vmap path.
_NORMS = (nn.GroupNorm, nn.LayerNorm)


def _fast_layer(m: nn.Module) -> bool:
    """A layer whose per-example gradients the one-pass path forms: the stock forward of one of its types
    (a subclass that computes something else must not be taken for what it derives from)."""
    kind = type(m)
    if isinstance(m, nn.Conv2d):
        return (kind.forward is nn.Conv2d.forward and kind._conv_forward is nn.Conv2d._conv_forward
                and m.groups == 1 and m.padding_mode == "zeros" and not isinstance(m.padding, str))
    return any(isinstance(m, base) and kind.forward is base.forward for base in (nn.Linear, *_NORMS))


def fast_path_supported(model: nn.Module) -> bool:
    """True when every trainable parameter belongs to a Linear, (ungrouped) Conv2d, GroupNorm or LayerNorm layer."""
    owned = {id(p) for m in model.modules() if _fast_layer(m) for p in m.parameters(recurse=False)}
    return all(id(p) in owned for p in model.parameters() if p.requires_grad)


def _per_example_conv_weight_grads(m: nn.Conv2d, a: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """Each example's Conv2d weight gradient, [batch, out, in * kh * kw], in one convolution call.

    With several input channels, the batch is read as one image whose
    channels are every example's channels side by side (a view: nothing is
    copied), and the weight gradient of a convolution with ``groups=batch`` is
    taken: group b sees only example b's input channels and output gradient,
    so its weight gradient is example b's. oneDNN computes them all in one
    call, about twice as fast as batched matrix products on a CPU. With few
    input channels (an image's first layer) that kernel can stall for seconds
    on a busy machine, so the roles are swapped instead: each example's
    output gradient becomes a group's kernel, correlated with its padded input.
    """
    batch, c_in = a.shape[:2]
    out = g.shape[1]
    kh, kw = m.kernel_size
    if c_in >= 8:
        grads = torch.nn.grad.conv2d_weight(
            a.reshape(1, batch * c_in, *a.shape[2:]), (batch * out, c_in, kh, kw),
            g.reshape(1, batch * out, *g.shape[2:]), m.stride, m.padding, m.dilation, groups=batch,
        )
        return grads.view(batch, out, -1)
    ph, pw = m.padding  # a tuple: string paddings take the vmap path
    padded = F.pad(a, (pw, pw, ph, ph)).transpose(0, 1)  # [in, batch, H, W]
    kernels = g.reshape(batch * out, 1, *g.shape[2:])
    corr = F.conv2d(padded, kernels, groups=batch, stride=m.dilation, dilation=m.stride)[:, :, :kh, :kw]
    return corr.reshape(c_in, batch, out, kh * kw).permute(1, 2, 0, 3).reshape(batch, out, c_in * kh * kw)


def _conv_by_gram(m: nn.Conv2d, a: torch.Tensor, g: torch.Tensor) -> bool:
    """Whether a convolution's per-example norms cost less through Gram matrices than through its gradients.

    Forming each example's weight gradient costs about L * out * in * k
    multiply-adds (L output positions, k kernel offsets); the Gram route costs
    about P^2 * in + L^2 * out (P padded input positions), plus one batched
    weight gradient for the sum. Small feature maps with many channels (the
    late layers of a CNN) favour the Gram route (mixed ghost clipping).
    """
    ph, pw = m.padding
    c_in, out, k = a.shape[1], g.shape[1], m.kernel_size[0] * m.kernel_size[1]
    positions = g.shape[2] * g.shape[3]
    padded = (a.shape[2] + 2 * ph) * (a.shape[3] + 2 * pw)
    return 2 * (padded**2 * c_in + positions**2 * (out + k)) < positions * out * c_in * k


def _conv_gram_norms(m: nn.Conv2d, a: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """Each example's squared Conv2d weight-gradient norm without forming the gradient (ghost norm).

    The weight gradient is sum_t g_t p_t^T over output positions t (g_t: the
    output gradient there, p_t: the input patch it saw), so its squared norm
    is sum_{t,s} (g_t . g_s)(p_t . p_s). The patch products are sums, over
    kernel offsets, of strided blocks of one Gram matrix of the padded input's
    positions, so no patch is ever copied out.
    """
    batch = a.shape[0]
    (kh, kw), (sh, sw), (dh, dw), (ph, pw) = m.kernel_size, m.stride, m.dilation, m.padding
    padded = F.pad(a, (pw, pw, ph, ph))
    (hp, wp), (ho, wo) = padded.shape[2:], g.shape[2:]
    flat = padded.flatten(2)
    inputs = torch.bmm(flat.transpose(1, 2), flat).view(batch, hp, wp, hp, wp)
    grads = g.flatten(2)
    outputs = torch.bmm(grads.transpose(1, 2), grads).view(batch, ho, wo, ho, wo)
    patches = torch.zeros_like(outputs)
    for i in range(kh):
        for j in range(kw):
            rows = slice(i * dh, i * dh + sh * (ho - 1) + 1, sh)
            cols = slice(j * dw, j * dw + sw * (wo - 1) + 1, sw)
            patches += inputs[:, rows, cols, rows, cols]
    return patches.mul_(outputs).flatten(1).sum(dim=1)


def _layer_pieces(m: nn.Module, a: torch.Tensor, g: torch.Tensor) -> dict[str, tuple[str, torch.Tensor]]:
    """One layer's per-example gradients, by parameter name, as (kind, tensor): "per" [batch, *shape];
    "ghost", the output gradient of a Linear
    weight on 2-D inputs, whose per-example gradient g_i a_i^T is never formed; "sequence", the same on
    [batch, positions, features] inputs (norm: sum_{t,s} (g_t . g_s)(a_t . a_s)); or "gram", the output gradient
    of a convolution whose per-example norms come from Gram matrices (:func:`_conv_gram_norms`)."""
    batch = a.shape[0]
    if isinstance(m, nn.Linear):
        if a.dim() == 2:
            return {"weight": ("ghost", g), "bias": ("per", g)}
        g3, a3 = g.reshape(batch, -1, g.shape[-1]), a.reshape(batch, -1, a.shape[-1])  # [batch, positions, features]
        positions, (n_out, n_in) = g3.shape[1], m.weight.shape
        if positions * (n_in + n_out) < n_in * n_out:  # long rows of wide layers: Gram norms, as for a convolution
            return {"weight": ("sequence", g3), "bias": ("per", g3.sum(dim=1))}
        return {"weight": ("per", torch.bmm(g3.transpose(1, 2), a3)), "bias": ("per", g3.sum(dim=1))}
    if isinstance(m, nn.Conv2d):
        weight = ("gram", g) if _conv_by_gram(m, a, g) else ("per", _per_example_conv_weight_grads(m, a, g))
        return {"weight": weight, "bias": ("per", g.sum(dim=(2, 3)))}
    # The norms: y = x_hat * w + b, so dL/dw = the sum over positions of g * x_hat, and dL/db that of g.
    if isinstance(m, nn.GroupNorm):  # per channel (dim 1); positions: the dims after it
        normed, dims = F.group_norm(a, m.num_groups, eps=m.eps), tuple(range(2, a.dim()))
    else:  # LayerNorm: per element of the trailing normalized_shape; positions: the dims between it and the batch
        normed, dims = F.layer_norm(a, m.normalized_shape, eps=m.eps), tuple(range(1, a.dim() - len(m.normalized_shape)))
    if not dims:  # nothing to sum over (and sum(dim=()) would sum over everything)
        return {"weight": ("per", normed.mul_(g)), "bias": ("per", g)}
    # A product (in place: x_hat is ours, and a fresh buffer of its size costs more than the product) then a
    # sum, not a batched dot product: the sum's pairwise accumulation keeps float32 exact.
    return {"weight": ("per", normed.mul_(g).sum(dim=dims)), "bias": ("per", g.sum(dim=dims))}


def clipped_sum_fast(
    model: nn.Module, X: torch.Tensor, y: torch.Tensor, clip: float, loss: PerExampleLoss = cross_entropy,
) -> tuple[dict[str, torch.Tensor], float]:
    """Per-example clipping from one forward and one backward pass, for Linear, Conv2d and norm-layer models.

    A layer's per-example gradient is a function of its input and its output
    gradient, both captured by hooks. For a linear layer z = a W^T + b it is
    g_i a_i^T, whose squared norm is |g_i|^2 |a_i|^2, so no per-example
    gradient is ever formed and the clipped sum is one matrix product
    (f * G)^T A (Goodfellow 2015; the trick behind ghost clipping). A
    convolution's per-example gradient is small (kernel-sized) and is formed
    from the input and the output gradient (mixed ghost clipping, Bu et al.
    2022); a GroupNorm's or LayerNorm's is a sum over positions of the output
    gradient (times the normalised input, for the weight).

    Returns the clipped sums of the trainable parameters (named as in
    ``model.named_parameters()``, in its order) and the summed loss. A model
    whose hooks cannot see every use of a layer (a layer run twice or not at
    all, an output changed in place, a parameter shared by two layers), or
    with a trainable parameter outside these layers (:func:`fast_path_supported`),
    gets the exact vmap per-example path instead. The path assumes that the
    layers' parameters are used only through the layers' own forward.
    """
    layers = [(name, m) for name, m in model.named_modules()
              if _fast_layer(m) and any(p.requires_grad for p in m.parameters(recurse=False))]
    owned = [id(p) for _, m in layers for p in m.parameters(recurse=False)]
    if len(owned) != len(set(owned)) or not fast_path_supported(model):  # a parameter shared by two layers
        return _clipped_sum_vmap(model, X, y, clip, loss)  # (its gradient is the sum of both), or one outside them
    seen: dict[str, list] = {}
    hooks = []
    for name, m in layers:
        def hook(mod, args, kwargs, out, name=name):
            ok = len(args) == 1 and not kwargs and isinstance(out, torch.Tensor)
            seen.setdefault(name, []).append((args[0].detach(), out, args[0]._version, out._version) if ok else None)
        hooks.append(m.register_forward_hook(hook, with_kwargs=True))
    try:
        total = loss(model(X), y).sum()
    finally:
        for h in hooks:
            h.remove()
    # Each layer must have run exactly once, on one positional input, and neither its input nor its output may
    # have been changed in place since: otherwise what the hooks hold is not what the gradient flowed through.
    if len(seen) != len(layers) or any(
        len(calls) != 1 or calls[0] is None or calls[0][0]._version != calls[0][2] or calls[0][1]._version != calls[0][3]
        for calls in seen.values()
    ):
        return _clipped_sum_vmap(model, X, y, clip, loss)
    outs = [seen[n][0][1] for n, _ in layers]
    out_grads = torch.autograd.grad(total, outs, allow_unused=True, materialize_grads=True)
    batch = X.shape[0]
    sq = torch.zeros(batch, dtype=total.dtype, device=X.device)
    pieces: dict[str, tuple[str, torch.Tensor, torch.Tensor, nn.Module]] = {}  # name -> (kind, tensor, input, layer)
    for (name, m), g in zip(layers, out_grads):
        a = seen[name][0][0]
        prefix = f"{name}." if name else ""
        for pname, (kind, t) in _layer_pieces(m, a, g).items():
            p = getattr(m, pname, None)
            if p is None or not p.requires_grad:
                continue
            if kind == "ghost":  # |g_i a_i^T|^2 = |g_i|^2 |a_i|^2
                sq += torch.linalg.vector_norm(t, dim=1).square() * torch.linalg.vector_norm(a, dim=1).square()
            elif kind == "gram":
                sq += _conv_gram_norms(m, a, t)
            elif kind == "sequence":
                a3 = a.reshape(batch, -1, a.shape[-1])
                sq += torch.bmm(t, t.transpose(1, 2)).mul_(torch.bmm(a3, a3.transpose(1, 2))).flatten(1).sum(dim=1)
            else:
                sq += torch.linalg.vector_norm(t.flatten(1), dim=1).square()
            pieces[prefix + pname] = (kind, t, a, m)
    factor = (clip / (sq.sqrt() + 1e-12)).clamp(max=1.0)
    summed: dict[str, torch.Tensor] = {}
    for k, p in model.named_parameters():
        if k in pieces:
            kind, t, a, m = pieces[k]
            if kind == "ghost":
                summed[k] = (t * factor.unsqueeze(1)).T @ a
            elif kind == "sequence":
                summed[k] = (t * factor.view(-1, 1, 1)).flatten(0, 1).T @ a.reshape(-1, a.shape[-1])
            elif kind == "gram":  # one batched weight gradient of the clipped output gradients
                scaled = t * factor.view(-1, *([1] * (t.dim() - 1)))
                summed[k] = torch.nn.grad.conv2d_weight(a, p.shape, scaled, m.stride, m.padding, m.dilation, m.groups)
            else:
                summed[k] = (factor @ t.flatten(1)).view_as(p)
    return summed, float(total.detach())


def _clipped_sum_vmap(
    model: nn.Module, X: torch.Tensor, y: torch.Tensor, clip: float, loss: PerExampleLoss,
) -> tuple[dict[str, torch.Tensor], float]:
    """The clipped sum of the trainable parameters' per-example gradients through vmap, and the summed loss."""
    params = {k: v.detach() for k, v in model.named_parameters() if v.requires_grad}
    summed = clip_and_sum(per_example_gradients(model, loss)(params, X, y), clip)
    with torch.no_grad():
        total = float(loss(functional_call(model, params, (X,)), y).sum())
    return summed, total


def train_dp_sgd(
    model: nn.Module,
    data: TrainingData,
    settings: TrainSettings,
    *,
    sampling_rate: float,
    noise_multiplier: float,
    clip: float,
    steps: int,
    generator: torch.Generator,
    proximal_mu: float = 0.0,
    proximal_center: list[torch.Tensor] | None = None,
    loss: PerExampleLoss = cross_entropy,
) -> float:
    """Run ``steps`` DP-SGD steps in place on ``data``; returns the mean loss over the sampled examples.

    ``loss``: the task's per-example loss (default: cross-entropy). Each step's Poisson sample is read
    and its clipped gradients summed ``data.chunk_rows`` rows at a time (a streamed table's batch; the
    whole sample in memory), so a large sample never sits in memory at once; the sum, and so the
    noise's calibration, is the same.

    Raises:
        ConfigError: the settings are out of range, or the model mixes the examples of a batch.
    """
    if not (0 < sampling_rate <= 1) or clip <= 0 or noise_multiplier < 0 or steps < 1:
        raise ConfigError(
            f"DP-SGD needs 0 < sampling_rate <= 1, clip > 0, noise_multiplier >= 0 and steps >= 1; found "
            f"{sampling_rate}, {clip}, {noise_multiplier}, {steps}"
        )
    require_per_example(model)
    named = {n: p for n, p in model.named_parameters() if p.requires_grad}
    opt = make_optimizer(list(named.values()), settings)
    fast = fast_path_supported(model)
    per_example = None if fast else per_example_gradients(model, loss)
    n = len(data)
    expected_batch = sampling_rate * n
    model.train()
    loss_total, seen = 0.0, 0
    for _ in range(steps):
        idx = (torch.rand(n, generator=generator) < sampling_rate).nonzero().squeeze(1)
        params = {k: v.detach() for k, v in named.items()}
        summed = {k: torch.zeros_like(v) for k, v in named.items()}
        for X, y in data.chunks(idx):
            if fast:
                part, batch_loss = clipped_sum_fast(model, X, y, clip, loss)
            else:
                assert per_example is not None
                part = clip_and_sum(per_example(params, X, y), clip)
                with torch.no_grad():
                    batch_loss = float(loss(functional_call(model, params, (X,)), y).sum())
            summed = {k: summed[k] + part[k] for k in summed}
            loss_total += batch_loss
        seen += len(idx)
        opt.zero_grad(set_to_none=True)
        for (k, p), center in zip(named.items(), proximal_center or [None] * len(named)):
            noise = torch.randn(p.shape, generator=generator) * (noise_multiplier * clip)
            g = (summed[k] + noise) / expected_batch
            if proximal_mu > 0 and center is not None:
                g = g + proximal_mu * (p.detach() - center)  # data-independent: no privacy cost
            p.grad = g
        opt.step()
    return loss_total / max(seen, 1)
