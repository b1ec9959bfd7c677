"""The peer of bench_growth.py: the same two rounds as a Flower 1.42 simulation (plain FedAvg).

Run with Flower's own interpreter (`make flower-peer` builds .venv-flower, whose pins cannot share .venv):

    .venv-flower/bin/python benchmarks/flower_peer.py N

It prints one JSON line last on stdout, {"second_round": s, "peak": bytes, "first_round": s, "accuracy": a,
"loss": l, "flower": version} (accuracy and log-loss: the pooled test figures after the last round, which
match ours to float rounding); Flower's and Ray's logs go to stderr.

The same run as bench_growth.py's with both protections off, through this project's own code (installed
in .venv-flower without its dependencies), not a copy of it: the config is bench_growth's (seed 0,
synthetic-hospitals over N sites, 2 rounds, every site each round), resolved as ours is, so the model
is the dataset's default (mlp, hidden (32,): 482 parameters) and the training plain SGD (1 epoch,
batch 32, lr 0.05, momentum 0.9). Each site's train and test splits are ``site_splits``'s, its training
seed per round ``SeedSequence([its seed from site_randomness, round])`` as a ``Site`` draws it, its
local training the built-in classifier's ``train`` and its evaluation ``evaluate_records`` on its test
split; the initial model is the coordinator's (``build_task_model`` with the run's seed) and the
standardisation the pooled statistics of every site's training split (``setup_sums``), computed once
before the run, as our setup phase does, and sent to the sites with every request (ConfigRecord) as
ours sends them in every request's task spec. A message carries the 482 parameters alone, as ours do.

Flower's way, not ours, where the frameworks differ: FedAvg averages the sites' models weighted by their
training rows (ours adds the same weighted mean of their deltas: equal, up to float32 rounding), and a
site answers an evaluation with its accuracy and mean log-loss, which Flower averages weighted by its
test rows (ours sums fixed-length vectors, of which the pooled accuracy and log-loss are the same
figures). No secure aggregation, no DP, no transcript, signatures or sealed messages: the plain
framework, as our "both off" run is (which still keeps the transcript and seals every message).

Each of Flower's simulated sites runs in a Ray actor, one CPU each (backend_config's client_resources),
so one actor per core, as our Ray backend's default pool; an actor builds the consortium's splits once
and keeps them (the module-level cache below: this file is imported by name, so the actors import it
rather than receive a copy), and builds the site's model again for each message, as a Flower ClientApp
does.

What is timed: ``Strategy.start`` calls ``evaluate_fn`` (server-side evaluation; here it only reads the
clock) before round 1 and again at the end of each round, after the round's federated evaluation has
been aggregated. The second round is the time between its calls after rounds 1 and 2: sampling the
nodes, sending the model to all N sites and waiting for their training replies (Flower's in-memory
grid polls for replies every 0.1 s, and its simulation engine for new messages every 0.1 s), FedAvg's
aggregation, sending the new model to all N sites for evaluation, waiting for their replies and
averaging them, plus Flower's per-round log lines. Not included: Ray's start, the actors' start and
their building of the data (all in the first round), nor the shutdown. The peak is the driver's
VmHWM (the ServerApp, the simulation engine and the Ray driver in one process; the sites live in the
actors), read after the run.

Flower's telemetry (an HTTP post to Flower's server at each start and stop) and Ray's usage statistics
are switched off here, before either is imported.
"""

from __future__ import annotations

import os

# Read when flwr and ray are imported: set before the imports below.
os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

import json
import re
import sys
import time
from functools import cache

import flwr
import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg
from flwr.serverapp.strategy.strategy_utils import aggregate_metricrecords
from flwr.simulation import run_simulation

from consortium.config import SimulationConfig
from consortium.data import Splits
from consortium.learning.task import DataShape, Task, build_task_model, evaluate_records, load_task
from consortium.learning.training import TrainingData
from consortium.protocol.contributions import read_setup_sum, setup_sums
from consortium.run.simulation import site_splits
from consortium.run.sites import site_randomness

ROUNDS = 2


def run_config(sites: int) -> SimulationConfig:
    """bench_growth.py's config with both protections off, resolved as a run resolves it (model, training)."""
    return SimulationConfig.model_validate({
        "rounds": ROUNDS, "seed": 0, "data": {"dataset": "synthetic-hospitals", "sites": sites},
        "privacy": {"enabled": False, "test_seed": 1}, "secure_aggregation": {"enabled": False},
        "baselines": {"local_only": False, "pooled": False},
    }).resolved()


@cache
def consortium(sites: int) -> tuple[SimulationConfig, Task, list[str], dict[str, Splits]]:
    """The run's config, task, site names (partition i is the i-th) and splits: built once per process."""
    config = run_config(sites)
    splits = site_splits(config)
    assert config.model is not None
    return config, load_task("classification", config.model), list(splits), splits


def pooled_shape(splits: dict[str, Splits]) -> DataShape:
    """What our setup phase establishes from the sums of every site's training split: the layout, and the
    features' mean and scale (float32, as the task spec carries them)."""
    first = next(iter(splits.values())).train
    summed = read_setup_sum(sum(setup_sums(s.train) for s in splits.values()), first.n_features)
    return DataShape(first.n_features, first.classes, None, summed.mean.astype(np.float32), summed.scale.astype(np.float32))


