"""GPU detection of node_agent/capabilities.py.

There is no NVIDIA GPU here: a stand-in ``nvidia-smi`` (a shell script on PATH printing what a
real one prints for the same query) exercises the detection path; NVML (``nvidia-ml-py``, the
``gpu`` extra) finds no driver here, or is not installed, so detection falls through to
``nvidia-smi`` as it does on such machines.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from cli.agent import check_gpus
from node_agent.capabilities import detect, nvidia_backends, parse_smi
from protocol.devices import cycles_device, route_key, satisfies


def fake_smi(folder: Path, output: str, monkeypatch: pytest.MonkeyPatch) -> None:
    exe = folder / "nvidia-smi"
    exe.write_text(
        "#!/bin/sh\n"
        'case "$*" in *--query-gpu=index,name,memory.total,compute_cap,driver_version,uuid*) ;; '
        "*) exit 9;; esac\n"
        f"cat <<'OUT'\n{output}OUT\n"
    )
    exe.chmod(0o755)
    monkeypatch.setenv("PATH", f"{folder}{os.pathsep}{os.environ['PATH']}")


def test_no_gpu_here_means_cpu_only() -> None:
    caps = detect()
    assert caps["cpu_cores"] >= 1 and caps["memory_bytes"] > 0
    assert caps["gpus"] == [] and caps["backends"] == []


def test_nvidia_gpus_are_detected_through_nvidia_smi(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fake_smi(
        tmp_path,
        "0, NVIDIA H200, 143771, 9.0, 570.86.15, GPU-1b2c\n"
        "1, NVIDIA RTX A4000, 16376, 8.6, 570.86.15, GPU-9f0e\n",
        monkeypatch,
    )
    caps = detect()
    assert [g["name"] for g in caps["gpus"]] == ["NVIDIA H200", "NVIDIA RTX A4000"]
    assert caps["gpus"][0]["memory_bytes"] == 143771 << 20
    assert [g["uuid"] for g in caps["gpus"]] == ["GPU-1b2c", "GPU-9f0e"]
    assert caps["backends"] == ["OPTIX", "CUDA"]
    assert route_key("default", caps["backends"]) == "default.gpu-optix-cuda"
    assert cycles_device("gpu", caps["backends"]) == "OPTIX"
    assert cycles_device("any", caps["backends"]) == "OPTIX"
    assert cycles_device("gpu:cuda", caps["backends"]) == "CUDA"
    assert cycles_device("cpu", caps["backends"]) == "CPU"


def test_a_broken_nvidia_smi_means_no_gpu(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    exe = tmp_path / "nvidia-smi"
    exe.write_text("#!/bin/sh\necho 'NVIDIA-SMI has failed: no driver' >&2\nexit 9\n")
    exe.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    assert detect()["backends"] == []


def test_old_gpus_and_drivers_get_only_what_blender_supports() -> None:
    kepler = parse_smi("0, Tesla K80, 11441, 3.7, 470.1\n")
    assert nvidia_backends(kepler) == []  # compute capability 3.7 < 5.0
    old_driver = parse_smi("0, Quadro RTX 4000, 7982, 7.5, 470.2\n")
    assert nvidia_backends(old_driver) == ["CUDA"]  # OptiX needs driver 535+
    assert parse_smi("garbage\n, , ,\n") == []


def test_backends_named_by_hand_override_detection(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fake_smi(tmp_path, "0, NVIDIA H200, 143771, 9.0, 570.86.15\n", monkeypatch)
    assert detect(backends=[])["backends"] == []  # keep the GPU out of the farm
    assert detect(backends=["hip", "nonsense"])["backends"] == ["HIP"]


@pytest.mark.parametrize(
    ("device", "backends", "ok"),
    [
        ("any", [], True),
        ("cpu", ["OPTIX"], True),
        ("gpu", [], False),
        ("gpu", ["HIP"], True),
        ("gpu:optix", ["CUDA"], False),
        ("gpu:optix", ["OPTIX", "CUDA"], True),
        ("gpu:metal", ["OPTIX", "CUDA"], False),
    ],
)
def test_which_agents_satisfy_which_devices(device: str, backends: list[str], ok: bool) -> None:
    assert satisfies(device, backends) is ok


def test_the_gpus_option_must_name_gpus_that_are_here(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    no_gpu = detect()
    with pytest.raises(ValueError, match="none was detected here"):
        check_gpus("all", no_gpu, None)
    with pytest.raises(ValueError, match="none was detected here"):
        check_gpus(["0"], no_gpu, None)
    check_gpus(None, no_gpu, None)  # no --gpus: fine anywhere
    fake_smi(tmp_path, "0, NVIDIA H200, 143771, 9.0, 570.86.15, GPU-1b2c\n", monkeypatch)
    one = detect()
    check_gpus("all", one, None)
    check_gpus(["0"], one, None)
    check_gpus(["GPU-1b2c"], one, None)
    with pytest.raises(
        ValueError, match=r"--gpus 7: no such GPU here; the detected ones are 0 \(NVIDIA H200\)"
    ):
        check_gpus(["7"], one, None)
    with pytest.raises(ValueError, match="--backends none advertises none"):
        check_gpus("all", one, [])


@pytest.mark.parametrize(
    ("value", "says"),
    [
        ("OPTIX,,CUDA", "has an empty item"),
        (",", "has an empty item"),
        ("none,OPTIX", "none cannot be combined with backends"),
        ("bogus", "unknown backend(s) BOGUS"),
    ],
)
def test_bad_backends_are_refused_before_anything_starts(value: str, says: str) -> None:
    from click.testing import CliRunner

    from cli.main import main

    res = CliRunner().invoke(
        main, ["agent", "--server", "http://127.0.0.1:9", "--token", "t", "--backends", value]
    )
    assert res.exit_code == 2, res.output
    assert says in " ".join(res.output.split())


def test_no_gpus_for_the_containers_means_no_backend_to_advertise() -> None:
    from click.testing import CliRunner

    from cli.main import main

    args = ["agent", "--server", "http://127.0.0.1:9", "--token", "t", "--executor", "docker"]
    res = CliRunner().invoke(main, [*args, "--gpus", "none", "--backends", "OPTIX"])
    assert res.exit_code == 2, res.output
    assert "--gpus none gives the containers no GPU, so they cannot render with OPTIX" in " ".join(
        res.output.split()
    )
