"""Results written as they come: one JSON line per (kind, image, eps), appended and flushed at once.

A crash or Ctrl-C loses at most the batch in flight; `--resume` reads every record file of the output
folder, skips what is there and appends the rest. Each process of a distributed run appends to its own
file, so no two writers share one; the summary reads them all.
"""
import json
import math
from pathlib import Path

CONFIG_FILE = "config.json"
RECORDS_DIR = "records"
# Settings that may change between a run and its resumption without changing any result already written.
RESUMABLE_CHANGES = ("n_images", "batch_size", "eot_chunk", "checkpoint_blocks", "device")


def verdicts(votes, label):
    """(right on every vote, right by majority): the label must have more votes than any other class, so a tie
    is wrong whatever the classes' indices (records written before this rule broke ties toward the smaller
    class index; `RecordStore.read_all` recomputes both from the votes)."""
    others = max((votes.count(c) for c in set(votes) if c != label), default=0)
    return all(v == label for v in votes), votes.count(label) > others


def eps_key(eps):
    """JSON-safe eps (math.inf, the unbounded attack, becomes the string "inf"), rounded to 1e-9."""
    return "inf" if math.isinf(eps) else round(float(eps), 9)


class RecordStore:
    def __init__(self, out_dir, rank=0, world_size=1):
        self.out_dir = Path(out_dir)
        self.records_dir = self.out_dir / RECORDS_DIR
        self.path = self.records_dir / f"rank{rank}-of-{world_size}.jsonl"

    def prepare(self, config, resume):
        """Creates the folder and config.json; on resume, checks that the configuration is the same."""
        config_path = self.out_dir / CONFIG_FILE
        self.records_dir.mkdir(parents=True, exist_ok=True)
        if config_path.is_file():
            stored = json.loads(config_path.read_text())
            if not resume:
                if any(self.records_dir.glob("*.jsonl")):
                    raise FileExistsError(f"{self.out_dir} already holds results: pass --resume to continue that "
                                          "evaluation, or choose another --out")
            else:
                _check_same_config(stored, config, config_path)
        if not config_path.is_file() or not resume:
            config_path.write_text(json.dumps(config, indent=2))

    def read_all(self):
        """Every record of every process, in file order; a truncated last line (a crash mid-write) is dropped."""
        records = []
        for path in sorted(self.records_dir.glob("*.jsonl")):
            for line in path.read_text().splitlines():
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if "votes" in record:
                    record["correct_all"], record["correct_majority"] = verdicts(record["votes"], record["label"])
                records.append(record)
        return records

    def read_first(self, n_images):
        """The records of the first n_images images: a run resumed with a smaller --n-images than an earlier one
        wrote is summarised over the images asked for."""
        return [r for r in self.read_all() if r["index"] < n_images]

    def done_keys(self):
        return {record_key(r) for r in self.read_all()}

    def append(self, records):
        with open(self.path, "a+b") as f:
            if f.tell() > 0:
                f.seek(-1, 2)
                if f.read(1) != b"\n":  # a line cut short by a crash: leave it alone on its own line
                    f.write(b"\n")
        with open(self.path, "a") as f:
            for r in records:
                f.write(json.dumps(r) + "\n")
            f.flush()


def record_key(record):
    return record["kind"], record["index"], record["eps"]


def _check_same_config(stored, config, path):
    config = json.loads(json.dumps(config))  # tuples become lists, as in the stored file
    changed = sorted(k for k in set(stored) | set(config)
                     if k not in RESUMABLE_CHANGES and stored.get(k) != config.get(k))
    if changed:
        details = ", ".join(f"{k}: {stored.get(k)!r} -> {config.get(k)!r}" for k in changed)
        raise ValueError(f"--resume with another configuration than {path} ({details}); use the same settings "
                         "or another --out")
