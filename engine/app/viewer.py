"""3D crystal views that work with no internet: what to draw, the 3Dmol.js asset and the viewer HTML.

What is drawn is decided here, not by 3Dmol: :func:`view_geometry` places every periodic image of the atoms on
the cell's faces, edges and corners and takes the bonds from the lab's neighbour analysis (the Structure page's
bond table), so the view never invents a bond from distances (3Dmol's own bonding joined Ti and Ba in BaTiO3).
Loading 3Dmol.js from a CDN fails on lab networks that block CDNs. Instead, the library is fetched once from the npm registry (pinned version, checked against the
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
import tarfile
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pandas as pd
from pymatgen.core import Element, Structure

from engine.lab.fsutil import atomic_write_bytes
from engine.lab.settings import get_settings

THREEDMOL_VERSION = "2.5.5"
"""Pinned 3Dmol.js version."""
REGISTRY_URL = "https://registry.npmjs.org/3dmol/" + THREEDMOL_VERSION
ASSET_MEMBER = "package/build/3Dmol-min.js"
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


BOUNDARY_TOL_A = 0.25
"""How far (Å, perpendicular to a cell face) outside the drawn box an atom may sit and still be drawn as lying on
that face, edge or corner: a sample's Ba at x = 0.9925 is drawn at both corners, as VESTA draws it."""


MAX_POLYHEDRON_CN = 8
"""Polyhedra are drawn around cations with at most this many neighbours: larger cages (a perovskite's BaO12
cuboctahedra) hide the framework a polyhedral drawing is meant to show."""


def _dominant_element(site) -> str:
    return max(site.species.items(), key=lambda kv: kv[1])[0].symbol


def view_geometry(structure: Structure, bonds: pd.DataFrame | None = None, *,
                  supercell: tuple[int, int, int] = (1, 1, 1), bonded_outside: bool = False,
                  boundary_tol: float = BOUNDARY_TOL_A) -> dict:
    """The atoms and bonds a crystallographer expects to see in a drawing of ``supercell`` cells.

    Atoms: every periodic image of every site that lies in the box ``[0, n_a] x [0, n_b] x [0, n_c]`` (in cells),
    so an atom on a face, edge or corner is drawn on every face, edge or corner it sits on (rock salt's
    conventional cell: 8 corner and 6 face-centre Na, 12 edge-centre and 1 body-centre Cl).
    Bonds: exactly the lab's neighbour analysis (:func:`engine.crystal.analysis.neighbour_bonds`, the Structure page's
    bond table), each bond carried to every drawn image of its site together with its lattice translation;
    a bond that leaves the box ends on an extra image atom outside it (``inside`` False) when
    ``bonded_outside``, else it is left out. Atoms are never joined by distance alone.

    Args:
        bonds: ``neighbour_bonds(structure)``; computed when None.
        supercell: cells drawn along a, b, c.
        bonded_outside: draw the atoms outside the box that a bond of an atom inside reaches.
        boundary_tol: tolerance in Å for an atom to count as lying on the box's boundary.

    Returns:
        ``{"atoms": DataFrame(element, x, y, z (Å), site, cell (lattice translation of the site), inside),
        "bonds": [(atom index, atom index), ...] (each once, lower index first),
        "polyhedra": [(centre atom index, [vertex atom indices]), ...]}``: one coordination polyhedron per
        inside atom with 4 to ``MAX_POLYHEDRON_CN`` bonds, all drawn, to neighbours more electronegative than
        itself (the cation-centred polyhedra of VESTA and Crystal Toolkit: TiO6 in a perovskite, not BaO12).
    """
    from engine.crystal.analysis import neighbour_bonds

    n = np.array([int(v) for v in supercell])
    if (n < 1).any():
        raise ValueError(f"supercell repeats must be >= 1, got {tuple(supercell)}")
    if bonds is None:
        bonds = neighbour_bonds(structure)
    frac = structure.frac_coords
    # Fractional tolerance per axis: the distance between lattice planes of axis i is 1 / |b_i| (no 2 pi).
    tol = boundary_tol * np.linalg.norm(structure.lattice.reciprocal_lattice_crystallographic.matrix, axis=1)

    def inside(site: int, cell: tuple[int, int, int]) -> bool:
        f = frac[site] + cell
        return bool(((f >= -tol) & (f <= n + tol)).all())

    index: dict[tuple[int, tuple[int, int, int]], int] = {}
    rows = []

    def add(site: int, cell: tuple[int, int, int], is_inside: bool) -> int:
        key = (site, cell)
        if key not in index:
            index[key] = len(rows)
            xyz = structure.lattice.get_cartesian_coords(frac[site] + cell)
            rows.append({"element": _dominant_element(structure[site]), "x": xyz[0], "y": xyz[1], "z": xyz[2],
                         "site": site, "cell": cell, "inside": is_inside})
        return index[key]

    for site in range(len(structure)):
        lo = np.floor(-frac[site] - tol).astype(int)
        hi = np.ceil(n - frac[site] + tol).astype(int)
        for a in range(lo[0], hi[0] + 1):
            for b in range(lo[1], hi[1] + 1):
                for c in range(lo[2], hi[2] + 1):
                    if inside(site, (a, b, c)):
                        add(site, (a, b, c), True)

    # Undirected neighbour list: CrystalNN may list a bond from one end only.
    neighbours: dict[int, set[tuple[int, tuple[int, int, int]]]] = {}
    for i, j, image in zip(bonds["site"], bonds["neighbour_site"], bonds["image"]):
        image = tuple(int(v) for v in image)
        neighbours.setdefault(int(i), set()).add((int(j), image))
        neighbours.setdefault(int(j), set()).add((int(i), tuple(-v for v in image)))

    drawn: set[tuple[int, int]] = set()
    for (site, cell), a in list(index.items()):
        for j, image in sorted(neighbours.get(site, ())):
            other = tuple(int(c + d) for c, d in zip(cell, image))
            if (j, other) in index:
                b = index[(j, other)]
            elif bonded_outside:
                b = add(j, other, False)
            else:
                continue
            drawn.add((min(a, b), max(a, b)))

    atoms = pd.DataFrame(rows, columns=["element", "x", "y", "z", "site", "cell", "inside"])
    bond_list = sorted(drawn)
    adjacency: dict[int, list[int]] = {}
    for a, b in bond_list:
        adjacency.setdefault(a, []).append(b)
        adjacency.setdefault(b, []).append(a)
    electronegativity = {el: Element(el).X for el in set(atoms["element"])}
    polyhedra = []
    for a in atoms.index[atoms["inside"]]:
        vertices = sorted(adjacency.get(a, []))
        centre_x = electronegativity[atoms.at[a, "element"]]
        if 4 <= len(vertices) <= MAX_POLYHEDRON_CN and all(electronegativity[atoms.at[v, "element"]] > centre_x for v in vertices):
            polyhedra.append((int(a), vertices))
    return {"atoms": atoms, "bonds": bond_list, "polyhedra": polyhedra}


