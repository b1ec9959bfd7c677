"""The run plan: resolved once, frozen, each site's epsilon cap the least of config, agreement and policy,
and the layout hash of the task's model."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from consortium.config import SimulationConfig
from consortium.data import load_builtin
from consortium.governance.agreement import parse_agreement, template
from consortium.governance.policy import parse_policy
from consortium.errors import ConfigError
from consortium.learning.classification import ClassificationTask
from consortium.learning.task import load_task
from consortium.run.plan import epsilon_caps, model_adapter, plan_run

SITES = ["site-1", "site-2", "site-3", "site-4"]
AGREEMENT = parse_agreement(template("hospitals", SITES))  # min_cohort 3, max_epsilon 8, record level, secure aggregation
SAMPLE = load_builtin("breast-cancer")


def _policy(site: str, **fields: object) -> str:
    body = {"site": site, **fields}
    return "\n".join(f"{k}: {json.dumps(v)}" for k, v in body.items()) + "\n"


def _config(**privacy: object) -> SimulationConfig:
    return SimulationConfig.model_validate({
        "rounds": 3, "data": {"dataset": "breast-cancer", "sites": 4}, "participation": {"min_sites": 3},
        "privacy": {"noise_multiplier": 1.0, **privacy},
    })


def test_the_plan_is_frozen_and_resolved():
    plan = plan_run(_config(), sample=SAMPLE, names=SITES)
    assert plan.config.model is not None and plan.config.training is not None  # the dataset's defaults filled in
    with pytest.raises(dataclasses.FrozenInstanceError):
        plan.layout_hash = "0" * 64  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        plan.privacy.epsilon_caps = {}  # type: ignore[misc]
    with pytest.raises(TypeError):
        plan.privacy.epsilon_caps["site-1"] = 100.0  # type: ignore[index]


def test_each_sites_cap_is_the_least_of_config_agreement_and_policy():
    strict = parse_policy(_policy("site-3", max_epsilon=2.0), AGREEMENT)  # stricter than the agreement's 8
    loose = parse_policy(_policy("site-4", max_epsilon=7.5), AGREEMENT)  # looser than the config's 6
    plan = plan_run(
        _config(epsilon=6.0, site_epsilon_caps={"site-2": 5.0}), sample=SAMPLE, names=SITES,
        agreement=AGREEMENT, policies={"site-3": strict, "site-4": loose},
    )
    assert dict(plan.privacy.epsilon_caps) == {"site-1": 6.0, "site-2": 5.0, "site-3": 2.0, "site-4": 6.0}
    assert plan.privacy.budget("site-3").epsilon_cap == 2.0
    # The agreement's cap wins over a looser config (which the plan itself refuses to run).
    assert epsilon_caps(_config(epsilon=20.0), SITES, AGREEMENT, {"site-3": strict}) == {
        "site-1": 8.0, "site-2": 8.0, "site-3": 2.0, "site-4": 8.0,
    }


def test_no_budget_without_privacy():
    plan = plan_run(_config(enabled=False), sample=SAMPLE, names=SITES)
    assert plan.privacy.budget("site-1") is None and plan.privacy.coordinator_privacy() is None


class Narrow(ClassificationTask):
    """A study's own model: one hidden layer of 7."""

    def model(self, shape):
        return torch.nn.Sequential(torch.nn.Linear(shape.n_features, 7), torch.nn.ReLU(), torch.nn.Linear(7, shape.n_classes))


def test_the_layout_hash_is_the_tasks_model_and_the_config_records_the_task():
    config = _config(enabled=False)
    task = Narrow()
    plan = plan_run(config, sample=SAMPLE, names=SITES, task=task)
    built_in = model_adapter(plan.config, SAMPLE, load_task("classification", plan.config.model))
    custom = model_adapter(plan.config, SAMPLE, task)
    assert plan.layout_hash == custom.layout_hash != built_in.layout_hash
    assert plan.model_size == custom.size == SAMPLE.n_features * 7 + 7 + 7 * 2 + 2
    assert plan.task is task and plan.config.task == f"{Narrow.__module__}:Narrow"
    assert plan_run(config, sample=SAMPLE, names=SITES).config.task == "classification"  # the data's built-in


def test_a_task_whose_target_is_not_the_datas_is_refused():
    with pytest.raises(ConfigError, match="is a regression, and the data's labels are classes"):
        plan_run(_config(enabled=False), sample=SAMPLE, names=SITES, task=load_task("regression"))
