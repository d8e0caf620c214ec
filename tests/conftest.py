"""Test-session isolation: user profiles live in $PRIVLM_HOME, so the suite points it at a fresh directory and
never reads or writes the developer's ~/.privlm (a user profile there could shadow a shipped one)."""
from __future__ import annotations

import os

import pytest

# `make test` runs two xdist workers on two cores: one intra-op thread per process (the subprocesses tests start
# inherit it). With torch's default of one thread per core the workers oversubscribe the cores, and tiny-tensor
# training steps then spend most of their time waking threads (a test 2.4x slower on a loaded machine).
os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.fixture(autouse=True, scope="session")
def _isolated_privlm_home(tmp_path_factory):
    old = os.environ.get("PRIVLM_HOME")
    os.environ["PRIVLM_HOME"] = str(tmp_path_factory.mktemp("privlm-home"))
    yield
    if old is None:
        os.environ.pop("PRIVLM_HOME", None)
    else:
        os.environ["PRIVLM_HOME"] = old


def pytest_collection_modifyitems(config, items):
    """Modules with the most slow tests (SPU runs, SLURM, process kills, training) first, each module's tests in
    their own order: xdist hands tests out in collection order, so the long ones start early and the short ones
    fill the end, instead of one worker finishing a long tail alone."""
    from collections import Counter
    slow = Counter(item.module.__name__ for item in items if item.get_closest_marker("slow") is not None)
    items.sort(key=lambda item: -slow[item.module.__name__])
