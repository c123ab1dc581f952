"""`family(name)`: a tiny random-weight checkpoint of one of the wider families, loaded into
Kiln and transformers once per session (tests/models/arch_helpers.py)."""

import pytest

from tests.models.arch_helpers import Family


@pytest.fixture(scope="session")
def family(tmp_path_factory):
    made = {}

    def get(name: str) -> Family:
        if name not in made:
            made[name] = Family(name, tmp_path_factory.mktemp(name))
        return made[name]
    return get
