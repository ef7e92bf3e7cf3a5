"""The online trainer as a Ray actor on a real cluster: a named, detached actor that polls a
real turn log, answers status() while it trains, exports its progress to the node's
Prometheus endpoint, and, its process killed, is restarted by Ray and goes on from its
saved state with nothing done twice."""

from __future__ import annotations

import time

import pytest
import ray
from ray.exceptions import ActorUnavailableError

from antiphon.experiments.train_online import start_trainer_actor, trainer_actor_name
from antiphon.policies.actor import POLICY_NAMESPACE
from antiphon.training.policy_versions import PolicyStore
from antiphon.training.turn_log import TurnLogWriter
from tests.deploy.test_metrics import SCRAPE_WITHIN_S, scrape
from tests.training.test_online_trainer import config, traffic

pytestmark = pytest.mark.slow


def status_when(actor, done, within_s: float = 300) -> dict:
    """The actor's status once `done(status)`; waits out a restart under way."""
    deadline = time.monotonic() + within_s
    while True:
        try:
            status = ray.get(actor.status.remote())
        except ActorUnavailableError:  # being restarted
            status = {"error": None, "restarting": True}
        else:
            if done(status):
                return status
        assert status["error"] is None, status
        assert time.monotonic() < deadline, status
        time.sleep(0.5)


def scraped_offset(trainer: str, expected: int) -> list[float]:
    """The trainer's log offset gauge on the node's metrics endpoint, once it shows
    `expected` (a process reports its points every few seconds), or as it is at the end. A
    series per trainer process: the one Ray restarted may still show beside it."""
    deadline = time.monotonic() + SCRAPE_WITHIN_S
    while True:
        series = scrape().get("ray_antiphon_trainer_log_offset", {})
        found = [v for labels, v in series.items() if ("trainer", trainer) in labels]
        if expected in found or time.monotonic() > deadline:
            return found
        time.sleep(1)


def test_the_trainer_actor_polls_the_log_and_survives_a_restart(
    ray_cluster, tmp_path, tiny_model_dir
):
    cfg = config(tmp_path, tiny_model_dir, poll_s=0.2, consumer="actor-trainer")
    with TurnLogWriter(cfg.turn_log) as log:
        end = log.append(traffic(32, good="b"))
    actor = start_trainer_actor(cfg)
    try:
        assert ray.get_actor(trainer_actor_name(cfg), namespace=POLICY_NAMESPACE)
        first = status_when(actor, lambda s: s["offset"] == end)
        assert first["running"] and first["step"] >= 1
        made = [v for v in PolicyStore(cfg.store).versions() if v.step >= 1]
        assert len(made) == first["step"]

        ray.kill(actor, no_restart=False)  # its process dies; Ray starts it again
        again = status_when(actor, lambda s: s["running"])
        assert (again["offset"], again["step"]) == (end, first["step"])  # nothing redone
        assert len(PolicyStore(cfg.store).versions()) == first["step"] + 1

        with TurnLogWriter(cfg.turn_log) as log:  # more traffic: the restarted one reads it
            more = log.append(traffic(32, good="b", start=32))
        after = status_when(actor, lambda s: s["offset"] == more)
        assert after["step"] > first["step"]
        ray.get(actor.stop.remote())
        assert not ray.get(actor.status.remote())["running"]
        assert more in scraped_offset("actor-trainer", more)  # what Prometheus would read
    finally:
        ray.kill(actor, no_restart=True)
