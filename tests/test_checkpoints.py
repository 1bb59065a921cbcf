"""bench.adapters.checkpoints against hostile input: every file a manifest names is confined to the manifest's
folder, checked and parsed from the same bytes, and every malformed manifest, unsafe file name, broken safetensors
file or misfitting tensor is refused with a BenchError (the one exception the CLI prints without a traceback) that
names the file and the problem.

Each hostile case is built so that it would load, or fail with some other exception, if its check were missing:
the files an escaping name points at are valid checkpoints whose sha256 the manifest vouches for, and so are the
broken safetensors files (the parser is only reached once the hash matches).
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import pytest
import safetensors.torch
import torch
from torch import nn

import bench.adapters.checkpoints as checkpoints
from bench.adapters.checkpoints import (DEFAULT_MAX_BYTES, load_checkpoint, load_checkpoint_file, read_manifest,
                                        record_evaluation, save_checkpoint, sha256_hex)
from bench.errors import BenchError

TENSORS = {"weight": torch.arange(6, dtype=torch.float32).reshape(2, 3), "bias": torch.tensor([0.5, -0.5])}


def safetensors_bytes(tensors=TENSORS) -> bytes:
    return safetensors.torch.save(dict(tensors))


def write_manifest(directory, entries) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "manifest.json").write_text(json.dumps(entries))


def vouch_for(directory, name, file_name, data: bytes, **extra) -> None:
    """A manifest in ``directory`` whose entry ``name`` names ``file_name`` with the sha256 of ``data``."""
    write_manifest(directory, {name: {"file": file_name, "sha256": sha256_hex(data), "recipe": "make it", **extra}})


def checkpoint_file(directory, file_name="net.safetensors", data: bytes | None = None, name="net"):
    """A checkpoint file and a manifest that vouches for it; returns its path."""
    data = safetensors_bytes() if data is None else data
    directory.mkdir(parents=True, exist_ok=True)
    (directory / file_name).write_bytes(data)
    vouch_for(directory, name, file_name, data)
    return directory / file_name


def refused(directory, *fragments, name="net", **options) -> str:
    """load_checkpoint raises a BenchError, and nothing else, whose message holds every fragment."""
    with pytest.raises(BenchError) as error:
        load_checkpoint(name, directory, **options)
    message = str(error.value)
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in {message!r}"
    return message


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(3, 2)


# ---------------------------------------------------------------------------------------- what loads

def test_a_vouched_file_loads_and_reports_the_hash_of_its_bytes(tmp_path):
    path = checkpoint_file(tmp_path)
    checkpoint = load_checkpoint("net", tmp_path)
    assert checkpoint.sha256 == sha256_hex(path.read_bytes()) and checkpoint.path == path
    assert set(checkpoint.tensors) == set(TENSORS)
    assert all(torch.equal(checkpoint.tensors[key], TENSORS[key]) for key in TENSORS)
    assert checkpoint.entry["recipe"] == "make it"


def test_the_bytes_that_are_hashed_are_the_bytes_that_are_parsed(tmp_path, monkeypatch):
    """The file is replaced on disk right after its hash is taken: what loads is still what was hashed, since the
    parser is given those bytes rather than opening the file again."""
    path = checkpoint_file(tmp_path)
    other = safetensors_bytes({"weight": torch.zeros(2, 3), "bias": torch.zeros(2)})
    hash_bytes = checkpoints.sha256_hex

    def hash_then_swap(data: bytes) -> str:
        digest = hash_bytes(data)
        path.write_bytes(other)
        return digest

    monkeypatch.setattr(checkpoints, "sha256_hex", hash_then_swap)
    checkpoint = load_checkpoint("net", tmp_path)
    assert path.read_bytes() == other  # the swap happened
    assert torch.equal(checkpoint.tensors["weight"], TENSORS["weight"])
    assert checkpoint.sha256 == hash_bytes(safetensors_bytes())


def test_a_symlink_that_stays_inside_the_folder_is_followed(tmp_path):
    checkpoint_file(tmp_path / "store", "real.safetensors")
    os.symlink("real.safetensors", tmp_path / "store" / "alias.safetensors")
    data = (tmp_path / "store" / "real.safetensors").read_bytes()
    vouch_for(tmp_path / "store", "net", "alias.safetensors", data)
    assert load_checkpoint("net", tmp_path / "store").sha256 == sha256_hex(data)


def test_the_pretrained_folder_is_the_environment_variable_else_the_package(tmp_path, monkeypatch):
    monkeypatch.delenv(checkpoints.ENVIRONMENT_VARIABLE, raising=False)
    import pretrained

    assert checkpoints.pretrained_dir() == Path(pretrained.__file__).parent
    checkpoint_file(tmp_path)
    monkeypatch.setenv(checkpoints.ENVIRONMENT_VARIABLE, str(tmp_path))
    assert checkpoints.pretrained_dir() == tmp_path
    assert load_checkpoint("net").path == tmp_path / "net.safetensors"


# --------------------------------------------------------------------------- names that leave the folder

def test_a_manifest_cannot_point_outside_its_directory(tmp_path):
    (tmp_path / "manifest.json").write_text(json.dumps({"evil": {"file": "../elsewhere.safetensors", "sha256": ""}}))
    with pytest.raises(BenchError, match="plain file name"):
        load_checkpoint("evil", tmp_path)


def test_a_name_with_dot_dot_is_refused_though_the_file_there_is_vouched_for(tmp_path):
    data = checkpoint_file(tmp_path / "other").read_bytes()
    vouch_for(tmp_path / "store", "net", "../other/net.safetensors", data)
    refused(tmp_path / "store", "'../other/net.safetensors'", "not a plain file name", "manifest.json")


def test_an_absolute_path_is_refused_though_the_file_there_is_vouched_for(tmp_path):
    target = checkpoint_file(tmp_path / "other")
    vouch_for(tmp_path / "store", "net", str(target), target.read_bytes())
    refused(tmp_path / "store", repr(str(target)), "not a plain file name")


def test_a_symlink_leading_out_of_the_folder_is_refused(tmp_path):
    target = checkpoint_file(tmp_path / "other")
    (tmp_path / "store").mkdir()
    os.symlink(target, tmp_path / "store" / "net.safetensors")
    vouch_for(tmp_path / "store", "net", "net.safetensors", target.read_bytes())
    refused(tmp_path / "store", "symlink", str(target), "outside")


@pytest.mark.parametrize("file_name, problem", [
    ("", "is empty"),
    ("net\0.safetensors", "NUL"),
    ("net.safetensors\n", "cannot be printed"),
    ("\ud800.safetensors", "cannot be printed"),  # a lone surrogate: no file system encoding can write it
    (".", "not a plain file name"),
    ("..", "not a plain file name"),
    ("sub/net.safetensors", "not a plain file name"),
    ("..\\net.safetensors", "not a plain file name"),
])
def test_anything_but_a_plain_printable_file_name_is_refused(tmp_path, file_name, problem):
    checkpoint_file(tmp_path)
    vouch_for(tmp_path, "net", file_name, safetensors_bytes())
    refused(tmp_path, problem, "plain name")


# --------------------------------------------------------------------------------------- malformed manifests

@pytest.mark.parametrize("manifest, problem", [
    (b'{"net": {"file": "net.safetensors"', "is not valid JSON"),
    (b"\xff\xfe not text", "is not valid JSON"),
    (b"[" * 100_000, "is not valid JSON"),  # nested deeper than the JSON parser recurses
    (b'["net.safetensors"]', "it holds an array"),
    (b'{"net": "net.safetensors"}', "must be a JSON object with 'file' and 'sha256'; it is a string"),
    (b'{"net": {"sha256": "' + b"0" * 64 + b'"}}', "'file' must be a string; it is missing"),
    (b'{"net": {"file": ["net.safetensors"], "sha256": "' + b"0" * 64 + b'"}}',
     "'file' must be a string; it is an array"),
    (b'{"net": {"file": "net.safetensors"}}', "'sha256' must be a string; it is missing"),
    (b'{"net": {"file": "net.safetensors", "sha256": 12}}', "'sha256' must be a string; it is a number"),
    (b'{"net": {"file": "net.safetensors", "sha256": "abc"}}', "'sha256' must be 64 hexadecimal digits"),
    (b'{"net": {"file": "net.safetensors", "sha256": "' + b"g" * 64 + b'"}}', "64 hexadecimal digits"),
    (b'{"net": {"file": "net.safetensors", "sha256": "' + b"0" * 64 + b'", "recipe": 3}}', "'recipe' must be"),
])
def test_a_malformed_manifest_is_refused_saying_what_is_wrong(tmp_path, manifest, problem):
    checkpoint_file(tmp_path)
    (tmp_path / "manifest.json").write_bytes(manifest)
    refused(tmp_path, problem, str(tmp_path / "manifest.json"), "restore the manifest")


def test_an_error_does_not_repeat_a_huge_value_from_the_manifest(tmp_path):
    write_manifest(tmp_path, {"net": {"file": "net.safetensors", "sha256": "f" * 1_000_000}})
    message = refused(tmp_path, "64 hexadecimal digits", "1,000,002 characters")
    assert len(message) < 1000


def test_a_manifest_that_is_not_a_regular_file_or_too_large_is_refused(tmp_path):
    (tmp_path / "manifest.json").mkdir()
    refused(tmp_path, "not a regular file")
    (tmp_path / "manifest.json").rmdir()
    with open(tmp_path / "manifest.json", "wb") as file:
        file.truncate(checkpoints.MAX_MANIFEST_BYTES + 1)  # sparse: nothing is written
    refused(tmp_path, "more than the limit")


def test_a_missing_manifest_entry_or_file_says_what_to_run(tmp_path):
    refused(tmp_path, "no checkpoint manifest", "make net", made_by="make net")
    write_manifest(tmp_path, {"other": {"file": "other.safetensors", "sha256": "0" * 64}})
    refused(tmp_path, "not in", "'other'", "make net", made_by="make net")
    vouch_for(tmp_path, "net", "net.safetensors", safetensors_bytes())
    refused(tmp_path, "net.safetensors is missing", "run `make it`")  # the entry names its own recipe


# ----------------------------------------------------------------------------------------- the file itself

def test_a_file_that_does_not_match_its_manifest_is_refused_naming_both_hashes(tmp_path):
    path = checkpoint_file(tmp_path)
    expected = sha256_hex(path.read_bytes())
    tampered = safetensors_bytes({"weight": TENSORS["weight"] + 1, "bias": TENSORS["bias"]})
    path.write_bytes(tampered)
    refused(tmp_path, str(path), expected, sha256_hex(tampered), "does not match its manifest")


def test_a_file_over_the_size_limit_is_refused_before_it_is_read(tmp_path, monkeypatch):
    with open(tmp_path / "net.safetensors", "wb") as file:
        file.truncate(DEFAULT_MAX_BYTES + 1)  # sparse: 1 GiB that costs no disk
    write_manifest(tmp_path, {"net": {"file": "net.safetensors", "sha256": "0" * 64}})
    monkeypatch.setattr(checkpoints, "sha256_hex", lambda data: pytest.fail("a file over the limit was read"))
    refused(tmp_path, "1,073,741,825 bytes", "more than the limit of 1,073,741,824", "max_bytes")


def test_the_size_limit_can_be_set_per_call(tmp_path):
    size = len(checkpoint_file(tmp_path).read_bytes())
    refused(tmp_path, "more than the limit", max_bytes=size - 1)
    assert load_checkpoint("net", tmp_path, max_bytes=size).tensors
    for wrong in (0, -1, True, 1.5, "1024"):
        refused(tmp_path, "max_bytes must be a positive number of bytes", max_bytes=wrong)


def test_a_file_that_is_not_a_regular_file_is_refused_without_waiting(tmp_path):
    (tmp_path / "net.safetensors").mkdir()
    write_manifest(tmp_path, {"net": {"file": "net.safetensors", "sha256": "0" * 64}})
    refused(tmp_path, "not a regular file")
    (tmp_path / "net.safetensors").rmdir()
    os.mkfifo(tmp_path / "net.safetensors")  # reading a FIFO with no writer would block forever
    refused(tmp_path, "not a regular file")


def header_then(header, data: bytes = b"") -> bytes:
    """A safetensors file: the 8-byte little-endian header length, the JSON header, then the data."""
    text = json.dumps(header).encode()
    return struct.pack("<Q", len(text)) + text + data


VALID = safetensors_bytes()

BROKEN_FILES = {
    "header length of 2**40": (struct.pack("<Q", 2 ** 40) + b"{}", "claims to be 1,099,511,627,776 bytes long"),
    "header not JSON": (struct.pack("<Q", 5) + b"{nope", "its header is not JSON"),
    "header an array": (header_then([1, 2]), "its header is an array"),
    "tensor of 4 TiB": (header_then({"weight": {"dtype": "F32", "shape": [2 ** 20, 2 ** 20],
                                               "data_offsets": [0, 4 * 2 ** 40]}}), "claims bytes up to"),
    "truncated": (VALID[:-5], "claims bytes up to"),
    "shape and size disagree": (header_then({"weight": {"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 8]}},
                                            b"\0" * 8), "safetensors:"),
    "unknown dtype": (header_then({"weight": {"dtype": "Q9", "shape": [1], "data_offsets": [0, 4]}}, b"\0" * 4),
                      "safetensors:"),
    "empty": (b"", "too few for the 8-byte header length"),
}


@pytest.mark.parametrize("case", sorted(BROKEN_FILES))
def test_a_broken_safetensors_file_is_refused_in_words_even_when_vouched_for(tmp_path, case):
    data, problem = BROKEN_FILES[case]
    checkpoint_file(tmp_path, data=data)
    refused(tmp_path, "not a valid safetensors file", problem, str(tmp_path / "net.safetensors"), "make it")


def test_a_checkpoint_is_never_unpickled(tmp_path):
    """A torch.save file (a pickle) is not a safetensors file, whatever the manifest says."""
    torch.save(TENSORS, tmp_path / "net.pt")
    vouch_for(tmp_path, "net", "net.pt", (tmp_path / "net.pt").read_bytes())
    refused(tmp_path, "not a valid safetensors file")


# ------------------------------------------------------------------------------------ tensors into a network

def test_tensors_that_fit_the_network_are_loaded_into_it(tmp_path):
    source = Net()
    checkpoint_file(tmp_path, data=safetensors_bytes(source.state_dict()))
    network = load_checkpoint("net", tmp_path).load_into(Net())
    assert all(torch.equal(a, b) for a, b in zip(network.state_dict().values(), source.state_dict().values()))


@pytest.mark.parametrize("tensors, fragments", [
    ({"linear.weight": torch.zeros(2, 3)}, ["missing tensors 'linear.bias'"]),
    ({"linear.weight": torch.zeros(2, 3), "linear.bias": torch.zeros(2), "extra.weight": torch.zeros(1)},
     ["unexpected tensors 'extra.weight'"]),
    ({"linear.weights": torch.zeros(2, 3), "linear.bias": torch.zeros(2)},
     ["missing tensors 'linear.weight'", "unexpected tensors 'linear.weights'"]),
    ({"linear.weight": torch.zeros(3, 2), "linear.bias": torch.zeros(2)},
     ["'linear.weight' (file: [3, 2] torch.float32, network: [2, 3] torch.float32)"]),
    ({"linear.weight": torch.zeros(2, 3, dtype=torch.float64), "linear.bias": torch.zeros(2)},
     ["'linear.weight' (file: [2, 3] torch.float64, network: [2, 3] torch.float32)"]),
])
def test_tensors_that_do_not_fit_the_network_are_named(tmp_path, tensors, fragments):
    checkpoint_file(tmp_path, data=safetensors_bytes(tensors))
    checkpoint = load_checkpoint("net", tmp_path)
    with pytest.raises(BenchError) as error:
        checkpoint.load_into(Net())
    for fragment in [*fragments, "does not fit the network Net", "net.safetensors", "make it"]:
        assert fragment in str(error.value)


def test_many_wrong_names_are_listed_briefly(tmp_path):
    checkpoint_file(tmp_path, data=safetensors_bytes({f"layer{i}": torch.zeros(1) for i in range(40)}))
    with pytest.raises(BenchError, match="unexpected tensors 'layer0', .* and 35 more"):
        load_checkpoint("net", tmp_path).load_into(Net())


# --------------------------------------------------------------------------------------- by path; saving

def test_a_file_given_by_path_is_loaded_only_through_the_manifest_beside_it(tmp_path):
    path = checkpoint_file(tmp_path)
    assert load_checkpoint_file(path).sha256 == sha256_hex(path.read_bytes())
    (tmp_path / "stray.safetensors").write_bytes(safetensors_bytes())
    with pytest.raises(BenchError, match="stray.safetensors is not listed in .*manifest.json"):
        load_checkpoint_file(tmp_path / "stray.safetensors")


def test_save_checkpoint_round_trips_and_keeps_other_entries(tmp_path):
    tensors = {"weight": torch.arange(6, dtype=torch.float32).reshape(2, 3), "step": torch.tensor(7)}
    save_checkpoint("first", tensors, "make first", ["--x", "1"], "data", {"loss": 0.5}, {"score": 1.0}, tmp_path)
    save_checkpoint("second", {"w": torch.ones(2)}, "make second", [], "data", {}, {}, tmp_path)
    loaded = load_checkpoint("first", tmp_path).tensors
    assert set(loaded) == set(tensors) and all(torch.equal(loaded[k], tensors[k]) for k in tensors)
    manifest = read_manifest(tmp_path)
    assert set(manifest) == {"first", "second"}
    assert manifest["first"]["sha256"] == sha256_hex((tmp_path / "first.safetensors").read_bytes())
    assert manifest["first"]["arguments"] == ["--x", "1"] and manifest["first"]["training"] == {"loss": 0.5}
    assert not list(tmp_path.glob(".*.tmp"))  # no temporary files left behind


def test_save_checkpoint_refuses_a_name_that_is_not_a_plain_file_name(tmp_path):
    with pytest.raises(BenchError, match="not a plain file name"):
        save_checkpoint("../escape", {"w": torch.ones(2)}, "make it", [], "data", {}, {}, tmp_path / "store")
    assert not (tmp_path / "escape.safetensors").exists()


def test_record_evaluation_replaces_only_the_evaluation(tmp_path):
    save_checkpoint("first", {"w": torch.ones(2)}, "make first", ["--x", "1"], "data", {"loss": 0.5}, {"old": 1.0},
                    tmp_path)
    before = read_manifest(tmp_path)["first"]
    record_evaluation("first", {"new": 2.0}, "make first --evaluate", tmp_path)
    after = read_manifest(tmp_path)["first"]
    assert after["evaluation"] == {"new": 2.0} and after["evaluated_by"] == "make first --evaluate"
    assert {k: v for k, v in after.items() if k not in ("evaluation", "evaluated_by")} == \
        {k: v for k, v in before.items() if k != "evaluation"}
    assert load_checkpoint("first", tmp_path).tensors["w"].tolist() == [1.0, 1.0]  # the weights still verify
    with pytest.raises(BenchError, match="not in"):
        record_evaluation("second", {}, "x", tmp_path)
