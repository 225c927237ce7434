"""Fixtures shared by the unit tests that train tiny models: one torch thread, and the NaCl-10 token dataset."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from pymatgen.core import Lattice, Structure

from engine.data.datasets import build_dataset


@pytest.fixture
def one_thread():
    """Tiny models run fastest single-threaded, and the test machine's cores are shared."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def nacl10(tmp_path_factory) -> Path:
    """Ten rock-salt NaCl CIFs (a = 5.50 ... 5.77 Å) built into a token dataset: 9 train, 1 validation."""
    root = tmp_path_factory.mktemp("nacl10")
    cifs = root / "cifs"
    cifs.mkdir()
    for k in range(10):
        s = Structure.from_spacegroup("Fm-3m", Lattice.cubic(5.50 + 0.03 * k), ["Na", "Cl"],
                                      [[0, 0, 0], [0.5, 0.5, 0.5]])
        s.to(filename=str(cifs / f"nacl_{k}.cif"))
    build_dataset([str(cifs)], root / "data", val_fraction=0.1, dedup=False, workers=1)
    return root / "data"
