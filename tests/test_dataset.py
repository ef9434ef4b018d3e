"""Parsing of every input format, every bad-input case, the split, windowing, padding and positions."""
import gzip
import json
import os
import re

import numpy as np
import pytest

from dataset import (
    APART,
    CALIBRATION,
    EVALUATION,
    TRAIN,
    DataError,
    SessionDataset,
    collate,
    is_validation,
    iter_session_arrays,
    iter_sessions,
    list_data_files,
    make_windows,
    skip_hint,
    split_classes,
    split_draws,
)
from tokens import IGNORE_INDEX, special_tokens

SESSIONS = [[1, 2, 3], [4, 5], [6]]


def ids(path, **options):
    return [r.event_ids for r in iter_sessions(path, **options)]


@pytest.mark.parametrize("gz", [False, True])
@pytest.mark.parametrize("fmt", ["array", "object", "jsonl", "text", "text_noext"])
def test_every_format_reads_the_same_sessions(tmp_path, fmt, gz):
    objects = [{"event_ids": s, "session_id": f"s{i}"} for i, s in enumerate(SESSIONS)]
    name, text = {
        "array": ("x.json", json.dumps(objects)),
        "object": ("x.json", json.dumps({"sessions": objects, "meta": {"n": 3}})),
        "jsonl": ("x.jsonl", "\n".join(json.dumps(o) for o in objects) + "\n\n"),
        "text": ("x.txt", "1 2 3\n4  5\n\n6\n"),
        "text_noext": ("hdfs_like", "1 2 3\n4 5\n6\n"),
    }[fmt]
    path = tmp_path / (name + (".gz" if gz else ""))
    if gz:
        with gzip.open(path, "wt") as handle:
            handle.write(text)
    else:
        path.write_text(text)
    records = list(iter_sessions(path, vocab_size=7))
    assert [r.event_ids for r in records] == SESSIONS
    assert all(r.label == 0 for r in records)
    if fmt in ("array", "object", "jsonl"):
        assert [r.session_id for r in records] == ["s0", "s1", "s2"]


def test_directory_is_read_in_sorted_order_and_skips_other_files(tmp_path):
    (tmp_path / "b.txt").write_text("4 5\n")
    (tmp_path / "a.jsonl").write_text(json.dumps({"event_ids": [1]}) + "\n")
    (tmp_path / "README.md").write_text("# not data\n")
    (tmp_path / ".hidden").write_text("9 9\n")
    assert [p.name for p in list_data_files(tmp_path)] == ["a.jsonl", "b.txt"]
    assert ids(tmp_path) == [[1], [4, 5]]


def test_configurable_field_names_and_array_key(tmp_path):
    path = tmp_path / "x.json"
    path.write_text(json.dumps({"data": [{"keys": [3, 4], "y": 1, "blk": "b1"}]}))
    record, = iter_sessions(path, event_ids_field="keys", label_field="y", session_id_field="blk",
                            json_array_key="data")
    assert (record.event_ids, record.label, record.session_id) == ([3, 4], 1, "b1")


