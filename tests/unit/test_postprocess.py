"""Post-processing of generated text: agreement with upstream CrystaLLM's output, recorded failures, the CLI."""

from __future__ import annotations

import argparse
import json
import re

import numpy as np
import pytest
from pymatgen.core.operations import SymmOp

from engine.crystal.postprocess import add_cli, find_truncation, postprocess
from engine.lab.errors import InputError

_OPS_RE = re.compile(r"_symmetry_equiv_pos_as_xyz[ \t]*\n((?:[ \t]*\d+[ \t]+'[^']*'[ \t]*\n)+)")


def run_cli(argv: list[str]) -> int:
    """Run ``crystallab postprocess`` through its own parser (the full CLI imports every engine module)."""
    parser = argparse.ArgumentParser()
    add_cli(parser.add_subparsers())
    args = parser.parse_args(argv)
    return args.func(args)


def _split(cif: str) -> tuple[set, list[str]]:
    """(operators as a set modulo lattice translations, the other non-empty lines stripped)."""
    match = _OPS_RE.search(cif)
    assert match, "no symmetry-operator rows"
    ops = set()
    for xyz in re.findall(r"'([^']*)'", match.group(1)):
        op = SymmOp.from_xyz_str(xyz)
        rot = tuple(np.rint(op.rotation_matrix).astype(int).ravel())
        ops.add((rot, tuple(np.round(op.translation_vector % 1.0, 4) % 1.0)))
    rest = cif.replace(match.group(1), "")
    lines = [ln.strip() for ln in rest.splitlines() if ln.strip()]
    return ops, lines


def test_matches_upstream_postprocessing_on_every_golden_record(golden_canonical):
    records = [r for r in golden_canonical if r.get("decoded") and r.get("postprocessed_cif")]
    assert len(records) > 300
    for r in records:
        result = postprocess(r["decoded"])
        assert result.error is None and result.reason is None, (r["id"], result.error)
        assert _split(result.cif) == _split(r["postprocessed_cif"]), r["id"]


def test_mutated_texts_match_upstream_except_truncated_ones(golden_validity):
    for r in golden_validity:
        result = postprocess(r["generated"])
        if r["mutation"] == "truncate":
            assert result.cif is None and result.reason == "truncated", r["id"]
        else:
            assert _split(result.cif) == _split(r["postprocessed_cif"]), (r["id"], r["mutation"])


def test_output_drops_atom_props_and_keeps_p1_identity(golden_canonical):
    text = next(r["decoded"] for r in golden_canonical if r.get("decoded"))
    out = postprocess(text).cif
    assert "_atom_type_symbol" not in out and "_atom_type_electronegativity" not in out
    assert out.splitlines()[0] == text.splitlines()[0]  # the data_ line survives
    assert out.splitlines()[1].startswith("_symmetry_space_group_name_H-M")
    p1 = re.sub(r"(_symmetry_space_group_name_H-M) \S+", r"\1 P1", text)
    out_p1 = postprocess(p1).cif
    assert "1 'x, y, z'\nloop_\n_atom_site_type_symbol" in out_p1
    assert "2 '" not in out_p1


def test_space_group_operators_are_complete_and_start_with_identity(golden_canonical):
    text = next(r["decoded"] for r in golden_canonical if r.get("decoded"))
    fm3m = re.sub(r"(_symmetry_space_group_name_H-M) \S+", r"\1 Fm-3m", text)
    result = postprocess(fm3m)
    assert result.spacegroup == "Fm-3m"
    rows = re.findall(r"^(\d+) '([^']*)'$", result.cif, flags=re.MULTILINE)
    assert len(rows) == 192 and rows[0] == ("1", "x, y, z")
    assert [int(i) for i, _ in rows] == list(range(1, 193))


@pytest.mark.parametrize(
    ("edit", "reason", "needle"),
    [
        (lambda t: re.sub(r"(_symmetry_space_group_name_H-M) \S+", r"\1 P7_7", t), "unknown_spacegroup", "P7_7"),
        (lambda t: re.sub(r"_symmetry_space_group_name_H-M \S+\n", "", t), "no_spacegroup", "H-M"),
        (lambda t: t[: len(t) - 12], "truncated", "truncated"),
        (lambda t: t.split("loop_\n_atom_site_type_symbol")[0], "truncated", "atom-site loop"),
        (lambda t: t.replace("data_", "dat_"), "not_cif", "data_"),
    ],
)
def test_failures_are_recorded_not_written(golden_canonical, edit, reason, needle):
    text = edit(next(r["decoded"] for r in golden_canonical if r.get("decoded")))
    result = postprocess(text)
    assert result.cif is None
    assert result.reason == reason
    assert needle in result.error


def test_truncation_detection():
    assert find_truncation("data_X\nloop_\n_atom_site_type_symbol\n_atom_site_label\nNa Na0\n\n") is None
    assert "fewer" in find_truncation("data_X\nloop_\n_atom_site_type_symbol\n_atom_site_label\nNa\n")
    assert "newline" in find_truncation("data_X\nloop_\n_atom_site_type_symbol\n_atom_site_label\nNa Na0")