def _hull_mesh(points: np.ndarray) -> dict | None:
    """Flat-shaded triangles of the convex hull of ``points`` (3Dmol ``addCustom`` arrays), None if flat."""
    from scipy.spatial import ConvexHull, QhullError

    try:
        hull = ConvexHull(points)
    except QhullError:
        return None
    centre = points.mean(axis=0)
    vertices, normals, faces = [], [], []
    for tri in hull.simplices:
        p = points[tri]
        normal = np.cross(p[1] - p[0], p[2] - p[0])
        if np.dot(normal, p[0] - centre) < 0:  # outward, so both lighting and culling see the outside
            p, normal = p[::-1], -normal
        normal = normal / (np.linalg.norm(normal) or 1.0)
        for v in p:
            faces.append(len(vertices))
            vertices.append({"x": float(v[0]), "y": float(v[1]), "z": float(v[2])})
            normals.append({"x": float(normal[0]), "y": float(normal[1]), "z": float(normal[2])})
    return {"vertexArr": vertices, "normalArr": normals, "faceArr": faces}


def structure_view_html(
    structure: Structure,
    *,
    style: str = "ball-and-stick",
    supercell: tuple[int, int, int] = (1, 1, 1),
    show_cell: bool = True,
    labels: bool = False,
    polyhedra: bool = False,
    bonded_outside: bool = False,
    bonds: pd.DataFrame | None = None,
    width: int | str = "100%",
    height: int = 560,
) -> str:
    """A self-contained HTML page showing ``structure`` in 3D with the inlined 3Dmol.js.

    What is drawn is :func:`view_geometry`: boundary atoms at every periodic image in the box, and only the bonds
    of the lab's neighbour analysis (3Dmol's own distance-based bonding is never used).

    Args:
        style: ``"ball-and-stick"`` (spheres at 0.3 of the van der Waals radius plus the analysis' bonds) or
            ``"space-filling"`` (van der Waals spheres, no bonds).
        supercell: repeats of the unit cell along a, b, c.
        show_cell: draw the edges of every unit cell of the box.
        labels: write each atom's element symbol.
        polyhedra: draw cation-centred coordination polyhedra (translucent, in the centre atom's colour).
        bonded_outside: draw the atoms outside the box that a bond reaches (smaller spheres).
        bonds: ``engine.crystal.analysis.neighbour_bonds(structure)`` when already computed.
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
    geometry = view_geometry(structure, bonds, supercell=supercell,
                             bonded_outside=bonded_outside and style == "ball-and-stick")
    atoms_df = geometry["atoms"]
    partners: dict[int, list[int]] = {i: [] for i in range(len(atoms_df))}
    for a, b in geometry["bonds"]:
        partners[a].append(b)
    atoms = [{"elem": r.element, "x": round(float(r.x), 4), "y": round(float(r.y), 4), "z": round(float(r.z), 4),
              "serial": i, "index": i, "bonds": partners[i], "bondOrder": [1] * len(partners[i])}
             for i, r in enumerate(atoms_df.itertuples())]
    outside = [int(i) for i in atoms_df.index[~atoms_df["inside"]]]
    colors = element_colors(structure)
    meshes = []
    if polyhedra:
        xyz = atoms_df[["x", "y", "z"]].to_numpy()
        for centre, vertices in geometry["polyhedra"]:
            mesh = _hull_mesh(xyz[vertices])
            if mesh is not None:
                meshes.append({**mesh, "color": colors.get(atoms_df.at[centre, "element"], "#808080"),
                               "opacity": 0.45})
    edges = []
    if show_cell:
        m = structure.lattice.matrix
        for a in range(supercell[0]):
            for b in range(supercell[1]):
                for c in range(supercell[2]):
                    o = np.array([a, b, c], dtype=float)
                    for axis in range(3):
                        for u in (0, 1):
                            for v in (0, 1):
                                start = o.copy()
                                others = [k for k in range(3) if k != axis]
                                start[others[0]] += u
                                start[others[1]] += v
                                end = start.copy()
                                end[axis] += 1
                                edges.append([list(map(float, start @ m)), list(map(float, end @ m))])
    if style == "ball-and-stick":
        base = {"sphere": {"scale": 0.3, "colorscheme": "Jmol"}, "stick": {"radius": 0.12, "colorscheme": "Jmol"}}
        beyond = {"sphere": {"scale": 0.18, "colorscheme": "Jmol"}, "stick": {"radius": 0.12, "colorscheme": "Jmol"}}
    else:
        base = beyond = {"sphere": {"colorscheme": "Jmol"}}
    spec = {"atoms": atoms, "outside": outside, "base": base, "beyond": beyond, "meshes": meshes,
            "edges": edges, "labels": bool(labels)}
    css_width = f"{width}px" if isinstance(width, int) else width
    js = js_path.read_text(encoding="utf-8").replace("</script", "<\\/script")
    data = json.dumps(spec).replace("</", "<\\/")
    script = """
