from pathlib import Path

import pytest
import torch

torch.set_num_threads(max(1, min(2, torch.get_num_threads())))


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small SD v1 pipeline with random weights, saved by diffusers (the reference for parity tests)."""
    from sd_fixtures import diffusers_v1_pipeline

    tmp = tmp_path_factory.mktemp("sd")
    diffusers_v1_pipeline(tmp).save_pretrained(tmp / "sd")
    return tmp / "sd"
