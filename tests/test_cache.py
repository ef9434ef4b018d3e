"""The token cache: built once, reused, rebuilt when stale or damaged, parallel equal to serial, and
epochs from it that hold the same windows as the streaming reader, in a deterministic global shuffle."""
import dataclasses
import json
import logging
import os
from collections import Counter

import numpy as np
import pytest

import batches
import cache
from batches import CachedSessions, keyed_permutation, session_chunks
from cache import build_caches, cache_settings
from config import Config
from dataset import DataError, SessionDataset, batch_to_device, iter_sessions
from tokens import IGNORE_INDEX


def settings_of(vocab_size, **changes):
    """The cache settings of the default config, with `changes` (CacheSettings fields)."""
    return dataclasses.replace(cache_settings(Config(), vocab_size), **changes)


def write_sessions(path, sessions, labels=None):
    labels = labels or [0] * len(sessions)
    if path.suffix == ".json":
        path.write_text(json.dumps([{"event_ids": s, "label": y} for s, y in zip(sessions, labels)]))
    elif path.suffix == ".jsonl":
        path.write_text("".join(json.dumps({"event_ids": s, "label": y}) + "\n"
                                for s, y in zip(sessions, labels)))
    else:
        path.write_text("".join(" ".join(map(str, s)) + "\n" for s in sessions))


def make_data(root, n=300, long_every=0):
    """Three files of every format; every `long_every`-th session is long enough to be windowed."""
    rng = np.random.default_rng(7)
    data = root / "data"
    data.mkdir()
    for name in ("a.json", "b.jsonl", "c.txt"):
        sessions = [rng.integers(0, 29, int(rng.integers(1, 30))).tolist() for _ in range(n)]
        if long_every:
            sessions = [s * 12 if i % long_every == 0 else s for i, s in enumerate(sessions)]
        labels = [int(i % 11 == 0) for i in range(n)] if name != "c.txt" else None
        write_sessions(data / name, sessions, labels)
    return data


def rows_of(batches):
    """Every (inputs, targets) row of the batches as they count after masking, as comparable tuples."""
    rows = []
    for batch, _ in batches:
        inputs, targets = batch_to_device(batch, "cpu")
        for length, input_row, target_row in zip(batch["lengths"].tolist(), inputs.tolist(),
                                                 targets.tolist()):
            rows.append((tuple(input_row[:length]), tuple(target_row[:length])))
    return rows


def streaming_rows(path, split, **options):
    data = SessionDataset(path, 29, split=split, shuffle=False, **options)
    return [(tuple(i), tuple(t)) for i, t in data]


@pytest.fixture
def built(tmp_path):
    data = make_data(tmp_path, long_every=9)
    entries = build_caches(data, settings_of(29), tmp_path / "cache", workers=1)
    return data, entries


@pytest.mark.parametrize("split", ["train", "val", "all"])
def test_cached_windows_and_counts_equal_the_streaming_reader(built, split):
    data, entries = built
    options = dict(max_seq_length=40, window_context=8)
    cached = CachedSessions(entries, 29, split, shuffle=False, **options)
    assert Counter(rows_of(cached.batches(32))) == Counter(streaming_rows(data, split, **options))
    streamed = SessionDataset(data, 29, split=split, shuffle=False, **options).count()
    if split != "train":  # the first pass records which targets and event sets occur in training only
        streamed.update(seen_targets=None, event_sets=None, event_pairs=None)
    counted = cached.count()
    cached_pairs, streamed_pairs = counted.pop("event_pairs"), streamed.pop("event_pairs")
    assert (cached_pairs is None) == (streamed_pairs is None) == (split != "train")
    assert split != "train" or (len(cached_pairs) and np.array_equal(cached_pairs, streamed_pairs))
    assert counted == {**streamed, "first_bad_record": None}
    assert any(length < 0 for w in cached.windows for length in w["lengths"].array)  # long sessions were cut


