"""Infilling: which element could replace a hidden one, and masked-span regeneration; CLI ``crystallab infill``.

Element infill hides every occurrence of one element of a structure's canonical CIF (`engine.crystal.masking`)
and ranks the vocabulary's elements as replacements with one of two scorers:

- ``diffusion``: a masked model (any family with ``masked_log_probs``) reads the canvas with the element and its
  atom-property numbers masked; a candidate scores the summed log-probability of its token over the element's
  positions (one forward pass for all candidates; element order on the ``data_`` line is the original's);
- ``likelihood``: any family's ``sequence_log_likelihood`` of the whole canonical CIF rewritten with the candidate
  (the species replaced in the structure and the canonical CIF regenerated, so property rows, formulas, labels and
  element order are the candidate's own): Gruver et al.'s way of scoring infill with an autoregressive LM.

``auto`` picks ``diffusion`` when the model can do it. Span infill (``--site N`` or ``--cell``) masks the number
tokens of one site's coordinates or of the cell and lets a masked model's ``fill`` regenerate them.
"""

from __future__ import annotations

import argparse
import csv
import io
import re
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Mapping

from pymatgen.core import Structure

from engine.crystal import tokenizer
from engine.crystal.canonical import canonicalize_structure, model_view
from engine.crystal.masking import ElementMask, mask_cell, mask_element, mask_site, masked_text
from engine.crystal.substitution import FILTERS, Screen, candidate_elements, substitute
from engine.crystal.vocab import STOI
from engine.lab.errors import CheckpointError, ConfigError, InputError

SCORERS = ("auto", "diffusion", "likelihood")


@dataclass(frozen=True)
class Candidate:
    """One replacement element and its score.

    Attributes:
        element: The replacement's symbol.
        score: Its log-probability in nats (higher is better): summed over the element's positions
            (``diffusion``) or of the whole rewritten CIF (``likelihood``).
        n_tokens: Tokens the score sums over.
        filter_reason: Why the chemistry filter drops it; None when it passes.
        original: Whether it is the hidden element itself.
        view: The model view of the substituted structure's canonical CIF (what the likelihood scorer reads).
        structure: The substituted structure.
    """

    element: str
    score: float
    n_tokens: int
    filter_reason: str | None
    original: bool
    view: str
    structure: Structure

    @property
    def cif(self) -> str:
        """The substituted structure as a plain CIF (every site, P1), for the Structure page and stability."""
        from pymatgen.io.cif import CifWriter

        # Rebuilt from lattice, species and coordinates: the parsed input's site labels ("Na0") would name the
        # old element.
        s = self.structure
        return str(CifWriter(Structure(s.lattice, s.species, s.frac_coords)))


@dataclass
class InfillResult:
    """Ranked replacements for one hidden element: kept candidates first (best score first), then filtered ones."""

    element: str
    scorer: str
    filter: str
    formula: str
    masked_text: str
    regions: dict[str, int]
    candidates: list[Candidate] = field(default_factory=list)
    unwritable: dict[str, str] = field(default_factory=dict)
    """Candidates left out because the substituted structure has no canonical CIF, with the reason."""

    @property
    def kept(self) -> list[Candidate]:
        return [c for c in self.candidates if c.filter_reason is None]

    def rank_of(self, element: str) -> int | None:
        """1-based rank of ``element`` among the kept candidates, None when it is not among them."""
        return next((i + 1 for i, c in enumerate(self.kept) if c.element == element), None)


# ---- reading a structure ------------------------------------------------------------------------------------------


def read_structure(cif_text: str, label: str) -> Structure:
    """A structure from CIF text; a canonical (semi-symmetrized) CIF gets its symmetry operators back first.

    Raises:
        InputError: the text is not a readable CIF (the message names ``label``).
    """
    from engine.crystal.analysis import load_structure
    from engine.crystal.postprocess import postprocess

    if "_atom_type_electronegativity" in cif_text:  # a model view: only the identity operator is written
        done = postprocess(cif_text if cif_text.endswith("\n\n") else cif_text.rstrip("\n") + "\n\n")
        if done.cif is None:
            raise InputError(f"{label} cannot be read as a canonical CIF: {done.error}")
        cif_text = done.cif
    return load_structure(cif_text, label=label)


def canonical_view(structure: Structure, label: str) -> str:
    """The model view of ``structure``'s canonical CIF (errors name ``label``)."""
    try:
        return model_view(canonicalize_structure(structure))
    except InputError as exc:
        raise InputError(f"{label}: {exc}") from None


# ---- scorers ------------------------------------------------------------------------------------------------------


def is_masked_model(model: Any) -> bool:
    """Whether ``model`` predicts masked tokens (the capability, whatever its family is called)."""
    return hasattr(model, "masked_log_probs") and hasattr(model, "mask_id")


