"""The image cache authenticates its entries (memaudit.imagecache): whoever can write the cache folder (a CI
cache restored from another branch or a fork's pull request) must not be able to make a scan audit other pixels
than the folder's own.  A poisoned, foreign or unauthenticated entry is a miss, decoded afresh; no usable
secret means no cache, never an unchecked one."""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import stat
import threading

import numpy as np
import pytest
from PIL import Image

import memaudit.data as data
import memaudit.imagecache as imagecache
from memaudit.data import load_dataset


def folder_of_images(root, seed=11, count=6):
    """A folder of 8-bit RGB PNGs (6x6), distinct per seed."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True)
    for i in range(count):
        Image.fromarray(rng.integers(0, 256, (6, 6, 3), dtype=np.uint8)).save(root / f"{i:02d}.png")
    return root


def pixels_of(dataset) -> bytes:
    return dataset.images.numpy().tobytes()


def count_decodes(monkeypatch) -> list:
    """Record every image decode from now on (a load with none came from the cache)."""
    decoded, real = [], data._open_image
    monkeypatch.setattr(data, "_open_image", lambda path: decoded.append(path) or real(path))
    return decoded


def entry(cache):
    """The one cache entry: (<key>.npy, <key>.json)."""
    [npy] = cache.glob("*.npy")
    return npy, npy.with_suffix(".json")


def mode(path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


# --- (1) the trial's cache poisoning ---

@pytest.mark.parametrize("forged_mac", ["kept", "dropped", "empty-key", "sha256"])
def test_poisoned_pixels_with_a_recomputed_sha256_are_a_miss(tmp_path, monkeypatch, image_cache, forged_mac):
    """The adversarial trial: replace <key>.npy by other pixels of the same shape and dtype and put their sha256
    in the sidecar (with whatever MAC an attacker can make without the secret): the load must still give the
    folder's own pixels, decoded afresh, and the entry be rewritten with them."""
    folder = folder_of_images(tmp_path / "train")
    truth = pixels_of(load_dataset(folder, cache_dir="off"))
    load_dataset(folder)  # caches the entry
    npy, sidecar = entry(image_cache)
    original = np.load(npy)
    forged = np.random.default_rng(99).integers(0, 256, original.shape, dtype=np.uint8)  # another training set
    assert forged.dtype == original.dtype and not np.array_equal(forged, original)
    np.save(npy, forged, allow_pickle=False)
    meta = json.loads(sidecar.read_text())
    meta["sha256"] = imagecache.array_digest(forged)
    if forged_mac == "dropped":
        meta.pop("mac", None)
    elif forged_mac in ("empty-key", "sha256"):  # guesses at the MAC without the secret
        fields = json.dumps({k: meta.get(k) for k in imagecache.MAC_FIELDS}, sort_keys=True, separators=(",", ":"))
        message = imagecache.MAC_CONTEXT + fields.encode()
        meta["mac"] = (hmac.new(b"", message, hashlib.sha256) if forged_mac == "empty-key"
                       else hashlib.sha256(message)).hexdigest()
    sidecar.write_text(json.dumps(meta))

    decoded, notes = count_decodes(monkeypatch), []
    loaded = load_dataset(folder, note=notes.append)
    assert pixels_of(loaded) == truth and pixels_of(loaded) != (forged.astype(np.float32) / 127.5 - 1).tobytes()
    assert len(decoded) == 6  # a miss: every file decoded afresh
    assert len(notes) == 1 and "ignoring the image cache entry" in notes[0] and "MAC does not verify" in notes[0]
    assert np.array_equal(np.load(npy), original)  # rewritten with the folder's own pixels
    decoded.clear()
    assert pixels_of(load_dataset(folder)) == truth and decoded == []  # and a hit again


def test_an_authentic_entry_of_another_folder_is_not_served_under_this_key(tmp_path, monkeypatch, image_cache):
    """An attacker holding authentic entries (e.g. of a clean set of the same shape) copies one under the key of
    the audited folder, with the key in its sidecar rewritten: the MAC covers the key, so it is a miss."""
    audited, clean = folder_of_images(tmp_path / "audited", seed=1), folder_of_images(tmp_path / "clean", seed=2)
    truth = pixels_of(load_dataset(audited, cache_dir="off"))
    load_dataset(audited)
    [audited_npy] = image_cache.glob("*.npy")
    load_dataset(clean)
    [clean_npy] = [p for p in image_cache.glob("*.npy") if p != audited_npy]
    audited_key = audited_npy.stem
    meta = json.loads(clean_npy.with_suffix(".json").read_text())
    meta["key"] = audited_key
    audited_npy.write_bytes(clean_npy.read_bytes())
    audited_npy.with_suffix(".json").write_text(json.dumps(meta))

    decoded, notes = count_decodes(monkeypatch), []
    assert pixels_of(load_dataset(audited, note=notes.append)) == truth
    assert decoded and "MAC does not verify" in notes[0]


