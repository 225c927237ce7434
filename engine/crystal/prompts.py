"""Sampling prompts: turn a formula, an optional Z and an optional space group into CrystaLLM prompt text.

A prompt is the start of a canonical CIF in the model view (crystallm-format.md sections 1 and 8):

- composition only: ``data_Na2Cl2\\n`` (the *cell* composition, element order of pymatgen
  ``Composition.formula``, explicit 1s);
- with a space group: that line, the atom-properties loop for the composition (values from the frozen table the
  pretrained models saw) and ``_symmetry_space_group_name_H-M Fm-3m\\n``;
- unconditional: ``data_`` (the model writes the composition too).

How a formula is read (the rule every caller gets, CLI and dashboard alike):

- with ``z``: the formula is one *reduced* formula unit and the cell holds ``z`` of them (``NaCl``, z=2 ->
  ``Na2Cl2``). A formula that is not reduced (``Na2Cl2`` with z=2) is refused rather than guessed at.
- without ``z``, a non-reduced formula is the cell itself (``Na2Cl2`` -> one prompt, Z = 2, as the seed's
  ``--prompt Na2Cl2`` means); a reduced formula gets one prompt per Z in ``DEFAULT_ZS`` (the CrystaLLM web
  app's behaviour).

Z is counted as pymatgen counts ``_cell_formula_units_Z``: cell composition / reduced composition.
"""

from __future__ import annotations

import difflib
import functools
import math
import re
import warnings
from dataclasses import asdict, dataclass

import spglib
from pymatgen.core import Composition, Element

from engine.crystal.canonical import cell_formula
from engine.crystal.vocab import ATOM_PROPS, ELEMENTS, SPACE_GROUPS
from engine.lab.errors import PromptError

DEFAULT_ZS: tuple[int, ...] = (1, 2, 3, 4, 6, 8)
"""Formula units per cell tried when a reduced formula comes without Z (as CrystaLLM's web app does)."""

MAX_Z = 32
"""Largest Z accepted: a sanity bound; cells beyond it are far larger than typical training structures."""

HM_TAG = "_symmetry_space_group_name_H-M"

MAX_CIF_TOKENS = 8192
"""Longest CIF a model here can read back whole: the largest context (block_size) a model may have
(`engine.train.config.MAX_BLOCK_SIZE`). A composition whose shortest possible CIF is longer cannot be expressed."""
MAX_MULTIPLICITY = 192
"""Most atoms one atom-site row can stand for: the largest Wyckoff multiplicity of any space group (Fm-3m, 192l)."""
# Lower bounds on the tokens of a canonical CIF (measured on the NaCl model view, rounded down): the lines every CIF
# has, what each element adds (its atom-properties row and formula entries) and one atom-site row.
_MIN_BASE_TOKENS, _MIN_ELEMENT_TOKENS, _MIN_ROW_TOKENS = 120, 25, 30

# Old e-glide spellings that pymatgen/spglib no longer use; the vocabulary holds the new ones.
_OLD_SYMBOLS = {"Cmca": "Cmce", "Cmma": "Cmme", "Ccca": "Ccce", "Abm2": "Aem2", "Aba2": "Aea2"}


def _coverage() -> str:
    """The vocabulary's elements in words: a Z range and its gaps."""
    zs = {Element(el).Z: el for el in ELEMENTS}
    gaps = [Element.from_Z(z).symbol for z in range(min(zs), max(zs) + 1) if z not in zs]
    return f"{zs[min(zs)]} to {zs[max(zs)]} except {', '.join(gaps)}"


_COVERAGE = _coverage()


@dataclass(frozen=True)
class Prompt:
    """One prompt for the sampler.

    Attributes:
        text: The exact prompt string handed to the tokenizer.
        formula: Cell composition as on the ``data_`` line (``"Na2Cl2"``); None for an unconditional prompt.
        z: Formula units per cell (reduced-formula units, as pymatgen counts Z); None when unconditional.
        spacegroup: Tokenized H-M symbol (one of the 227, e.g. ``"Fm-3m"``) or None.
        label: Short human-readable name (``"Na2Cl2 Fm-3m"``).
    """

    text: str
    formula: str | None
    z: int | None
    spacegroup: str | None
    label: str

    @property
    def elements(self) -> list[str]:
        """Elements of the composition in data_-line order (empty when unconditional)."""
        return list(parse_formula_spec(self.formula)) if self.formula else []

    def to_dict(self) -> dict:
        """Plain dict for ``config.json``."""
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> Prompt:
        """Inverse of `to_dict` (unknown keys are ignored)."""
        return cls(**{k: d.get(k) for k in ("text", "formula", "z", "spacegroup", "label")})