BAD = [
    ("x.json", '[{"event_ids": [1, 2]}, {"event_ids": [1, 2}]', "record 2"),
    ("x.jsonl", '{"event_ids": [1]}\n{"event_ids": [1,\n', "line 2"),
    ("x.jsonl", '{"event_ids": [1, "a"]}\n', "'a' is not an integer"),
    ("x.jsonl", '{"event_ids": [1, 2.5]}\n', "2.5 is not an integer"),
    ("x.jsonl", '{"event_ids": [1, true]}\n', "True is not an integer"),
    ("x.jsonl", '{"event_ids": [1, -3]}\n', "-3 is negative"),
    ("x.jsonl", '{"event_ids": [1, 2]}\n{"event_ids": [1, 50]}\n', "line 2: event ID 50 >= vocab_size 29"),
    ("x.jsonl", '{"events": [1]}\n', "missing field 'event_ids'"),
    ("x.jsonl", '{"event_ids": "1 2"}\n', "must be a list"),
    ("x.jsonl", '{"event_ids": []}\n', "empty session"),
    ("x.jsonl", '{"event_ids": [1], "label": 2}\n', "must be 0 (normal) or 1"),
    ("x.jsonl", '[1, 2]\n', "expected a session object"),
    ("x.txt", "1 2\n3 x 4\n", "line 2: 'x' is not an integer"),
    ("x.txt", "1 2\n3 --5\n", "line 2: '--5' is not an integer"),
    ("x.txt", "1 2\n1 \u00b2\n", "line 2: '\u00b2' is not an integer"),
    ("x.txt", "1 2\n+3 4\n", "line 2: '+3' is not an integer"),  # int() takes these three
    ("x.txt", "1 2\n1_0 4\n", "line 2: '1_0' is not an integer"),
    ("x.txt", "1 2\n\u0661 4\n", "line 2: '\u0661' is not an integer"),  # an Arabic-Indic digit one
    ("x.txt", "1 2\n3 -5\n", "line 2: event ID -5 is negative"),
    ("x.jsonl", '{"event_ids": [1, 2], "times": [1.5]}\n', 'line 1: "times" must be a list of one time per'),
    ("x.jsonl", '{"event_ids": [1], "times": ["noon"]}\n', "\"times\" holds 'noon', not a finite number"),
    ("x.json", '[{"event_ids": [1, 2], "values": [[1], [2, "x"]]}]', "record 1: \"values\" holds [2, 'x']"),
    ("x.jsonl", '{"event_ids": [1], "values": [[1, 2, 3, 4, 5]]}\n', "not a list of at most 4 finite"),
    ("x.jsonl", '{"event_ids": [1], "values": [[1e999]]}\n', "not a list of at most 4 finite numbers"),
    ("x.json", '{"other": []}', "no session array found"),
    ("x.json", "   ", "empty file"),
]


@pytest.mark.parametrize("name,content,message", BAD)
def test_bad_input_names_file_and_record(tmp_path, name, content, message):
    """Every bad record (the optional "times" and "values" of the parameter model too) stops the read with
    one message naming file and record."""
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(DataError) as error:
        ids(path, vocab_size=29)
    assert str(path) in str(error.value)
    assert message in str(error.value)


@pytest.mark.parametrize("name,line", [("x.jsonl", '{{"event_ids": [1, {}]}}'), ("x.txt", "3 {}")])
def test_an_event_id_beyond_64_bits_is_named_where_any_id_is_allowed(tmp_path, name, line):
    """Detection reads IDs of any size (one the model never saw is scored as unknown), up to int64's."""
    path = tmp_path / name
    path.write_text(line.format(2 ** 63 - 1) + "\n")
    assert ids(path, vocab_size=None)[0][-1] == 2 ** 63 - 1
    path.write_text(line.format(2 ** 63 - 1) + "\n" + line.format(2 ** 63) + "\n")
    with pytest.raises(DataError, match=re.escape(f"{path}: line 2: event ID 9223372036854775808 is too "
                                                  "large (IDs are 64-bit integers)")):
        ids(path, vocab_size=None)


@pytest.mark.parametrize("name,content", [("x.json.gz", b"not gzip at all"),
                                          ("x.jsonl.gz", b"\x1f\x8b\x08garbage"),
                                          ("x.txt", b"1 2\n\xff\xfe\x00binary\n")])
def test_unreadable_files_are_data_errors(tmp_path, name, content):
    (tmp_path / name).write_bytes(content)
    with pytest.raises(DataError, match=f"{name}: unreadable"):
        ids(tmp_path / name)


def test_missing_path_and_empty_directories(tmp_path):
    with pytest.raises(DataError, match="no such file"):
        list_data_files(tmp_path / "nope")
    with pytest.raises(DataError, match="no readable data file"):
        list_data_files(tmp_path)
    (tmp_path / "notes.md").write_text("x")
    with pytest.raises(DataError, match="no readable data file"):
        list_data_files(tmp_path)