def test_the_mac_covers_every_field_of_the_sidecar(tmp_path):
    meta = {"version": imagecache.CACHE_VERSION, "key": "k" * 64, "kind": "bytes", "dtype": "uint8",
            "shape": [6, 6, 6, 3], "sha256": "0" * 64, "reading": "8-bit images [0, 255]"}
    mac = imagecache.entry_mac(b"s" * 32, meta)
    assert imagecache.entry_mac(b"s" * 32, dict(meta)) == mac and imagecache.entry_mac(b"t" * 32, meta) != mac
    changed = {"version": 1, "key": "j" * 64, "kind": "float", "dtype": "float32", "shape": [6, 3, 6, 6],
               "sha256": "1" * 64, "reading": "[-1, 1]"}
    assert set(changed) == set(imagecache.MAC_FIELDS)
    for field, value in changed.items():
        assert imagecache.entry_mac(b"s" * 32, {**meta, field: value}) != mac, field


def test_entries_of_the_previous_format_are_never_read():
    assert imagecache.CACHE_VERSION >= 2  # version 1 sidecars carried no MAC


# --- (2) MEMAUDIT_CACHE_SECRET ---

def test_an_entry_is_a_hit_only_under_the_secret_it_was_written_with(tmp_path, monkeypatch, image_cache,
                                                                     config_home):
    folder = folder_of_images(tmp_path / "d")
    truth = pixels_of(load_dataset(folder, cache_dir="off"))
    decoded = count_decodes(monkeypatch)
    monkeypatch.setenv("MEMAUDIT_CACHE_SECRET", "secret of the main branch")
    assert pixels_of(load_dataset(folder)) == truth and len(decoded) == 6  # written under it
    decoded.clear()
    assert pixels_of(load_dataset(folder)) == truth and decoded == []  # the same secret: a hit

    monkeypatch.setenv("MEMAUDIT_CACHE_SECRET", "another secret")
    notes = []
    assert pixels_of(load_dataset(folder, note=notes.append)) == truth and len(decoded) == 6  # a miss
    assert len(notes) == 1 and "MAC does not verify" in notes[0]
    decoded.clear()
    assert pixels_of(load_dataset(folder)) == truth and decoded == []  # rewritten under the new one

    monkeypatch.setenv("MEMAUDIT_CACHE_SECRET", "")  # empty: the per-user key file instead
    assert pixels_of(load_dataset(folder, note=notes.append)) == truth and len(decoded) == 6
    assert (config_home / "memaudit" / "cache.key").is_file()


def test_the_environment_secret_needs_no_key_file(tmp_path, monkeypatch, image_cache, config_home):
    monkeypatch.setenv("MEMAUDIT_CACHE_SECRET", "from the CI secret store")
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "not-a-folder"))
    (tmp_path / "not-a-folder").write_text("x")  # a key file could not be made here
    folder = folder_of_images(tmp_path / "d")
    notes = []
    load_dataset(folder, note=notes.append)
    decoded = count_decodes(monkeypatch)
    load_dataset(folder, note=notes.append)
    assert decoded == [] and notes == []
    assert list(config_home.iterdir()) == []
    meta = json.loads(entry(image_cache)[1].read_text())
    assert meta["mac"] == imagecache.entry_mac(b"from the CI secret store", meta)  # authenticated by that secret


# --- (3) the per-user key file ---

