"""The bad-input matrix through the real CLI: every case exits 2 with one line that names the
problem and the fix, and leaves the file system exactly as it was (no run folder, no staging
folder, no parent folder, no file a pickle could have written)."""
from __future__ import annotations

import hashlib
import os
import resource
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from foldship.models.checkpoint import read_state_dict

from .conftest import CIFAR_JPEG, CIFAR_LOSSLESS, RESNET20, RESNET56, invoke_cli, run_cli

CASES: dict = {}


def case(*expected: str):
    """Register a case: a function that writes its inputs and returns the CLI arguments."""
    def register(fn):
        CASES[fn.__name__] = (fn, expected)
        return fn
    return register


class Inputs:
    """One case's scratch folder, tmpfs mounts removed after the case, and extra subprocess options."""

    def __init__(self, root: Path, request):
        self.root, self.request, self.run_options = root, request, {}

    def path(self, name: str) -> str:
        return str(self.root / name)

    def config(self, **keys) -> list[str]:
        path = self.root / "config.yaml"
        path.write_text(yaml.safe_dump(keys))
        return ["--config", str(path)]

    def checkpoint(self, state) -> list[str]:
        path = self.root / "model.pt"
        torch.save(state, path)
        return ["--checkpoint", str(path)]

    def npz(self, x, y) -> list[str]:
        path = self.root / "data.npz"
        np.savez(path, x=x, y=y)
        return ["--data", str(path)]

    def mount(self, name: str, options: str) -> Path:
        target = self.root / name
        target.mkdir()
        mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(target)], capture_output=True)
        if mounted.returncode != 0:
            pytest.skip("mounting a tmpfs needs root with CAP_SYS_ADMIN")
        self.request.addfinalizer(lambda: subprocess.run(["umount", str(target)], check=True))
        return target


def cifar(n: int = 10):
    data = np.load(CIFAR_LOSSLESS)
    return data["x"][:n], data["y"][:n]


def r20_state() -> dict:
    return read_state_dict(RESNET20)


