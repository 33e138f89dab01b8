"""tools/audit.py: the vulnerability audit of the installed stack against the local copy of
advisories (`make audit`, run by `make lint` and by this suite)."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tools"))
import audit  # noqa: E402


def test_an_ecosystem_range_and_a_version_list_cover_what_they_say():
    ranged = {"ranges": [{"type": "ECOSYSTEM", "events": [{"introduced": "0"},
                                                           {"fixed": "0.47.2"},
                                                           {"introduced": "1.0"},
                                                           {"last_affected": "1.2"}]}]}
    assert audit.covers(ranged, "0.41.3") and audit.covers(ranged, "1.2")
    assert not audit.covers(ranged, "0.47.2") and not audit.covers(ranged, "1.2.1")
    assert audit.covers({"versions": ["0.41.3"]}, "0.41.3")
    assert not audit.covers({"versions": ["0.41.3"]}, "1.10.0")
    assert audit.covers({"ranges": [{"type": "ECOSYSTEM", "events": [{"introduced": "2.0"}]}]},
                        "2.15.1")


@pytest.mark.parametrize("version, findings", [("0.41.3", 3), ("1.10.0", 0)])
def test_the_starlette_this_project_pinned_before_is_found_and_todays_is_not(
        monkeypatch, capsys, version, findings):
    monkeypatch.setattr(audit, "installed", lambda: {"starlette": version})
    assert audit.audit() == (1 if findings else 0)
    out = capsys.readouterr().out
    assert out.count("FINDING: starlette") == findings
    if findings:
        assert "CVE-2025-62727" in out and "fixed in 0.49.1" in out


def test_the_installed_stack_has_no_unaccepted_finding(capsys):
    assert audit.audit() == 0, capsys.readouterr().out
