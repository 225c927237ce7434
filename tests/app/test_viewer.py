"""The offline 3D viewer: 3Dmol.js comes from the npm registry once, is verified, and views make no requests."""

from __future__ import annotations

import json
import re
import urllib.error

import pytest
from pymatgen.core import Lattice, Structure

from engine.app import viewer


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
    assert "cdn.jsdelivr" not in html and viewer._LOCAL_SENTINEL not in html
    # Nothing in the view itself points at a URL; the library arrives inline in the head.
    assert not re.search(r"(src|href)\s*=", body)
    assert "loadScriptAsync" not in body and "$3Dmolpromise = Promise.resolve()" in body
    head = html[: html.index("<body>")]
    assert len(head) > 100_000 and "</script" not in head[len("<!doctype html><html><head>") + 8: -len("</script></head>")]
    assert "replicateUnitCell(2,2,1)" in body and "addUnitCell()" in body and "addPropertyLabels" in body
    assert body.count("Na  Na") == 4 and body.count("Cl  Cl") == 4  # every atom of the cell (P1 CIF)


def test_view_rejects_bad_options(use_asset_cache, nacl):
    with pytest.raises(ValueError, match="style"):
        viewer.structure_view_html(nacl, style="wireframe")
    with pytest.raises(ValueError, match="supercell"):
        viewer.structure_view_html(nacl, supercell=(0, 1, 1))


def test_fallback_figure_plots_every_atom_and_the_cell(nacl):
    fig = viewer.fallback_figure(nacl, supercell=(2, 1, 1))
    atoms = {t.name: len(t.x) for t in fig.data if t.mode == "markers"}
    assert atoms == {"Na": 8, "Cl": 8}
    cell = [t for t in fig.data if t.name == "cell"][0]
    assert sum(v is not None for v in cell.x) == 24  # 12 edges, 2 ends each


def test_legend_colours_are_the_jmol_colours_of_the_elements(nacl):
    assert viewer.element_colors(nacl) == {"Na": "#ab5cf2", "Cl": "#1ff01f"}  # Jmol's sodium violet, chlorine green
