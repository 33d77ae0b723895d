"""The one keying scheme of caches and checkpoints (lmpipe.runs.keys)."""

from pathlib import Path

from lmpipe.runs.keys import KEY_CHARS, directory_digest, key_of, keyed_path


def test_a_key_depends_on_the_payload_not_on_its_order() -> None:
    key = key_of({"seed": 1, "finetune": {"lr": 0.1, "steps": 10}})
    assert key == key_of({"finetune": {"steps": 10, "lr": 0.1}, "seed": 1})
    assert key != key_of({"seed": 1, "finetune": {"lr": 0.1, "steps": 11}})
    assert key != key_of({"seed": 2, "finetune": {"lr": 0.1, "steps": 10}})
    assert len(key) == KEY_CHARS and int(key, 16) >= 0
    assert key_of({"path": Path("a")}) == key_of({"path": "a"})  # written as str


def test_a_directory_digest_follows_file_names_and_contents(tmp_path: Path) -> None:
    model = tmp_path / "model"
    (model / "sub").mkdir(parents=True)
    (model / "config.json").write_text("{}")
    (model / "sub" / "weights.bin").write_bytes(b"\x00\x01")
    first = directory_digest(model)
    assert directory_digest(model) == first
    (model / "sub" / "weights.bin").write_bytes(b"\x00\x02")
    changed = directory_digest(model)
    assert changed != first
    (model / "sub" / "weights.bin").rename(model / "sub" / "other.bin")
    assert directory_digest(model) not in (first, changed)


def test_a_keyed_path_names_the_payloads_result(tmp_path: Path) -> None:
    path = keyed_path(tmp_path, {"a": 1}, ".parquet")
    assert path == tmp_path / f"{key_of({'a': 1})}.parquet"
    assert keyed_path(tmp_path, {"a": 2}, ".parquet") != path
