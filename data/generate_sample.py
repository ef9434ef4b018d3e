"""Generate data/sample: a synthetic HDFS-like block lifecycle, in every supported input format.

Examples:

    python data/generate_sample.py                     # rewrites data/sample (seeded, reproducible)
    python data/generate_sample.py --out /tmp/sample --normal 20000 --abnormal 2000

Event keys (IDs 1..17 of vocab_size 29; 0 and 18..28 unused, as in real parsed logs):
  1 allocateBlock           2 receiving block from src   3 received block (size)
  4 PacketResponder ends    5 addStoredBlock             6 verification succeeded
  7 served block            8 ask to replicate           9 starting transfer thread
 10 transmitted block      11 ask to delete             12 deleting block file
 13 deleted block file     14 write exception (error)   15 checksum mismatch (error)
 16 block corrupt (error)  17 responder interrupted (error)

Normal: allocate; receive from 2-3 sources; for each source received + responder-ends (in any order);
addStoredBlock per replica; then 0-6 reads, some verified; maybe a re-replication (ask, thread,
transmitted, addStoredBlock); maybe a deletion (ask, then deleting + deleted per replica).
Abnormal: missing, extra (error events or a duplicated step), reordered or truncated sessions.

Layout written:
  train/part-000.json      top-level JSON array of {"session_id", "event_ids"}
  train/part-001.json.gz   gzipped JSON object {"sessions": [...]}
  train/part-002.jsonl     one object per line, with labels: 300 abnormal sessions that training skips
                           and the evaluation after training uses
  train/part-003.txt       DeepLog text: space-separated IDs, one session per line
  abnormal/abnormal.jsonl  labelled abnormal sessions (label 1, "anomaly" says which kind)
  new/sessions.jsonl       unlabelled mix of normal and abnormal sessions for `evaluate.py --detect`
"""
from __future__ import annotations

import argparse
import gzip
import json
import random
from pathlib import Path


def normal_session(rng: random.Random) -> list[int]:
    replicas = rng.choice([2, 3, 3, 3])
    events = [1] + [2] * replicas
    acks = [3, 4] * replicas
    for _ in range(replicas):  # each source's "received" may race its responder's end
        i = rng.randrange(0, len(acks) - 1, 2)
        if rng.random() < 0.3:
            acks[i], acks[i + 1] = acks[i + 1], acks[i]
    events += acks + [5] * replicas
    for _ in range(rng.choice([0, 0, 1, 2, 3, 6])):
        events.append(7)
        if rng.random() < 0.3:
            events.append(6)
    if rng.random() < 0.2:
        events += [8, 9, 10, 5]
    if rng.random() < 0.5:
        events += [11] + [12] * replicas + [13] * replicas
    return events


def abnormal_session(rng: random.Random) -> tuple[list[int], str]:
    events = normal_session(rng)
    kind = rng.choice(["missing", "extra", "reordered", "truncated"])
    if kind == "missing":
        removable = [i for i, e in enumerate(events) if e in (1, 3, 5, 9, 12)]
        del events[rng.choice(removable)]
    elif kind == "extra":
        position = rng.randrange(1, len(events))
        events.insert(position, rng.choice([14, 15, 16, 17, 1, 10]))
    elif kind == "reordered":
        while True:  # swap two different keys, one from each half
            i, j = rng.randrange(0, len(events) // 2), rng.randrange(len(events) // 2, len(events))
            if events[i] != events[j]:
                break
        events[i], events[j] = events[j], events[i]
    else:  # stops before the last addStoredBlock: never a complete normal prefix
        last_stored = max(i for i, e in enumerate(events) if e == 5)
        events = events[:rng.randrange(2, last_stored)]
    return events, kind


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=str(Path(__file__).parent / "sample"), help="output directory")
    parser.add_argument("--normal", type=int, default=3000, help="normal training sessions")
    parser.add_argument("--abnormal", type=int, default=400, help="abnormal sessions in abnormal/")
    parser.add_argument("--labelled-abnormal", type=int, default=300,
                        help="abnormal sessions (label 1) mixed into train/part-002.jsonl")
    parser.add_argument("--seed", type=int, default=7, help="random seed")
    args = parser.parse_args()
    rng = random.Random(args.seed)
    out = Path(args.out)
    (out / "train").mkdir(parents=True, exist_ok=True)
    (out / "abnormal").mkdir(parents=True, exist_ok=True)
    (out / "new").mkdir(parents=True, exist_ok=True)

    sessions = [{"session_id": f"blk_{i:06d}", "event_ids": normal_session(rng)} for i in range(args.normal)]
    quarter = len(sessions) // 4
    with open(out / "train" / "part-000.json", "w") as handle:
        json.dump(sessions[:quarter], handle, separators=(",", ":"))
    with gzip.open(out / "train" / "part-001.json.gz", "wt") as handle:
        json.dump({"sessions": sessions[quarter:2 * quarter]}, handle, separators=(",", ":"))
    with open(out / "train" / "part-002.jsonl", "w") as handle:
        for session in sessions[2 * quarter:3 * quarter]:
            handle.write(json.dumps({**session, "label": 0}) + "\n")
        for i in range(args.labelled_abnormal):
            events, kind = abnormal_session(rng)
            handle.write(json.dumps({"session_id": f"blk_bad_{i:04d}", "event_ids": events, "label": 1,
                                     "anomaly": kind}) + "\n")
    with open(out / "train" / "part-003.txt", "w") as handle:
        for session in sessions[3 * quarter:]:
            handle.write(" ".join(map(str, session["event_ids"])) + "\n")
    with open(out / "abnormal" / "abnormal.jsonl", "w") as handle:
        for i in range(args.abnormal):
            events, kind = abnormal_session(rng)
            handle.write(json.dumps({"session_id": f"blk_abn_{i:05d}", "event_ids": events, "label": 1,
                                     "anomaly": kind}) + "\n")
    with open(out / "new" / "sessions.jsonl", "w") as handle:
        for i in range(200):
            events = abnormal_session(rng)[0] if rng.random() < 0.1 else normal_session(rng)
            handle.write(json.dumps({"session_id": f"blk_new_{i:05d}", "event_ids": events}) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