@pytest.mark.parametrize("bucketing", [False, True])
def test_epochs_are_a_deterministic_global_shuffle_and_resume_anywhere(built, bucketing):
    _, entries = built
    data = CachedSessions(entries, 29, "train", buffer_size=64, max_seq_length=40, window_context=8,
                          length_bucketing=bucketing)
    data.set_epoch(1)
    first = [(b["input_ids"].tolist(), pos) for b, pos in data.batches(16)]
    assert first == [(b["input_ids"].tolist(), pos) for b, pos in data.batches(16)]   # replays exactly
    assert [pos for _, pos in first] == list(range(1, len(first) + 1))
    for start in (1, 5, len(first) - 1):                                            # mid-block, block edge
        assert [(b["input_ids"].tolist(), p) for b, p in data.batches(16, start)] == first[start:]
    data.set_epoch(2)
    second = rows_of(data.batches(16))
    data.set_epoch(1)
    assert Counter(second) == Counter(rows_of(data.batches(16)))                     # same windows...
    assert second != rows_of(data.batches(16))                                       # ...another order
    # a global shuffle: the first block draws windows from all over the data, the last file included
    first_block = keyed_permutation(np.arange(64), data.total_windows, "42:1")
    assert first_block.min() < data.total_windows / 3 and first_block.max() > data.window_bounds[-2]


def test_length_bucketing_keeps_padding_small(built):
    _, entries = built
    data = CachedSessions(entries, 29, "train", buffer_size=256, max_seq_length=40, window_context=8,
                          length_bucketing=True)
    data.set_epoch(1)
    padded = sum(b["input_ids"].numel() for b, _ in data.batches(16))
    real = sum(int(b["lengths"].sum()) for b, _ in data.batches(16))
    unbucketed = CachedSessions(entries, 29, "train", buffer_size=256, max_seq_length=40, window_context=8)
    unbucketed.set_epoch(1)
    assert padded / real < 1.1 < sum(b["input_ids"].numel() for b, _ in unbucketed.batches(16)) / real
    assert Counter(rows_of(data.batches(16))) == Counter(rows_of(unbucketed.batches(16)))  # the same windows


def test_ranks_take_disjoint_equal_shares_of_the_permutation(built):
    _, entries = built
    shards = [CachedSessions(entries, 29, "train", rank=r, world_size=3, max_seq_length=40, window_context=8)
              for r in range(3)]
    rows = [rows_of(s.batches(8)) for s in shards]
    assert len(rows[0]) == len(rows[1]) == len(rows[2]) == shards[0].total_windows // 3
    everything = CachedSessions(entries, 29, "train", shuffle=False, max_seq_length=40, window_context=8)
    assert sum((Counter(r) for r in rows), Counter()) <= Counter(rows_of(everything.batches(8)))


def test_keyed_permutation_is_a_bijection():
    for n in (1, 2, 3, 17, 1000, 4097):
        values = keyed_permutation(np.arange(n), n, "seed")
        assert sorted(values.tolist()) == list(range(n))
    assert keyed_permutation(np.arange(100), 100, "a").tolist() != \
        keyed_permutation(np.arange(100), 100, "b").tolist()


def test_cache_is_reused_then_rebuilt_when_the_file_or_a_setting_changes(tmp_path, caplog):
    data = make_data(tmp_path)
    settings = settings_of(29)
    caplog.set_level(logging.INFO, logger="deeplog")
    entries = build_caches(data, settings, tmp_path / "cache", workers=1)
    built_at = {e: (e / "meta.json").stat().st_mtime_ns for e in entries}
    assert build_caches(data, settings, tmp_path / "cache", workers=1) == entries
    assert {e: (e / "meta.json").stat().st_mtime_ns for e in entries} == built_at   # nothing rebuilt
    assert "reusing 3 entries" in caplog.text

    write_sessions(data / "c.txt", [[1, 2, 3]] * 5)                                 # the file changes
    caplog.clear()
    build_caches(data, settings, tmp_path / "cache", workers=1)
    assert "Token cache of" in caplog.text
    assert "c.txt: stale (mtime_ns, size changed); rebuilding" in caplog.text
    assert sum(1 for _ in iter_sessions(data / "c.txt")) == 5
    assert CachedSessions(entries[2:], 29, "all", shuffle=False).count()["sessions"] == 5
    assert len([p for p in (tmp_path / "cache").iterdir() if not p.name.startswith(".")]) == 3  # replaced

    other = build_caches(data, settings_of(29, seed=1), tmp_path / "cache", workers=1)
    assert set(other).isdisjoint(entries)                                      # another split: new entries


