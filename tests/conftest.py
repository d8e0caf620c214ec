"""Test-session isolation: user profiles live in $PRIVLM_HOME, so the suite points it at a fresh directory and
never reads or writes the developer's ~/.privlm (a user profile there could shadow a shipped one)."""
from __future__ import annotations

import os

import pytest


@pytest.fixture(autouse=True, scope="session")
def _isolated_privlm_home(tmp_path_factory):
    old = os.environ.get("PRIVLM_HOME")
    os.environ["PRIVLM_HOME"] = str(tmp_path_factory.mktemp("privlm-home"))
    yield
    if old is None:
        os.environ.pop("PRIVLM_HOME", None)
    else:
        os.environ["PRIVLM_HOME"] = old
