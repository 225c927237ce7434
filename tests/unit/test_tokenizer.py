"""Tests for the frozen vocabulary (engine.crystal.vocab) and the CrystaLLM tokenizer (engine.crystal.tokenizer).

Ids must match upstream exactly for pretrained checkpoints and published token files to work, so the golden
records produced by the upstream pipeline are the main oracle.
"""

from __future__ import annotations

import random

import numpy as np
import pytest

from engine.crystal import tokenizer, vocab
from engine.lab.errors import InputError


def test_vocab_layout_matches_crystallm():
    assert len(vocab.TOKENS) == vocab.VOCAB_SIZE == 371
    assert (vocab.DATA_ID, vocab.SPACE_ID, vocab.NEWLINE_ID, vocab.UNK_ID) == (124, 141, 142, 370)
    assert vocab.TOKENS[:3] == ["Si", "C", "Pb"] and vocab.STOI["loop_"] == 123
    assert vocab.ELEMENTS == vocab.TOKENS[:89]
    assert len(vocab.SPACE_GROUPS) == 227 and "Fm-3m" in vocab.SPACE_GROUPS
    # The three space groups upstream never tokenized.
    assert not {"P4_222", "P6", "P432"} & set(vocab.SPACE_GROUPS)
    assert all(vocab.ITOS[i] == tok for tok, i in vocab.STOI.items())


def test_vocab_fingerprint_is_pinned():
    # Checkpoints store this value; if it changes, every saved checkpoint is refused on load.
    assert vocab.vocab_fingerprint() == "8ce6884824ed4e1449323f188e4a43ac0c50725015d8f495f938d0fa3d8b2148"


def test_meta_dict_has_upstream_layout_and_is_a_copy():
    meta = vocab.meta_dict()
    assert meta["vocab_size"] == 371
    assert meta["itos"][124] == "data_" and meta["stoi"] == vocab.STOI
    assert all(isinstance(k, int) for k in meta["itos"])
    meta["stoi"]["data_"] = -1
    assert vocab.STOI["data_"] == 124


def test_atom_props_keep_values_as_written():
    assert vocab.ATOM_PROPS["Na"] == ("0.9300", "1.8000", "1.1600")
    assert vocab.ATOM_PROPS["He"].electronegativity == "4.16" and vocab.ATOM_PROPS["He"].radius == "1.4"
    assert vocab.PAULING_X["Na"] == 0.93
    assert np.isnan(vocab.PAULING_X["He"])


def test_golden_records_tokenize_exactly(golden_canonical):
    assert len(golden_canonical) >= 300
    for rec in golden_canonical:
        ids, dropped = tokenizer.encode_with_report(rec["model_view"])
        assert ids == rec["ids"], rec["id"]
        assert tokenizer.tokenize(rec["model_view"]) == rec["tokens"], rec["id"]
        assert tokenizer.decode(ids) == rec["decoded"], rec["id"]
        assert dropped == [], rec["id"]


def test_composition_prompt_ids():
    assert tokenizer.encode("data_Na2Cl2\n") == [124, 54, 91, 5, 91, 142]


def test_space_group_token_only_on_hm_line_before_newline():
    text = "_symmetry_space_group_name_H-M   Pm\nPm Pm\n"
    assert tokenizer.tokenize(text) == ["_symmetry_space_group_name_H-M", " ", "Pm_sg", "\n", "Pm", " ", "Pm", "\n"]
    assert tokenizer.encode("_symmetry_space_group_name_H-M Pm\n")[2] == vocab.STOI["Pm_sg"]
    # Not directly followed by a newline: the element.
    assert tokenizer.tokenize("_symmetry_space_group_name_H-M Pm")[-1] == "Pm"
    # A space group without a token falls apart into ordinary tokens.
    assert tokenizer.tokenize("_symmetry_space_group_name_H-M P432\n")[2:] == ["P", "4", "3", "2", "\n"]
    # Decoding maps the space-group token back to the bare symbol.
    assert tokenizer.decode([vocab.STOI["Pm_sg"], vocab.STOI["Pm"]]) == "PmPm"


def test_numbers_and_labels_split_per_character():
    assert tokenizer.tokenize("Cl12 -0.5000") == ["Cl", "1", "2", " ", "-", "0", ".", "5", "0", "0", "0"]


def test_unknown_words_become_unk_and_unmatched_characters_are_reported():
    ids, dropped = tokenizer.encode_with_report("# made by hand\r\ndata_Zz2 Na;\t\t\"x\"\n")
    assert dropped == ["#", "\r", '"', '"']
    toks = [vocab.ITOS[i] for i in ids]
    # "made", "by", "hand", "Zz2" are word runs outside the vocabulary; ";" is punctuation outside it.
    assert toks.count("<unk>") == 5
    assert toks[-3:] == [" ", "x", "\n"]
    # Tabs and space runs collapse to one space token.
    assert vocab.STOI[" "] in ids and "\t" not in "".join(toks)


def _reference_scan(text: str) -> list[str]:
    """Slow, obviously-correct longest-match scan to check the compiled regex against."""
    toks = sorted((t for t in vocab.TOKENS if t != "<unk>"), key=len, reverse=True)
    out, i = [], 0
    while i < len(text):
        hit = next((t for t in toks if text.startswith(t, i)), None)
        if hit is None:
            j = i
            while j < len(text) and (text[j].isalnum() or text[j] == "_"):
                j += 1
            if j > i:
                hit = text[i:j]
            elif text[i] in ".,;!?":
                hit = text[i]
        if hit is None:
            i += 1
            continue
        out.append(hit if hit in vocab.STOI else "<unk>")
        i += len(hit)
    return out


def test_scan_is_longest_match_on_random_text():
    rng = random.Random(0)
    pieces = [t for t in vocab.TOKENS if t != "<unk>"] + list("abqXZ;!?#\"_")
    for _ in range(200):
        text = "".join(rng.choice(pieces) for _ in range(rng.randint(1, 12)))
        # Keep the space-group rule out of this comparison (tested above); collapse spaces like the tokenizer.
        text = text.replace("_symmetry_space_group_name_H-M", "_cell_volume")
        while "  " in text:
            text = text.replace("  ", " ")
        assert tokenizer.tokenize(text) == _reference_scan(text), repr(text)


def test_decode_round_trips_and_accepts_arrays(golden_canonical):
    rec = golden_canonical[0]
    ids = tokenizer.encode(rec["decoded"])
    assert ids == rec["ids"]
    assert tokenizer.decode(np.array(ids, dtype=np.uint16)) == rec["decoded"]


def test_decode_rejects_ids_outside_the_vocabulary():
    with pytest.raises(InputError, match="371|outside"):
        tokenizer.decode([124, 371])
    with pytest.raises(InputError, match="-1"):
        tokenizer.decode([-1])
