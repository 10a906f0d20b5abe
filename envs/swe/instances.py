"""SWE-bench task instances: one typed record, read from any copy of a SWE-bench-schema dataset on disk.

Official rows (princeton-nlp / SWE-bench org datasets, swebench 5 task repos) and our factory's rows share
one schema; `SWEInstance` is that schema as a type, and `to_record` writes it back in the form
`swebench.harness.utils.make_test_spec` reads. Nothing here touches the network: a named benchmark is read
from a local copy or not at all.

    instances = load_instances("verified", repos=["astropy/astropy"], count=10)
    spec = make_test_spec(instances[0].to_record())   # the swebench harness grades it from here
"""

from __future__ import annotations

import json
import os
import random
import re
import shlex
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, NoReturn

from m2rl.rewards.grading import split_patch
from m2rl.rewards.paths import is_test_path
from swebench.harness.constants import END_TEST_OUTPUT, FAIL_ONLY_REPOS, START_TEST_OUTPUT, EvalType
from swebench.harness.log_parsers import PARSER_REGISTRY
from swebench.harness.log_parsers.python import MAP_REPO_TO_PARSER_PY
from swebench.task.checks import expected_image

__all__ = [
    "DEFAULT_TEST_CMD",
    "NAMED_DATASETS",
    "InstanceError",
    "SWEInstance",
    "dataset_name",
    "eval_script",
    "load_instances",
    "official_image_name",
    "test_files",
    "write_instances",
]

# -rA prints one "PASSED/FAILED <id>" line per test, which is what the pytest log parsers read;
# no:cacheprovider keeps .pytest_cache out of the repo so the tree stays as clean as the agent left it.
DEFAULT_TEST_CMD = "python -m pytest -rA -p no:cacheprovider"
REPO_DIR = "/testbed"  # where official images hold the repo; ours follow them
# Canonical name -> Hugging Face ids that may hold it in a local cache (the datasets moved from the
# princeton-nlp org to the SWE-bench org, so a cache may hold either).
NAMED_DATASETS: Mapping[str, tuple[str, ...]] = {
    "SWE-bench": ("SWE-bench/SWE-bench", "princeton-nlp/SWE-bench"),
    "SWE-bench_Verified": ("SWE-bench/SWE-bench_Verified", "princeton-nlp/SWE-bench_Verified"),
    "SWE-bench_Lite": ("SWE-bench/SWE-bench_Lite", "princeton-nlp/SWE-bench_Lite"),
}
_ALIASES = {
    "swebench": "SWE-bench", "full": "SWE-bench",
    "swebenchverified": "SWE-bench_Verified", "verified": "SWE-bench_Verified",
    "swebenchlite": "SWE-bench_Lite", "lite": "SWE-bench_Lite",
}
_REQUIRED = ("instance_id", "repo", "base_commit", "patch", "test_patch", "problem_statement",
             "FAIL_TO_PASS", "PASS_TO_PASS")
_TEST_LISTS = ("FAIL_TO_PASS", "PASS_TO_PASS")
_REPO_NAME = re.compile(r"[^/\s]+/[^/\s]+")
# The official heredoc delimiter; lengthened if a test patch happens to contain it.
_HEREDOC = "EOF_114329324912"
# Official images keep the repo's environment in conda env "testbed"; an image without it runs the tests
# with the python on PATH.
_CONDA_ACTIVATE = ("if [ -d /opt/miniconda3/envs/testbed ]; then "
                   "source /opt/miniconda3/bin/activate && conda activate testbed; fi")


class InstanceError(ValueError):
    """A record, file or dataset name that cannot become SWEInstances; the message says where and why."""

    def __init__(self, reason: str, *, source: str = "", instance_id: str = "", field: str = "") -> None:
        self.reason, self.source, self.instance_id, self.field = reason, source, instance_id, field
        where = [source, f"instance {instance_id!r}" if instance_id else "",
                 f"field {field!r}" if field else ""]
        prefix = ", ".join(w for w in where if w)
        super().__init__(f"{prefix}: {reason}" if prefix else reason)


