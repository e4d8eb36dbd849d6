"""The pieces of a scan: discovery by the registry's sniffers, content keys, manifests, atomic parts."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from nora_spectra import load_scan
from nora_spectra.errors import UsageError
from nora_spectra.scan import scan, store
from nora_spectra.scan.content_key import content_key
from nora_spectra.scan.discover import discover
from nora_spectra.scan.manifest import read_manifest
from nora_spectra.scan.task import AnalysisSettings, ScanItem, analyse_item
from tests.nora_spectra.io_builders import lora_tensors, peft_dir, write_numpy


def _adapter(path: Path, seed: int = 0, r: int = 4) -> Path:
    return peft_dir(path, lora_tensors({"model.layers.0.q_proj": (16, 12, r)}, seed=seed), r=r, lora_alpha=r)


# ------------------------------------------------------------------------------------------- discovery


def test_named_adapters_a_default_beside_them_and_loose_files(tmp_path: Path) -> None:
    _adapter(tmp_path / "runs" / "a")
    _adapter(tmp_path / "runs" / "b")
    write_numpy(tmp_path / "runs" / "loose.safetensors", lora_tensors({"x.q_proj": (8, 8, 2)}, prefix=""))
    _adapter(tmp_path / "with_default")
    _adapter(tmp_path / "with_default" / "named")
    found = discover([tmp_path])
    rel = [(Path(f.path).relative_to(tmp_path).as_posix(), f.is_dir) for f in found]
    assert rel == [("runs/a", True), ("runs/b", True), ("runs/loose.safetensors", False),
                   ("with_default", True), ("with_default/named", True)]


def test_a_file_reached_by_two_paths_is_one_adapter(tmp_path: Path) -> None:
    # a Hugging Face cache: snapshots/<rev>/ links its files to blobs/<hash>
    blobs, snapshot = tmp_path / "blobs", tmp_path / "snapshots" / "rev1"
    _adapter(blobs)
    os.rename(blobs / "adapter_model.safetensors", blobs / "3f2a")
    os.rename(blobs / "adapter_config.json", blobs / "9c1d")
    snapshot.mkdir(parents=True)
    os.symlink(blobs / "3f2a", snapshot / "adapter_model.safetensors")
    os.symlink(blobs / "9c1d", snapshot / "adapter_config.json")
    write_numpy(tmp_path / "x.safetensors", lora_tensors({"m.q_proj": (8, 8, 2)}, prefix=""))
    os.symlink(tmp_path / "x.safetensors", tmp_path / "y.safetensors")
    found = [Path(f.path).relative_to(tmp_path).as_posix() for f in discover([tmp_path])]
    assert found == ["snapshots/rev1", "x.safetensors"]


def test_overlapping_roots_and_the_output_directory(tmp_path: Path) -> None:
    _adapter(tmp_path / "a")
    _adapter(tmp_path / "out" / "old")
    found = discover([tmp_path, tmp_path / "a", tmp_path / "a" / "adapter_model.safetensors"], skip=[tmp_path / "out"])
    assert [f.path for f in found] == [str(tmp_path / "a")]  # the weights file is a part of the adapter a


def test_fifos_are_never_opened(tmp_path: Path) -> None:
    _adapter(tmp_path / "a")
    os.mkfifo(tmp_path / "pipe.safetensors")
    assert [f.path for f in discover([tmp_path])] == [str(tmp_path / "a")]


def test_a_new_format_is_found_without_a_change_to_discovery(tmp_path: Path, monkeypatch) -> None:
    from nora_spectra.io import registry

    (tmp_path / "thing.toy").write_text("toy adapter")
    (tmp_path / "other.txt").write_text("not one")
    toy = registry.Format("toy", "a test format", lambda probe: probe.path.endswith(".toy"), lambda probe, adapter: None)
    monkeypatch.setattr(registry, "_FORMATS", {**registry.formats(), "toy": toy})
    assert [f.path for f in discover([tmp_path])] == [str(tmp_path / "thing.toy")]


# ------------------------------------------------------------------------------------------- content key


def test_the_content_key_follows_size_mtime_and_header(tmp_path: Path) -> None:
    path = write_numpy(tmp_path / "a.safetensors", lora_tensors({"m.q_proj": (8, 8, 2)}, prefix=""))
    first = content_key(str(path), is_dir=False)
    assert first == content_key(str(path), is_dir=False) and first.size == path.stat().st_size
    info = path.stat()
    os.utime(path, ns=(info.st_atime_ns, info.st_mtime_ns + 1))
    touched = content_key(str(path), is_dir=False)
    assert touched.digest != first.digest and touched.mtime == info.st_mtime_ns + 1
    data = bytearray(path.read_bytes())
    header_len = int.from_bytes(data[:8], "little")
    data[8 + header_len:] = b"\0" * (len(data) - 8 - header_len)  # tensor bytes change, header and size do not
    path.write_bytes(bytes(data))
    os.utime(path, ns=(info.st_atime_ns, info.st_mtime_ns + 1))
    assert content_key(str(path), is_dir=False).digest == touched.digest  # by design: only the header is hashed
    directory = _adapter(tmp_path / "d")
    before = content_key(str(directory), is_dir=True)
    config = json.loads((directory / "adapter_config.json").read_text())
    config["lora_alpha"] = 99
    (directory / "adapter_config.json").write_text(json.dumps(config))
    assert content_key(str(directory), is_dir=True).digest != before.digest


def test_an_item_that_cannot_be_examined_is_an_error_row(tmp_path: Path) -> None:
    missing = str(tmp_path / "gone.safetensors")
    key = content_key(missing, is_dir=False)
    assert key.size is None and key.mtime is None
    result = analyse_item(ScanItem(missing, key), AnalysisSettings())
    assert result.adapter["status"] == "error" and result.adapter["error"] == f"{missing}: no such file or directory"
    assert result.layers == []


# ------------------------------------------------------------------------------------------- manifest


def test_manifest_paths_and_metadata_reach_the_adapters_table(tmp_path: Path) -> None:
    _adapter(tmp_path / "a", seed=1)
    _adapter(tmp_path / "b", seed=2)
    (tmp_path / "list.csv").write_text("path,base_model,task\na,org/base-7b,math\nb,,chat\nmissing,org/base-7b,\n")
    summary = scan(manifest=tmp_path / "list.csv", output=tmp_path / "out", workers=1)
    assert (summary.ok, summary.errors) == (2, 1)
    adapters, _ = load_scan(tmp_path / "out")
    assert adapters.columns[-1] == "task"
    rows = {Path(p).name: row for p, row in zip(adapters["path"], adapters.to_dict("records"))}
    assert rows["a"]["base_model"] == "org/base-7b" and rows["a"]["task"] == "math"
    assert rows["b"]["task"] == "chat" and rows["missing"]["status"] == "error"
    assert "no such file or directory" in rows["missing"]["error"]

    (tmp_path / "list.jsonl").write_text(json.dumps({"path": "a", "steps": 1000, "lr": 1e-4}) + "\n"
                                         + json.dumps({"path": "b", "steps": 2.5}) + "\n")
    scan(manifest=tmp_path / "list.jsonl", output=tmp_path / "out2", workers=1)
    adapters, _ = load_scan(tmp_path / "out2")
    assert adapters["steps"].tolist() == [1000.0, 2.5] and adapters["lr"].tolist()[0] == 1e-4


@pytest.mark.parametrize(
    "name, text, message",
    [
        ("m.csv", "file,task\na,x\n", "no 'path' column"),
        ("m.csv", "path,status\na,x\n", "'status' clashes with a column of adapters.parquet"),
        ("m.csv", "path,task\na,x,y\n", "line 2: 3 cells for 2 columns"),
        ("m.csv", "path\na\n./a\n", "listed twice (also on line 2)"),
        ("m.jsonl", '{"path": "a", "steps": 1}\n{"path": "b", "steps": "many"}\n', "'steps' is a str here but a number on line 1"),
        ("m.jsonl", '{"path": "a", "tags": ["x"]}\n', "must be a string, number, boolean or null"),
        ("m.jsonl", '["a"]\n', "expected a JSON object"),
        ("m.jsonl", "{oops\n", "line 1: not JSON"),
        ("m.txt", "a\n", "must be a .csv or .jsonl file"),
        ("m.csv", "path\n", "lists no adapter"),
    ],
)
def test_bad_manifests_are_refused_naming_the_line(tmp_path: Path, name: str, text: str, message: str) -> None:
    (tmp_path / name).write_text(text)
    with pytest.raises(UsageError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
        read_manifest(tmp_path / name)


# ------------------------------------------------------------------------------------------- atomic parts


def _results(paths: list[Path]):
    out = []
    for path in paths:
        item = ScanItem(str(path), content_key(str(path), is_dir=True))
        out.append(analyse_item(item, AnalysisSettings()))
    return out


def test_a_layers_part_without_its_adapters_part_is_not_committed(tmp_path: Path) -> None:
    paths = [_adapter(tmp_path / "tree" / f"a{i}", seed=i) for i in range(3)]
    out = tmp_path / "out"
    settings = {"roots": [str(tmp_path / "tree")]}
    opened = store.ScanStore.open(out, settings, part_size=1)
    for result in _results(paths[:2]):
        opened.add(result)
    # a kill between the two renames of part 3: its layers file exists, its adapters file does not
    (out / "parts" / "000003.layers.parquet").write_bytes((out / "parts" / "000002.layers.parquet").read_bytes())
    (out / "parts" / ".000003.adapters.parquet.abc.tmp").write_bytes(b"half a file")
    adapters, layers = load_scan(out)
    assert adapters["path"].tolist() == [str(p) for p in paths[:2]] and layers["path"].tolist() == [str(p) for p in paths[:2]]
    again = store.ScanStore.open(out, settings, resume=True)
    assert sorted(p.name for p in (out / "parts").iterdir()) == [
        "000001.adapters.parquet", "000001.layers.parquet", "000002.adapters.parquet", "000002.layers.parquet"]
    assert set(again.completed()) == {str(p) for p in paths[:2]}


def test_a_kill_between_the_final_renames_loses_and_duplicates_nothing(tmp_path: Path, monkeypatch) -> None:
    paths = [_adapter(tmp_path / "tree" / f"a{i}", seed=i) for i in range(3)]
    out = tmp_path / "out"
    settings = {"roots": [str(tmp_path / "tree")]}
    first = store.ScanStore.open(out, settings)
    for result in _results(paths):
        first.add(result)
    first.finish([str(p) for p in paths])
    want_adapters, want_layers = load_scan(out)

    # a resumed run re-analyses a1 after a change (r 4 -> 2) and drops a2, then dies between the renames
    _adapter(tmp_path / "tree" / "a1", seed=7, r=2)
    resumed = store.ScanStore.open(out, settings, resume=True, part_size=1)
    resumed.add(_results([paths[1]])[0])
    real_write = store._write_parquet
    calls = []

    def dies_on_the_layers_file(path, table):
        calls.append(Path(path).name)
        if Path(path).name == store.LAYERS_FILE:
            raise KeyboardInterrupt("killed")
        real_write(path, table)

    monkeypatch.setattr(store, "_write_parquet", dies_on_the_layers_file)
    with pytest.raises(KeyboardInterrupt):
        resumed.finish([str(paths[0]), str(paths[1])])
    monkeypatch.setattr(store, "_write_parquet", real_write)
    assert calls == [store.ADAPTERS_FILE, store.LAYERS_FILE]

    adapters, layers = load_scan(out)  # new adapters table, old layers table, the part still there
    assert adapters["path"].tolist() == [str(paths[0]), str(paths[1])]
    assert layers["path"].tolist() == [str(paths[0]), str(paths[1])]
    assert layers.loc[layers["path"] == str(paths[1]), "rank"].tolist() == [2]
    assert layers[layers["path"] == str(paths[0])].equals(want_layers[want_layers["path"] == str(paths[0])])
    store.ScanStore.open(out, settings, resume=True).finish([str(paths[0]), str(paths[1])])
    final_adapters, final_layers = load_scan(out)
    assert final_adapters.equals(adapters) and final_layers.reset_index(drop=True).equals(layers.reset_index(drop=True))
    assert not list((out / "parts").iterdir())
    assert want_adapters["path"].tolist() == [str(p) for p in paths]


def test_a_part_where_every_adapter_failed_merges_with_typed_parts(tmp_path: Path) -> None:
    good = _adapter(tmp_path / "tree" / "good")
    bad = tmp_path / "tree" / "bad.safetensors"
    bad.write_bytes(b"\xff" * 20)
    out = tmp_path / "out"
    opened = store.ScanStore.open(out, {"roots": []}, part_size=1)
    opened.add(analyse_item(ScanItem(str(bad), content_key(str(bad), is_dir=False)), AnalysisSettings()))
    opened.add(_results([good])[0])
    adapters, layers = opened.finish([str(bad), str(good)])
    values = layers.schema.field("singular_values").type
    assert str(adapters.schema.field("r").type) == "int64" and str(values.value_type) == "double"
    frame, _ = load_scan(out)
    assert frame["r"].tolist()[1] == 4 and str(frame["r"].dtype) == "Int64"


def test_empty_and_unreadable_scan_directories(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="not a spectra scan directory"):
        load_scan(tmp_path)
    (tmp_path / "scan.json").write_text("[1, 2]")
    with pytest.raises(UsageError, match="not the settings of a spectra scan"):
        store.ScanStore.open(tmp_path, {}, resume=True)


@pytest.mark.parametrize("text, message", [("[" * 100_000 + "\n", "line 1: not JSON"), ('{"path": "a", "n": 1e999}\n', "line 1: not JSON")])
def test_hostile_jsonl_manifest_lines_are_refused_naming_the_line(tmp_path: Path, text: str, message: str) -> None:
    (tmp_path / "m.jsonl").write_text(text)
    with pytest.raises(UsageError, match=message):
        read_manifest(tmp_path / "m.jsonl")
