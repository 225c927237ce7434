"""The offline 3D viewer: 3Dmol.js comes from the npm registry once, is verified, and views make no requests."""

from __future__ import annotations

import json
import re
import urllib.error
from collections import Counter

import numpy as np
import pytest
from pymatgen.core import Lattice, Structure

from engine.app import viewer
from engine.crystal import analysis


@pytest.fixture(params=["cubic", "mp-5777"])
def perovskite(request) -> Structure:
    """BaTiO3: ideal cubic with Ba at the origin, and mp-5777 as MP-20 writes it (distorted, Ba at x = 0.9925)."""
    if request.param == "cubic":
        return Structure(Lattice.cubic(4.0), ["Ba", "Ti", "O", "O", "O"],
                         [[0, 0, 0], [0.5, 0.5, 0.5], [0.5, 0.5, 0], [0.5, 0, 0.5], [0, 0.5, 0.5]])
    lattice = Lattice.from_parameters(4.12278815, 4.12278815, 3.98753100, 90, 90, 90.48824126)
    return Structure(lattice, ["Ba", "Ti", "O", "O", "O"],
                     [[0.992521, 0.007479, 0], [0.475486, 0.524514, 0.5], [0.509612, 0.972987, 0.5],
                      [0.027013, 0.490388, 0.5], [0.515468, 0.484532, 0]])


@pytest.fixture
def nacl() -> Structure:
    return Structure.from_spacegroup("Fm-3m", Lattice.cubic(5.64), ["Na", "Cl"], [[0, 0, 0], [0.5, 0.5, 0.5]])


def test_asset_is_cached_and_reused_without_network(use_asset_cache, monkeypatch):
    path = viewer.ensure_3dmol_js()
    assert path is not None and path.stat().st_size > 100_000
    assert "createViewer" in path.read_text(encoding="utf-8")

    def no_network(url, timeout):
        raise AssertionError(f"fetched {url} although the asset is cached")

    monkeypatch.setattr(viewer, "_fetch", no_network)
    assert viewer.ensure_3dmol_js() == path
    assert viewer.asset_status() is None


def test_offline_without_cache_says_why(monkeypatch):
    def offline(url, timeout):
        raise urllib.error.URLError("Name or service not known")

    monkeypatch.setattr(viewer, "_fetch", offline)
    assert viewer.ensure_3dmol_js() is None
    reason = viewer.asset_status()
    assert "npm registry" in reason and "Name or service not known" in reason
    with pytest.raises(FileNotFoundError, match="3Dmol"):
        viewer.structure_view_html(Structure(Lattice.cubic(3), ["Fe"], [[0, 0, 0]]))


def test_tampered_tarball_is_rejected_and_not_cached(monkeypatch):
    meta = {"dist": {"tarball": "https://registry.example/3dmol.tgz",
                     "integrity": "sha512-" + "A" * 86 + "=="}}

    def fake(url, timeout):
        return json.dumps(meta).encode() if url == viewer.REGISTRY_URL else b"not the real tarball"

    monkeypatch.setattr(viewer, "_fetch", fake)
    assert viewer.ensure_3dmol_js() is None
    assert "integrity" in viewer.asset_status()
    assert not viewer.asset_path().exists()


def test_view_html_inlines_library_and_requests_nothing(use_asset_cache, nacl):
    html = viewer.structure_view_html(nacl, supercell=(2, 2, 1), labels=True, style="space-filling")
    body = html[html.index("<body>"):]
    assert "cdn.jsdelivr" not in html
    # Nothing in the view itself points at a URL; the library arrives inline in the head.
    assert not re.search(r"(src|href)\s*=", body) and "loadScriptAsync" not in body
    head = html[: html.index("<body>")]
    assert len(head) > 100_000 and "</script" not in head[len("<!doctype html><html><head>") + 8: -len("</script></head>")]
    spec = json.loads(re.search(r"const spec = (\{.*?\});\n", body).group(1))
    assert spec["labels"] and len(spec["edges"]) == 12 * 4  # every unit cell of the 2x2x1 box
    elements = [a["elem"] for a in spec["atoms"]]
    assert elements.count("Na") == 3 * 3 * 2 + 2 * 2 * 1 + 4 * 2 * 2 and len(elements) == len(set(
        (a["x"], a["y"], a["z"]) for a in spec["atoms"]))


