"""The frozen 371-token CrystaLLM vocabulary and the atom-property table the pretrained models saw.

Both come from ``engine/resources/crystallm_vocab.json`` and are loaded once at import. Token ids must match
upstream exactly, otherwise pretrained checkpoints and published token files are meaningless, so nothing here is
computed from pymatgen: newer pymatgen versions changed some electronegativities and radii.

Id layout: 89 element symbols (0-88, not in Z order), digits (89-98), CIF keywords (99-124, ``data_`` = 124),
``_atom_type_*`` keywords (125-129), symbols (130-142, space = 141, newline = 142), 227 space-group tokens
carrying the suffix ``_sg`` (143-369) and ``<unk>`` = 370.

The module-level containers are shared by every caller: treat them as read-only. ``meta_dict()`` returns fresh
copies in upstream's ``meta.pkl`` layout for writing (space-group ids map to bare symbols in ``itos``).
"""

from __future__ import annotations

import hashlib
import json
import math
from importlib import resources
from typing import NamedTuple

SG_SUFFIX = "_sg"
"""Suffix that separates a space-group token (``Pm_sg``) from an element token (``Pm``)."""


class AtomProps(NamedTuple):
    """Atom-properties row values, as strings written exactly as in CrystaLLM's training data."""

    electronegativity: str
    """Pauling electronegativity (Allen value for He, Ne, Ar), usually 4 decimals."""
    radius: str
    """Atomic radius in angstrom (van der Waals radius for noble gases without one)."""
    ionic_radius: str
    """Average ionic radius in angstrom."""


def _load() -> dict:
    text = resources.files("engine").joinpath("resources", "crystallm_vocab.json").read_text(encoding="utf-8")
    return json.loads(text)


_RAW = _load()

TOKENS: list[str] = list(_RAW["tokens_in_id_order"])
STOI: dict[str, int] = {tok: i for i, tok in enumerate(TOKENS)}
ITOS: dict[int, str] = dict(enumerate(TOKENS))
VOCAB_SIZE: int = 371
UNK_ID: int = 370
UNK_TOKEN: str = "<unk>"
DATA_ID: int = STOI["data_"]
NEWLINE_ID: int = STOI["\n"]
SPACE_ID: int = STOI[" "]

ELEMENTS: list[str] = TOKENS[:89]
SPACE_GROUPS: list[str] = [tok[: -len(SG_SUFFIX)] for tok in TOKENS if tok.endswith(SG_SUFFIX)]

ATOM_PROPS: dict[str, AtomProps] = {
    el: AtomProps(p["electronegativity"], p["radius"], p["ionic_radius"])
    for el, p in _RAW["atom_props_as_written"].items()
}
# NaN (not None) where pymatgen had no Pauling value: pymatgen's Composition.formula sorted by Element.X, which
# was NaN for He, Ne and Ar, and reproducing that sort key reproduces its element order.
PAULING_X: dict[str, float] = {
    el: math.nan if p["pauling_X_for_sorting"] is None else float(p["pauling_X_for_sorting"])
    for el, p in _RAW["atom_props_as_written"].items()
}

# Guard the invariants other modules (and pretrained checkpoints) rely on; a corrupted resource file must fail
# at import, not produce silently shifted ids.
if not (
    len(TOKENS) == VOCAB_SIZE == _RAW["vocab_size"] == len(set(TOKENS))
    and TOKENS[UNK_ID] == UNK_TOKEN
    and _RAW["unk_id"] == UNK_ID
    and (DATA_ID, SPACE_ID, NEWLINE_ID) == (124, 141, 142)
    and len(SPACE_GROUPS) == 227
    and set(ATOM_PROPS) == set(ELEMENTS)
):
    raise RuntimeError("engine/resources/crystallm_vocab.json is corrupted: restore it from git")


def vocab_fingerprint() -> str:
    """Identify this vocabulary: sha256 hex digest of the tokens (id order) joined by ``"\\n"``.

    Checkpoints store it; loading a checkpoint compares it so a model is never paired with shifted token ids.
    """
    return hashlib.sha256("\n".join(TOKENS).encode("utf-8")).hexdigest()


def meta_dict() -> dict:
    """The vocabulary in CrystaLLM's ``meta.pkl`` layout: ``{"vocab_size", "itos": {int: str}, "stoi"}``.

    As upstream's ``bin/tokenize_cifs.py`` writes it (``CIFTokenizer().id_to_token``): ``itos`` maps the 227
    space-group ids to the bare symbol (``143: 'P6/mmm'``) while ``stoi`` keeps the suffix (``'P6/mmm_sg': 143``),
    so upstream tools that rebuild text through ``meta["itos"]`` read our files as they read their own.
    Returns fresh dicts, safe to modify or pickle.
    """
    itos = {i: tok[: -len(SG_SUFFIX)] if tok.endswith(SG_SUFFIX) else tok for i, tok in ITOS.items()}
    return {"vocab_size": VOCAB_SIZE, "itos": itos, "stoi": dict(STOI)}