@pytest.mark.parametrize("damage", ["truncate tokens", "drop meta", "garble meta", "truncate offsets"])
def test_a_damaged_cache_is_rebuilt_with_one_log_line(tmp_path, caplog, damage):
    data = make_data(tmp_path)
    settings = settings_of(29)
    entry = build_caches(data, settings, tmp_path / "cache", workers=1)[1]
    good = CachedSessions([entry], 29, "all", shuffle=False).count()
    name = {"truncate tokens": "part-0.tokens", "truncate offsets": "part-0.offsets"}.get(damage, "meta.json")
    target = entry / name
    if damage.startswith("truncate"):
        os.truncate(target, target.stat().st_size - 6)
    elif damage == "drop meta":
        target.unlink()
    else:
        target.write_text('{"key": ')
    caplog.set_level(logging.INFO, logger="deeplog")
    build_caches(data, settings, tmp_path / "cache", workers=1)
    lines = [r.message for r in caplog.records if "rebuilding" in r.message]
    assert len(lines) == 1 and "b.jsonl" in lines[0]
    assert CachedSessions([entry], 29, "all", shuffle=False).count() == good


def flip_byte(path, at):
    data = bytearray(path.read_bytes())
    data[at] ^= 0xFF
    path.write_bytes(data)


def set_offsets(entry, **values):
    """Overwrite offsets of part 0 (the keys are positions: at3=...)."""
    offsets = np.fromfile(entry / "part-0.offsets", dtype=np.int64)
    original = offsets.copy()
    for at, value in values.items():
        offsets[int(at[2:])] = value if isinstance(value, int) else original[int(value[2:])]
    offsets.tofile(entry / "part-0.offsets")


def edit_meta(entry, change):
    meta = json.loads((entry / "meta.json").read_text())
    (entry / "meta.json").write_text(json.dumps(change(meta)))


def zero_tokens(entry):
    path = entry / "part-0.tokens"
    path.write_bytes(bytes(path.stat().st_size))


def replace_in_meta(**changes):
    """A damage: meta.json with fields replaced, `part` the first part's, `key` the key's, `files` the
    records of files (`changes` give a function of the old value)."""
    def change(meta):
        for field, new in changes.items():
            where = {"part": meta["parts"][0], "key": meta["key"], "files": meta["files"]}.get(field, meta)
            name, make = new
            where[name] = make(where[name])
        return meta
    return lambda entry: edit_meta(entry, change)


# damage: (what it does to an entry, what the log line says)
DAMAGES = {
    "tokens zeroed at the same size": (zero_tokens, "part-0.tokens: sessions 0..299 are not all framed"),
    "offsets past the end": (lambda e: set_offsets(e, at5=10 ** 9),
                             "part-0.offsets point past the last token at session 5"),
    "offsets not monotone": (lambda e: set_offsets(e, at3="at4", at4="at3"),
                             "part-0.offsets decrease at session 3"),
    "a session without its end": (lambda e: set_offsets(e, at4="at3"),
                                  "part-0.offsets leave fewer than 2 tokens (start and end) at session 3"),
    "offsets not from 0": (lambda e: set_offsets(e, at0=1), "part-0.offsets run from 1 to"),
    "a flipped byte in flags": (lambda e: flip_byte(e / "part-0.flags", 7), "part-0.flags: bits besides 15"),
    "a flipped byte in indexes": (lambda e: flip_byte(e / "part-0.indexes", 8 * 9 + 2), "part-0.indexes"),
    "a flipped byte in event_pairs": (lambda e: flip_byte(e / "event_pairs.npy", -3),
                                      "event_pairs.npy fails its checksum"),
    "a flipped byte in a token": (lambda e: flip_byte(e / "part-0.tokens", 21),
                                  "part-0.tokens fails its checksum"),
    "meta.json an array": (lambda e: (e / "meta.json").write_text("[1, 2]"),
                           "meta.json is an array, not an object"),
    "meta.json a number": (lambda e: (e / "meta.json").write_text("3"),
                           "meta.json is an integer, not an object"),
    "meta.json not JSON": (lambda e: (e / "meta.json").write_bytes(b"\xff\xfe{"), "meta.json unreadable"),
    "meta.json missing keys": (lambda e: edit_meta(e, lambda m: {"key": m["key"]}),
                               "meta.json lacks event_pairs, event_sets, files, parts"),
    "meta.json a part's field a string": (replace_in_meta(part=("sessions", str)),
                                          "meta.json's parts[0]: sessions is a string, not an integer"),
    "meta.json a key's field a list": (replace_in_meta(key=("seed", lambda seed: [seed])),
                                       "meta.json's key: seed is an array, not an integer"),
    "meta.json a key's number a string": (replace_in_meta(key=("validation_split", str)),
                                          "meta.json's key: validation_split is a string, not a number"),
    "meta.json files an array": (replace_in_meta(files=("part-0.flags", lambda record: [record])),
                                 "meta.json's files[part-0.flags] is an array, not an object"),
    "meta.json a wrong checksum": (replace_in_meta(files=("part-0.flags", lambda rec: {**rec, "crc32": 1})),
                                   "part-0.flags fails its checksum"),
    "meta.json a wrong size": (replace_in_meta(files=("part-0.flags", lambda rec: {**rec, "size": 3})),
                               "meta.json records 3 bytes for part-0.flags"),
    "meta.json too many pairs": (replace_in_meta(event_pairs=("event_pairs", lambda count: count + 1)),
                                 "event_pairs.npy does not hold the sorted distinct pair codes"),
}


