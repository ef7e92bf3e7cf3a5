"""Session ids name their replica (no cluster): `pytest tests/actors/test_affinity.py -q`."""

from __future__ import annotations

import pytest

from antiphon.actors.affinity import home_replica_of, session_id_prefix


def test_session_id_names_its_replica():
    session_id = session_id_prefix("abc123") + "0f" * 16
    assert home_replica_of(session_id) == "abc123"


@pytest.mark.parametrize("session_id", ["", "0f0f0f", "~0f0f", "abc123~", "abc"])
def test_ids_without_a_replica_name_none(session_id):
    # Ids from an engine outside Serve, or junk from a caller: routed anywhere, answered there.
    assert home_replica_of(session_id) is None


def test_replica_id_with_separator_is_refused():
    with pytest.raises(ValueError, match="contains"):
        session_id_prefix("a~b")