@dataclass(frozen=True)
class SWEInstance:
    instance_id: str
    repo: str  # "owner/name" (ours: "m2rl-factory/<library>")
    base_commit: str
    patch: str  # the gold fix (diff)
    test_patch: str  # diff adding/changing tests, applied at grading ("" when the tests already exist)
    problem_statement: str
    FAIL_TO_PASS: tuple[str, ...]
    PASS_TO_PASS: tuple[str, ...]
    version: str = ""
    environment_setup_commit: str = ""
    hints_text: str = ""
    created_at: str = ""
    image: str = ""  # docker image holding the repo (ours); "" = derive (official name / build)
    test_cmd: str = ""  # run from the repo root; "" = DEFAULT_TEST_CMD plus test_files(self)
    log_parser: str = "parse_log_pytest"  # a key of swebench PARSER_REGISTRY
    eval_type: str = "pass_and_fail"  # an EvalType value
    split: str = "train"  # "train" | "test" (our factory splits by library)
    # Extra keys found in the record, kept verbatim. Not hashed: values may be lists or dicts.
    meta: Mapping[str, Any] = field(default_factory=dict, hash=False)

    def __post_init__(self) -> None:
        iid = self.instance_id if isinstance(self.instance_id, str) else ""

        def fail(name: str, reason: str) -> NoReturn:
            raise InstanceError(reason, instance_id=iid, field=name)

        for f in fields(self):
            value = getattr(self, f.name)
            if f.name in _TEST_LISTS:
                # a str is a Sequence too, and tuple("test_a") would be five one-letter test ids
                if isinstance(value, str | bytes) or not isinstance(value, Sequence):
                    fail(f.name, f"must be a list of test ids, got {type(value).__name__}")
                bad = [t for t in value if not isinstance(t, str) or not t]
                if bad:
                    fail(f.name, f"test ids must be non-empty strings, got {bad[:3]!r}")
                object.__setattr__(self, f.name, tuple(value))
            elif f.name == "meta":
                if not isinstance(value, Mapping):
                    fail("meta", f"must be a mapping, got {type(value).__name__}")
                object.__setattr__(self, "meta", dict(value))
            elif not isinstance(value, str):
                fail(f.name, f"must be a string, got {type(value).__name__}: {value!r:.60}")
        for name in ("instance_id", "base_commit", "split"):
            if not getattr(self, name).strip():
                fail(name, "is empty")
        if not _REPO_NAME.fullmatch(self.repo):
            fail("repo", f"must be 'owner/name', got {self.repo!r}")
        if not self.FAIL_TO_PASS:
            # with no FAIL_TO_PASS test, swebench scores the f2p rate as 1: every patch would resolve it
            fail("FAIL_TO_PASS", "is empty, so nothing would tell a fix from no fix")
        if self.log_parser not in PARSER_REGISTRY:
            fail("log_parser", f"{self.log_parser!r} is not a swebench parser; known: "
                               f"{sorted(PARSER_REGISTRY)}")
        if self.eval_type not in {e.value for e in EvalType}:
            fail("eval_type", f"{self.eval_type!r} is not one of {[e.value for e in EvalType]}")
        # eval_script may come from the record itself (see `script`); every other record key is a field
        clashes = sorted(set(self.meta) & (_RECORD_KEYS - {"eval_script"}))
        if clashes:
            fail("meta", f"holds keys that are fields of SWEInstance: {clashes}")

    @property
    def command(self) -> str:
        """The test command the eval script runs from the repo root."""
        if self.test_cmd:
            return self.test_cmd
        return " ".join([DEFAULT_TEST_CMD, *map(shlex.quote, test_files(self))])

    @property
    def script(self) -> str:
        """The eval script graders run: the record's own when it shipped one (swebench 5 datasets carry a
        repo-specific eval.sh, e.g. activating conda or calling Django's runner), else eval_script(self)."""
        return self.meta.get("eval_script") or eval_script(self)

    @classmethod
    def from_record(cls, record: Mapping[str, Any], source: str) -> SWEInstance:
        """An instance from one row of a SWE-bench-schema dataset; `source` names where the row came from
        (e.g. "data.jsonl:12") for the error messages.

        Accepts official rows: FAIL_TO_PASS / PASS_TO_PASS as JSON strings or lists; optional fields
        missing or null. A row without log_parser / eval_type gets swebench's choice for its repo.
        Unknown keys are kept in `meta`.
        """
        if not isinstance(record, Mapping):
            raise InstanceError(f"a record must be a JSON object, got {type(record).__name__}", source=source)
        raw_id = record.get("instance_id")
        iid = raw_id if isinstance(raw_id, str) else ""
        missing = [k for k in _REQUIRED if record.get(k) is None]
        if missing:
            raise InstanceError(f"missing required key(s) {missing}", source=source, instance_id=iid,
                                field=missing[0])
        known = {f.name for f in fields(cls)} - {"meta"}
        values: dict[str, Any] = {k: v for k, v in record.items() if k in known and v is not None}
        for name in _TEST_LISTS:
            values[name] = _test_ids(record[name], source, iid, name)
        if isinstance(values.get("version"), int | float) and not isinstance(values["version"], bool):
            values["version"] = str(values["version"])  # some JSON dumps store "4.3" as a number
        if hasattr(values.get("created_at"), "isoformat"):
            values["created_at"] = values["created_at"].isoformat()  # parquet may type it as a timestamp
        repo = values["repo"]
        if "log_parser" not in values and repo in MAP_REPO_TO_PARSER_PY:
            values["log_parser"] = MAP_REPO_TO_PARSER_PY[repo].__name__
        if "eval_type" not in values and repo in FAIL_ONLY_REPOS:
            values["eval_type"] = EvalType.FAIL_ONLY.value
        # columnar copies (parquet, datasets) give a row null in a column only other rows have: null = absent
        meta = {k: v for k, v in record.items() if k not in known and v is not None}
        try:
            instance = cls(**values, meta=meta)
        except InstanceError as exc:
            raise InstanceError(exc.reason, source=source, instance_id=exc.instance_id,
                                field=exc.field) from None
        if meta.get("eval_script") is not None and meta["eval_script"] == eval_script(instance):
            # our own derived script, written by to_record: keep it derived, so edits to fields reach it
            instance = cls(**values, meta={k: v for k, v in meta.items() if k != "eval_script"})
        return instance

    def to_record(self) -> dict[str, Any]:
        """This instance in the SWE-bench schema (test lists as JSON strings, as the official datasets
        store them), with the keys make_test_spec needs and the meta keys after them."""
        record: dict[str, Any] = {
            "repo": self.repo,
            "instance_id": self.instance_id,
            "base_commit": self.base_commit,
            "patch": self.patch,
            "test_patch": self.test_patch,
            "problem_statement": self.problem_statement,
            "hints_text": self.hints_text,
            "created_at": self.created_at,
            "version": self.version,
            "FAIL_TO_PASS": json.dumps(list(self.FAIL_TO_PASS)),
            "PASS_TO_PASS": json.dumps(list(self.PASS_TO_PASS)),
            "environment_setup_commit": self.environment_setup_commit,
            "image": self.image,
            "test_cmd": self.test_cmd,
            "log_parser": self.log_parser,
            "eval_type": self.eval_type,
            "eval_script": self.script,
            "split": self.split,
        }
        record.update((k, v) for k, v in self.meta.items() if k not in record)
        return record


