"""Shared by the plugin's tests: one thread (tiny models gain nothing from more, and CI shares its cores)."""

import pytest
import torch


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
