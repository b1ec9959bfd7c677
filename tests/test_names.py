"""A name with a trailing newline is refused wherever names are checked.

Python's ``re.match(r"^...$", s)`` accepts ``s + "\\n"``: ``$`` also matches just
before a final newline. A member called ``"a\\n"`` would then reach certificates,
file names, logs and signed statements. Every validator below is fed a valid
value with one ``"\\n"`` appended and must refuse it (Python regexes anchored
with ``\\Z``; pydantic's ``pattern=`` runs the Rust engine, whose ``$`` is the
end of the text). The valid value itself is accepted, so each case shows that
the newline, and nothing else, is what is refused.
"""

from __future__ import annotations

import json
import os
import struct
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated

import pytest
import yaml
from pydantic import TypeAdapter, ValidationError

from consortium.config import parse_config
from consortium.deploy.provision import parse_address, provision
from consortium.errors import ConfigError, MessageRejected
from consortium.governance import agreement as ag
from consortium.governance import policy as pol
from consortium.protocol import messages as m
from consortium.secagg.messages import KeyAdvert
from tests import forkserver

REPO = Path(__file__).resolve().parents[1]
HEX64 = "ab" * 32


def _agreement(**edit: object) -> None:
    raw = yaml.safe_load(ag.template("hospitals", ["site-a", "site-b"]))
    for key, value in edit.items():
        if key == "member":
            raw["members"][1]["name"] = value
        elif key == "canary":
            raw["lifecycle"]["canary_sites"] = [value, "site-b"]
        elif key == "feature":
            raw["data_schema"] = {"features": [value], "classes": ["no", "yes"]}
        elif key == "layout":
            raw["allowed_layouts"] = [value]
        else:
            raw[key] = value
    ag.parse_agreement(yaml.safe_dump(raw))


def _policy(field: str, value: object) -> None:
    agreement = ag.parse_agreement(ag.template("hospitals", ["site-a", "site-b"]))
    raw = yaml.safe_load(pol.template("site-a", agreement))
    raw[field] = value
    pol.parse_policy(yaml.safe_dump(raw), agreement)


def _config(site: str) -> None:
    sites = [{"name": site, "csv": "a.csv", "schema": "s.yaml"}, {"name": "other", "csv": "b.csv", "schema": "s.yaml"}]
    parse_config(yaml.safe_dump({"data": {"dataset": "csv", "csv_sites": sites}}))


def _provision(tmp_path: Path, **names: object) -> None:
    args = {"sites": ["site-a", "site-b"], "coordinator_address": "coord.example.org:8443", "consortium": "hospitals"}
    args.update(names)
    provision(tmp_path / "out", **args)  # type: ignore[arg-type]


def _envelope(sender: str) -> None:
    frame = m.encode(m.make_envelope("site-a", m.COORDINATOR, 0, m.DescribeRequest()))
    header = frame[8:].replace(b'"site-a"', json.dumps(sender).encode())  # no tensors: the header is the rest
    try:
        m.decode(frame[:4] + struct.pack(">I", len(header)) + header)
    except MessageRejected as exc:
        assert "sender" in str(exc), exc  # refused for the name, not for a frame the edit broke
        raise


def _field(model: type, name: str, value: str) -> None:
    """One field of a message checked against its declared constraints (building the whole message needs a model)."""
    TypeAdapter(Annotated[str, *model.model_fields[name].metadata]).validate_python(value)


#: (what is checked, a valid value, a function that validates it); the function raises on refusal.
CASES: list[tuple[str, str, Callable[[Path, str], None]]] = [
    ("provision: site name", "site-a", lambda t, v: _provision(t, sites=[v, "site-b"])),
    ("provision: auditor name", "audit", lambda t, v: _provision(t, auditors=[v])),
    ("provision: consortium name", "hospitals", lambda t, v: _provision(t, consortium=v)),
    ("provision: coordinator host", "coord.example.org", lambda t, v: parse_address(f"{v}:8443")),
    ("agreement: member name", "site-a", lambda t, v: _agreement(member=v)),
    ("agreement: consortium name", "hospitals", lambda t, v: _agreement(consortium=v)),
    ("agreement: canary site", "site-a", lambda t, v: _agreement(canary=v)),
    ("agreement: schema feature", "age", lambda t, v: _agreement(feature=v)),
    ("agreement: allowed layout hash", HEX64, lambda t, v: _agreement(layout=v)),
    ("site policy: site name", "site-a", lambda t, v: _policy("site", v)),
    ("site policy: pinned version", "v3", lambda t, v: _policy("pin_model", v)),
    ("site policy: quiet hours", "22:00-06:00", lambda t, v: _policy("quiet_hours", [v])),
    ("site policy: time zone", "Europe/Zurich", lambda t, v: _policy("timezone", v)),
    ("config: csv site name", "site-a", lambda t, v: _config(v)),
    ("wire: envelope sender", "site-a", lambda t, v: _envelope(v)),
    ("wire: deployed version", "v2", lambda t, v: _field(m.DeployRequest, "version", v)),
    ("wire: refusal rule", "min_cohort", lambda t, v: _field(m.Refusal, "rule", v)),
    ("secagg: advertised site", "site-a", lambda t, v: KeyAdvert(site=v, c_pk=b"k", s_pk=b"k", signature=b"s")),
]


@pytest.mark.parametrize("what, valid, check", CASES, ids=[c[0] for c in CASES])
def test_a_trailing_newline_is_refused(tmp_path: Path, what: str, valid: str, check: Callable[[Path, str], None]) -> None:
    check(tmp_path / "valid", valid)  # the value itself passes: only the newline is refused
    with pytest.raises((ConfigError, MessageRejected, ValidationError)) as info:
        check(tmp_path / "newline", valid + "\n")
    if not isinstance(info.value, ValidationError):  # what a user reads: one line, the name escaped
        assert "\n" not in str(info.value), str(info.value)


def test_the_command_line_refuses_it_in_one_line(tmp_path: Path) -> None:
    proc = forkserver.run(
        [sys.executable, "-m", "consortium.cli", "init", str(tmp_path / "c"), "--sites", "site-a,site-b",
         "--coordinator", "127.0.0.1:8443", "--consortium", "hospitals\n"],
        capture_output=True, text=True, cwd=REPO, env={**os.environ, "COLUMNS": "200"}, timeout=120,
    )
    assert proc.returncode == 2, proc.stderr
    assert "is not a valid name" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert not (tmp_path / "c").exists()