_PART_RE = re.compile(r"\s*(?:([A-Z][a-z]?)|(\()|(\)))(\d*)\s*")


def parse_formula_spec(spec: str) -> dict[str, int]:
    """Parse a chemical formula with whole-number counts into element counts.

    Accepts ``NaCl``, ``Na2Cl2``, ``Na2 Cl2`` and parentheses (``Ca3(PO4)2``). Repeated elements are summed.
    Keys keep the order of first appearance.

    Raises:
        PromptError: empty or malformed formula, a count that is not a positive whole number, or an element that
            is not in the CrystaLLM vocabulary.
    """
    text = (spec or "").strip()
    hint = "write element symbols with whole-number counts, e.g. NaCl, Na2Cl2 or Ca3(PO4)2"
    if not text:
        raise PromptError(f"the formula is empty: {hint}")
    if re.search(r"\d\.\d|\.\d", text):
        raise PromptError(
            f"formula {spec!r} has a fractional count: a cell holds whole atoms, so scale it to whole numbers "
            "(e.g. Na0.5Cl0.5 -> NaCl)"
        )
    stack: list[dict[str, int]] = [{}]
    pos = 0
    while pos < len(text):
        m = _PART_RE.match(text, pos)
        if m is None:
            raise PromptError(f"formula {spec!r} is malformed at {text[pos:]!r} (character {pos + 1}): {hint}")
        symbol, open_, close, digits = m.groups()
        count = int(digits) if digits else 1
        if symbol:
            if symbol not in ATOM_PROPS:
                raise PromptError(
                    f"{symbol} is not one of the 89 elements in the CrystaLLM vocabulary (formula {spec!r}): "
                    f"the vocabulary covers {_COVERAGE}"
                )
            _add(stack[-1], symbol, count, spec)
        elif open_:
            if digits:
                raise PromptError(f"formula {spec!r} is malformed: a count cannot follow '(': {hint}")
            stack.append({})
        elif close:
            if len(stack) == 1:
                raise PromptError(f"formula {spec!r} is malformed: the ')' at character {m.start() + 1} closes nothing")
            for el, n in stack.pop().items():
                _add(stack[-1], el, n * count, spec)
        pos = m.end()
    if len(stack) != 1:
        raise PromptError(f"formula {spec!r} is malformed: a '(' is never closed")
    if not stack[0]:
        raise PromptError(f"formula {spec!r} names no element: {hint}")
    return stack[0]


def _add(counts: dict[str, int], el: str, n: int, spec: str) -> None:
    if n < 1:
        raise PromptError(f"formula {spec!r} gives {el} a count of 0: every count must be at least 1")
    counts[el] = counts.get(el, 0) + n


@functools.cache
def _sg_table() -> dict[int, tuple[str, str]]:
    """International Tables number -> (short H-M symbol in spglib's spelling, point group), all 230 groups.

    spglib's standard-setting symbols are what pymatgen's CifWriter wrote into the training data, hence exactly
    the 227 tokenized symbols plus the three without a token.
    """
    table: dict[int, tuple[str, str]] = {}
    with warnings.catch_warnings():
        # spglib 2.x warns about its legacy error handling on every call; nothing here can fail.
        warnings.simplefilter("ignore", DeprecationWarning)
        for hall in range(1, 531):
            t = spglib.get_spacegroup_type(hall)
            table.setdefault(t.number, (t.international_short, t.pointgroup_international))
    return table


def spacegroup_choices() -> list[tuple[int, str]]:
    """The 227 space groups a prompt can name, as ``(number, symbol)`` sorted by number."""
    tokenized = set(SPACE_GROUPS)
    return [(n, sym) for n, (sym, _) in sorted(_sg_table().items()) if sym in tokenized]