def what_it_reads(entries):
    """Every session (session_chunks), the counts and the batches of the training split."""
    counted = CachedSessions(entries, 29, "train", shuffle=False, max_seq_length=40, window_context=8).count()
    pairs = counted.pop("event_pairs")
    rows = rows_of(CachedSessions(entries, 29, "train", shuffle=False, max_seq_length=40,
                                  window_context=8).batches(64))
    return [s for c in session_chunks(entries, "all") for s in c], counted, pairs.tolist(), rows


@pytest.mark.parametrize("damage", list(DAMAGES))
def test_every_damage_is_rebuilt_with_one_line_naming_entry_and_damage(tmp_path, caplog, damage):
    data = make_data(tmp_path)
    entries = build_caches(data / "b.jsonl", settings_of(29), tmp_path / "cache", workers=1)
    fresh = what_it_reads(entries)
    harm, said = DAMAGES[damage]
    harm(entries[0])
    cache.VERIFIED.clear()  # as a later process finds it
    caplog.set_level(logging.INFO, logger="deeplog")
    assert build_caches(data / "b.jsonl", settings_of(29), tmp_path / "cache", workers=1) == entries
    lines = [r.message for r in caplog.records if "rebuilding" in r.message]
    assert len(lines) == 1 and "b.jsonl: damaged (" in lines[0] and str(entries[0]) in lines[0], lines
    assert said in lines[0], lines[0]
    assert what_it_reads(entries) == fresh
    assert cache.check_entry(entries[0], None) is None


def test_an_entry_opened_directly_is_verified_and_rebuilt_there(tmp_path, caplog):
    data = make_data(tmp_path)
    entries = build_caches(data / "b.jsonl", settings_of(29), tmp_path / "cache", workers=1)
    fresh = what_it_reads(entries)
    set_offsets(entries[0], at7=10 ** 6)
    cache.VERIFIED.clear()
    caplog.set_level(logging.INFO, logger="deeplog")
    assert what_it_reads(entries) == fresh   # CachedSessions, then session_chunks, find it rebuilt
    lines = [r.message for r in caplog.records if "rebuilding" in r.message]
    assert len(lines) == 1 and "point past the last token at session 7" in lines[0]
    (entries[0] / "meta.json").write_text("[]")  # names neither its file nor its settings: cannot be rebuilt
    cache.VERIFIED.clear()
    with pytest.raises(DataError, match=rf"token cache {entries[0]}: damaged \(meta.json is an array"):
        CachedSessions(entries, 29, "train")


