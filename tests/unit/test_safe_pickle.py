"""safe_pickle: CrystaLLM's plain pickles load, anything naming a Python global is refused without running."""

from __future__ import annotations

import os
import pickle

import pytest

from engine.lab.errors import InputError
from engine.lab.safe_pickle import dump_pickle, load_pickle


class _Exploit:
    """Unpickling this calls os.system, which would create the marker file."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_upstream_meta_layout_round_trips_from_path_and_bytes(tmp_path):
    meta = {"vocab_size": 3, "itos": {0: "Si", 1: "data_", 2: "\n"}, "stoi": {"Si": 0, "data_": 1, "\n": 2}}
    path = tmp_path / "meta.pkl"
    path.write_bytes(pickle.dumps(meta, protocol=pickle.HIGHEST_PROTOCOL))
    assert load_pickle(path) == meta
    assert load_pickle(path.read_bytes()) == meta
    for protocol in range(0, pickle.HIGHEST_PROTOCOL + 1):
        assert load_pickle(pickle.dumps([0, 17, 2**40, "x", None, 1.5], protocol=protocol)) == [
            0, 17, 2**40, "x", None, 1.5
        ]


def test_dump_pickle_is_readable_by_plain_pickle(tmp_path):
    starts = list(range(0, 10_000, 7))
    path = dump_pickle(starts, tmp_path / "sub" / "starts.pkl")
    with open(path, "rb") as fh:
        assert pickle.load(fh) == starts
    assert not [p for p in path.parent.iterdir() if p.name != "starts.pkl"]  # no temp file left behind


def test_malicious_pickle_is_refused_without_executing(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "meta.pkl"
    path.write_bytes(pickle.dumps({"vocab_size": 371, "itos": _Exploit(marker)}))
    with pytest.raises(InputError, match=r"refusing to load .*meta\.pkl.*(posix|os)\.system"):
        load_pickle(path)
    assert not marker.exists()


def test_class_instances_and_numpy_arrays_are_refused(tmp_path):
    import numpy as np

    with pytest.raises(InputError, match="numpy"):
        load_pickle(pickle.dumps(np.arange(3)), label="starts.pkl")
    with pytest.raises(InputError, match="collections.OrderedDict"):
        import collections

        load_pickle(pickle.dumps(collections.OrderedDict(a=1)))


def test_missing_and_garbage_files_raise_input_error(tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        load_pickle(tmp_path / "nope.pkl")
    (tmp_path / "junk.pkl").write_bytes(b"\x00\x01 definitely not a pickle")
    with pytest.raises(InputError, match="junk.pkl is not a readable pickle"):
        load_pickle(tmp_path / "junk.pkl")
    truncated = pickle.dumps(list(range(100)))[:-5]
    with pytest.raises(InputError, match="not a readable pickle"):
        load_pickle(truncated)
