"""The task factory: SWE-bench instances from real PyPI libraries, by procedural bug injection.

For each library (SWE-smith's method, our own implementation):
1. its sdist becomes a clean one-commit git repository (`sources.make_repo`), and an image with its test
   dependencies in a virtualenv (`library_image.build_library_image`);
2. the suite runs twice in a container of that image; the tests passing both times are the baseline;
3. AST mutations (`m2rl.envs.swe.mutations`) are sampled with the seed; each is written into the
   container and the suite runs: a candidate is kept only if at least one baseline test fails and every
   other baseline test passes (at least one does: a crash that fails everything is no task), and a second
   run agrees exactly (no flaky verdicts);
4. a kept candidate becomes a commit on top of the clean commit (fixed identity and dates, so its sha is
   reproducible), its problem statement is written from the observed failures
   (`m2rl.envs.swe.statement`, never naming the changed file or line), and its gold patch is the diff
   back to the clean tree;
5. an instance image adds those commits to the library image; `instances.jsonl` (SWE-bench schema) and
   `images.json` (the recipe each image is rebuilt from) are written to the output directory.

Splits are by library: the held-out ("test") libraries never share a repository with training ones.
Nothing here is library-specific; `known_libraries` holds the few per-library test-command needs.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

from m2rl.envs.swe.factory import known_libraries
from m2rl.envs.swe.factory.baseline import TestContainer, TestRun
from m2rl.envs.swe.factory.instance_image import build_instance_image
from m2rl.envs.swe.factory.library_image import build_library_image
from m2rl.envs.swe.factory.sources import (
    LibraryError,
    LibrarySource,
    default_cache_dir,
    fetch_sdist,
    git,
    make_repo,
    resolve,
)
from m2rl.envs.swe.instances import SWEInstance, write_instances
from m2rl.envs.swe.mutations import Mutation, sample_mutations
from m2rl.envs.swe.statement import failures_from_pytest_log, leaks_location, problem_statement

logger = logging.getLogger(__name__)

PASSED = "PASSED"
TEST_FRACTION_PER_256 = 51  # ~20% of libraries are held out when none are named
STATEMENT_ATTEMPTS = 4  # template variants tried before a candidate whose statement leaks is dropped
REPO_OWNER = "m2rl-factory"
# A mutation that makes the suite loop must not cost the full timeout: a candidate run may take this many times
# the slower baseline run (at least CANDIDATE_MIN_TIMEOUT_S), never more than the configured timeout.
CANDIDATE_TIMEOUT_FACTOR = 5.0
CANDIDATE_MIN_TIMEOUT_S = 20.0


@dataclass(frozen=True)
class FactoryConfig:
    libraries: tuple[str, ...]  # "NAME" or "NAME==VERSION"
    out: Path
    seed: int = 0
    max_per_library: int = 40  # valid instances kept per library
    candidates_per_library: int = 0  # mutations tried per library; 0: 4 x max_per_library
    test_libraries: tuple[str, ...] = ()  # held-out libraries; empty: ~20% chosen by the seed
    workers: int = 2  # libraries processed at once (one test container each)
    test_timeout_s: float = 120.0  # a baseline run; a mutated run gets CANDIDATE_TIMEOUT_FACTOR x the baseline
    cache_dir: Path | None = None

    @property
    def candidates(self) -> int:
        return self.candidates_per_library or 4 * self.max_per_library


@dataclass
class LibraryReport:
    library: str
    version: str = ""
    split: str = "train"
    image: str = ""
    baseline_tests: int = 0
    candidates: int = 0  # mutations tried
    failing: int = 0  # broke at least one test, nothing else (first run)
    flaky: int = 0  # second run disagreed
    leaking: int = 0  # no statement without the changed location
    valid: int = 0
    seconds: float = 0.0
    error: str = ""

    @property
    def validity(self) -> float:
        return self.valid / self.candidates if self.candidates else 0.0


@dataclass
class FactoryReport:
    libraries: list[LibraryReport] = field(default_factory=list)
    instances: int = 0
    seconds: float = 0.0
    out: str = ""


def split_of_library(name: str, seed: int, test_libraries: Sequence[str], all_names: Sequence[str]) -> str:
    """"test" for held-out libraries: the named ones, else a seeded hash (at least one when >= 2 libraries)."""
    if test_libraries:
        return "test" if name in test_libraries else "train"

    def score(n: str) -> int:
        return hashlib.sha256(f"{seed}:{n}".encode()).digest()[0]

    if len(all_names) >= 2 and not any(score(n) < TEST_FRACTION_PER_256 for n in all_names):
        return "test" if name == min(all_names, key=score) else "train"
    return "test" if score(name) < TEST_FRACTION_PER_256 else "train"


def commit_bug(source: LibrarySource, mutation: Mutation, instance_id: str) -> tuple[str, str]:
    """Commit the mutated file on top of the clean commit; returns (its sha, the gold patch back to clean)."""
    repo = source.repo_dir
    git(repo, "checkout", "-q", "-f", source.base_commit)
    (repo / mutation.path).write_text(mutation.mutated)
    git(repo, "commit", "-q", "--no-verify", "-a", "-m", f"{instance_id}")
    sha = git(repo, "rev-parse", "HEAD").strip()
    git(repo, "tag", "-f", f"m2rl/{instance_id}", sha)
    patch = git(repo, "diff", "--no-color", "--no-ext-diff", sha, source.base_commit)
    git(repo, "checkout", "-q", "-f", source.base_commit)
    return sha, patch


def instance_id_of(source: LibrarySource, mutation: Mutation) -> str:
    digest = hashlib.sha256(f"{mutation.path}\0{mutation.mutated}".encode()).hexdigest()[:8]
    return f"{source.canonical_name}__{source.canonical_name}-{source.version}.{mutation.operator}.{digest}"


def _passing(run: TestRun) -> set[str]:
    return {t for t, s in run.status.items() if s == PASSED}


class LibraryBuild:
    """One library through steps 1-4 of the module docstring."""

    def __init__(self, spec: str, config: FactoryConfig, split_for: Callable[[str], str]) -> None:
        self.spec, self.config, self.split_for = spec, config, split_for
        self.report = LibraryReport(library=spec)

    def run(self) -> tuple[list[SWEInstance], LibraryReport, dict | None]:
        t0 = time.monotonic()
        try:
            instances, recipe = self._build()
            return instances, self.report, recipe
        except (LibraryError, RuntimeError, OSError) as exc:
            self.report.error = str(exc)[:500]
            logger.warning("library %s skipped: %s", self.spec, exc)
            return [], self.report, None
        finally:
            self.report.seconds = time.monotonic() - t0

    def _build(self) -> tuple[list[SWEInstance], dict | None]:
        cache = self.config.cache_dir or default_cache_dir()
        name, version = resolve(self.spec)
        self.report.library, self.report.version = name, version
        self.report.split = self.split_for(name)
        sdist = fetch_sdist(name, version, cache)
        source = make_repo(name, version, sdist, cache / "repos")
        known = known_libraries.lookup(name)
        image = build_library_image(source, known)
        test_cmd = known_libraries.pytest_command(source, known)
        kept: list[tuple[Mutation, set[str], set[str], str]] = []  # (mutation, failing, passing, statement)
        self.verdicts = VerdictCache(cache / "verdicts" / f"{image.replace(':', '-')}.jsonl", test_cmd)
        with TestContainer(image) as container:
            baseline = self._baseline(container, test_cmd)
            files = {path: (source.repo_dir / path).read_text(errors="replace") for path in source.source_files}
            seed = int.from_bytes(hashlib.sha256(f"{self.config.seed}:{name}".encode()).digest()[:4], "big")
            for mutation in sample_mutations(files, seed, self.config.candidates):
                if len(kept) >= self.config.max_per_library:
                    break
                self.report.candidates += 1
                verdict = self._try(container, test_cmd, baseline, mutation)
                if verdict is None:
                    continue
                failing, still_passing, log = verdict
                statement = self._statement(source, mutation, failing, log)
                if statement is not None:
                    kept.append((mutation, failing, still_passing, statement))
        instances = [self._instance(source, image, test_cmd, *k) for k in kept]
        self.report.valid = len(instances)
        if not instances:
            return [], None
        final = build_instance_image(source, image, [i.base_commit for i in instances])
        self.report.image = final
        instances = [_with_image(i, final) for i in instances]
        recipe = {"library": name, "version": version, "sdist": sdist.name, "clean_commit": source.base_commit,
                  "library_image": image, "test_cmd": test_cmd,
                  "instances": [i.instance_id for i in instances]}
        return instances, recipe

    def _baseline(self, container: TestContainer, test_cmd: str) -> set[str]:
        first = container.run(test_cmd, self.config.test_timeout_s)
        second = container.run(test_cmd, self.config.test_timeout_s)
        self.candidate_timeout_s = min(self.config.test_timeout_s, max(
            CANDIDATE_MIN_TIMEOUT_S, CANDIDATE_TIMEOUT_FACTOR * max(first.duration_s, second.duration_s)))
        passing = _passing(first) & _passing(second)
        self.report.baseline_tests = len(passing)
        if not passing:
            raise LibraryError(f"{self.spec}: no test passes in the clean repository:\n{first.log[-1500:]}")
        return passing

    def _try(self, container: TestContainer, test_cmd: str, baseline: set[str],
             mutation: Mutation) -> tuple[set[str], set[str], str] | None:
        """(failing, still passing, log) if the mutation breaks some baseline tests and nothing else, twice.
        Verdicts are cached per image and test command: a rebuild reruns nothing it has already run."""
        key = self.verdicts.key(mutation, baseline)
        if key not in self.verdicts:
            self.verdicts.add(key, self._run_candidate(container, test_cmd, baseline, mutation))
        verdict = self.verdicts[key]
        self.report.failing += verdict.broke
        self.report.flaky += verdict.flaky
        if verdict.failing is None or set(verdict.failing) == baseline:
            return None
        failing = set(verdict.failing)
        return failing, baseline - failing, verdict.log

    def _run_candidate(self, container: TestContainer, test_cmd: str, baseline: set[str],
                       mutation: Mutation) -> Verdict:
        container.write_file(mutation.path, mutation.mutated)
        try:
            first = container.run(test_cmd, self.candidate_timeout_s)
            failing = baseline - _passing(first)
            if first.timed_out or not failing:
                return Verdict(broke=False, flaky=False, failing=None)
            if failing == baseline:  # nothing passes (an import-time crash): no PASS_TO_PASS to keep
                return Verdict(broke=True, flaky=False, failing=None)
            second = container.run(test_cmd, self.candidate_timeout_s)
            if second.timed_out or baseline - _passing(second) != failing:
                return Verdict(broke=True, flaky=True, failing=None)
            return Verdict(broke=True, flaky=False, failing=tuple(sorted(failing)), log=first.log)
        finally:
            container.restore(mutation.path)

    def _statement(self, source: LibrarySource, mutation: Mutation, failing: set[str], log: str) -> str | None:
        """The problem statement of a valid candidate: the first template variant that does not give away
        the changed file, line or function (None if none of them manages)."""
        failures = failures_from_pytest_log(log, sorted(failing))
        for attempt in range(STATEMENT_ATTEMPTS):
            text = problem_statement(failures, seed=self.config.seed + attempt, repo_name=source.name)
            if not leaks_location(text, mutation.path, mutation.lineno, mutation.function):
                return text
        self.report.leaking += 1
        logger.info("%s: every statement of %s names its location; dropped", source.name, mutation.description)
        return None

    def _instance(self, source: LibrarySource, image: str, test_cmd: str, mutation: Mutation,
                  failing: set[str], still_passing: set[str], statement: str) -> SWEInstance:
        iid = instance_id_of(source, mutation)
        sha, patch = commit_bug(source, mutation, iid)
        return SWEInstance(
            instance_id=iid,
            repo=f"{REPO_OWNER}/{source.canonical_name}",
            base_commit=sha,
            patch=patch,
            test_patch="",
            problem_statement=statement,
            FAIL_TO_PASS=tuple(sorted(failing)),
            PASS_TO_PASS=tuple(sorted(still_passing)),
            version=source.version,
            environment_setup_commit=source.base_commit,
            created_at="",
            image=image,
            test_cmd=test_cmd,
            split=self.report.split,
            meta={"library": source.name, "operator": mutation.operator},
        )


@dataclass(frozen=True)
class Verdict:
    broke: bool  # the first run failed some baseline test and nothing timed out
    flaky: bool  # the second run disagreed with the first
    failing: tuple[str, ...] | None  # the FAIL_TO_PASS tests of a valid candidate, else None
    log: str = ""  # the first run's log (the problem statement is written from it)


class VerdictCache:
    """Candidate verdicts of one image and test command, appended to a JSONL file as they are made."""

    def __init__(self, path: Path, test_cmd: str) -> None:
        self.path, self.test_cmd = path, test_cmd
        self.entries: dict[str, Verdict] = {}
        if path.is_file():
            for line in path.read_text().splitlines():
                try:
                    record = json.loads(line)
                    failing = record["failing"]
                    self.entries[record["key"]] = Verdict(bool(record["broke"]), bool(record["flaky"]),
                                                          None if failing is None else tuple(failing),
                                                          str(record.get("log", "")))
                except (ValueError, KeyError, TypeError):  # a line cut by a crash: that verdict is made again
                    continue

    def key(self, mutation: Mutation, baseline: set[str]) -> str:
        text = "\0".join([self.test_cmd, mutation.path, mutation.mutated, *sorted(baseline)])
        return hashlib.sha256(text.encode()).hexdigest()

    def __contains__(self, key: str) -> bool:
        return key in self.entries

    def __getitem__(self, key: str) -> Verdict:
        return self.entries[key]

    def add(self, key: str, verdict: Verdict) -> None:
        self.entries[key] = verdict
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a") as f:
            f.write(json.dumps({"key": key, **asdict(verdict)}) + "\n")


def _with_image(inst: SWEInstance, image: str) -> SWEInstance:
    return SWEInstance(**{**{f: getattr(inst, f) for f in inst.__dataclass_fields__}, "image": image})


def build_tasks(config: FactoryConfig, progress: Callable[[LibraryReport], None] | None = None) -> FactoryReport:
    """Build every library (up to `config.workers` at once) and write the task directory."""
    t0 = time.monotonic()
    names = [s.split("==")[0].strip() for s in config.libraries]

    def split_for(name: str) -> str:
        canonical = [n.lower().replace("_", "-") for n in names]
        return split_of_library(name.lower().replace("_", "-"), config.seed,
                                [n.lower().replace("_", "-") for n in config.test_libraries], canonical)

    def one(spec: str) -> tuple[list[SWEInstance], LibraryReport, dict | None]:
        result = LibraryBuild(spec, config, split_for).run()
        if progress is not None:
            progress(result[1])
        return result

    with ThreadPoolExecutor(max_workers=max(1, config.workers)) as pool:
        results = list(pool.map(one, config.libraries))
    instances = [inst for result in results for inst in result[0]]
    recipes = {result[1].image: result[2] for result in results if result[2] is not None}
    config.out.mkdir(parents=True, exist_ok=True)
    write_instances(config.out / "instances.jsonl", instances)
    (config.out / "images.json").write_text(json.dumps(recipes, indent=2, sort_keys=True) + "\n")
    report = FactoryReport(libraries=[r[1] for r in results], instances=len(instances),
                           seconds=time.monotonic() - t0, out=str(config.out))
    (config.out / "build_report.json").write_text(
        json.dumps({**asdict(report), "config": {**asdict(config), "out": str(config.out),
                                                 "cache_dir": str(config.cache_dir or "")}},
                   indent=2, default=str) + "\n")
    return report
