"""The Docker images install exactly what the lock files pin, as the Makefile does.

Docker cannot run on the project's machines, so this reads the Dockerfiles: every pip install in
them comes from its lock (or installs foldship itself under it as constraints, or without
dependencies), and the pins in pyproject.toml and in the GPU and edge locks agree with
requirements.lock.
"""
import re
import shlex
import subprocess
import tomllib

import pytest

from .conftest import ROOT

PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;#]+)$")
DOCKERFILES = {"docker/Dockerfile": "requirements.lock", "docker/Dockerfile.tensorrt": "requirements-gpu.lock"}


def normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def lock(name: str = "requirements.lock") -> dict[str, str]:
    pins = {}
    for line in (ROOT / name).read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            match = PIN.match(line)
            assert match, f"{name} line is not an exact pin: {line!r}"
            assert normalise(match[1]) not in pins, f"{name} pins {match[1]} twice"
            pins[normalise(match[1])] = match[2]
    return pins


def pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def run_commands(dockerfile: str) -> list[str]:
    """Each shell command of each RUN instruction (continuation lines joined, split at &&)."""
    text = re.sub(r"\\\n", " ", (ROOT / dockerfile).read_text())
    runs = [line.strip()[4:] for line in text.splitlines() if line.strip().startswith("RUN ")]
    return [part.strip() for run in runs for part in run.split("&&")]


def pip_installs(dockerfile: str) -> list[tuple[list[str], dict[str, str], set[str]]]:
    """(requirement arguments, {-r/-c: file}, other options) of every pip install in the Dockerfile."""
    found = []
    for command in run_commands(dockerfile):
        words = shlex.split(command)
        if words[:2] != ["pip", "install"]:
            continue
        requirements, files, options, rest = [], {}, set(), iter(words[2:])
        for word in rest:
            if word in ("-r", "-c"):
                files[word] = next(rest)
            elif word.startswith("-"):
                options.add(word)
            else:
                requirements.append(word)
        found.append((requirements, files, options))
    return found


def test_pyproject_pins_agree_with_the_lock():
    pins = lock()
    project = pyproject()
    extras = project["optional-dependencies"]
    for requirement in project["dependencies"] + [r for name, group in extras.items() if name != "trt" for r in group]:
        name, version = PIN.match(requirement).groups()
        assert pins.get(normalise(name)) == version, f"{requirement} in pyproject.toml, lock has {pins.get(normalise(name))}"
    assert extras["trt"] and all(PIN.match(r) for r in extras["trt"])  # TensorRT: pinned, GPU images only


def trt_pins() -> dict[str, str]:
    return {normalise(n): v for n, v in (PIN.match(r).groups() for r in pyproject()["optional-dependencies"]["trt"])}


def test_gpu_lock_is_the_cpu_lock_with_onnxruntime_gpu():
    """Same version of every package both locks pin; onnxruntime-gpu replaces onnxruntime (one module)."""
    cpu, gpu = lock(), lock("requirements-gpu.lock")
    assert "onnxruntime" not in gpu and "onnxruntime-gpu" in gpu and "onnxruntime-gpu" not in cpu
    assert set(gpu) - {"onnxruntime-gpu"} == set(cpu) - {"onnxruntime"}
    assert {name: gpu[name] for name in set(gpu) & set(cpu)} == {name: cpu[name] for name in set(gpu) & set(cpu)}
    assert "torch" in gpu and gpu["torch"] == cpu["torch"]


def test_edge_lock_is_a_torch_free_subset_of_the_lock():
    cpu, edge = lock(), lock("requirements-edge.lock")
    assert edge == {name: cpu[name] for name in edge}
    assert {"onnxruntime", "numpy", "typer", "rich"} <= set(edge)
    assert not {"torch", "torchvision", "torch-pruning"} & set(edge)


@pytest.mark.parametrize("target,venv,lock", [("env", ".venv", "requirements.lock"),
                                              ("env-gpu", ".venv-gpu", "requirements-gpu.lock"),
                                              ("env-edge", ".venv-edge", "requirements-edge.lock")])
def test_makefile_installs_the_locks(target, venv, lock):
    """What make would run (dry run, every target out of date): the lock, then foldship without its
    dependencies (its metadata names onnxruntime, which the GPU lock replaces), into that venv."""
    dry = subprocess.run(["make", "-n", "-B", target], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    installs = [shlex.split(line) for line in dry.splitlines() if " pip install " in line]
    assert [words[0] for words in installs] == [f"{venv}/bin/python"] * 2
    assert installs[0][-2:] == ["-r", lock] and installs[1][-3:] == ["--no-deps", "-e", "."]


@pytest.mark.parametrize("dockerfile,lock_name", DOCKERFILES.items())
def test_dockerfile_installs_only_what_the_lock_pins(dockerfile, lock_name):
    installs = pip_installs(dockerfile)
    assert installs[0][:2] == ([], {"-r": lock_name})  # everything pinned comes first, from the lock
    pins = lock(lock_name)
    for requirements, files, options in installs[1:]:
        if requirements in (["."], [".[trt]"]):  # then foldship itself, adding nothing unpinned
            assert files == {"-c": lock_name} or "--no-deps" in options
        else:  # or the trt extra's pins, under the lock
            assert files == {"-c": lock_name} and all(PIN.match(r) for r in requirements)
    text = (ROOT / dockerfile).read_text()
    assert f"COPY {lock_name} ./" in text
    for name, version in re.findall(r"([A-Za-z0-9][A-Za-z0-9._-]*)==([0-9][^\s\"';&]*)", text):
        assert (pins | trt_pins()).get(normalise(name)) == version, f"{dockerfile} pins {name}=={version}"


def test_tensorrt_image_is_nvidias_with_onnxruntime_gpu_and_the_trt_extra():
    text = (ROOT / "docker/Dockerfile.tensorrt").read_text()
    base = re.search(r"^ARG TRT_IMAGE=(\S+)$", text, re.MULTILINE)[1]
    repository, tag = base.rsplit(":", 1)
    assert repository == "nvcr.io/nvidia/tensorrt" and tag not in ("", "latest")
    assert "FROM ${TRT_IMAGE}" in text
    installs = [i[:2] for i in pip_installs("docker/Dockerfile.tensorrt")]
    assert ([f"{n}=={v}" for n, v in trt_pins().items()], {"-c": "requirements-gpu.lock"}) in installs
    # foldship without dependencies: with them pip would add onnxruntime beside onnxruntime-gpu.
    assert (["."], {}) in installs and "--no-deps" in pip_installs("docker/Dockerfile.tensorrt")[-1][2]
