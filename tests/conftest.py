import random

import pytest
import torch


@pytest.fixture(autouse=True)
def _seed_and_restore_dtype():
    """Every test starts from the same seed and float32 default dtype."""
    random.seed(0)
    torch.manual_seed(0)
    dtype = torch.get_default_dtype()
    yield
    torch.set_default_dtype(dtype)