def test_an_entry_is_verified_once_per_process_and_again_when_a_file_changes(tmp_path, monkeypatch):
    data = make_data(tmp_path)
    entries = build_caches(data, settings_of(29), tmp_path / "cache", workers=1)
    reads = []
    real = cache.file_record
    counting = lambda path: reads.append(path.name) or real(path)  # noqa: E731
    monkeypatch.setattr(cache, "file_record", counting)    # entries (cache.py), window indexes (batches.py)
    monkeypatch.setattr(batches, "file_record", counting)
    build_caches(data, settings_of(29), tmp_path / "cache", workers=1)
    CachedSessions(entries, 29, "train").count()
    assert not reads                        # built here: their checksums were taken while they were written
    cache.VERIFIED.clear()                 # a later process
    build_caches(data, settings_of(29), tmp_path / "cache", workers=1)
    CachedSessions(entries, 29, "train").count()
    window_index = [f"part-0.windows-train-256-32.{k}" for k in ("starts", "lengths")] * 3
    assert sorted(reads) == sorted(window_index + [
        name for e in entries for name in json.loads((e / "meta.json").read_text())["files"]])
    reads.clear()
    CachedSessions(entries, 29, "train").count()
    list(session_chunks(entries, "all"))
    assert not reads                        # verified once per process
    (entries[1] / "part-0.flags").write_bytes((entries[1] / "part-0.flags").read_bytes())  # written again
    CachedSessions(entries, 29, "train").count()
    assert sorted(reads) == sorted(json.loads((entries[1] / "meta.json").read_text())["files"])


def test_a_damaged_window_index_is_rebuilt_with_one_line(built, caplog):
    _, entries = built
    options = dict(max_seq_length=40, window_context=8, shuffle=False)
    fresh = rows_of(CachedSessions(entries, 29, "train", **options).batches(32))
    index = next(entries[0].glob("part-0.windows-train-40-8.starts"))
    flip_byte(index, 3)
    cache.VERIFIED.clear()
    caplog.set_level(logging.INFO, logger="deeplog")
    assert rows_of(CachedSessions(entries, 29, "train", **options).batches(32)) == fresh
    lines = [r.message for r in caplog.records if "rebuilding" in r.message]
    assert len(lines) == 1 and "window index part-0.windows-train-40-8" in lines[0] and "CRC-32" in lines[0]


def test_the_cli_reports_bad_data_in_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_code:
        cache.main([str(tmp_path / "missing"), "--cache-dir", str(tmp_path / "cache")])
    assert exit_code.value.code == 2
    assert capsys.readouterr().err.strip() == f"error: {tmp_path / 'missing'}: no such file or directory"


def test_parallel_byte_ranges_equal_the_serial_build(tmp_path, monkeypatch):
    data = tmp_path / "data"
    data.mkdir()
    rng = np.random.default_rng(3)
    sessions = [rng.integers(0, 29, int(rng.integers(1, 20))).tolist() for _ in range(3000)]
    write_sessions(data / "big.jsonl", sessions, [int(i % 7 == 0) for i in range(3000)])
    (data / "big.jsonl").write_text((data / "big.jsonl").read_text().replace("\n", "\n\n", 40))  # blank lines
    write_sessions(data / "big.txt", sessions[:2000])
    settings = settings_of(29)
    serial = build_caches(data, settings, tmp_path / "serial", workers=1)
    monkeypatch.setattr(cache, "MIN_PART_BYTES", 1000)
    parallel = build_caches(data, settings, tmp_path / "parallel", workers=3)  # fewer files than workers
    assert all(len(json.loads((e / "meta.json").read_text())["parts"]) > 1 for e in parallel)
    for wanted in ("normal", "abnormal", "calibration", "evaluation"):
        assert [s for c in session_chunks(serial, wanted) for s in c] == \
            [s for c in session_chunks(parallel, wanted) for s in c]
    one, many = (CachedSessions(e, 29, "train", shuffle=False) for e in (serial, parallel))
    one_counted, many_counted = one.count(), many.count()
    assert np.array_equal(one_counted.pop("event_pairs"), many_counted.pop("event_pairs"))
    assert one_counted == many_counted
    assert rows_of(one.batches(64)) == rows_of(many.batches(64))
    records = [r.index for r in iter_sessions(data / "big.jsonl")]      # exact line numbers across ranges
    parts = sorted(parallel[0].glob("part-*.indexes"), key=lambda p: int(p.name[5:-8]))
    indexes = np.concatenate([np.fromfile(p, dtype=np.int64) for p in parts])
    assert indexes.tolist() == records