def test_view_rejects_bad_options(use_asset_cache, nacl):
    with pytest.raises(ValueError, match="style"):
        viewer.structure_view_html(nacl, style="wireframe")
    with pytest.raises(ValueError, match="supercell"):
        viewer.structure_view_html(nacl, supercell=(0, 1, 1))


def _degrees(geometry) -> dict[int, int]:
    return Counter(i for bond in geometry["bonds"] for i in bond)


def test_rock_salt_is_drawn_with_its_boundary_atoms_and_six_bonds_each(nacl):
    geometry = viewer.view_geometry(nacl, bonded_outside=True)
    atoms = geometry["atoms"]
    inside = atoms[atoms["inside"]]
    frac = nacl.lattice.get_fractional_coords(inside[["x", "y", "z"]].to_numpy())
    on_boundary = (np.isclose(frac, 0, atol=1e-6) | np.isclose(frac, 1, atol=1e-6)).sum(axis=1)
    kinds = Counter(zip(inside["element"], on_boundary))  # 3: corner, 2: edge, 1: face, 0: inside
    assert kinds == {("Na", 3): 8, ("Na", 1): 6, ("Cl", 2): 12, ("Cl", 0): 1}
    degree = _degrees(geometry)
    assert all(degree[i] == 6 for i in inside.index)  # full octahedra, bonds across the boundary included
    for a, b in geometry["bonds"]:
        assert {atoms.at[a, "element"], atoms.at[b, "element"]} == {"Na", "Cl"}
        d = np.linalg.norm(atoms.loc[a, ["x", "y", "z"]].to_numpy(float) - atoms.loc[b, ["x", "y", "z"]].to_numpy(float))
        assert d == pytest.approx(5.64 / 2)
    assert len(geometry["polyhedra"]) == 14 and all(len(v) == 6 for _, v in geometry["polyhedra"])  # NaCl6

    boxed = viewer.view_geometry(nacl)  # without the atoms beyond the cell: only bonds inside it
    assert boxed["atoms"]["inside"].all() and len(boxed["atoms"]) == 27
    centre = boxed["atoms"].index[np.isclose(boxed["atoms"][["x", "y", "z"]].to_numpy(float), 5.64 / 2).all(axis=1)]
    assert _degrees(boxed)[int(centre[0])] == 6


def test_perovskite_bonds_are_the_analysis_bonds_across_the_cell_boundary(perovskite):
    bonds = analysis.neighbour_bonds(perovskite)
    geometry = viewer.view_geometry(perovskite, bonds)
    atoms = geometry["atoms"]
    assert Counter(atoms["element"]) == {"Ba": 8, "O": 6, "Ti": 1}  # Ba at every corner, O on every face
    pairs = Counter(frozenset((atoms.at[a, "element"], atoms.at[b, "element"])) for a, b in geometry["bonds"])
    assert frozenset(("Ba", "Ti")) not in pairs  # 3Dmol's distance rule drew this 3.4 Å stick; the table has none
    assert pairs[frozenset(("Ti", "O"))] == 6
    # Each corner Ba bonds the three face O around it; all but one corner are periodic images of the Ba site.
    assert pairs[frozenset(("Ba", "O"))] == 8 * 3
    image_ba = atoms.index[(atoms["element"] == "Ba") & atoms["cell"].map(any)]
    assert len(image_ba) == 7 and all(_degrees(geometry)[i] == 3 for i in image_ba)
    assert [atoms.at[c, "element"] for c, _ in geometry["polyhedra"]] == ["Ti"]  # TiO6, not BaO12 cages


def test_fallback_figure_plots_every_atom_and_the_cell(nacl):
    fig = viewer.fallback_figure(nacl, supercell=(2, 1, 1))
    atoms = {t.name: len(t.x) for t in fig.data if t.mode == "markers"}
    assert atoms == {"Na": 8, "Cl": 8}
    cell = [t for t in fig.data if t.name == "cell"][0]
    assert sum(v is not None for v in cell.x) == 24  # 12 edges, 2 ends each


def test_legend_colours_are_the_jmol_colours_of_the_elements(nacl):
    assert viewer.element_colors(nacl) == {"Na": "#ab5cf2", "Cl": "#1ff01f"}  # Jmol's sodium violet, chlorine green
