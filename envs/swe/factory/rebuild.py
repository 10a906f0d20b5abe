"""Rebuild a task directory's images from its recipes (`images.json`), on a machine that has none of them.

A recipe names the library release and the instances its image holds. The clean repository comes back
from the sdist with the same sha (fixed identity and dates), each instance's base commit from reverting
its gold patch on it (checked against the recorded sha), and the images from the same build functions
as in `build.py`, so the tags come out the same.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path

from m2rl.envs.swe.factory import known_libraries
from m2rl.envs.swe.factory.instance_image import build_instance_image
from m2rl.envs.swe.factory.library_image import build_library_image
from m2rl.envs.swe.factory.sources import LibraryError, default_cache_dir, fetch_sdist, git, make_repo
from m2rl.envs.swe.images import ImageBuilder
from m2rl.envs.swe.instances import SWEInstance, load_instances


def rebuild_image(recipe: dict, instances: dict[str, SWEInstance], cache_dir: Path | None = None) -> str:
    """The image of one recipe, built (or found) from the library's sdist and the instances' patches."""
    cache = cache_dir or default_cache_dir()
    name, version = recipe["library"], recipe["version"]
    source = make_repo(name, version, fetch_sdist(name, version, cache), cache / "repos")
    if source.base_commit != recipe["clean_commit"]:
        raise LibraryError(f"{name}=={version}: the sdist gives commit {source.base_commit}, the recipe "
                           f"recorded {recipe['clean_commit']}")
    library_image = build_library_image(source, known_libraries.lookup(name))
    commits = []
    for iid in recipe["instances"]:
        inst = instances[iid]
        git(source.repo_dir, "checkout", "-q", "-f", source.base_commit)
        git(source.repo_dir, "apply", "-R", "-", stdin=inst.patch if inst.patch.endswith("\n") else inst.patch + "\n")
        git(source.repo_dir, "commit", "-q", "--no-verify", "-a", "-m", iid)
        sha = git(source.repo_dir, "rev-parse", "HEAD").strip()
        if sha != inst.base_commit:
            raise LibraryError(f"{iid}: rebuilding its base commit gave {sha}, not {inst.base_commit}")
        git(source.repo_dir, "tag", "-f", f"m2rl/{iid}", sha)
        commits.append(sha)
    return build_instance_image(source, library_image, commits)


def recipe_builder(task_dir: Path, cache_dir: Path | None = None) -> ImageBuilder:
    """An `ImageBuilder` for SWEEnv: the image of an instance of `task_dir`, rebuilt once per recipe."""
    recipes: dict[str, dict] = json.loads((task_dir / "images.json").read_text())
    by_instance = {iid: tag for tag, recipe in recipes.items() for iid in recipe["instances"]}
    lock = threading.Lock()
    built: dict[str, str] = {}

    def build(instance: SWEInstance) -> str:
        tag = by_instance.get(instance.instance_id)
        if tag is None:
            raise LibraryError(f"{instance.instance_id} has no image recipe in {task_dir / 'images.json'}")
        with lock:
            if tag not in built:
                instances = {i.instance_id: i for i in load_instances(task_dir)}
                built[tag] = rebuild_image(recipes[tag], instances, cache_dir)
        return built[tag]

    return build