def resolve_scorer(model: Any, scorer: str) -> str:
    """``auto`` -> ``diffusion`` for a masked model, else ``likelihood``.

    Raises:
        ConfigError: an unknown scorer, or ``diffusion`` for a model that cannot predict masked tokens.
    """
    if scorer not in SCORERS:
        raise ConfigError(f"--scorer {scorer!r}: give one of {', '.join(SCORERS)}")
    if scorer == "auto":
        return "diffusion" if is_masked_model(model) else "likelihood"
    if scorer == "diffusion" and not is_masked_model(model):
        raise ConfigError(f"--scorer diffusion: the checkpoint {getattr(model, 'path', None)} is a "
                          f"{getattr(model, 'family', '?')} model, which cannot predict masked tokens; give a "
                          "masked-diffusion checkpoint or use --scorer likelihood")
    return scorer


def diffusion_scores(model: Any, mask: ElementMask, candidates: list[str]) -> dict[str, tuple[float, int]]:
    """Summed log-probability of each candidate's token over the element's positions, all of them (and the
    property numbers) masked, in one forward pass."""
    import torch

    ids = list(mask.cif.ids)
    for pos in mask.positions:
        ids[pos] = int(model.mask_id)
    canvas = torch.tensor([ids], dtype=torch.long)  # (1, T)
    with torch.inference_mode():
        logp = model.masked_log_probs(canvas)[0].double()  # (T, V_base)
    where = torch.tensor(mask.element_positions, dtype=torch.long)  # (K,)
    cand = torch.tensor([STOI[c] for c in candidates], dtype=torch.long)  # (C,)
    summed = logp[where][:, cand].sum(dim=0)  # (C,)
    return {c: (float(s), len(mask.element_positions)) for c, s in zip(candidates, summed.tolist())}


def likelihood_scores(model: Any, texts: Mapping[str, str]) -> dict[str, tuple[float, int]]:
    """Log-likelihood of each candidate's rewritten canonical CIF (model view) under the model."""
    names = list(texts)
    scores = model.sequence_log_likelihood([texts[n] for n in names])
    return {n: (float(s.logp), int(s.n_tokens)) for n, s in zip(names, scores)}


# ---- element infill -----------------------------------------------------------------------------------------------


def rank_replacements(structure: Structure, element: str, model: Any, *, scorer: str = "auto",
                      filter: str = "none", label: str = "the structure") -> InfillResult:
    """Rank the vocabulary's elements as replacements for every ``element`` site of ``structure``.

    Raises:
        InputError: ``element`` is no vocabulary element or not in the structure; the structure has no canonical
            CIF (disorder, too many sites).
        ConfigError: an unknown scorer or filter, or ``diffusion`` for a model that cannot do it.
    """
    view = canonical_view(structure, label)
    try:
        mask = mask_element(view, element)
    except InputError as exc:
        raise InputError(f"--mask {element}: {label}: {exc}") from None
    scorer = resolve_scorer(model, scorer)
    if filter not in FILTERS:
        raise ConfigError(f"--filter {filter!r}: give one of {', '.join(FILTERS)}")
    screen = Screen(structure, element, filter)
    names = candidate_elements(structure, element)
    subs, unwritable = {}, {}
    for c in names:
        try:
            subs[c] = substitute(structure, element, c)
        except InputError as exc:  # e.g. CifWriter writes Z 0 for some compositions: no canonical CIF exists
            unwritable[c] = str(exc)
    names = [c for c in names if c in subs]
    views = {c: model_view(canonical) for c, (_, canonical) in subs.items()}
    if scorer == "diffusion":
        scores = diffusion_scores(model, mask, names)
    else:
        scores = likelihood_scores(model, views)
    candidates = [Candidate(c, scores[c][0], scores[c][1], screen.reason(c), c == element, views[c], subs[c][0])
                  for c in names]
    candidates.sort(key=lambda c: (c.filter_reason is not None, -c.score, c.element))
    return InfillResult(element, scorer, filter, structure.composition.formula.replace(" ", ""),
                        masked_text(mask.cif.ids, mask.positions), mask.region_counts(), candidates, unwritable)


# ---- span infill --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SpanFill:
    """A masked span regenerated by a masked model.

    Attributes:
        span: ``"site N"`` or ``"cell"``.
        masked_text: The canonical CIF with the span written as ``[MASK]``.
        text: The filled model view.
        cif: The filled text post-processed into a CIF (symmetry operators restored), None when that failed.
        error: Why post-processing or parsing failed, None when the result reads as a structure.
    """

    span: str
    masked_text: str
    text: str
    cif: str | None
    error: str | None


