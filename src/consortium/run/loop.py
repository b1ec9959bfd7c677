"""The round loop: drives a coordinator over a transport, stage by stage.

It is its own small object so that another schedule (asynchronous rounds,
evaluation every k rounds, a deadline per stage) replaces it without touching
the coordinator or the sites.
"""

from __future__ import annotations

from collections.abc import Callable

from consortium.errors import ProtocolError
from consortium.protocol.coordinator import Coordinator, RoundRecord
from consortium.transport import Transport


class RoundLoop:
    """Sends each stage's requests, hands every answer back, then closes the stage.

    ``before_stage`` runs before each stage's requests are built: the
    transcript uses it to log and co-sign a round's plan before any site sees it.
    ``after_stage`` runs once a stage has closed, with the stage's name: the
    transcript uses it to put the sites' decisions on record before the round goes on.
    """

    def __init__(
        self,
        before_stage: Callable[[Coordinator], None] | None = None,
        after_stage: Callable[[Coordinator, str], None] | None = None,
    ) -> None:
        self.before_stage = before_stage
        self.after_stage = after_stage

    def run(
        self,
        coordinator: Coordinator,
        transport: Transport,
        on_round: Callable[[RoundRecord], None] | None = None,
    ) -> list[RoundRecord]:
        while not coordinator.done:
            record = self.step(coordinator, transport)
            if record is not None and on_round is not None:
                on_round(record)
        return coordinator.history

    def step(self, coordinator: Coordinator, transport: Transport) -> RoundRecord | None:
        """Run one stage; returns the round's record when that stage ended a round."""
        if self.before_stage is not None:
            self.before_stage(coordinator)
        stage = coordinator.stage
        for reply in transport.exchange_many(coordinator.requests()):
            if reply is None:
                continue  # no answer in time: the site has dropped out of this stage
            try:
                coordinator.receive(reply)
            except ProtocolError:
                continue  # an unsolicited reply is ignored, never used
        record = coordinator.close_stage()
        if self.after_stage is not None:
            self.after_stage(coordinator, stage)
        return record
