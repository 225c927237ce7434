"""3D crystal views that work with no internet: the 3Dmol.js asset and the viewer HTML.

py3Dmol writes HTML that loads 3Dmol.js from a CDN when the page is viewed, which fails on lab networks that
block CDNs. Instead, the library is fetched once from the npm registry (pinned version, checked against the
registry's sha512 integrity), cached under ``get_settings().cache_dir`` and inlined into every view, so a view
makes no network request at all. ``crystallab dashboard`` calls :func:`ensure_3dmol_js` at start, so only the
first start needs the registry; a machine that never reaches it can be given the file by copying it into the
cache folder. When the asset is unavailable, :func:`asset_status` says why and pages fall back to
:func:`fallback_figure` (a plotly scatter of the atoms).
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import re
import tarfile
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import py3Dmol
from pymatgen.core import Structure
from pymatgen.io.cif import CifWriter

from engine.lab.fsutil import atomic_write_bytes
from engine.lab.settings import get_settings

THREEDMOL_VERSION = "2.5.5"
"""Pinned 3Dmol.js version (the one py3Dmol 2.5.x points its CDN URL at)."""
REGISTRY_URL = "https://registry.npmjs.org/3dmol/" + THREEDMOL_VERSION
ASSET_MEMBER = "package/build/3Dmol-min.js"
_LOCAL_SENTINEL = "crystallab-inline-3dmol"
_LOADER_DEF = re.compile(r"var loadScriptAsync = function\(uri\)\{.*?\n\}\);\n\};\n", re.DOTALL)
_last_error: str | None = None


def asset_path() -> Path:
    """Where the cached ``3Dmol-min.js`` lives (it may not exist yet)."""
    return get_settings().cache_dir / "3dmol" / THREEDMOL_VERSION / "3Dmol-min.js"


def _fetch(url: str, timeout: float) -> bytes:
    with urllib.request.urlopen(url, timeout=timeout) as resp:  # noqa: S310 (fixed https registry URL)
        return resp.read()


def _verify_integrity(data: bytes, integrity: str) -> None:
    algo, _, b64 = integrity.partition("-")
    if algo != "sha512":
        raise ValueError(f"unsupported integrity algorithm {algo!r} in npm metadata")
    if hashlib.sha512(data).digest() != base64.b64decode(b64):
        raise ValueError("3dmol tarball does not match the registry's sha512 integrity")


def ensure_3dmol_js(download: bool = True, timeout: float = 60.0) -> Path | None:
    """Return the cached 3Dmol.js, fetching it from the npm registry the first time.

    Args:
        download: when False, only look in the cache.
        timeout: seconds per HTTP request.

    Returns:
        The path of ``3Dmol-min.js``, or None when it is not cached and cannot be fetched; then
        :func:`asset_status` gives the reason.
    """
    global _last_error
    path = asset_path()
    if path.is_file() and path.stat().st_size > 0:
        return path
    if not download:
        return None
    try:
        meta = json.loads(_fetch(REGISTRY_URL, timeout))
        dist = meta["dist"]
        tarball = _fetch(dist["tarball"], timeout)
        _verify_integrity(tarball, dist["integrity"])
        with tarfile.open(fileobj=io.BytesIO(tarball), mode="r:gz") as tar:
            member = tar.extractfile(ASSET_MEMBER)
            if member is None:
                raise ValueError(f"{ASSET_MEMBER} missing from the 3dmol package")
            js = member.read()
    except (urllib.error.URLError, OSError, ValueError, KeyError, tarfile.TarError) as exc:
        _last_error = (
            f"could not fetch 3Dmol.js {THREEDMOL_VERSION} from the npm registry ({exc}); run "
            f"`crystallab dashboard` once on a machine with access to registry.npmjs.org, or place "
            f"3Dmol-min.js at {path}"
        )
        return None
    atomic_write_bytes(path, js)
    _last_error = None
    return path


def asset_status() -> str | None:
    """None when 3D views can render; otherwise a sentence saying why not and what to do."""
    if ensure_3dmol_js(download=False) is not None:
        return None
    return _last_error or (
        f"3Dmol.js is not cached at {asset_path()}; start the lab with `crystallab dashboard` on a machine "
        "that can reach registry.npmjs.org once, or copy 3Dmol-min.js there"
    )


def _p1_cif(structure: Structure) -> str:
    # A P1 CIF lists every atom, so 3Dmol needs no symmetry expansion of its own. Symmetry-expanded sites share
    # their orbit's label; unique labels keep the CIF valid (and CifWriter quiet).
    p1 = structure.copy()
    for i, site in enumerate(p1):
        site.label = f"{site.specie}{i}"
    return str(CifWriter(p1))


def element_colors(structure: Structure) -> dict[str, str]:
    """Jmol colour (``#rrggbb``) of each element of ``structure``, in the order of its composition.

    The same scheme the 3D view draws with (3Dmol's ``Jmol``), read from pymatgen's bundled table, for a legend.
    """
    import functools

    import pymatgen.vis
    import yaml

    @functools.cache
    def table() -> dict:
        path = Path(pymatgen.vis.__file__).with_name("ElementColorSchemes.yaml")
        return yaml.safe_load(path.read_text())["Jmol"]

    colors = {}
    for element in structure.composition.elements:
        rgb = table().get(element.symbol, [128, 128, 128])
        colors[element.symbol] = "#" + "".join(f"{int(c):02x}" for c in rgb)
    return colors


def structure_view_html(
    structure: Structure,
    *,
    style: str = "ball-and-stick",
    supercell: tuple[int, int, int] = (1, 1, 1),
    show_cell: bool = True,
    labels: bool = False,
    width: int | str = "100%",
    height: int = 420,
) -> str:
    """A self-contained HTML page showing ``structure`` in 3D with the inlined 3Dmol.js.

    Args:
        style: ``"ball-and-stick"`` (spheres at 0.3 of the van der Waals radius plus sticks) or
            ``"space-filling"`` (van der Waals spheres).
        supercell: repeats of the unit cell along a, b, c.
        show_cell: draw the unit-cell box.
        labels: write each atom's element symbol.
        width, height: size of the view (int: CSS pixels, str: any CSS length such as "100%").

    Raises:
        FileNotFoundError: 3Dmol.js is not available (see :func:`asset_status`).
        ValueError: unknown style or a supercell repeat < 1.
    """
    js_path = ensure_3dmol_js(download=False)
    if js_path is None:
        raise FileNotFoundError(asset_status())
    if style not in ("ball-and-stick", "space-filling"):
        raise ValueError(f"unknown style {style!r}; use 'ball-and-stick' or 'space-filling'")
    if any(int(n) < 1 for n in supercell):
        raise ValueError(f"supercell repeats must be >= 1, got {supercell}")
    view = py3Dmol.view(width=width, height=height, js=_LOCAL_SENTINEL)
    view.addModel(_p1_cif(structure), "cif")
    if style == "ball-and-stick":
        view.setStyle({"sphere": {"scale": 0.3, "colorscheme": "Jmol"}, "stick": {"radius": 0.12}})
    else:
        view.setStyle({"sphere": {"colorscheme": "Jmol"}})
    if show_cell:
        view.addUnitCell()
    if tuple(supercell) != (1, 1, 1):
        view.replicateUnitCell(*map(int, supercell))
    if labels:
        view.addPropertyLabels("elem", {}, {"fontSize": 11, "showBackground": False, "fontColor": "black",
                                            "alignment": "center"})
    view.zoomTo()
    body = view.write_html()
    # The library is inlined in the head; py3Dmol's script-tag loader (which would fetch the CDN URL) is
    # removed and its promise replaced by an already-resolved one.
    body, n_defs = _LOADER_DEF.subn("", body)
    loader = f"loadScriptAsync('{_LOCAL_SENTINEL}')"
    if n_defs != 1 or loader not in body:
        raise RuntimeError("py3Dmol's HTML changed: cannot find its script loader to replace")
    body = body.replace(loader, "Promise.resolve()")
    js = js_path.read_text(encoding="utf-8").replace("</script", "<\\/script")
    return (
        "<!doctype html><html><head><meta charset='utf-8'>"
        "<style>html,body{margin:0;padding:0;background:white;overflow:hidden}</style>"
        f"<script>{js}</script></head><body>{body}</body></html>"
    )


def fallback_figure(structure: Structure, supercell: tuple[int, int, int] = (1, 1, 1)):
    """A plotly 3D scatter of the atoms and the cell edges, for when 3Dmol.js is unavailable."""
    import plotly.graph_objects as go

    sc = structure.copy()
    if tuple(supercell) != (1, 1, 1):
        sc.make_supercell(list(map(int, supercell)))
    fig = go.Figure()
    for el in sorted({s.specie.symbol for s in sc}):
        xyz = np.array([s.coords for s in sc if s.specie.symbol == el])
        fig.add_trace(go.Scatter3d(x=xyz[:, 0], y=xyz[:, 1], z=xyz[:, 2], mode="markers", name=el,
                                   marker={"size": 8}))
    corners = np.array([[i, j, k] for i in (0, 1) for j in (0, 1) for k in (0, 1)], dtype=float)
    cart = corners @ structure.lattice.matrix
    xs, ys, zs = [], [], []
    for a in range(8):
        for b in range(a + 1, 8):
            if np.abs(corners[a] - corners[b]).sum() == 1:  # cell edges join corners differing in one axis
                xs += [cart[a][0], cart[b][0], None]
                ys += [cart[a][1], cart[b][1], None]
                zs += [cart[a][2], cart[b][2], None]
    fig.add_trace(go.Scatter3d(x=xs, y=ys, z=zs, mode="lines", name="cell", line={"color": "gray"},
                               hoverinfo="skip"))
    fig.update_layout(scene={"aspectmode": "data"}, margin={"l": 0, "r": 0, "t": 0, "b": 0}, height=420)
    return fig