def test_cli_folder_writes_cifs_and_failure_list(tmp_path, golden_canonical, capsys):
    texts = [r["decoded"] for r in golden_canonical if r.get("decoded")][:2]
    src, out = tmp_path / "raw", tmp_path / "processed"
    src.mkdir()
    (src / "0000.txt").write_text(texts[0])
    (src / "0001.txt").write_text(texts[1][:200])  # cut by the token limit
    assert run_cli(["postprocess", str(src), str(out)]) == 0
    assert (out / "0000.cif").read_text() == postprocess(texts[0]).cif
    assert not (out / "0001.cif").exists()
    failures = [json.loads(line) for line in (out / "postprocess_failures.jsonl").read_text().splitlines()]
    assert failures == [{"file": "0001.txt", "reason": "truncated", "error": postprocess(texts[1][:200]).error}]
    assert "0001.txt: truncated" in capsys.readouterr().err


def test_cli_missing_input_is_a_user_error(tmp_path):
    with pytest.raises(InputError, match="nope.txt does not exist"):
        run_cli(["postprocess", str(tmp_path / "nope.txt"), str(tmp_path / "out.cif")])


def _complete_text(golden_canonical) -> str:
    return next(r["decoded"] for r in golden_canonical if r.get("decoded"))


def test_text_cut_at_the_token_limit_is_truncated_whatever_it_holds(golden_canonical):
    text = _complete_text(golden_canonical)
    cut = postprocess(text, finished=False)  # the sampler says: stopped at max_new_tokens
    assert cut.cif is None and cut.reason == "truncated" and "max_new_tokens" in cut.error
    assert postprocess(text, finished=True).cif == postprocess(text).cif  # a finished complete text is fine


def test_finished_text_with_a_short_last_row_is_malformed_not_truncated(golden_canonical):
    text = _complete_text(golden_canonical)
    body, last = text.rstrip("\n").rsplit("\n", 1)
    short = f"{body}\n{last.split(' ', 1)[1]}\n\n"  # the row lost its type symbol; the model then ended the CIF
    for finished in (True, None):
        result = postprocess(short, finished=finished)
        assert result.cif is None and result.reason == "malformed", finished
        assert "fewer than" in result.error and "max_new_tokens" not in result.error
    assert postprocess(short, finished=False).reason == "truncated"
    assert postprocess(text[: len(text) - 12]).reason == "truncated"  # cut mid-row: still truncated


def test_a_second_data_block_is_a_failure_not_a_cif(golden_canonical):
    texts = [r["decoded"] for r in golden_canonical if r.get("decoded")][:2]
    both = texts[0].rstrip("\n") + "\n" + texts[1]  # no blank line: the model ran on into a second CIF
    result = postprocess(both, finished=True)
    assert result.cif is None and result.reason == "several_blocks"
    assert "2 data_ blocks" in result.error


def test_cli_refuses_a_file_as_output_for_a_folder(tmp_path, golden_canonical):
    src = tmp_path / "raw"
    src.mkdir()
    (src / "0000.txt").write_text(_complete_text(golden_canonical))
    existing = tmp_path / "one.cif"
    existing.write_text("keep me")
    with pytest.raises(InputError, match="one.cif is a file but IN .* is a folder"):
        run_cli(["postprocess", str(src), str(existing)])
    assert existing.read_text() == "keep me"


def test_cli_with_nothing_post_processed_is_a_user_error(tmp_path, golden_canonical):
    src, out = tmp_path / "raw", tmp_path / "out"
    src.mkdir()
    (src / "0000.txt").write_text(_complete_text(golden_canonical)[:200])
    with pytest.raises(InputError, match="none of the 1 file.* could be post-processed"):
        run_cli(["postprocess", str(src), str(out)])
    assert json.loads((out / "postprocess_failures.jsonl").read_text())["reason"] == "truncated"


def test_cli_on_a_sample_set_uses_the_samplers_finished_flags(tmp_path, golden_canonical):
    texts = [r["decoded"] for r in golden_canonical if r.get("decoded")][:2]
    raw = tmp_path / "set" / "raw"
    raw.mkdir(parents=True)
    for i, text in enumerate(texts):
        (raw / f"{i:04d}.txt").write_text(text)
    flags = [{"name": "0000", "finished": True}, {"name": "0001", "finished": False}]
    (tmp_path / "set" / "samples.jsonl").write_text("".join(json.dumps(f) + "\n" for f in flags))
    out = tmp_path / "processed"
    assert run_cli(["postprocess", str(raw), str(out)]) == 0
    assert (out / "0000.cif").exists() and not (out / "0001.cif").exists()
    failure = json.loads((out / "postprocess_failures.jsonl").read_text())
    assert failure["file"] == "0001.txt" and failure["reason"] == "truncated"