def test_bad_data_is_one_error_and_leaves_no_entry(tmp_path, monkeypatch):
    data = make_data(tmp_path)
    (data / "b.jsonl").write_text((data / "b.jsonl").read_text() + '{"event_ids": [1, 99]}\n')
    monkeypatch.setattr(cache, "MIN_PART_BYTES", 1000)
    with pytest.raises(DataError, match=r"b.jsonl: line 301: event ID 99 >= vocab_size 29"):
        build_caches(data, settings_of(29), tmp_path / "cache", workers=2)
    assert not [p for p in (tmp_path / "cache").iterdir() if p.name.startswith("b.jsonl")]
    skipped = build_caches(data, settings_of(29, skip_bad_records=True), tmp_path / "cache")
    counted = CachedSessions(skipped, 29, "all", shuffle=False).count()
    assert counted["bad_records"] == 1 and "line 301" in counted["first_bad_record"]


def test_session_chunks_give_the_split_halves_and_the_abnormal_sessions(built):
    data, entries = built
    chunks = {w: Counter(s for c in session_chunks(entries, w, chunk_size=50) for s in c)
              for w in ("normal", "abnormal", "calibration", "evaluation")}
    records = list(iter_sessions(data))
    assert chunks["abnormal"] == Counter(tuple(r.event_ids) for r in records if r.label)
    assert chunks["normal"] == Counter(tuple(r.event_ids) for r in records if not r.label)
    validation = Counter(s for s, _ in streaming_rows(data, "val", max_seq_length=10 ** 6, window_context=0))
    held_out = chunks["calibration"] + chunks["evaluation"]
    assert Counter({(31, *s): n for s, n in held_out.items()}) == validation  # 31: the start token
    assert chunks["calibration"] and chunks["evaluation"]


def test_targets_are_masked_beyond_each_row_and_over_context(built):
    _, entries = built
    data = CachedSessions(entries, 29, "train", shuffle=False, max_seq_length=40, window_context=8)
    for batch, _ in data.batches(32):
        _, targets = batch_to_device(batch, "cpu")
        for row, (length, context) in enumerate(zip(batch["lengths"].tolist(), batch["context"].tolist())):
            assert (targets[row, length:] == IGNORE_INDEX).all()
            assert (targets[row, :context] == IGNORE_INDEX).all()
            assert (targets[row, context:length] != IGNORE_INDEX).all()


def test_a_file_named_twice_is_read_once(tmp_path):
    data = make_data(tmp_path)
    once = build_caches(data, settings_of(29), tmp_path / "cache", workers=1)
    twice = build_caches([data, data / "b.jsonl"], settings_of(29), tmp_path / "cache", workers=1)
    assert twice == once


def test_a_file_that_changes_while_it_is_read_is_refused(tmp_path, monkeypatch):
    data = make_data(tmp_path)
    real_run = cache._run

    def run_then_append(*args):
        yield from real_run(*args)
        with open(data / "c.txt", "a") as handle:   # a copy still in progress
            handle.write("1 2 3\n")
    monkeypatch.setattr(cache, "_run", run_then_append)
    with pytest.raises(DataError, match="c.txt: changed while it was being read"):
        build_caches(data, settings_of(29), tmp_path / "cache", workers=1)
    assert not list((tmp_path / "cache").glob("c.txt*"))  # the other files, unchanged, keep their entries