_RECORD_KEYS = frozenset({f.name for f in fields(SWEInstance)} - {"meta"} | {"eval_script"})


def _test_ids(value: Any, source: str, instance_id: str, name: str) -> list[str]:
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as exc:
            raise InstanceError(f"is a string but not a JSON list: {exc.msg} ({value!r:.60})", source=source,
                                instance_id=instance_id, field=name) from None
    if isinstance(value, str | bytes) or not isinstance(value, Sequence):
        raise InstanceError(f"must be a list of test ids, got {type(value).__name__}", source=source,
                            instance_id=instance_id, field=name)
    return list(value)


# --------------------------------------------------------------------------- tests, script, image (pure)


def _is_test_module(path: str) -> bool:
    # conftest.py and __init__.py hold fixtures and package glue that pytest loads by itself; named on the
    # command line they would be collected as test modules too
    name = path.rsplit("/", 1)[-1]
    return path.endswith(".py") and not re.search(r"\s", path) and name not in ("conftest.py", "__init__.py")


def test_files(instance: SWEInstance) -> tuple[str, ...]:
    """The test modules the default command runs, sorted and deduplicated: the files named by the
    FAIL_TO_PASS / PASS_TO_PASS ids ("path.py::test") and the Python test files (rewards.paths' rule)
    that test_patch leaves in the tree. Ids without a file (Django's "test_x (module.Class)", sympy's
    "test_x") add nothing; with no file at all the command runs the whole suite."""
    named = {test_id.split("::", 1)[0] for test_id in (*instance.FAIL_TO_PASS, *instance.PASS_TO_PASS)}
    patched = {d.new_path for d in split_patch(instance.test_patch) if d.new_path}
    return tuple(sorted(p for p in named | {p for p in patched if is_test_path(p)} if _is_test_module(p)))