def test_a_fifo_or_a_device_as_data_is_one_line_saying_what_it_is(tmp_path):
    fifo = tmp_path / "pipe.jsonl"
    os.mkfifo(fifo)
    with pytest.raises(DataError, match=r"pipe.jsonl is a FIFO \(named pipe\), not a regular file: the "
                                        r"token cache needs a file it can read twice .*to a file first"):
        list_data_files(fifo)
    with pytest.raises(DataError, match="^/dev/null is a character device, not a regular file"):
        list_data_files("/dev/null")
    with pytest.raises(DataError, match="FIFO"):
        list(iter_sessions(fifo, 29))   # never opened: it would wait for a writer
    (tmp_path / "a.jsonl").write_text('{"event_ids": [1]}\n')   # a folder of data with the pipe among it
    with pytest.raises(DataError, match=re.escape(f"{fifo} is a FIFO (named pipe), not a regular file: the "
                                                  "data folder must hold files only")):
        list_data_files(tmp_path)
    fifo.unlink()
    assert list_data_files(tmp_path) == [tmp_path / "a.jsonl"]


def test_the_skip_bad_records_hint_only_where_that_flag_is_off_and_would_skip(tmp_path):
    records = tmp_path / "x.jsonl"
    records.write_text('{"event_ids": [1]}\n{"event_ids": [99]}\n')
    for read in (lambda: list(iter_sessions(records, 29)), lambda: list(iter_session_arrays(records, 29))):
        with pytest.raises(DataError, match="line 2") as bad_record:
            read()
        assert skip_hint(bad_record.value, False) == " (--skip-bad-records skips such records)"
        assert skip_hint(bad_record.value, True) == ""   # given already: never suggested again
    damaged = tmp_path / "y.json"
    damaged.write_text('[{"event_ids": [1]}, {"event_ids": [2')
    for skip in (False, True):   # a damaged file is not a bad record: the flag would not skip it
        with pytest.raises(DataError, match="malformed JSON") as bad_file:
            list(iter_sessions(damaged, 29, skip_bad_records=skip))
        assert skip_hint(bad_file.value, skip) == ""


def test_skip_bad_records_counts_them(tmp_path):
    path = tmp_path / "x.jsonl"
    path.write_text('{"event_ids": [1]}\n{"event_ids": [99]}\n{"event_ids": [2]}\n{"event_ids": []}\n')
    counters = {}
    assert ids(path, vocab_size=29, skip_bad_records=True, counters=counters) == [[1], [2]]
    assert counters["bad_records"] == 2
    assert "line 2" in counters["first_bad_record"]


def test_validation_split_is_deterministic_disjoint_and_near_the_fraction(tmp_path):
    path = tmp_path / "x.txt"
    path.write_text("".join(f"{i % 7} {i % 5}\n" for i in range(2000)))
    common = dict(vocab_size=29, validation_split=0.2, seed=3, shuffle=False)
    train = SessionDataset(path, split="train", **common)
    val = SessionDataset(path, split="val", **common)
    train_ids = [r for r in range(1, 2001) if not is_validation(str(path), r, 3, 0.2)]
    assert 0.17 < 1 - len(train_ids) / 2000 < 0.23
    assert train.count()["sessions"] + val.count()["sessions"] == 2000
    assert train.count()["sessions"] == len(train_ids)
    # the same sessions every time, and another seed gives another split
    assert [is_validation(str(path), r, 3, 0.2) for r in range(1, 200)] == \
        [is_validation(str(path), r, 3, 0.2) for r in range(1, 200)]
    assert [is_validation(str(path), r, 4, 0.2) for r in range(1, 200)] != \
        [is_validation(str(path), r, 3, 0.2) for r in range(1, 200)]