def test_concurrent_builders_wait_for_each_other(tmp_path):
    import threading
    data = make_data(tmp_path)
    results, errors = [], []

    def build():
        try:
            results.append(build_caches(data, settings_of(29), tmp_path / "cache", workers=1))
        except Exception as error:  # noqa: BLE001 - any failure fails the test below
            errors.append(error)
    threads = [threading.Thread(target=build) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors and len(results) == 3 and results[0] == results[1] == results[2]
    assert CachedSessions(results[0], 29, "all", shuffle=False).count()["sessions"] > 0


def test_an_unusable_cache_dir_is_one_clear_error(tmp_path):
    data = make_data(tmp_path)
    (tmp_path / "occupied").write_text("a file, not a folder")
    with pytest.raises(DataError, match=r"token cache .*occupied \(lazy_loading.cache_dir\)"):
        build_caches(data, settings_of(29), tmp_path / "occupied")


def test_negative_seeds_shuffle_too(built):
    _, entries = built
    data = CachedSessions(entries, 29, "train", seed=-5)
    data.set_epoch(1)
    assert sum(len(b["lengths"]) for b, _ in data.batches(16)) == data.total_windows


def test_evaluation_caches_hold_every_64_bit_id_exactly(tmp_path):
    """Evaluation data may hold IDs no model has (scored as unknown): its cache keeps them, up to 2**63-1."""
    (tmp_path / "x.jsonl").write_text('{"event_ids": [1, 2]}\n'
                                      '{"event_ids": [4294967301, 9223372036854775807]}\n')
    entries = build_caches(tmp_path / "x.jsonl", settings_of(None), tmp_path / "cache")
    sessions = [s for chunk in session_chunks(entries, "all") for s in chunk]
    assert sessions == [(1, 2), (4294967301, 2 ** 63 - 1)]


def test_a_read_only_cache_of_complete_entries_is_used_and_one_with_gaps_is_one_error(tmp_path, monkeypatch,
                                                                                    caplog):
    """A cache folder this user may not write (shared, read-only) needs no build lock when nothing is to be
    built: its complete entries are used as they are, the window indexes go to a private folder, and the
    batches equal those of a writable cache. With an entry missing: one error saying what to do."""
    data = make_data(tmp_path)
    cache_dir = tmp_path / "cache"
    entries = build_caches(data, settings_of(29), cache_dir, workers=1)
    writable = CachedSessions(entries, 29, "train", shuffle=False, max_seq_length=40, window_context=8)
    expected = rows_of(writable.batches(16))
    before = sorted(p.name for p in cache_dir.rglob("*"))
    monkeypatch.setattr(cache, "writable", lambda folder: False)
    monkeypatch.setattr(batches, "writable", lambda folder: False)
    monkeypatch.setattr(batches, "_private_folder", lambda: (tmp_path / "private").mkdir(exist_ok=True) or
                        tmp_path / "private")
    caplog.set_level(logging.INFO)
    assert build_caches(data, settings_of(29), cache_dir, workers=1) == entries
    assert "(read-only)" in caplog.text
    read_only = CachedSessions(entries, 29, "train", shuffle=False, max_seq_length=48, window_context=8)
    assert rows_of(read_only.batches(16)) == expected   # sessions under 40 events: the same windows
    assert sorted(p.name for p in cache_dir.rglob("*")) == before        # nothing written there
    assert list((tmp_path / "private").glob("*.json"))                   # the new window index, privately
    (data / "d.txt").write_text("1 2 3\n")
    with pytest.raises(DataError, match=r"is read-only and the entry of .*d\.txt is absent: point "
                                        r"lazy_loading\.cache_dir at a folder"):
        build_caches(data, settings_of(29), cache_dir, workers=1)


def test_one_entry_is_one_entry(tmp_path, caplog):
    data = tmp_path / "one.txt"
    data.write_text("1 2 3\n")
    caplog.set_level(logging.INFO, logger="deeplog")
    build_caches(data, settings_of(29), tmp_path / "cache", workers=1)
    build_caches(data, settings_of(29), tmp_path / "cache", workers=1)
    assert "built 1 of 1 entry in" in caplog.text and "reusing 1 entry in" in caplog.text


def test_a_second_ctrl_c_during_the_clean_up_still_removes_the_temp_folders(tmp_path, monkeypatch):
    """Ctrl-C while a file is parsed, and again while the build removes its temp folders: none is left,
    and the first signal's stop is what comes out."""
    import shutil
    import signal

    import utils
    data = make_data(tmp_path)

    def interrupted(_task):
        os.kill(os.getpid(), signal.SIGINT)   # the first Ctrl-C, mid-build
        raise AssertionError("not stopped")

    def rmtree(path, *args, real=shutil.rmtree, **kwargs):
        os.kill(os.getpid(), signal.SIGINT)   # the second, while the temp folders go
        return real(path, *args, **kwargs)
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        utils.StopSignal(raise_now=True)
        monkeypatch.setattr(cache, "_build_part", interrupted)
        monkeypatch.setattr(shutil, "rmtree", rmtree)
        try:
            build_caches(data, settings_of(29), tmp_path / "cache", workers=1)
        except BaseException as error:   # (a KeyboardInterrupt: the clean-up was cut short)
            raised = error
    finally:
        monkeypatch.undo()
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
    assert isinstance(raised, utils.Stopped), repr(raised)
    assert [p.name for p in (tmp_path / "cache").iterdir()] == [".build.lock"]