# pytest would collect the function as a test wherever a test module imports it by name
test_files.__test__ = False  # type: ignore[attr-defined]


def _test_patch_paths(test_patch: str) -> tuple[list[str], list[str]]:
    """(files test_patch changes that exist at base_commit, files it creates)."""
    diffs = split_patch(test_patch)
    at_base = {d.old_path for d in diffs if d.old_path}
    created = {d.new_path for d in diffs if d.new_path and d.new_path not in at_base}
    return sorted(at_base), sorted(created)


def _quoted(paths: Iterable[str]) -> str:
    return " ".join(map(shlex.quote, paths))


def eval_script(instance: SWEInstance, repo_dir: str = REPO_DIR) -> str:
    """The eval.sh the SWE-bench harness runs, in the official shape: reset the test files test_patch
    touches to base_commit, apply test_patch, run the test command between the start / end markers the
    log parsers slice on, reset the test files again. Derived from the fields only; `SWEInstance.script`
    prefers a script the record shipped."""
    at_base, created = _test_patch_paths(instance.test_patch)
    reset = []
    if at_base:  # the agent may have edited them; the grade must see the pristine versions
        reset.append(f"git checkout {shlex.quote(instance.base_commit)} -- {_quoted(at_base)}")
    if created:  # git checkout cannot reset a file base_commit lacks, and `git apply` refuses to overwrite it
        reset.append(f"rm -f -- {_quoted(created)}")
    lines = [
        "#!/bin/bash",
        "set -uxo pipefail",
        _CONDA_ACTIVATE,
        f"cd {shlex.quote(repo_dir)}",
        *reset,
    ]
    if instance.test_patch:
        body = instance.test_patch if instance.test_patch.endswith("\n") else instance.test_patch + "\n"
        delimiter = _HEREDOC
        while delimiter in body:
            delimiter += "_"
        lines.append(f"git apply --verbose - <<'{delimiter}'\n{body}{delimiter}")
    # the command must come right before the end marker: record_test_exit_code stores $? there
    lines += [f": '{START_TEST_OUTPUT}'", instance.command, f": '{END_TEST_OUTPUT}'", *reset]
    return "\n".join(lines) + "\n"


def official_image_name(instance_id: str) -> str:
    """The SWE-bench eval image of an instance without registry namespace or tag,
    e.g. "sweb.eval.x86_64.astropy_1776_astropy-12907" (swebench's own derivation, trimmed)."""
    namespaced = expected_image(instance_id)  # "swebench/sweb.eval.x86_64.<id>:latest", lowercased
    return namespaced.split("/", 1)[1].removesuffix(":latest")


# --------------------------------------------------------------------------- reading and writing


Rows = Iterator[tuple[str, Any]]  # (where the row came from: file:line or file row N, the row)
_SAVED_DATASET_MARKERS = ("dataset_dict.json", "dataset_info.json", "state.json")


def dataset_name(source: str) -> str | None:
    """The canonical name of a SWE-bench benchmark ("lite", "princeton-nlp/SWE-bench_Lite",
    "SWE-bench/SWE-bench_Lite" -> "SWE-bench_Lite"), or None if `source` names none."""
    org, _, name = source.strip().rpartition("/")
    if org.lower() not in ("", "princeton-nlp", "swe-bench"):
        return None
    return _ALIASES.get(re.sub(r"[-_ ]", "", name.lower()))


def _with_split(rows: Rows, split: str) -> Rows:
    """Rows that name no split get `split` (a DatasetDict key; "test" for a named benchmark)."""
    for where, row in rows:
        yield where, ({**row, "split": row.get("split") or split} if isinstance(row, Mapping) else row)


