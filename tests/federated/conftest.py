import time

import pytest

from tests.federated.fleet import Fleet, tagged


@pytest.fixture
def fleet(tmp_path):
    made = []

    def make(nodes):
        made.append(Fleet(tmp_path, nodes))
        return made[-1]

    yield make
    for f in made:
        f.close()
        time.sleep(0.5)
        assert tagged(f.tag) == [], "processes left behind"