class _WritesAFile:
    """Unpickling this creates a file: proof that pickle code ran."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


# --- checkpoints ---------------------------------------------------------------------------------

@case("does not exist", "--checkpoint")
def checkpoint_missing(inputs):
    return ["--checkpoint", inputs.path("missing.th")]


@case("is empty (0 bytes)", "re-download")
def checkpoint_empty(inputs):
    Path(inputs.path("empty.th")).write_bytes(b"")
    return ["--checkpoint", inputs.path("empty.th")]


@case("corrupt or truncated", "re-download")
def checkpoint_truncated(inputs):
    Path(inputs.path("half.th")).write_bytes(RESNET20.read_bytes()[: RESNET20.stat().st_size // 2])
    return ["--checkpoint", inputs.path("half.th")]


@case("corrupt or truncated", "re-download")
def checkpoint_corrupt(inputs):
    Path(inputs.path("noise.th")).write_bytes(bytes(range(256)) * 64)
    return ["--checkpoint", inputs.path("noise.th")]


@case("not a readable safetensors file", "save_file")
def checkpoint_corrupt_safetensors(inputs):
    Path(inputs.path("noise.safetensors")).write_bytes(b"\xff" * 4096)
    return ["--checkpoint", inputs.path("noise.safetensors")]


@case("holds more than tensors", "--trust-checkpoint")
def checkpoint_with_pickled_code(inputs):
    # The marker file would appear in the snapshot if the pickle's code ran.
    torch.save({"state_dict": _WritesAFile(inputs.path("pwned"))}, inputs.path("evil.pt"))
    return ["--checkpoint", inputs.path("evil.pt")]


@case("does not hold a state dict of tensors", "model.state_dict()")
def checkpoint_without_tensors(inputs):
    return inputs.checkpoint({"epoch": 3, "note": "optimizer only"})


@case("does not fit model cifar_resnet20", "unexpected keys", "layer1.3", "check --model")
def checkpoint_of_another_depth(inputs):
    return ["--checkpoint", str(RESNET56)]


@case("shape mismatches linear.weight (100, 64)", "num_classes")
def checkpoint_of_another_width(inputs):
    state = r20_state()
    state["linear.weight"], state["linear.bias"] = torch.zeros(100, 64), torch.zeros(100)
    return inputs.checkpoint(state)


@case("non-float weights", "conv1.weight is torch.int8", "before quantisation")
def checkpoint_with_integer_weights(inputs):
    state = r20_state()
    state["conv1.weight"] = state["conv1.weight"].mul(100).to(torch.int8)
    return inputs.checkpoint(state)


@case("NaN or infinite values in layer2.0.bn1.running_var", "healthy checkpoint")
def checkpoint_with_nan_weights(inputs):
    state = r20_state()
    state["layer2.0.bn1.running_var"][3] = float("nan")
    return inputs.checkpoint(state)


# --- options -------------------------------------------------------------------------------------

@case("ratio 0.0 is outside (0, 1)", "--ratio 0.3")
def ratio_zero(inputs):
    return ["--ratio", "0"]


@case("ratio 1.0 is outside (0, 1)", "--ratio 0.3")
def ratio_one(inputs):
    return ["--ratio", "1"]


@case("round_to must be a whole number >= 1, got 0", "--round-to 8")
def round_to_zero_with_a_target(inputs):
    return ["--round-to", "0", "--target-macs", "0.8"]


@case("--ratio 0.5 and --target-macs 0.8 both given", "give one of them")
def ratio_and_target_flags(inputs):
    return ["--ratio", "0.5", "--target-macs", "0.8"]


@case("--drop-blocks removes whole residual blocks to meet --target-macs or --target-latency", "--target-macs 0.8")
def drop_blocks_without_a_target(inputs):
    return ["--drop-blocks", "--ratio", "0.3"]


@case("repair reconstruct needs unlabelled calibration images", "pass --calibration-data")
def reconstruct_without_calibration_data(inputs):
    return ["--repair", "reconstruct"]


@case("give each step once, in the order fold-ar+reconstruct+bn-recalibrate", "e.g. reconstruct+bn-recalibrate")
def repair_steps_out_of_order(inputs):
    return ["--repair", "bn-recalibrate+reconstruct", "--calibration-data", str(CIFAR_JPEG)]


@case("needs at least 65 calibration images", "linear solves 65 weights", "got 10", "--calibration-data")
def too_few_calibration_images_to_reconstruct(inputs):
    images = np.random.default_rng(0).integers(0, 256, (10, 32, 32, 3), dtype=np.uint8)
    np.savez(inputs.path("few.npz"), x=images)
    return ["--repair", "reconstruct", "--groups", "inner", "--calibration-data", inputs.path("few.npz")]


@case("unknown method 'magic'", "fold, prune-l1, prune-l2")
def unknown_method(inputs):
    return ["--method", "magic"]


@case("unknown model 'resnet9000'", "torchvision:<name>")
def unknown_model(inputs):
    return ["--model", "resnet9000"]


@case("unknown target 'tflite'", "onnx, tensorrt")
def unknown_backend(inputs):
    return ["--target", "tflite"]


@case("unknown device 'tpu'", "use auto, cpu or cuda")
def unknown_device(inputs):
    return ["--device", "tpu"]


@case("needs an NVIDIA GPU", "--device cpu")
def cuda_without_gpu(inputs):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    return ["--device", "cuda"]


# --- models --------------------------------------------------------------------------------------

@case("cannot run on inputs of shape (2, 3, 16, 16)", "Output size is too small", "set input_size")
def model_that_cannot_run_on_its_input(inputs):
    return inputs.config(model="torchvision:squeezenet1_1", random_weights=True, num_classes=10, input_size=16)


@case("cannot trace the model", "ZeroDivisionError", "check the input shape")
def model_that_cannot_be_traced(inputs):
    # Torch-Pruning cannot follow shufflenet's channel shuffle on 32x32 inputs.
    return inputs.config(model="torchvision:shufflenet_v2_x0_5", random_weights=True, num_classes=10, input_size=32,
                         limit=2)


# --- data ----------------------------------------------------------------------------------------

@case("does not exist", "--data")
def data_missing(inputs):
    return ["--data", inputs.path("missing.npz")]


@case("is not a readable .npz file", "numpy.savez")
def data_corrupt(inputs):
    Path(inputs.path("data.npz")).write_bytes(b"PK\x03\x04" + b"\x00" * 100)
    return ["--data", inputs.path("data.npz")]


@case("x is float32 (10, 32, 32, 3)", "expected uint8 images")
def data_of_wrong_dtype(inputs):
    x, y = cifar()
    return inputs.npz(x.astype(np.float32) / 255, y)


@case("images of shape (3, 64, 64)", "model takes (3, 32, 32)")
def data_of_wrong_image_size(inputs):
    x, y = cifar()
    return inputs.npz(x.repeat(2, axis=1).repeat(2, axis=2), y)


@case("1 channel(s)", "grayscale to RGB")
def data_in_grayscale(inputs):
    x, y = cifar()
    return inputs.npz(x.mean(axis=3, keepdims=True).astype(np.uint8), y)


@case("y is int64 (9,)", "expected 10 integer labels")
def data_with_too_few_labels(inputs):
    x, y = cifar()
    return inputs.npz(x, y[:9])


@case("labels in [-1, 8]", "use the dataset the model was trained for")
def data_with_negative_labels(inputs):
    x, _ = cifar()
    return inputs.npz(x, np.arange(10) - 1)


@case("labels in [0, 99] but the model has 10 classes", "set num_classes")
def data_for_other_classes(inputs):
    x, _ = cifar(100)
    return inputs.npz(x, np.arange(100))  # CIFAR-100 style labels for a CIFAR-10 model


@case("holds no images", "non-empty dataset")
def data_empty(inputs):
    return inputs.npz(np.zeros((0, 32, 32, 3), np.uint8), np.zeros(0, np.int64))


# --- recovery (--finetune distill) ------------------------------------------------------------

@case("--finetune distill needs --calibration-data", "never the evaluation set")
def finetune_without_calibration_data(inputs):
    return ["--finetune", "distill"]


@case("--finetune-epochs must be a whole number >= 1, got 0")
def finetune_zero_epochs(inputs):  # minutes and learning rate: tests/test_distill.py, through the config
    return ["--finetune", "distill", "--calibration-data", str(CIFAR_JPEG), "--finetune-epochs", "0"]


@case("only holds near-copies of the evaluation images", "use other images")
def finetune_on_copies_of_the_evaluation_images(inputs):
    return ["--finetune", "distill", "--calibration-data", str(CIFAR_LOSSLESS)]  # the evaluation images themselves


@case("needs at least 64 calibration images (one batch of --finetune-batch 64), got 40", "smaller --finetune-batch")
def finetune_on_too_few_images(inputs):
    x = np.load(CIFAR_JPEG)["x"][-40:]  # the last trucks: none is a near-copy of the first 1,000 test images
    np.savez(inputs.path("few.npz"), x=x)
    return ["--finetune", "distill", "--calibration-data", inputs.path("few.npz")]


# --- the output folder ---------------------------------------------------------------------------

@case("already exists", "pass --overwrite")
def output_folder_exists(inputs):
    taken = Path(inputs.path("taken"))
    taken.mkdir()
    (taken / "report.json").write_text("{}\n")  # must survive untouched
    return ["--out", str(taken)]


@case("cannot write to", "choose a writable --out")
def output_under_a_file(inputs):
    Path(inputs.path("file")).write_text("not a folder")
    return ["--out", inputs.path("file/run")]


@case("cannot write to", "choose a writable --out")
def output_not_writable(inputs):
    if os.geteuid() != 0:
        read_only = inputs.root / "readonly"
        read_only.mkdir(mode=0o555)
    else:  # root writes through permission bits: a read-only file system stops it
        read_only = inputs.mount("readonly", "ro,size=64k")
    return ["--out", str(read_only / "run")]


@case("No space left on device", "nothing was kept", "free disk space")
def disk_full(inputs):
    small = inputs.mount("small", "size=256k")  # room for the folder, not for the weights
    return ["--out", str(small / "run")]


@case("File too large", "nothing was kept", "ulimit -f")
def file_size_limit(inputs):
    # Python ignores SIGXFSZ, so writing past the limit fails with EFBIG, like a full disk.
    limit = 256 * 1024
    inputs.run_options["preexec_fn"] = lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return []


def snapshot(root: Path) -> dict[str, str]:
    """Every path under ``root`` with a hash of its bytes (folders as 'dir')."""
    found = {}
    for folder, dirs, files in os.walk(root):
        for name in dirs:
            found[os.path.relpath(os.path.join(folder, name), root)] = "dir"
        for name in files:
            path = os.path.join(folder, name)
            found[os.path.relpath(path, root)] = hashlib.sha256(Path(path).read_bytes()).hexdigest()
    return found


# Cases that also run as a real ``python -m foldship`` process, beside those that need one (run options such
# as a file size limit): the in-process CLI must answer them exactly as the process does.
ALSO_IN_A_PROCESS = ("ratio_zero", "checkpoint_with_pickled_code")


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory, request) -> dict:
    """Every case through the CLI: in this process, and in a real process where the case needs one.

    Per case: the CLI result and snapshots of its folder before and after, or why it was skipped; for the
    cases in ALSO_IN_A_PROCESS, "<name>@process" holds the same for a second, real process run.
    """
    prepared = {}
    for name, (make_args, _) in CASES.items():
        for key in (name, f"{name}@process") if name in ALSO_IN_A_PROCESS else (name,):
            root = tmp_path_factory.mktemp(key.replace("@", "_"))
            inputs = Inputs(root / "inputs", request)
            inputs.root.mkdir()
            try:
                args = make_args(inputs)
            except pytest.skip.Exception as exc:
                prepared[key] = exc.msg
                continue
            # A case's own --out comes last and wins.
            command = ("build", "--out", str(root / "runs" / "out"), "--quiet", *args)
            prepared[key] = (root, command, inputs.run_options, snapshot(root))
    in_a_process = {key for key, p in prepared.items() if isinstance(p, tuple) and (p[2] or key.endswith("@process"))}
    # The processes run side by side (mostly imports, one core each) while this one runs the other cases.
    with ThreadPoolExecutor(max_workers=len(in_a_process)) as pool:
        running = {key: pool.submit(run_cli, *prepared[key][1], **prepared[key][2]) for key in sorted(in_a_process)}
        results = {key: invoke_cli(*p[1]) for key, p in prepared.items() if isinstance(p, tuple) and key not in running}
        results.update({key: future.result() for key, future in running.items()})
    return {key: (p if isinstance(p, str) else (results[key], p[3], snapshot(p[0]))) for key, p in prepared.items()}


@pytest.mark.parametrize("name", sorted(CASES) + [f"{name}@process" for name in ALSO_IN_A_PROCESS])
def test_bad_input_exits_2_with_one_line_and_leaves_nothing(outcomes, name):
    if isinstance(outcomes[name], str):
        pytest.skip(outcomes[name])
    result, before, after = outcomes[name]
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2, result.stderr
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for text in CASES[name.split("@")[0]][1]:
        assert text in lines[0]
    assert result.stdout == ""
    assert after == before


@pytest.mark.parametrize("name", ALSO_IN_A_PROCESS)
def test_the_cli_in_this_process_answers_as_the_real_process(outcomes, name):
    """The matrix runs most cases in this process to spare ~6 s of imports each; a real process must agree."""
    here, there = outcomes[name][0], outcomes[f"{name}@process"][0]
    scratch = str(Path(outcomes[name][0].args[3]).parents[1])  # each run has its own scratch folder
    scratch_there = str(Path(there.args[5]).parents[1])
    assert (here.returncode, here.stdout) == (there.returncode, there.stdout)
    assert here.stderr.replace(scratch, "ROOT") == there.stderr.replace(scratch_there, "ROOT")


def test_trusted_pickle_runs_only_after_a_warning(tmp_path):
    """The other side of checkpoint_with_pickled_code: --trust-checkpoint does run the pickle, and says so first."""
    marker = tmp_path / "pwned"
    torch.save({"state_dict": _WritesAFile(str(marker))}, tmp_path / "evil.pt")
    result = invoke_cli("build", "--checkpoint", str(tmp_path / "evil.pt"), "--trust-checkpoint", "--out",
                        str(tmp_path / "out"), "--quiet")
    warning, error = result.stderr.strip().splitlines()
    assert warning.startswith("warning: --trust-checkpoint") and "runs any code inside it" in warning
    assert result.returncode == 2 and "does not hold a state dict of tensors" in error
    assert marker.exists() and not (tmp_path / "out").exists()