const spec = %s;
const viewer = $3Dmol.createViewer(document.getElementById("crystal"), {backgroundColor: "white"});
const model = viewer.addModel();
model.addAtoms(spec.atoms);
viewer.setStyle({}, spec.base);
if (spec.outside.length) viewer.setStyle({serial: spec.outside}, spec.beyond);
for (const mesh of spec.meshes) viewer.addCustom(mesh);
for (const [s, e] of spec.edges) viewer.addCylinder({start: {x: s[0], y: s[1], z: s[2]},
                                                     end: {x: e[0], y: e[1], z: e[2]}, radius: 0.025,
                                                     color: "#444444", fromCap: 1, toCap: 1});
if (spec.labels) viewer.addPropertyLabels("elem", {}, {fontSize: 11, showBackground: false, fontColor: "black",
                                                       alignment: "center"});
viewer.zoomTo();
viewer.rotate(-15, "x");  // a slight tilt shows depth; the user turns it from there
viewer.rotate(20, "y");
viewer.render();
""" % data
    return (
        "<!doctype html><html><head><meta charset='utf-8'>"
        "<style>html,body{margin:0;padding:0;background:white;overflow:hidden}</style>"
        f"<script>{js}</script></head><body>"
        f"<div id='crystal' style='width:{css_width};height:{height}px;position:relative'></div>"
        f"<script>{script}</script></body></html>"
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