def normalize_spacegroup(spec: str | int) -> str:
    """Map a space-group spelling or number to its token symbol (``225``, ``F m -3 m``, ``fm-3m`` -> ``Fm-3m``).

    Accepted: the number 1-230; the symbol as tokenized; with spaces, without underscores (``P21/c``), any
    case; full symbols pymatgen understands (``P 1 21/c 1``); old e-glide names (``Cmca``).

    Raises:
        PromptError: unknown symbol (with close matches) or one of the three groups without a token
            (``P4_222``, ``P6``, ``P432``; with the tokenized groups of the same point group).
    """
    table = _sg_table()
    raw = str(spec).strip()
    if re.fullmatch(r"\d+", raw):
        number = int(raw)
        if not 1 <= number <= 230:
            raise PromptError(f"space group number {number} does not exist: use 1-230")
        return _tokenized(number, raw)
    compact = re.sub(r"\s+", "", raw)
    compact = _OLD_SYMBOLS.get(compact, compact)
    by_key = {sym.replace("_", "").lower(): sym for sym in SPACE_GROUPS}
    if compact in SPACE_GROUPS:
        return compact
    if compact.replace("_", "").lower() in by_key:
        return by_key[compact.replace("_", "").lower()]
    for number, (sym, _) in table.items():
        if compact.replace("_", "").lower() == sym.replace("_", "").lower():
            return _tokenized(number, raw)
    try:
        from pymatgen.symmetry.groups import SpaceGroup

        number = SpaceGroup(raw).int_number
    except ValueError:
        close = difflib.get_close_matches(compact, SPACE_GROUPS, n=5, cutoff=0.5)
        suggestion = f"did you mean {', '.join(close)}? " if close else ""
        raise PromptError(
            f"space group {raw!r} is not a known Hermann-Mauguin symbol: {suggestion}"
            "give the number (1-230) or a short symbol such as Fm-3m or P2_1/c"
        ) from None
    return _tokenized(number, raw)


def _tokenized(number: int, raw: str) -> str:
    table = _sg_table()
    symbol, point_group = table[number]
    if symbol in SPACE_GROUPS:
        return symbol
    same_class = sorted(
        (n for n, (s, pg) in table.items() if pg == point_group and s in SPACE_GROUPS),
        key=lambda n: (abs(n - number), n),
    )
    options = ", ".join(f"{table[n][0]} ({n})" for n in same_class[:6])
    raise PromptError(
        f"space group {raw!r} ({symbol}, No. {number}) has no token in the CrystaLLM vocabulary (3 of the 230 "
        f"groups have none), so the model cannot be prompted with it: nearest options with point group "
        f"{point_group}: {options}; or leave the space group out"
    )