def shape_record(shape: DataShape) -> ConfigRecord:
    """The pooled statistics as a request carries them to a site."""
    return ConfigRecord({"classes": list(shape.classes), "mean": shape.mean.tolist(), "scale": shape.scale.tolist()})


def site_model(task: Task, msg: Message) -> tuple[torch.nn.Module, DataShape]:
    """The task's model for the statistics the message carries, loaded with the parameters it carries."""
    stats = msg.content["config"]
    mean, scale = np.asarray(stats["mean"], dtype=np.float32), np.asarray(stats["scale"], dtype=np.float32)
    shape = DataShape(len(mean), tuple(stats["classes"]), None, mean, scale)
    model = build_task_model(task, shape, 0)
    params = msg.content["arrays"].to_torch_state_dict()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(params[name])
    return model, shape


def parameters(model: torch.nn.Module) -> ArrayRecord:
    """The model's trainable parameters (not the standardisation's constants): what a message carries."""
    return ArrayRecord({name: p.detach() for name, p in model.named_parameters()})


client_app = ClientApp()


def _site(context: Context) -> tuple[SimulationConfig, Task, str, Splits]:
    config, task, names, splits = consortium(int(context.node_config["num-partitions"]))
    name = names[int(context.node_config["partition-id"])]
    return config, task, name, splits[name]


@client_app.train()
def train(msg: Message, context: Context) -> Message:
    config, task, name, splits = _site(context)
    model, shape = site_model(task, msg)
    rnd = int(msg.content["config"]["server-round"])
    seed = int(np.random.SeedSequence([site_randomness(config.seed, name)[1], rnd]).generate_state(1)[0])
    data = TrainingData(splits.train, targets=lambda y: task.training_targets(y, shape))
    assert config.training is not None
    loss = task.train(model, data, config.training, seed=seed)
    metrics = MetricRecord({"train-loss": float(loss), "num-examples": splits.train.n_rows})
    return Message(RecordDict({"arrays": parameters(model), "metrics": metrics}), reply_to=msg)


@client_app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    _, task, _, splits = _site(context)
    model, shape = site_model(task, msg)
    n, correct, loss_sum = evaluate_records(task, model, splits.test, shape)[:3]  # the vector's first sums
    metrics = MetricRecord({"accuracy": correct / n, "loss": loss_sum / n, "num-examples": splits.test.n_rows})
    return Message(RecordDict({"metrics": metrics}), reply_to=msg)


def counted(records: list[RecordDict], key: str) -> MetricRecord:
    """FedAvg's weighted mean of the replies' metrics, and how many sites replied."""
    out = aggregate_metricrecords(records, key)
    out["sites"] = len(records)
    return out


def simulate(sites: int) -> dict[str, float]:
    """Run the two rounds over ``sites`` simulated sites; the second round's seconds, the driver's peak
    resident set (bytes), the first round's seconds and the last round's pooled accuracy and log-loss."""
    config, task, _, splits = consortium(sites)
    shape = pooled_shape(splits)
    model = build_task_model(task, shape, config.seed)  # the coordinator's initial model
    marks: list[float] = []
    out: dict[str, float] = {}

    def end_of_round(server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        marks.append(time.perf_counter())  # called before round 1, then after each round's evaluation
        return None

    server_app = ServerApp()

    @server_app.main()
    def main(grid: Grid, context: Context) -> None:
        strategy = FedAvg(
            fraction_train=1.0, fraction_evaluate=1.0,
            min_train_nodes=sites, min_evaluate_nodes=sites, min_available_nodes=sites,
            train_metrics_aggr_fn=counted, evaluate_metrics_aggr_fn=counted,
        )
        result = strategy.start(
            grid=grid, initial_arrays=parameters(model), num_rounds=config.rounds,
            train_config=shape_record(shape), evaluate_config=shape_record(shape),
            evaluate_fn=end_of_round,
        )
        for rnd in range(1, config.rounds + 1):  # every site trained and evaluated, every round
            assert result.train_metrics_clientapp[rnd]["sites"] == sites, f"round {rnd}: a site failed to train"
            assert result.evaluate_metrics_clientapp[rnd]["sites"] == sites, f"round {rnd}: a site failed to evaluate"
        out.update(result.evaluate_metrics_clientapp[config.rounds])

    run_simulation(
        server_app=server_app, client_app=client_app, num_supernodes=sites,
        backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0}},
    )
    if "sites" not in out:  # run_simulation raises what the ServerApp raised: this is in case it did not
        raise RuntimeError("the Flower run did not finish: see its log on stderr")
    with open("/proc/self/status") as f:
        peak = int(re.search(r"VmHWM:\s+(\d+) kB", f.read()).group(1)) * 1024
    return {"second_round": marks[2] - marks[1], "peak": peak, "first_round": marks[1] - marks[0],
            "accuracy": float(out["accuracy"]), "loss": float(out["loss"])}


if __name__ == "__main__":
    if len(sys.argv) != 2 or not sys.argv[1].isdigit() or int(sys.argv[1]) < 1:
        sys.exit("usage: flower_peer.py N  (N sites, at least 1)")
    # This file imported by its name, so that Ray's actors import the client app (and keep its cache of
    # the splits) rather than receive a fresh copy of __main__'s with every message.
    import flower_peer

    print(json.dumps({**flower_peer.simulate(int(sys.argv[1])), "flower": flwr.__version__}), flush=True)
