"""The AMQP gateway benchmark (bench/amqp_gateway.py) in smoke mode, so it never rots.

It checks the facts the comparison rests on, never a timing: both stacks really ran
(the old one imported from the tree taken out of git history), every device connected
and came back after the hub's AMQP door restarted, the shared-loop client added no
thread for its devices and the old client one per device.
"""

from __future__ import annotations

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

pytest.importorskip("proton")


def test_smoke_run_measures_both_stacks() -> None:
    from bench.amqp_gateway import NEW, OLD, run

    result = run(smoke=True)
    assert result.skipped is None and result.method
    runs = result.data["runs"]
    new = runs[f"{NEW} N=5"]
    assert [m.get("error") for m in new] == [None]
    assert new[0]["threads_added"] == 0 and new[0]["resumed"] == 5
    assert Path(new[0]["package"]).resolve().is_relative_to(REPO)  # this tree's client
    if result.data["old_commit"] is None:  # no git history here (an sdist): said so
        assert any("could not be taken from git" in note for note in result.notes)
        return
    old = runs[f"{OLD} N=5"]
    assert [m.get("error") for m in old] == [None]
    assert old[0]["threads_added"] == 5  # one I/O thread per connection
    assert not Path(old[0]["package"]).resolve().is_relative_to(REPO)  # git history's
    [table] = result.tables
    assert {row["stack"] for row in table.rows} == {NEW, OLD}