def test_training_skips_abnormal_sessions_and_counts_them(tmp_path):
    path = tmp_path / "x.jsonl"
    path.write_text("".join(json.dumps({"event_ids": [1, 2], "label": i % 3 == 0}).replace("true", "1")
                            .replace("false", "0") + "\n" for i in range(30)))
    counts = SessionDataset(path, 29, split="all", shuffle=False).count()
    assert (counts["sessions"], counts["abnormal_skipped"]) == (20, 10)


def test_short_session_is_one_window_with_start_and_end():
    end_id, _, start_id, _ = special_tokens(29)
    assert make_windows([5, 6, 7], 29, 8, 2) == [([start_id, 5, 6, 7], [5, 6, 7, end_id])]


@pytest.mark.parametrize("length,max_len,context", [(20, 8, 3), (7, 8, 0), (30, 10, 9), (8, 8, 2)])
def test_long_sessions_are_windowed_and_every_prediction_counts_once(length, max_len, context):
    events = list(range(length))
    windows = make_windows(events, 29, max_len, context)
    assert all(len(inputs) <= max_len and len(inputs) == len(targets) for inputs, targets in windows)
    counted = [t for _, targets in windows for t in targets if t != IGNORE_INDEX]
    assert counted == events + [29]
    end_id, _, start_id, _ = special_tokens(29)
    stream = [start_id] + events
    stride = max_len - context
    for k, (inputs, targets) in enumerate(windows):
        assert inputs == stream[k * stride:k * stride + max_len]  # later windows re-read `context` inputs
        if k:
            assert targets[:context] == [IGNORE_INDEX] * context


def test_collate_pads_inputs_and_masks_targets():
    batch = collate([([30, 1, 2], [1, 2, 29]), ([30], [29])], pad_id=30)
    assert batch["input_ids"].tolist() == [[30, 1, 2], [30, 30, 30]]
    assert batch["targets"].tolist() == [[1, 2, 29], [29, IGNORE_INDEX, IGNORE_INDEX]]
    assert batch["lengths"].tolist() == [3, 1]


def test_shuffle_is_seeded_per_epoch_and_batches_resume_at_their_position(tmp_path):
    path = tmp_path / "x.txt"
    path.write_text("".join(f"{i % 20} {(i * 7) % 20}\n" for i in range(300)))
    data = SessionDataset(path, 29, split="all", shuffle=True, buffer_size=50, seed=1)
    data.set_epoch(1)
    first = list(data)
    assert list(data) == first                       # the same epoch replays identically
    data.set_epoch(2)
    assert list(data) != first and sorted(list(data)) == sorted(first)   # a new order, same samples
    data.set_epoch(1)
    full = [(b["input_ids"].tolist(), pos) for b, pos in data.batches(32)]
    assert [pos for _, pos in full] == list(range(1, 11))  # 300 samples: 9 full batches and one of 12
    resumed = [(b["input_ids"].tolist(), pos) for b, pos in data.batches(32, start_batch=4)]
    assert resumed == full[4:]


def test_ranks_take_disjoint_equal_shards(tmp_path):
    path = tmp_path / "x.txt"
    path.write_text("".join(f"{i}\n" for i in range(25)))
    shards = [list(SessionDataset(path, 29, split="all", shuffle=False, rank=r, world_size=2,
                                  samples_per_rank=12)) for r in range(2)]
    firsts = [[inputs[1] for inputs, _ in shard] for shard in shards]
    assert len(firsts[0]) == len(firsts[1]) == 12
    assert not set(firsts[0]) & set(firsts[1])


def test_iter_sessions_streams_json_without_reading_it_whole(tmp_path, monkeypatch):
    """ijson pulls the file in chunks: the first record arrives before the file is read to the end."""
    path = tmp_path / "big.json"
    path.write_text("[" + ",".join(json.dumps({"event_ids": [i % 29]}) for i in range(50000)) + "]")
    reads = []
    real_open = open

    class Spy:
        def __init__(self, handle):
            self.handle = handle

        def read(self, n=-1):
            reads.append(n)
            return self.handle.read(n)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.handle.close()

    import dataset
    monkeypatch.setattr(dataset, "open", lambda p, mode="r": Spy(real_open(p, mode)), raising=False)
    first = next(iter_sessions(path))
    assert first.event_ids == [0]
    assert -1 not in reads and sum(reads) < path.stat().st_size / 4


