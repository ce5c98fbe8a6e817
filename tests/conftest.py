"""Shared fixtures: tiny random models built from configs/models/tiny.yaml, saved once per session."""

import pytest
import torch

from latentsd.data.shapes import make_shapes_dataset, write_imagefolder
from latentsd.models import build_components


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session", autouse=True)
def one_thread():
    """Tiny models gain nothing from intra-op threads; on a shared 2-core box they only fight (10-50x slower)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def tiny():
    """Random-init tiny components (never mutate them in a test: build your own for that)."""
    return build_components("tiny", seed=0)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tiny):
    """A diffusers-layout folder of the tiny model, as `latentsd init-model` writes it."""
    from latentsd.pipeline import LatentDiffusionPipeline

    path = tmp_path_factory.mktemp("tiny_model")
    LatentDiffusionPipeline(**tiny.as_dict()).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def shapes_dir(tmp_path_factory):
    """16 shapes images (seed 1) as an imagefolder, per test module (modules that need other data define their own)."""
    return write_imagefolder(make_shapes_dataset(16, seed=1), tmp_path_factory.mktemp("shapes"))