def test_the_key_file_is_created_private_and_reused(tmp_path, monkeypatch, image_cache, config_home):
    folder = folder_of_images(tmp_path / "d")
    truth = pixels_of(load_dataset(folder, cache_dir="off"))
    key = config_home / "memaudit" / "cache.key"
    assert not key.exists()
    old_umask = os.umask(0)  # the modes do not depend on the umask
    try:
        assert pixels_of(load_dataset(folder)) == truth
    finally:
        os.umask(old_umask)
    assert key.is_file() and mode(key) == 0o600 and mode(key.parent) == 0o700
    secret = key.read_bytes()
    assert len(secret) == 32 and sorted(p.name for p in key.parent.iterdir()) == ["cache.key"]  # no temp file
    json.loads(entry(image_cache)[1].read_text())["mac"]  # the entry is authenticated

    decoded = count_decodes(monkeypatch)
    assert pixels_of(load_dataset(folder)) == truth and decoded == []  # a hit under the same key
    assert key.read_bytes() == secret

    key.unlink()  # a new key: the old entry is not authentic under it
    notes = []
    assert pixels_of(load_dataset(folder, note=notes.append)) == truth and len(decoded) == 6
    assert "MAC does not verify" in notes[0] and key.read_bytes() != secret


def test_the_key_file_defaults_to_the_config_folder_under_home(tmp_path, monkeypatch):
    monkeypatch.delenv("XDG_CONFIG_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert imagecache.key_file() == tmp_path / "home" / ".config" / "memaudit" / "cache.key"
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg"))
    assert imagecache.key_file() == tmp_path / "xdg" / "memaudit" / "cache.key"


def test_concurrent_first_uses_agree_on_one_key(config_home):
    results, start = [], threading.Barrier(6)

    def first_use():
        start.wait()
        results.append(imagecache.cache_secret())

    threads = [threading.Thread(target=first_use) for _ in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    key = (config_home / "memaudit" / "cache.key").read_bytes()
    assert results == [(key, "")] * 6
    assert sorted(p.name for p in (config_home / "memaudit").iterdir()) == ["cache.key"]


# --- (4) no usable key file: no cache, the right pixels ---

def break_key_file(how, tmp_path, monkeypatch, config_home, image_cache):
    if how == "config-is-a-file":  # the key file cannot be created
        blocker = tmp_path / "config-file"
        blocker.write_text("x")
        monkeypatch.setenv("XDG_CONFIG_HOME", str(blocker))
    elif how == "key-is-a-folder":  # the key file cannot be read
        (config_home / "memaudit" / "cache.key").mkdir(parents=True)
    elif how == "short-key":
        (config_home / "memaudit").mkdir(exist_ok=True)
        (config_home / "memaudit" / "cache.key").write_bytes(b"short")
    elif how == "inside-the-cache":  # whoever writes the cache could write the key
        monkeypatch.setenv("XDG_CONFIG_HOME", str(image_cache / "config"))
    else:  # "read-only-config"
        if os.geteuid() == 0:
            pytest.skip("root can write a read-only folder")
        os.chmod(config_home, 0o500)


HOW = ["config-is-a-file", "key-is-a-folder", "short-key", "inside-the-cache", "read-only-config"]


@pytest.mark.parametrize("how", HOW)
def test_without_a_usable_key_file_nothing_is_cached_and_the_load_goes_on(tmp_path, monkeypatch, image_cache,
                                                                         config_home, how):
    folder = folder_of_images(tmp_path / "d")
    truth = pixels_of(load_dataset(folder, cache_dir="off"))
    break_key_file(how, tmp_path, monkeypatch, config_home, image_cache)
    try:
        notes = []
        assert pixels_of(load_dataset(folder, note=notes.append)) == truth
        assert len(notes) == 1 and notes[0].startswith("warning: image cache not written (no cache secret")
        assert not list(image_cache.glob("*.npy")) and not list(image_cache.glob("*.json"))
        decoded = count_decodes(monkeypatch)
        assert pixels_of(load_dataset(folder, note=notes.append)) == truth and len(decoded) == 6  # still no cache
    finally:
        os.chmod(config_home, 0o700)


@pytest.mark.parametrize("how", HOW)
def test_an_entry_is_not_used_once_its_key_file_is_unusable(tmp_path, monkeypatch, image_cache, config_home, how):
    folder = folder_of_images(tmp_path / "d")
    truth = pixels_of(load_dataset(folder))  # cached under a good key
    key = config_home / "memaudit" / "cache.key"
    if how in ("key-is-a-folder", "short-key"):
        key.unlink()
    break_key_file(how, tmp_path, monkeypatch, config_home, image_cache)
    try:
        decoded, notes = count_decodes(monkeypatch), []
        assert pixels_of(load_dataset(folder, note=notes.append)) == truth and len(decoded) == 6
        assert "ignoring the image cache entry" in notes[0] and "no cache secret" in notes[0]
    finally:
        os.chmod(config_home, 0o700)
