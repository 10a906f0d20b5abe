"""Image specs and content-hash tags (pure), and derived image builds on the real engine."""

from __future__ import annotations

import json

import pytest
from m2rl.sandboxes import SandboxError, make_sandbox
from m2rl.sandboxes.images import BaseSpec, ImageSpec, base_hash, build_image, image_tag


def test_spec_validation_names_the_problem(tmp_path):
    with pytest.raises(SandboxError, match="'name'"):
        ImageSpec.from_dict({})
    with pytest.raises(SandboxError, match="unknown keys \\['packages'\\]"):
        ImageSpec.from_dict({"name": "x", "packages": []})
    with pytest.raises(SandboxError, match="apt_packages"):
        ImageSpec.from_dict({"name": "x", "apt_packages": "git"})
    with pytest.raises(SandboxError, match="absolute"):
        ImageSpec.from_dict({"name": "x", "files": {"rel/path": "/etc/hostname"}})
    with pytest.raises(SandboxError, match="not found"):
        ImageSpec.from_file(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.json"
    bad.write_text("[1, 2]")
    with pytest.raises(SandboxError, match="mapping"):
        ImageSpec.from_file(bad)


def test_tags_follow_content(tmp_path):
    (tmp_path / "task.txt").write_text("v1")
    spec_file = tmp_path / "spec.json"
    spec_file.write_text(json.dumps({"name": "m2rl-test", "files": {"/work/task.txt": "task.txt"}}))
    spec = ImageSpec.from_file(spec_file)
    assert spec.files == {"/work/task.txt": str(tmp_path / "task.txt")}  # relative to the spec file
    tag = image_tag(spec)
    assert tag.startswith("m2rl-test:") and image_tag(ImageSpec.from_file(spec_file)) == tag
    (tmp_path / "task.txt").write_text("v2")
    assert image_tag(spec) != tag  # file content is part of the hash
    assert image_tag(ImageSpec(name="m2rl-test", files=spec.files, apt_packages=("git",))) != image_tag(spec)
    assert base_hash(BaseSpec()) == base_hash(BaseSpec())
    assert base_hash(BaseSpec(packages=("python3",))) != base_hash(BaseSpec())
    with pytest.raises(SandboxError, match="does not exist"):
        image_tag(ImageSpec(name="x", files={"/a": str(tmp_path / "nope")}))


@pytest.mark.docker
def test_derived_image_with_files_and_env(tmp_path, docker_ready):
    import docker

    (tmp_path / "task.txt").write_text("solve me\n")
    (tmp_path / "tools").mkdir()
    (tmp_path / "tools" / "hello.sh").write_text("#!/bin/sh\necho hello-tool\n")
    (tmp_path / "tools" / "hello.sh").chmod(0o755)
    spec = ImageSpec(
        name="m2rl-test-derived",
        files={"/work/task.txt": str(tmp_path / "task.txt"), "/opt/tools": str(tmp_path / "tools")},
        env={"TASK_ID": "42"},
    )
    client = docker.from_env()
    tag = build_image(spec)
    try:
        image_id = client.images.get(tag).id
        assert build_image(spec) == tag and client.images.get(tag).id == image_id  # cached, not rebuilt
        with make_sandbox("docker", image=tag) as sb:
            assert (
                sb.exec("cat /work/task.txt; /opt/tools/hello.sh; echo $TASK_ID").stdout
                == "solve me\nhello-tool\n42\n"
            )
            sb.exec("rm /work/task.txt")
            sb.reset()
            assert sb.read_file("/work/task.txt") == b"solve me\n"  # the seeded /work is the reset point
    finally:
        client.images.remove(tag, force=True)


@pytest.mark.docker
@pytest.mark.slow
def test_derived_image_with_apt_and_pip(docker_ready):
    import docker

    spec = ImageSpec(name="m2rl-test-pkgs", apt_packages=("jq",), pip_packages=("six==1.16.0",))
    tag = build_image(spec)
    try:
        with make_sandbox("docker", image=tag) as sb:
            r = sb.exec("echo '{\"a\": 1}' | jq .a; python3 -c 'import six; print(six.__version__)'")
            assert r.stdout == "1\n1.16.0\n", r
    finally:
        docker.from_env().images.remove(tag, force=True)