def build_prompts(formula: str | None, z: int | None = None, spacegroup: str | int | None = None) -> list[Prompt]:
    """Build the prompt(s) for a composition request (see the module docstring for how formula and Z combine).

    Args:
        formula: A reduced formula unit (``NaCl``), a cell composition (``Na2Cl2``) or None/"" (unconditional).
        z: Formula units per cell, 1 to `MAX_Z`; requires a reduced ``formula``.
        spacegroup: Symbol or number (see `normalize_spacegroup`); requires a formula.

    Returns:
        One Prompt, or one per Z in `DEFAULT_ZS` when a reduced formula comes without Z.

    Raises:
        PromptError: any input that the CrystaLLM vocabulary cannot express; the message says what to change.
    """
    if formula is None or not str(formula).strip():
        if z is not None or spacegroup not in (None, ""):
            raise PromptError(
                "Z and a space group need a composition: give a formula (e.g. NaCl), or neither for an "
                "unconditional prompt"
            )
        return [Prompt(text="data_", formula=None, z=None, spacegroup=None, label="unconditional")]
    counts = parse_formula_spec(formula)
    divisor = math.gcd(*counts.values())
    reduced = {el: n // divisor for el, n in counts.items()}
    if z is not None:
        if isinstance(z, bool) or not isinstance(z, int) or not 1 <= z <= MAX_Z:
            raise PromptError(f"Z = {z!r} is out of range: give a whole number of formula units from 1 to {MAX_Z}")
        if divisor > 1:
            reduced_text = "".join(f"{el}{n if n > 1 else ''}" for el, n in reduced.items())
            raise PromptError(
                f"formula {formula!r} is {divisor} formula units of {reduced_text}, so Z is already implied: give "
                f"the formula unit {reduced_text} with Z, or {formula!r} without Z"
            )
        zs = [z]
    else:
        zs = [divisor] if divisor > 1 else list(DEFAULT_ZS)
    sg = normalize_spacegroup(spacegroup) if spacegroup not in (None, "") else None
    return [cell_prompt(cell_formula(Composition({el: n * zi for el, n in reduced.items()})), sg) for zi in zs]


def min_cif_tokens(counts: dict[str, int]) -> int:
    """A lower bound on the tokens of any canonical CIF with this cell composition (element -> atoms in the cell).

    Even in the most symmetric space group each element needs ``ceil(count / MAX_MULTIPLICITY)`` atom-site rows.
    """
    rows = sum(-(-n // MAX_MULTIPLICITY) for n in counts.values())
    digits = sum(len(str(n)) for n in counts.values())
    return _MIN_BASE_TOKENS + _MIN_ELEMENT_TOKENS * len(counts) + 2 * digits + _MIN_ROW_TOKENS * rows


def check_expressible(cell: str, counts: dict[str, int], limit: int = MAX_CIF_TOKENS) -> None:
    """Refuse a cell composition whose shortest CIF cannot fit in ``limit`` tokens, naming the limit.

    Raises:
        PromptError: the composition needs more tokens than any model here can hold; the message gives the
            estimate and the largest cell of these elements that fits.
    """
    need = min_cif_tokens(counts)
    if need <= limit:
        return
    room = limit - _MIN_BASE_TOKENS - _MIN_ELEMENT_TOKENS * len(counts) - 2 * 4 * len(counts)
    max_atoms = max(0, room // _MIN_ROW_TOKENS) * MAX_MULTIPLICITY
    raise PromptError(
        f"the cell {cell} ({sum(counts.values()):,} atoms) cannot be expressed: even in the most symmetric space "
        f"group (at most {MAX_MULTIPLICITY} atoms per site) its CIF needs at least {need:,} tokens, more than the "
        f"{limit:,}-token context (block_size) of the largest model; a cell of {len(counts)} element(s) can hold "
        f"at most about {max_atoms:,} atoms: give a smaller cell or a formula unit with a small Z"
    )


def cell_prompt(cell: str, spacegroup: str | int | None = None) -> Prompt:
    """The prompt for an exact cell composition as a ``data_`` line writes it (``Na4Cl4``), with no limit on Z.

    For prompts taken from known structures (the CSP benchmark), whose conventional cells can hold more formula
    units than `MAX_Z` allows for typed requests. Z is the greatest common divisor of the counts.

    Raises:
        PromptError: a malformed composition or space group, an element outside the vocabulary, or a cell too
            large for any CIF a model here can hold (`check_expressible`).
    """
    counts = parse_formula_spec(cell)
    check_expressible(cell, counts)
    sg = normalize_spacegroup(spacegroup) if spacegroup not in (None, "") else None
    text = f"data_{cell}\n"
    if sg is not None:
        text += _atom_props_loop(list(counts)) + f"{HM_TAG} {sg}\n"
    label = cell if sg is None else f"{cell} {sg}"
    return Prompt(text=text, formula=cell, z=math.gcd(*counts.values()), spacegroup=sg, label=label)


def _atom_props_loop(elements: list[str]) -> str:
    """The atom-properties loop (crystallm-format.md section 1 step 4) for ``elements`` in data_-line order."""
    head = "loop_\n_atom_type_symbol\n_atom_type_electronegativity\n_atom_type_radius\n_atom_type_ionic_radius\n"
    rows = "".join(f"{el} {p.electronegativity} {p.radius} {p.ionic_radius}\n" for el in elements for p in [ATOM_PROPS[el]])
    return head + rows