def fill_span(model: Any, view: str, *, site: int | None = None, cell: bool = False,
              knobs: Mapping[str, Any] | None = None, seed: int = 1337) -> SpanFill:
    """Mask one site's coordinates (``site``) or the cell (``cell``) and regenerate them with ``model.fill``.

    Raises:
        CheckpointError: the model has no ``fill`` (the message names its checkpoint).
        InputError: no such site, or neither / both of ``site`` and ``cell``.
    """
    if (site is None) == (not cell):
        raise InputError("give exactly one of --site N and --cell")
    flag = f"--site {site}" if site is not None else "--cell"
    if not (hasattr(model, "fill") and is_masked_model(model)):
        raise CheckpointError(f"{flag}: the checkpoint {getattr(model, 'path', None)} is a "
                              f"{getattr(model, 'family', '?')} model, which cannot fill a masked span; give a "
                              "masked-diffusion checkpoint")
    positions = mask_site(view, site) if site is not None else mask_cell(view)
    ids = tokenizer.encode(view)
    canvas = list(ids)
    for pos in positions:
        canvas[pos] = int(model.mask_id)
    filled = model.fill(canvas, dict(knobs or {}), seed)
    text = tokenizer.decode([t for t in filled if t != model.mask_id])
    cif, error = None, None
    try:
        structure = read_structure(text, "the filled CIF")
        cif = str(structure.to(fmt="cif"))
    except InputError as exc:
        error = str(exc)
    return SpanFill("cell" if cell else f"site {site}", masked_text(ids, positions), text, cif, error)


# ---- output -------------------------------------------------------------------------------------------------------


def _safe(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text)


def table_text(result: InfillResult, top: int) -> str:
    """The top kept candidates as a fixed-width table."""
    unit = "summed log p at the element's positions" if result.scorer == "diffusion" else "log p of the whole CIF"
    lines = [f"{'rank':>4}  {'element':<7}  {'score (nats)':>13}  {'tokens':>6}  note",
             f"{'':>4}  {'':<7}  {unit}"]
    for i, c in enumerate(result.kept[:top], start=1):
        lines.append(f"{i:>4}  {c.element:<7}  {c.score:>13.3f}  {c.n_tokens:>6}  {'original' if c.original else ''}")
    return "\n".join(lines)


def write_infill(result: InfillResult, out: Path, top: int, inputs: Mapping[str, Any]) -> dict[str, Path]:
    """``infill.csv`` (every candidate), ``infill.json`` (inputs, provenance, masked text, ranking) and the top
    kept substituted structures as ``cifs/NN_El.cif`` (ready for ``crystallab stability OUT/cifs``)."""
    from engine.lab.fsutil import atomic_write_json, atomic_write_text

    out.mkdir(parents=True, exist_ok=True)
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(["rank", "element", "score", "n_tokens", "original", "kept", "filter_reason"])
    ranks = {c.element: i for i, c in enumerate(result.kept, start=1)}
    for c in result.candidates:
        writer.writerow([ranks.get(c.element, ""), c.element, f"{c.score:.6f}", c.n_tokens, c.original,
                         c.filter_reason is None, c.filter_reason or ""])
    paths = {"csv": atomic_write_text(out / "infill.csv", buf.getvalue())}
    cif_dir = out / "cifs"
    cif_dir.mkdir(exist_ok=True)
    written = []
    for i, c in enumerate(result.kept[:top], start=1):
        name = f"{i:02d}_{_safe(c.element)}.cif"
        atomic_write_text(cif_dir / name, c.cif)
        written.append(name)
    record = {
        "inputs": dict(inputs),
        "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "element": result.element, "scorer": result.scorer, "filter": result.filter, "formula": result.formula,
        "masked_regions": result.regions, "masked_text": result.masked_text,
        "rank_of_original": result.rank_of(result.element),
        "ranking": [{"element": c.element, "score": c.score, "n_tokens": c.n_tokens, "original": c.original}
                    for c in result.kept[:top]],
        "cifs": written,
        "left_out": result.unwritable,
    }
    paths["json"] = atomic_write_json(out / "infill.json", record)
    return paths


# ---- CLI ----------------------------------------------------------------------------------------------------------


def _default_checkpoint() -> Path:
    from engine.lab.settings import get_settings

    train = get_settings().train_dir
    found = sorted(train.glob("*/ckpt/*.pt"), key=lambda p: (p.stat().st_mtime, p.stem == "best"), reverse=True)
    if not found:
        raise InputError(f"no --ckpt given and no checkpoint under {train}: give --ckpt PATH")
    return found[0]


def _load_model(path: Path) -> Any:
    from engine.models.family import load_family_model

    return load_family_model(path, "cpu")


