"""``consortium privacy``: differential-privacy accounting, epsilon from noise and noise from epsilon."""

from __future__ import annotations

import json
import sys
from enum import Enum
from typing import Annotated, Any

import typer

from consortium.cli.common import JsonOpt, out_console


privacy_app = typer.Typer(help="Differential-privacy accounting (dp-accounting): epsilon from noise, noise from epsilon.")


class AccountantChoice(str, Enum):
    pld = "pld"
    rdp = "rdp"


AccountantOpt = Annotated[AccountantChoice, typer.Option("--accountant", help="pld (reported figures) or rdp")]
SamplingOpt = Annotated[float, typer.Option(min=0.0, max=1.0, help="Poisson sampling probability per record and step")]
StepsOpt = Annotated[int, typer.Option(min=1, help="number of DP-SGD steps")]
DeltaOpt = Annotated[float, typer.Option(min=0.0, max=1.0, help="target delta")]


def _report(inputs: dict[str, Any], key: str, value: float, as_json: bool, text: str) -> None:
    if as_json:
        sys.stdout.write(json.dumps({**inputs, key: value}) + "\n")
    else:
        out_console.print(text)


# Both commands use dp-accounting's own PLD resolution (1e-4), so a figure matches calling it directly.


@privacy_app.command("epsilon")
def privacy_epsilon(
    noise_multiplier: Annotated[float, typer.Option(min=0.0, help="Gaussian noise std / clip")],
    sampling_rate: SamplingOpt,
    steps: StepsOpt,
    delta: DeltaOpt,
    accountant: AccountantOpt = AccountantChoice.pld,
    as_json: JsonOpt = False,
) -> None:
    """Epsilon of DP-SGD (Poisson-subsampled Gaussian) after STEPS steps."""
    from consortium.privacy.accountant import dp_sgd_epsilon

    acc = accountant.value
    eps = dp_sgd_epsilon(
        noise_multiplier=noise_multiplier, sampling_rate=sampling_rate, steps=steps, delta=delta,
        accountant=acc, pld_interval=1e-4,  # type: ignore[arg-type]
    )
    inputs = {"noise_multiplier": noise_multiplier, "sampling_rate": sampling_rate, "steps": steps, "delta": delta, "accountant": acc}
    _report(inputs, "epsilon", eps, as_json, f"epsilon = {eps:.4f} at delta = {delta:g} ({acc})")


@privacy_app.command("calibrate")
def privacy_calibrate(
    epsilon: Annotated[float, typer.Option(min=0.0, help="target epsilon")],
    delta: DeltaOpt,
    steps: StepsOpt,
    sampling_rate: SamplingOpt,
    accountant: AccountantOpt = AccountantChoice.pld,
    as_json: JsonOpt = False,
) -> None:
    """The smallest noise multiplier that keeps DP-SGD within EPSILON."""
    from consortium.privacy.accountant import calibrate_noise

    acc = accountant.value
    sigma = calibrate_noise(
        target_epsilon=epsilon, delta=delta, sampling_rate=sampling_rate, steps=steps,
        accountant=acc, pld_interval=1e-4,  # type: ignore[arg-type]
    )
    inputs = {"epsilon": epsilon, "delta": delta, "steps": steps, "sampling_rate": sampling_rate, "accountant": acc}
    _report(inputs, "noise_multiplier", sigma, as_json, f"noise multiplier = {sigma:.4f}")
