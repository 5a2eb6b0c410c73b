import os

import pytest
import torch

# Two cores in CI: keep intra-op threads modest so parallel work stays predictable.
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU; run on the GPU machine")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="module")
def demo_set(tmp_path_factory):
    """The demo models, built once per test module in a fresh WANRENDER_HOME that stays
    set for the module: (home, ModelFiles, demo image path)."""
    home = tmp_path_factory.mktemp("home")
    mp = pytest.MonkeyPatch()
    mp.setenv("WANRENDER_HOME", str(home))
    from wanrender.demo import demo_image, ensure_demo_models

    files = ensure_demo_models()
    yield home, files, demo_image()
    mp.undo()
