"""Schemathesis against the coordinator's OpenAPI schema, over real mutual TLS: no input gets a 5xx.

The fuzzer calls the live service on 127.0.0.1 with a site's client
certificate, so every generated request reaches the endpoints' own checks
(not just the TLS layer); a stage is kept open meanwhile so that replies are
taken and refused on their merits too.
"""

from __future__ import annotations

import threading

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.checks import not_a_server_error

from consortium.deploy.mailbox import Mailbox
from consortium.deploy.provision import load_kit, provision
from consortium.deploy.service import HttpsServer, create_app

SITES = ["site-1", "site-2"]
ROLES = {"coordinator": "coordinator", **{s: "site" for s in SITES}}
schema = schemathesis.openapi.from_dict(create_app(Mailbox(), ROLES).openapi())
#: Every operation, each its own test (one id per operation, so the suite splits across workers whole).
OPERATIONS = {op.label: op for op in (result.ok() for result in schema.get_all_operations())}


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    folder = tmp_path_factory.mktemp("fuzz") / "c"
    provision(folder, sites=SITES, coordinator_address="127.0.0.1:8443")
    mailbox = Mailbox()
    server = HttpsServer(create_app(mailbox, ROLES, poll_wait_s=0.05, max_message_bytes=4096),
                         load_kit(folder / "kits" / "coordinator"), port=0)
    port = server.start()
    stop = threading.Event()

    def stages():  # keep asking both sites, so polls and replies meet a live stage
        while not stop.is_set():
            mailbox.run_stage({s: b"request" for s in SITES}, 0.2)

    stager = threading.Thread(target=stages, daemon=True)
    stager.start()
    kit = folder / "kits" / "site-1"
    yield {"url": f"https://127.0.0.1:{port}", "verify": str(kit / "ca.crt"), "cert": (str(kit / "tls.crt"), str(kit / "tls.key"))}
    stop.set()
    mailbox.close()
    stager.join(5)
    server.stop()


def test_every_route_of_the_service_is_fuzzed():
    """No endpoint escapes the fuzzer by being left out of the schema."""
    from fastapi.routing import APIRoute

    routes = {f"{method} {r.path}" for r in create_app(Mailbox(), ROLES).routes if isinstance(r, APIRoute) for method in r.methods}
    assert routes and sorted(routes) == sorted(OPERATIONS)


@pytest.mark.parametrize("label", sorted(OPERATIONS))
def test_no_input_makes_the_service_fail(label, live):
    @given(case=OPERATIONS[label].as_strategy())
    @settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
    def fuzz(case):  # type: ignore[no-untyped-def]
        response = case.call(base_url=live["url"], verify=live["verify"], cert=live["cert"], timeout=10)
        case.validate_response(response, checks=[not_a_server_error])

    fuzz()