def test_ranks_shard_by_file_when_there_are_enough_files(tmp_path):
    from dataset import merge_counts
    for name, first in (("a.txt", 0), ("b.txt", 10), ("c.txt", 20)):
        (tmp_path / name).write_text("".join(f"{first + i} {i}\n" for i in range(3 + first // 10)))
    shards = [SessionDataset(tmp_path, 29, split="all", shuffle=False, rank=r, world_size=2)
              for r in range(2)]
    assert [[f.name for f in s.files] for s in shards] == [["a.txt", "c.txt"], ["b.txt"]]
    firsts = [sorted(inputs[1] for inputs, _ in shard) for shard in shards]
    assert firsts == [[0, 1, 2, 20, 21, 22, 23, 24], [10, 11, 12, 13]]   # disjoint, every session once
    merged = merge_counts([s.count() for s in shards], disjoint=True)
    assert (merged["sessions"], merged["windows"], merged["windows_per_rank"]) == (12, 12, 4)
    whole = SessionDataset(tmp_path, 29, split="all", shuffle=False).count()
    assert merged["seen_targets"] == whole["seen_targets"] and merged["event_sets"] == whole["event_sets"]
    assert len(whole["event_pairs"]) and np.array_equal(merged["event_pairs"], whole["event_pairs"])
    assert merge_counts([whole, whole], disjoint=False)["windows_per_rank"] == 6


def _three_files(tmp_path):
    for n, name in enumerate(("a.txt", "b.jsonl", "c.json")):
        sessions = [[(n * 7 + i) % 29, i % 29, (i * 3) % 29] for i in range(40 + 25 * n)]
        if name.endswith(".txt"):
            (tmp_path / name).write_text("".join(" ".join(map(str, s)) + "\n" for s in sessions))
        elif name.endswith(".jsonl"):
            (tmp_path / name).write_text("".join(json.dumps({"event_ids": s}) + "\n" for s in sessions))
        else:
            (tmp_path / name).write_text(json.dumps([{"event_ids": s} for s in sessions]))


def test_reader_processes_give_a_deterministic_order_of_the_same_samples(tmp_path):
    _three_files(tmp_path)
    sequential = SessionDataset(tmp_path, 29, split="train", buffer_size=30, seed=5)
    parallel = SessionDataset(tmp_path, 29, split="train", buffer_size=30, seed=5, num_workers=2)
    assert parallel.num_workers == 2
    parallel.set_epoch(3)
    first = [b["input_ids"].tolist() for b, _ in parallel.batches(16)]
    assert first == [b["input_ids"].tolist() for b, _ in parallel.batches(16)]          # replays exactly
    assert [b["input_ids"].tolist() for b, _ in parallel.batches(16, start_batch=3)] == first[3:]
    def samples(batches):
        return sorted(str([i for i in row if i != 30]) for b, _ in batches for row in b["input_ids"].tolist())
    assert samples(parallel.batches(16)) == samples(sequential.batches(16))               # same samples
    counted, expected = parallel.count(), sequential.count()
    assert np.array_equal(counted.pop("event_pairs"), expected.pop("event_pairs"))
    assert counted == {**expected, "first_bad_record": None}


def test_bad_data_in_a_reader_process_is_one_clear_error(tmp_path):
    _three_files(tmp_path)
    (tmp_path / "b.jsonl").write_text('{"event_ids": [1]}\n{"event_ids": [1, 99]}\n')
    parallel = SessionDataset(tmp_path, 29, split="all", num_workers=2)
    for run in (lambda: list(parallel.batches(8)), parallel.count):
        with pytest.raises(DataError) as error:
            run()
        assert str(error.value) == f"{tmp_path / 'b.jsonl'}: line 2: event ID 99 >= vocab_size 29 " \
                                   f"(raise model.vocab_size)"


@pytest.mark.parametrize("name,content,message", BAD)
def test_the_fast_first_pass_names_the_same_bad_record(tmp_path, name, content, message):
    """iter_session_arrays checks chunks at C speed; a bad record still gets iter_sessions' exact message."""
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(DataError) as fast:
        list(iter_session_arrays(path, vocab_size=29))
    with pytest.raises(DataError) as slow:
        ids(path, vocab_size=29)
    assert str(fast.value) == str(slow.value)


@pytest.mark.parametrize("chunk_records", [1, 2, 1024])
@pytest.mark.parametrize("name,content", [
    ("x.json", json.dumps([{"event_ids": [1, 0, 2], "label": 1}, {"event_ids": [3]}, {"x": 1},
                           {"event_ids": [0, 1]}])),
    ("x.jsonl", '{"event_ids": [1, 0, 2], "label": 1}\n\n{"event_ids": [1, true]}\nnot json\n'
                '{"event_ids": [3]}\n'),
    ("x.txt", "1 2 3\n\n4 x\n5 6\n7 99\n"),
])
def test_the_fast_first_pass_equals_the_record_reader_and_skips_what_it_skips(tmp_path, name, content,
                                                                              chunk_records):
    path = tmp_path / name
    path.write_text(content)
    fast_counters, slow_counters = {}, {}
    chunks = list(iter_session_arrays(path, 29, skip_bad_records=True, counters=fast_counters,
                                      chunk_records=chunk_records))
    records = list(iter_sessions(path, 29, skip_bad_records=True, counters=slow_counters))
    lengths = [n for c in chunks for n in c.lengths.tolist()]
    assert [t for c in chunks for t in c.tokens.tolist()] == [e for r in records for e in r.event_ids]
    assert lengths == [len(r.event_ids) for r in records]
    assert [x for c in chunks for x in c.labels.tolist()] == [r.label for r in records]
    assert [x for c in chunks for x in c.indexes.tolist()] == [r.index for r in records]
    assert fast_counters["bad_records"] >= 1 and fast_counters["first_bad_record"]


def test_byte_ranges_cover_every_line_once_with_exact_line_numbers(tmp_path):
    path = tmp_path / "r.txt"
    path.write_text("".join(" ".join(str((i * 7 + k) % 29) for k in range(1 + i % 5)) + "\n"
                            + "\n" * (i % 3 == 0) for i in range(500)))
    data, size = path.read_bytes(), path.stat().st_size
    whole = [(a.tokens.tolist(), a.indexes.tolist()) for a in iter_session_arrays(path, 29)]
    for bounds in ([0, 1, size], [0, 100, 101, 2000, size], [0, size // 2, size]):
        tokens, indexes = [], []
        for begin, end in zip(bounds, bounds[1:]):
            first_line = data[:begin].count(b"\n") + 1
            for a in iter_session_arrays(path, 29, byte_range=(begin, end), first_line=first_line):
                tokens += a.tokens.tolist()
                indexes += a.indexes.tolist()
        assert tokens == [t for c, _ in whole for t in c] and indexes == [i for _, c in whole for i in c]


@pytest.mark.parametrize("name,content,message", [
    ("x.json", '[{"event_ids": [1, ' + "[" * 20 + "]" * 20 + "]}]",
     "record 1: event ID [[[...]]] is not an integer"),
    ("x.json", '[{"event_ids": [1, ' + "[" * 5000 + "]" * 5000 + "]}]",
     "JSON nested deeper than 32 levels within bytes 0-10,022"),
    ("x.json", "[" * 20000 + "]" * 20000, "JSON nested deeper than 32 levels"),
    ("x.jsonl", '{"event_ids": ' + "[" * 3000 + "]" * 3000 + "}\n",
     "line 1: malformed JSON: nested too deeply"),
    ("x.jsonl", '{"event_ids": [1, ' + "9" * 5000 + "]}\n", "...9999999999999999999 >= vocab_size 29"),
    ("x.json", '[{"event_ids": [1, ' + "9" * 5000 + "]}]",
     "malformed JSON after record 0 (at record 1): parse error"),
    ("x.json", '[{"event_ids": [1], "label": "' + "x" * 5000 + '"}]',
     "'label' must be 0 (normal) or 1 (abnormal)"),
], ids=["list nested 20 deep", "list nested 5000 deep", "brackets 20000 deep (ijson took 1 GB)",
        "JSONL line nested 3000 deep", "5000-digit ID in JSONL",
        "5000-digit ID in a JSON array (ijson crashed on it)", "5000-character label"])
def test_pathological_values_give_one_short_line(tmp_path, name, content, message):
    """Deep nesting and huge values: a bounded excerpt in one line, for both readers, never a traceback."""
    path = tmp_path / name
    path.write_text(content)
    for read in (lambda: ids(path, vocab_size=29), lambda: list(iter_session_arrays(path, vocab_size=29))):
        with pytest.raises(DataError) as error:
            read()
        assert message in str(error.value) and len(str(error.value)) < 300 and "\n" not in str(error.value)


def test_depth_bound_tracks_strings_and_escapes_across_any_block_boundaries():
    """The depth check sees the JSON ijson sees: brackets inside strings, escaped quotes and a backslash
    split from the character it escapes by a block boundary do not count, at any read size."""
    import io
    import random

    from dataset import MAX_JSON_DEPTH, _DepthBoundedReader

    # the JSON "a\\\"[[[...{\"}": escapes, brackets in a string
    tricky_id = '"a\\\\\\"' + "[" * 40 + '{\\"}' + '"'
    nested = "[" * MAX_JSON_DEPTH + "]" * MAX_JSON_DEPTH
    good = '{"sessions": [' + ", ".join([f'{{"session_id": {tricky_id}, "event_ids": [1, 2]}}'] * 50) + "]}"
    assert json.loads(good)["sessions"][0]["session_id"].count("[") == 40
    too_deep = good[:-2] + ', {"event_ids": ' + nested + "}]}"
    random.seed(0)
    for _ in range(200):
        size = random.randint(1, 64)
        reader = _DepthBoundedReader(io.BytesIO(good.encode()), "f.json")
        while reader.read(size):
            pass
        assert reader.depth == 0 and not reader.in_string
        reader = _DepthBoundedReader(io.BytesIO(too_deep.encode()), "f.json")
        with pytest.raises(DataError, match="nested deeper than 32"):
            while reader.read(size):
                pass


def test_dataset_cli_counts_per_file_and_in_total_without_calling_unlabelled_sessions_normal(tmp_path):
    from dataset import describe
    (tmp_path / "a.jsonl").write_text('{"event_ids": [1, 2], "label": 1}\n{"event_ids": [3, 4, 5]}\n')
    (tmp_path / "b.txt").write_text("1 2 3 4\n7\n")
    lines = list(describe(tmp_path, 29))
    assert lines[0].endswith("a.jsonl: 2 sessions, 1 labelled abnormal, 1 normal or unlabelled, length 2..3, "
                             "largest ID 5")
    assert lines[1].endswith("b.txt: 2 sessions, no labels (DeepLog text), length 1..4, largest ID 7")
    assert lines[2] == "total: 4 sessions in 2 files, 1 labelled abnormal"


@pytest.mark.parametrize("vocab_size", [40, 500])   # the bit-mask path (<= 63 types) and the general one
def test_co_occurrence_record_keeps_exact_pairs_past_the_set_cap(monkeypatch, vocab_size):
    """Past MAX_EVENT_SETS the sets are dropped but the pairs stay exact (those of the dropped sets included);
    past MAX_EVENT_PAIRS the pairs are dropped too. Given at once or session by session, the same record."""
    import itertools

    import rules
    rng = np.random.default_rng(vocab_size)
    sessions = [rng.integers(0, vocab_size // 4, rng.integers(0, 12)).tolist() for _ in range(3000)]
    expected = {a * vocab_size + b for s in sessions for a, b in itertools.combinations(sorted(set(s)), 2)}
    monkeypatch.setattr(rules, "MAX_EVENT_SETS", 50)
    monkeypatch.setattr(rules, "PAIR_SLICE", 97)          # many small slices
    whole, one_by_one = rules.CoOccurrenceRecorder(vocab_size), rules.CoOccurrenceRecorder(vocab_size)
    lengths = np.array([len(s) for s in sessions])
    for begin in range(0, len(sessions), 700):
        block = sessions[begin:begin + 700]
        whole.add(np.array([t for s in block for t in s], dtype=np.int64), lengths[begin:begin + 700])
    for session in sessions:
        one_by_one.add_session(session)
    for record in (whole.summary(), one_by_one.summary()):
        assert record["event_sets"] is None and record["event_pairs"].tolist() == sorted(expected)
    monkeypatch.setattr(rules, "MAX_EVENT_PAIRS", len(expected) - 1)
    capped = rules.CoOccurrenceRecorder(vocab_size)
    capped.add(np.array([t for s in sessions for t in s], dtype=np.int64), lengths)
    assert capped.summary()["event_pairs"] is None
    # selected sessions only; below the cap the sets are kept and the pairs follow from them
    few = rules.CoOccurrenceRecorder(vocab_size)
    few.add(np.array([1, 2, 3, 3, 4, 5], dtype=np.int64), np.array([3, 1, 2]), np.array([True, False, True]))
    assert few.summary()["event_sets"] == [[1, 2, 3], [4, 5]]
    assert few.summary()["event_pairs"].tolist() == [1 * vocab_size + 2, 1 * vocab_size + 3,
                                                     2 * vocab_size + 3, 4 * vocab_size + 5]


@pytest.mark.parametrize("overlap", [1, 3, 19])
def test_records_that_share_lines_are_never_on_two_sides_of_the_split(overlap):
    """Overlapping windows (data.overlap): no two records within `overlap` of each other are on different
    sides (training, calibration half, evaluation half); those at the seams are apart, and few."""
    indexes = np.arange(1, 20_001)
    sides = split_classes("w.jsonl", indexes, 42, 0.2, overlap)
    for distance in range(1, overlap + 1):
        a, b = sides[:-distance], sides[distance:]
        placed = (a != APART) & (b != APART)
        assert (a[placed] == b[placed]).all()
    held_out = np.isin(sides, (CALIBRATION, EVALUATION)).mean()
    assert 0.15 < held_out < 0.25 and (sides == CALIBRATION).any() and (sides == EVALUATION).any()
    assert 0 < (sides == APART).mean() < 0.06
    # without overlap: one draw per record, as before (checkpoints of older runs name the same sessions)
    plain = split_classes("w.jsonl", indexes, 42, 0.2)
    assert ((plain != TRAIN) == (split_draws("w.jsonl", indexes, 42) < 0.2)).all()
    assert not (plain == APART).any()


def test_times_and_values_are_read_where_present_and_absent_otherwise(tmp_path):
    path = tmp_path / "x.jsonl"
    path.write_text('{"event_ids": [1, 2], "times": [10.5, null], "values": [[200, 0.25], []]}\n'
                    '{"event_ids": [3]}\n')
    first, second = iter_sessions(path, vocab_size=29)
    assert (first.times, first.values) == ([10.5, None], [[200, 0.25], []])
    assert (second.times, second.values) == (None, None)
    arrays, = iter_session_arrays(path, vocab_size=29)   # the fast first pass takes them too
    assert arrays.tokens.tolist() == [1, 2, 3]
