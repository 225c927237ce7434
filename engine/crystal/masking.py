"""Masks over the tokens of a canonical CIF: every occurrence of one element, one site's coordinates, or the cell.

An element is one token in the CrystaLLM vocabulary, so hiding it keeps the sequence length. In a model view it
appears on the ``data_`` line, in its atom-property row (followed by three numbers that give it away), on the two
formula lines, and twice in each of its site rows (type symbol and label, ``Na Na0``). `mask_element` finds all of
them by token id (space-group tokens such as ``Pm_sg`` are distinct ids from the element ``Pm``) and records which
part of the CIF each occurrence lies in, plus the tokens of the property numbers, which depend on the element.

Numbers are several tokens each (digits and ``.``); `mask_site` and `mask_cell` cover the tokens of the fractional
coordinates of one site row or of the six cell lengths and angles, leaving the spaces between fields in place.
Nothing here imports torch: masks are lists of token positions, applied by the caller with its model's mask id.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from engine.crystal import tokenizer
from engine.crystal.vocab import ELEMENTS, STOI
from engine.lab.errors import InputError

MASK_TEXT = "[MASK]"
"""How a masked run of tokens is written in texts shown to people (Gruver et al.'s infill prompt uses it too)."""

CELL_TAGS = ("_cell_length_a", "_cell_length_b", "_cell_length_c",
             "_cell_angle_alpha", "_cell_angle_beta", "_cell_angle_gamma")
"""The cell parameters `mask_cell` hides (the volume line is left: it is a consequence, not a parameter)."""

_SPACE = STOI[" "]
_NEWLINE = STOI["\n"]
_FORMULA_TAGS = {STOI["_chemical_formula_structural"], STOI["_chemical_formula_sum"]}
_ATOM_TYPE_TAG = STOI["_atom_type_symbol"]
_ATOM_SITE_TAG = STOI["_atom_site_type_symbol"]
_DATA = STOI["data_"]


@dataclass(frozen=True)
class CifTokens:
    """A model view split into token ids, with each token's line and the role of each line.

    Attributes:
        text: The model view (what a model reads).
        ids: Its token ids.
        line_of: Line index of each token (a newline token belongs to the line it ends).
        lines: Per line: ``(start, end)`` token positions, newline excluded.
        props_rows: Line indices of the atom-property rows (``Na 0.9300 1.8000 1.1600``).
        site_rows: Line indices of the atom-site rows, in CIF order.
    """

    text: str
    ids: list[int]
    line_of: list[int]
    lines: list[tuple[int, int]]
    props_rows: list[int]
    site_rows: list[int]

    def fields(self, line: int) -> list[list[int]]:
        """Token positions of each space-separated field of ``line``."""
        start, end = self.lines[line]
        out: list[list[int]] = [[]]
        for pos in range(start, end):
            if self.ids[pos] == _SPACE:
                out.append([])
            else:
                out[-1].append(pos)
        return [f for f in out if f]


def _loop_rows(ids: list[int], lines: list[tuple[int, int]], tag: int) -> list[int]:
    """Line indices of the rows of the loop whose header holds ``tag``: lines after its last ``_`` header line
    up to the next keyword line."""
    header = next((i for i, (s, e) in enumerate(lines) if e > s and ids[s] == tag), None)
    if header is None:
        return []
    row = header + 1
    while row < len(lines) and tokenizer.decode(ids[lines[row][0]:lines[row][0] + 1]).startswith("_"):
        row += 1
    rows = []
    while row < len(lines):
        s, e = lines[row]
        if e <= s:
            break
        first = tokenizer.decode(ids[s:s + 1])
        if first.startswith(("_", "loop_", "data_")):
            break
        rows.append(row)
        row += 1
    return rows


def split_cif(view: str) -> CifTokens:
    """Tokenize a model view and locate its lines, atom-property rows and atom-site rows.

    Raises:
        InputError: the text has no ``data_`` line or no atom-site loop (not a canonical CIF).
    """
    ids = tokenizer.encode(view)
    if _DATA not in ids:
        raise InputError("the text has no data_ line: give a canonical CIF (crystallab cif canonicalize)")
    line_of, lines, start = [], [], 0
    for pos, tok in enumerate(ids):
        line_of.append(len(lines))
        if tok == _NEWLINE:
            lines.append((start, pos))
            start = pos + 1
    if start < len(ids):
        lines.append((start, len(ids)))
    site_rows = _loop_rows(ids, lines, _ATOM_SITE_TAG)
    if not site_rows:
        raise InputError("the text has no atom-site rows: give a canonical CIF (crystallab cif canonicalize)")
    return CifTokens(view, ids, line_of, lines, _loop_rows(ids, lines, _ATOM_TYPE_TAG), site_rows)


@dataclass(frozen=True)
class ElementMask:
    """Where one element occurs in a canonical CIF's tokens.

    Attributes:
        element: The hidden element symbol.
        cif: The tokenized canonical CIF.
        element_positions: Token positions holding the element, in text order.
        regions: Per element position, the part of the CIF it lies in: ``"data"``, ``"props"``, ``"formula"``,
            ``"site"`` (a row's type symbol) or ``"label"`` (a row's site label).
        dependent_positions: Token positions of the element's atom-property numbers (electronegativity, radius,
            ionic radius), which name the element as surely as its symbol.
    """

    element: str
    cif: CifTokens
    element_positions: list[int]
    regions: list[str]
    dependent_positions: list[int] = field(default_factory=list)

    @property
    def positions(self) -> list[int]:
        """Every masked position: the element's and its dependent tokens', sorted."""
        return sorted({*self.element_positions, *self.dependent_positions})

    def region_counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for r in self.regions:
            out[r] = out.get(r, 0) + 1
        return out


def _region(cif: CifTokens, pos: int) -> str:
    line = cif.line_of[pos]
    start, _ = cif.lines[line]
    first = cif.ids[start]
    if first == _DATA:
        return "data"
    if first in _FORMULA_TAGS:
        return "formula"
    if line in cif.props_rows:
        return "props"
    if line in cif.site_rows:
        return "site" if pos == start else "label"
    return "other"


def mask_element(view: str, element: str) -> ElementMask:
    """Every occurrence of ``element`` in a canonical CIF's model view, and its property numbers.

    Raises:
        InputError: ``element`` is not an element of the vocabulary, or does not occur in the CIF.
    """
    if element not in ELEMENTS:
        raise InputError(f"{element!r} is not an element symbol of the CrystaLLM vocabulary (89 elements, e.g. "
                         "Na, Cl, Fe): give one")
    cif = split_cif(view)
    target = STOI[element]
    positions = [p for p, tok in enumerate(cif.ids) if tok == target]
    if not positions:
        present = ", ".join(el for el in ELEMENTS if STOI[el] in set(cif.ids))
        raise InputError(f"the structure has no {element} (its elements: {present}): give one of those to mask")
    regions = [_region(cif, p) for p in positions]
    dependent: list[int] = []
    for line in cif.props_rows:
        fields = cif.fields(line)
        if fields and fields[0] == [cif.lines[line][0]] and cif.ids[fields[0][0]] == target:
            dependent += [p for f in fields[1:] for p in f]
    return ElementMask(element, cif, positions, regions, dependent)


def mask_site(view: str, site: int) -> list[int]:
    """Token positions of the fractional coordinates (x, y, z) of atom-site row ``site`` (0-based, CIF order).

    Raises:
        InputError: no such row (the message gives the number of rows).
    """
    cif = split_cif(view)
    if not 0 <= site < len(cif.site_rows):
        raise InputError(f"--site {site}: the CIF has {len(cif.site_rows)} atom-site rows; give 0 to "
                         f"{len(cif.site_rows) - 1}")
    fields = cif.fields(cif.site_rows[site])
    if len(fields) < 6:
        raise InputError(f"--site {site}: its row has no x, y, z fields; give a canonical CIF")
    return [p for f in fields[3:6] for p in f]


def mask_cell(view: str) -> list[int]:
    """Token positions of the values of the six cell lengths and angles.

    Raises:
        InputError: a cell parameter line is missing.
    """
    cif = split_cif(view)
    out: list[int] = []
    for tag in CELL_TAGS:
        line = next((i for i, (s, e) in enumerate(cif.lines) if e > s and cif.ids[s] == STOI[tag]), None)
        if line is None:
            raise InputError(f"the CIF has no {tag} line: give a canonical CIF")
        out += [p for f in cif.fields(line)[1:] for p in f]
    return out


def masked_text(ids: list[int], positions: list[int]) -> str:
    """The text of ``ids`` with each run of masked positions written once as ``[MASK]``."""
    hidden = set(positions)
    parts: list[str] = []
    for pos, tok in enumerate(ids):
        if pos in hidden:
            if pos - 1 not in hidden:
                parts.append(MASK_TEXT)
        else:
            parts.append(tokenizer.decode([tok]))
    return "".join(parts)