def _cmd_infill(args: argparse.Namespace) -> int:
    from engine.data.sources import decode_cif_bytes
    from engine.lab.settings import get_settings
    from engine.models.family import knobs_from_args, provenance

    if args.top < 1:
        raise InputError(f"--top {args.top}: give a whole number of at least 1")
    modes = sum(x is not None and x is not False for x in (args.mask, args.site, args.cell or None))
    if modes != 1:
        raise InputError("give exactly one of --mask ELEMENT, --site N and --cell")
    path = Path(args.cif)
    try:
        text, _ = decode_cif_bytes(path.read_bytes(), str(path))
    except OSError as exc:
        raise InputError(f"{path}: cannot read it ({exc.strerror or exc}); check the path") from None
    structure = read_structure(text, str(path))
    ckpt = Path(args.ckpt) if args.ckpt else _default_checkpoint()
    model = _load_model(ckpt)
    what = args.mask or (f"site{args.site}" if args.site is not None else "cell")
    out = Path(args.out) if args.out else get_settings().runs_dir / "infill" / _safe(f"{path.stem}-{what}")
    inputs = {"cif": str(path), "mask": args.mask, "site": args.site, "cell": bool(args.cell),
              "checkpoint": provenance(model), "scorer": args.scorer, "filter": args.filter, "top": args.top}
    if args.mask:
        result = rank_replacements(structure, args.mask, model, scorer=args.scorer, filter=args.filter,
                                   label=str(path))
        paths = write_infill(result, out, args.top, inputs)
        print(f"{result.formula}: {args.mask} hidden at {sum(result.regions.values())} places "
              f"({', '.join(f'{k} {v}' for k, v in result.regions.items())}); scorer {result.scorer}, "
              f"filter {result.filter}, {len(result.kept)} of {len(result.candidates)} candidates kept"
              + (f"; left out (no canonical CIF): {', '.join(result.unwritable)}" if result.unwritable else ""))
        print(table_text(result, args.top))
        print(f"wrote {paths['csv']}, {paths['json']} and {out / 'cifs'}")
        return 0
    knobs = knobs_from_args(args, (), type(model)) if hasattr(model, "fill") else {}
    span = fill_span(model, canonical_view(structure, str(path)), site=args.site, cell=bool(args.cell),
                     knobs=knobs, seed=args.seed)
    from engine.lab.fsutil import atomic_write_json, atomic_write_text

    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "filled.txt", span.text)
    if span.cif is not None:
        atomic_write_text(out / "filled.cif", span.cif)
    atomic_write_json(out / "infill.json", {**inputs, "knobs": knobs, "seed": args.seed, "span": span.span,
                                            "masked_text": span.masked_text, "parsed": span.error is None,
                                            "parse_error": span.error})
    print(span.text, end="")
    print(f"wrote {out / ('filled.cif' if span.cif else 'filled.txt')}"
          + ("" if span.error is None else f" (the filled text does not read as a structure: {span.error})"))
    return 0


def add_cli(subparsers) -> None:
    """Register ``crystallab infill``."""
    p = subparsers.add_parser(
        "infill", help="rank replacements for a hidden element, or regenerate a site / the cell",
        description="Element infill: hide every occurrence of --mask ELEMENT in the structure's canonical CIF and "
        "rank the vocabulary's elements as replacements (infill.csv, infill.json, cifs/NN_El.cif in --out). Span "
        "infill: --site N or --cell masks those numbers and a masked-diffusion checkpoint regenerates them.")
    p.add_argument("cif", metavar="CIF", help="a CIF file (raw or canonical)")
    p.add_argument("--mask", metavar="ELEMENT", default=None, help="the element to hide and rank replacements for")
    p.add_argument("--site", type=int, default=None, metavar="N",
                   help="regenerate the coordinates of atom-site row N (0-based) of the canonical CIF")
    p.add_argument("--cell", action="store_true", help="regenerate the cell lengths and angles")
    p.add_argument("--ckpt", default=None, metavar="PATH", help="checkpoint (default: the newest under runs/train)")
    p.add_argument("--top", type=int, default=10, help="candidates shown and written as CIFs (default 10)")
    p.add_argument("--scorer", choices=SCORERS, default="auto",
                   help="diffusion (masked model), likelihood (any model: log p of the rewritten CIF), auto")
    p.add_argument("--filter", choices=FILTERS, default="none",
                   help="drop candidates: oxidation (no charge-neutral smact states), radius (ionic radius off by "
                   "more than 35 %%)")
    p.add_argument("--seed", type=int, default=1337, help="seed of span infill (default 1337)")
    p.add_argument("--knob", dest="knobs", action="append", default=[], metavar="NAME=VALUE",
                   help="a sampling knob of the masked model for span infill (repeatable)")
    p.add_argument("--out", default=None, metavar="DIR", help="output folder (default runs/infill/NAME)")
    p.set_defaults(func=_cmd_infill)