def _read_jsonl(path: Path) -> Rows:
    with path.open(encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise InstanceError(f"invalid JSON: {exc.msg} (column {exc.colno})",
                                    source=f"{path}:{lineno}") from None
            yield f"{path}:{lineno}", row


def _read_json(path: Path) -> Rows:
    try:
        rows = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise InstanceError(f"invalid JSON: {exc.msg}", source=f"{path}:{exc.lineno}") from None
    if not isinstance(rows, list):
        raise InstanceError(f"must hold a JSON list of records, got {type(rows).__name__}", source=str(path))
    for i, row in enumerate(rows):
        yield f"{path}[{i}]", row


def _read_parquet(path: Path) -> Rows:
    # pyarrow and datasets come with swebench, but m2rl does not declare them: either one will do
    try:
        import pyarrow.parquet as pq

        rows = pq.read_table(path).to_pylist()
    except ImportError:
        try:
            from datasets import Dataset
        except ImportError:
            raise InstanceError("reading .parquet needs pyarrow or datasets: pip install pyarrow",
                                source=str(path)) from None
        rows = list(Dataset.from_parquet(str(path)))
    for i, row in enumerate(rows):
        yield f"{path} row {i}", row


def _read_saved_dataset(path: Path) -> Rows:
    """A `datasets` save_to_disk directory; a DatasetDict's split names become the rows' default split."""
    try:
        from datasets import DatasetDict, load_from_disk
    except ImportError:
        raise InstanceError("is a datasets.save_to_disk directory; reading it needs `pip install datasets`",
                            source=str(path)) from None
    loaded = load_from_disk(str(path))
    if not isinstance(loaded, DatasetDict):
        yield from ((f"{path} row {i}", row) for i, row in enumerate(loaded))
        return
    for split, dataset in loaded.items():
        yield from _with_split(((f"{path} [{split}] row {i}", row) for i, row in enumerate(dataset)), split)


def _read_path(path: Path) -> Rows:
    if path.is_dir():
        if (path / "instances.jsonl").is_file():
            return _read_jsonl(path / "instances.jsonl")
        if any((path / marker).is_file() for marker in _SAVED_DATASET_MARKERS):
            return _read_saved_dataset(path)
        raise InstanceError("directory holds neither instances.jsonl nor a datasets.save_to_disk copy",
                            source=str(path))
    readers = {".jsonl": _read_jsonl, ".json": _read_json, ".parquet": _read_parquet}
    if path.suffix not in readers:
        raise InstanceError(f"unsupported file type {path.suffix!r}; use one of {sorted(readers)} or a "
                            "directory", source=str(path))
    return readers[path.suffix](path)


def _local_copies(name: str) -> list[Path]:
    """Where a copy of benchmark `name` may have been placed, in the order they are tried."""
    roots = [Path(os.environ["M2RL_SWE_DATA"])] if os.environ.get("M2RL_SWE_DATA") else []
    roots.append(Path.home() / ".cache" / "m2rl" / "swe-datasets")
    return [root / f"{name}{suffix}" for root in roots for suffix in ("", ".jsonl", ".json", ".parquet")]


def _hf_datasets_cache() -> Path:
    # read now, not at datasets' import, so a caller (or test) that sets HF_HOME later is honoured
    if os.environ.get("HF_DATASETS_CACHE"):
        return Path(os.environ["HF_DATASETS_CACHE"])
    cache_home = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return Path(os.environ.get("HF_HOME") or cache_home / "huggingface") / "datasets"


@contextmanager
def _hub_offline() -> Iterator[None]:
    """datasets and huggingface_hub read HF_DATASETS_OFFLINE / HF_HUB_OFFLINE once, at import; setting the
    variables now would not stop an already imported copy from going online, so flip their values too."""
    import datasets.config
    import huggingface_hub.constants as hub

    saved = datasets.config.HF_HUB_OFFLINE, datasets.config.HF_DATASETS_OFFLINE, hub.HF_HUB_OFFLINE
    datasets.config.HF_HUB_OFFLINE = datasets.config.HF_DATASETS_OFFLINE = hub.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        datasets.config.HF_HUB_OFFLINE, datasets.config.HF_DATASETS_OFFLINE, hub.HF_HUB_OFFLINE = saved


def _read_named(name: str) -> Rows:
    """A named benchmark from a local copy only; its rows are the benchmark's test split."""
    copies = _local_copies(name)
    for candidate in copies:
        if candidate.exists():
            return _with_split(_read_path(candidate), "test")
    cache, reasons = _hf_datasets_cache(), []
    try:
        from datasets import load_dataset
    except ImportError:
        reasons.append("the datasets package is not installed")
    else:
        for hf_id in NAMED_DATASETS[name]:
            try:
                with _hub_offline():
                    dataset = load_dataset(hf_id, split="test", cache_dir=str(cache))
            except Exception as exc:  # noqa: BLE001 - each datasets release raises its own "not cached" type
                reasons.append(f"{hf_id}: {type(exc).__name__}: {(str(exc).splitlines() or [''])[0]}")
                continue
            rows = ((f"{hf_id} (cache {cache}) row {i}", row) for i, row in enumerate(dataset))
            return _with_split(rows, "test")
    raise InstanceError(
        f"no local copy of {name} (nothing is downloaded here). Looked in: {', '.join(map(str, copies))}; "
        f"and the Hugging Face datasets cache {cache} ({'; '.join(reasons)}). To place a copy: on a machine "
        f"with network run `datasets.load_dataset('{NAMED_DATASETS[name][0]}', split='test')"
        f".save_to_disk(DIR)`, or write its rows as JSONL to DIR/instances.jsonl (write_instances does), "
        f"then copy DIR to {copies[0]} (or set M2RL_SWE_DATA to the folder holding {name}/).",
        source=name,
    )


def load_instances(
    source: str | os.PathLike[str],
    *,
    repos: Iterable[str] | None = None,
    ids: Iterable[str] | None = None,
    count: int | None = None,
    split: str | None = None,
    shuffle_seed: int | None = None,
) -> list[SWEInstance]:
    """Instances from `source`: a .json (list of records), .jsonl or .parquet file; a directory holding
    instances.jsonl or a datasets.save_to_disk copy; or a benchmark name ("SWE-bench", "SWE-bench_Verified",
    "SWE-bench_Lite" and aliases such as "lite", "princeton-nlp/SWE-bench_Verified") read from a local copy.

    Filters, in order: `repos` (exact "owner/name"), `ids` (every id must exist), `split`; then the list is
    shuffled with `shuffle_seed` when given, and cut to the first `count`. File order is kept otherwise.
    Raises InstanceError naming the file, line or row, instance and field of the first problem.
    """
    if count is not None and count < 1:
        raise InstanceError(f"count must be at least 1, got {count}", source=str(source))
    path = Path(source).expanduser()
    if path.exists():
        rows = _read_path(path)
    elif (name := dataset_name(str(source))) is not None:
        rows = _read_named(name)
    else:
        raise InstanceError(f"no such file or directory, and not a dataset name (known: "
                            f"{sorted(NAMED_DATASETS)})", source=str(source))
    instances: list[SWEInstance] = []
    seen: dict[str, str] = {}
    for where, row in rows:
        instance = SWEInstance.from_record(row, where)
        if instance.instance_id in seen:
            raise InstanceError(f"duplicate instance_id, first seen at {seen[instance.instance_id]}",
                                source=where, instance_id=instance.instance_id)
        seen[instance.instance_id] = where
        instances.append(instance)
    instances = _filter(instances, str(source), repos=repos, ids=ids, split=split)
    if shuffle_seed is not None:
        random.Random(shuffle_seed).shuffle(instances)
    return instances if count is None else instances[:count]


def _filter(instances: list[SWEInstance], source: str, *, repos: Iterable[str] | None,
            ids: Iterable[str] | None, split: str | None) -> list[SWEInstance]:
    # each filter that matches nothing is an error: a typo should not quietly shrink the run
    if repos is not None:
        wanted = {repos} if isinstance(repos, str) else set(repos)
        present = {i.repo for i in instances}
        if wanted - present:
            raise InstanceError(f"no instances of repos {sorted(wanted - present)}; repos present: "
                                f"{sorted(present)}", source=source)
        instances = [i for i in instances if i.repo in wanted]
    if ids is not None:
        wanted = {ids} if isinstance(ids, str) else set(ids)
        unknown = wanted - {i.instance_id for i in instances}
        if unknown:
            raise InstanceError(f"unknown instance ids (after the repos filter): {sorted(unknown)}",
                                source=source)
        instances = [i for i in instances if i.instance_id in wanted]
    if split is not None:
        instances = [i for i in instances if i.split == split]
        if not instances:
            raise InstanceError(f"no instances in split {split!r} (after the other filters)", source=source)
    return instances


def _json_default(value: Any) -> Any:
    if hasattr(value, "isoformat"):  # timestamps read from parquet meta columns
        return value.isoformat()
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


def write_instances(path: str | os.PathLike[str], instances: Iterable[SWEInstance]) -> Path:
    """Write `instances` as JSONL of `to_record` rows (what load_instances and the swebench harness read)."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w", encoding="utf-8") as fh:
        for instance in instances:
            fh.write(json.dumps(instance.to_record(), ensure_ascii=False, default=_json_default) + "\n")
    return out
