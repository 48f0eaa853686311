import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# tiny models gain nothing from threads, and spinning OpenMP barriers collapse on a busy 2-core machine
os.environ.setdefault("OMP_NUM_THREADS", "1")

from tiny_models import build  # noqa: E402


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    """tiny(family) -> (path, transformers model), built once per session."""
    made = {}

    def get(family: str):
        if family not in made:
            path = tmp_path_factory.mktemp(family)
            made[family] = (path, build(family, path))
        return made[family]

    return get
