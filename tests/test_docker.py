"""The Docker image and compose file, proven without a Docker engine (none runs here).

Two kinds of test: the files are parsed and held to their invariants (a GPU reservation, health
checks that gate start-up, nothing published beyond loopback, a non-root user, no secret in a
file); and each service's command is taken from docker/compose.yaml and run outside Docker
against a real PostgreSQL and a real MLflow server, with only hosts, ports and paths swapped,
so that the commands the containers run are known to work.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from servers import (  # noqa: F401 (the postgres fixture)
    START_TIMEOUT_S,
    Postgres,
    free_port,
    postgres,
    postgres_bindir,
    stop_process_group,
    wait_for_http,
)

REPO = Path(__file__).resolve().parent.parent
DOCKER = REPO / "docker"
SECRET_NAME = re.compile(r"pass(word)?|secret|token|api_?key", re.IGNORECASE)


# ---- reading the files --------------------------------------------------------------------------


def dockerfile_instructions(path: Path = DOCKER / "Dockerfile") -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, with continuation lines joined and comments dropped."""
    instructions: list[tuple[str, str]] = []
    pending = ""
    for line in path.read_text().splitlines():
        stripped = line.strip()
        if not pending and (not stripped or stripped.startswith("#")):
            continue
        if stripped.startswith("#"):
            continue  # a comment inside a continued instruction
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        keyword, _, arguments = (pending + stripped).partition(" ")
        instructions.append((keyword.upper(), arguments.strip()))
        pending = ""
    return instructions


def compose_file() -> dict:
    return yaml.safe_load((DOCKER / "compose.yaml").read_text())


VARIABLE = re.compile(r"\$\$|\$\{(?P<name>\w+)(?:(?P<op>:?[-?])(?P<arg>[^}]*))?\}")


def interpolate(value, env: dict[str, str]):
    """Compose's `${VAR}`, `${VAR:-default}`, `${VAR:?error}` and `$$` in `value`'s strings."""
    if isinstance(value, dict):
        return {key: interpolate(item, env) for key, item in value.items()}
    if isinstance(value, list):
        return [interpolate(item, env) for item in value]
    if not isinstance(value, str):
        return value

    def substitute(match: re.Match) -> str:
        if match.group(0) == "$$":
            return "$"
        name, op, arg = match.group("name", "op", "arg")
        current = env.get(name)
        missing = current is None or (op is not None and op.startswith(":") and current == "")
        if op in (":?", "?") and missing:
            raise KeyError(f"{name}: {arg}")
        if op in (":-", "-") and missing:
            return arg
        return current or ""

    return VARIABLE.sub(substitute, value)


def env_example() -> dict[str, str]:
    pairs = {}
    for line in (DOCKER / ".env.example").read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            key, _, value = line.partition("=")
            pairs[key.strip()] = value.strip()
    return pairs


# ---- the Dockerfile -----------------------------------------------------------------------------


def test_base_image_is_pytorch_with_cuda_pinned_by_tag() -> None:
    froms = [args for keyword, args in dockerfile_instructions() if keyword == "FROM"]
    assert len(froms) == 1
    image, _, tag = froms[0].split()[0].partition(":")
    assert image == "pytorch/pytorch"
    # A tag such as 2.8.0-cuda12.9-cudnn9-runtime: torch, CUDA and cuDNN versions, not "latest".
    assert re.fullmatch(r"\d+\.\d+\.\d+-cuda\d+\.\d+-cudnn\d+-runtime", tag), tag


def test_runs_as_a_non_root_user_with_the_training_entry_point() -> None:
    instructions = dockerfile_instructions()
    keywords = [keyword for keyword, _ in instructions]
    users = [args for keyword, args in instructions if keyword == "USER"]
    assert users, "no USER: the container would run as root"
    assert users[-1].split(":")[0] not in ("root", "0")
    # The user is switched before anything runs as the container's process.
    assert keywords.index("ENTRYPOINT") > len(keywords) - 1 - keywords[::-1].index("USER")
    entrypoint = next(args for keyword, args in instructions if keyword == "ENTRYPOINT")
    assert yaml.safe_load(entrypoint) == ["python", "-m", "src.train"]


def test_dependencies_are_installed_before_the_code_is_copied() -> None:
    instructions = dockerfile_instructions()

    def first(predicate) -> int:
        return next(i for i, instruction in enumerate(instructions) if predicate(*instruction))

    copy_pyproject = first(lambda k, a: k == "COPY" and a.split()[0] == "pyproject.toml")
    install_deps = first(lambda k, a: k == "RUN" and "pip install -r" in a)
    copy_code = first(lambda k, a: k == "COPY" and a.split()[0].rstrip("/") == "src")
    install_project = first(lambda k, a: k == "RUN" and "pip install --no-deps" in a)
    # A change to src/ invalidates only the layers from copy_code on: the deps stay cached.
    assert copy_pyproject < install_deps < copy_code < install_project
    copied_before_deps = [a.split()[0] for k, a in instructions[:install_deps] if k == "COPY"]
    assert copied_before_deps == ["pyproject.toml"]


def test_the_dependency_step_keeps_the_installed_torch(tmp_path: Path) -> None:
    """Run the image's dependency step against this venv: pip must plan no change to torch."""
    instructions = dockerfile_instructions()
    step = next(args for keyword, args in instructions if keyword == "RUN" and "-r " in args)
    (tmp_path / "pyproject.toml").write_text((REPO / "pyproject.toml").read_text())
    env = {
        **os.environ,
        # `python` and `pip` are this venv's, as they are the image's own there.
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        "PIP_DRY_RUN": "1",  # plan only, and from what is installed: no network
        "PIP_NO_INDEX": "1",
    }
    step = step.replace("/tmp/", f"{tmp_path}/")
    result = subprocess.run(
        ["sh", "-c", step], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stdout + result.stderr
    import torch

    # The constraint pins the torch that is there, build tag and all (+cpu here, +cu129 there).
    assert (tmp_path / "constraints.txt").read_text().strip() == f"torch=={torch.__version__}"
    requirements = (tmp_path / "requirements.txt").read_text().split()
    assert any(line.startswith("torch") for line in requirements)
    planned = [line for line in result.stdout.splitlines() if line.startswith("Would install")]
    assert not any(re.search(r"\btorch-\d", line) for line in planned), planned


def test_dockerignore_keeps_data_runs_venvs_and_secrets_out() -> None:
    entries = {
        line.strip().rstrip("/")
        for line in (REPO / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    }
    for needed in [".git", ".venv", "data", "outputs", "multirun", "mlflow.db", "mlartifacts",
                   "mlruns", "docker/.env"]:
        assert needed in entries, needed
    # What the Dockerfile copies must not be ignored, or the build fails.
    copied = [args.split()[0].rstrip("/") for keyword, args in dockerfile_instructions()
              if keyword == "COPY"]
    assert copied and not set(copied) & entries
    for source in copied:
        assert (REPO / source).exists(), source


# ---- the compose file ---------------------------------------------------------------------------


def test_services_and_their_images() -> None:
    services = compose_file()["services"]
    assert set(services) == {"postgres", "mlflow", "trainer"}
    for name, service in services.items():
        image = service["image"]
        if "build" in service:
            # Built here, from this Dockerfile, with the repository root as the context.
            assert service["build"] == {"context": "..", "dockerfile": "docker/Dockerfile"}
        else:
            # Pulled: pinned by a tag that is not "latest".
            assert ":" in image and not image.endswith(":latest"), (name, image)


def test_trainer_reserves_gpus_and_runs_the_sweep_on_the_other_services() -> None:
    trainer = compose_file()["services"]["trainer"]
    devices = trainer["deploy"]["resources"]["reservations"]["devices"]
    assert any(d["driver"] == "nvidia" and "gpu" in d["capabilities"] for d in devices)
    # Replicas see all GPUs and claim one each; `count: 1` would put them all on GPU 0.
    assert trainer["environment"]["TBPTT_GPU_LOCK_DIR"]
    assert "scale" not in trainer and "container_name" not in trainer  # both block --scale

    command = trainer["command"]
    assert command[0] == "-m" and "trainer=gpu" in command
    assert "hydra.sweeper.storage=$${oc.env:TBPTT_OPTUNA_STORAGE}" in command
    assert "@postgres:5432/optuna" in trainer["environment"]["TBPTT_OPTUNA_STORAGE"]
    assert trainer["environment"]["MLFLOW_TRACKING_URI"] == "http://mlflow:5000"


def test_start_up_waits_for_health_checks() -> None:
    services = compose_file()["services"]
    for name in ("postgres", "mlflow"):
        assert services[name]["healthcheck"]["test"], name
    assert services["mlflow"]["depends_on"] == {"postgres": {"condition": "service_healthy"}}
    assert services["trainer"]["depends_on"] == {
        "postgres": {"condition": "service_healthy"},
        "mlflow": {"condition": "service_healthy"},
    }


def test_no_port_is_published_beyond_loopback() -> None:
    published = 0
    # As compose reads it, with the variables of the example env file filled in.
    for name, service in resolved_compose("pw")["services"].items():
        for port in service.get("ports", []):
            published += 1
            if isinstance(port, dict):
                assert port.get("host_ip") == "127.0.0.1", (name, port)
            else:
                # "HOST_IP:HOST_PORT:CONTAINER_PORT"; a bare "5000:5000" binds 0.0.0.0.
                assert str(port).startswith("127.0.0.1:") and str(port).count(":") == 2, port
        assert "expose" not in service or name != "postgres"
    assert published == 1  # the MLflow UI; PostgreSQL stays on the compose network


def test_volumes_are_named() -> None:
    compose = compose_file()
    assert set(compose["volumes"]) == {"postgres-data", "mlartifacts", "runs"}
    mounts = {name: service.get("volumes", []) for name, service in compose["services"].items()}
    assert "postgres-data:/var/lib/postgresql/data" in mounts["postgres"]
    assert "mlartifacts:/mlartifacts" in mounts["mlflow"]


def _strings(node) -> Iterator[tuple[str, str]]:
    """(key, string) for every string in a parsed YAML tree; list items carry their list's key."""
    stack = [("", node)]
    while stack:
        key, value = stack.pop()
        if isinstance(value, dict):
            stack.extend((str(k), v) for k, v in value.items())
        elif isinstance(value, list):
            stack.extend((key, v) for v in value)
        elif isinstance(value, str):
            yield key, value


def test_no_secret_is_written_in_the_files() -> None:
    for key, value in _strings(compose_file()):
        if SECRET_NAME.search(key):
            assert re.fullmatch(r"\$\{\w+(:?[-?][^}]*)?\}", value), (key, value)
        # A password inside a URL must be a variable too.
        for password in re.findall(r"://[^:/@\s]+:([^@\s]+)@", value):
            assert re.fullmatch(r"\$\{\w+(:?[-?][^}]*)?\}", password), value

    example = env_example()
    assert example["POSTGRES_PASSWORD"] == ""  # the user sets it; compose fails until then
    for key, value in example.items():
        if SECRET_NAME.search(key):
            assert value == "", key
    assert not re.search(r"(?i)pass(word)?\s*[=:]\s*\S", (DOCKER / "Dockerfile").read_text())

    # The real env file is never committed.
    ignored = subprocess.run(["git", "check-ignore", "-q", "docker/.env"], cwd=REPO, check=False)
    assert ignored.returncode == 0


def test_compose_refuses_to_start_without_a_password() -> None:
    compose = compose_file()
    with pytest.raises(KeyError, match="POSTGRES_PASSWORD"):
        interpolate(compose, env_example())
    resolved = interpolate(compose, {**env_example(), "POSTGRES_PASSWORD": "pw"})
    assert resolved["services"]["mlflow"]["ports"] == ["127.0.0.1:5000:5000"]
    assert resolved["services"]["trainer"]["environment"]["TBPTT_OPTUNA_STORAGE"] == (
        "postgresql://tbptt:pw@postgres:5432/optuna"
    )


# ---- the services' commands, run outside Docker -------------------------------------------------


def resolved_compose(password: str) -> dict:
    return interpolate(compose_file(), {**env_example(), "POSTGRES_PASSWORD": password})


@pytest.fixture
def compose_postgres(postgres: Postgres) -> Iterator[tuple[Postgres, str]]:  # noqa: F811
    """The databases the postgres service sets up: POSTGRES_DB, then its init script's.

    The test server has its own password; the compose file is resolved with that one, and the
    compose service name and port (postgres:5432) become the test server's.
    """
    service = resolved_compose(postgres.password)["services"]["postgres"]
    database = service["environment"]["POSTGRES_DB"]
    # A database per test: the session's server is shared.
    suffix = f"_{os.getpid()}_{free_port()}"
    url = postgres.create_database(database + suffix)
    import psycopg

    init_sql = (DOCKER / "postgres-init.sql").read_text()
    # The image runs the init script with psql in POSTGRES_DB; the names get the same suffix.
    init_sql = re.sub(r"(?i)(CREATE DATABASE\s+)(\w+)", rf"\g<1>\g<2>{suffix}", init_sql)
    with psycopg.connect(url, autocommit=True) as connection:
        for statement in filter(str.strip, init_sql.split(";")):
            connection.execute(statement)
    yield postgres, suffix


def to_test_servers(text: str, pg: Postgres, suffix: str) -> str:
    """A compose-network URL made to point at the test PostgreSQL and its databases."""
    text = text.replace("@postgres:5432/", f"@{pg.host}:{pg.port}/")
    return re.sub(rf"(@{re.escape(pg.host)}:{pg.port}/\w+)", rf"\g<1>{suffix}", text)


@pytest.mark.server
@pytest.mark.slow
def test_postgres_health_check_passes_on_a_live_server(compose_postgres) -> None:
    pg, suffix = compose_postgres
    service = compose_file()["services"]["postgres"]
    kind, command = service["healthcheck"]["test"]
    assert kind == "CMD-SHELL"
    command = interpolate(command, {})  # $$ -> $: the shell in the container expands it
    env = {**os.environ, "POSTGRES_USER": pg.user, "PGPORT": str(pg.port),
           "PATH": f"{postgres_bindir()}{os.pathsep}{os.environ['PATH']}"}
    # pg_isready takes its port from PGPORT; the database name gets the test's suffix.
    command = command.replace("-d optuna", f"-d optuna{suffix}")
    ok = subprocess.run(["sh", "-c", command], env=env, capture_output=True, text=True)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    down = subprocess.run(["sh", "-c", command], env={**env, "PGPORT": str(free_port())},
                          capture_output=True, text=True)
    assert down.returncode != 0  # and it fails where nothing listens


@pytest.mark.server
@pytest.mark.slow
def test_mlflow_service_command_serves_on_postgres(compose_postgres, tmp_path: Path) -> None:
    pg, suffix = compose_postgres
    service = resolved_compose(pg.password)["services"]["mlflow"]
    port = free_port()
    swaps = {
        "--host=0.0.0.0": "--host=127.0.0.1",  # in a test, loopback only
        "--port=5000": f"--port={port}",
        "--artifacts-destination=/mlartifacts": f"--artifacts-destination={tmp_path / 'art'}",
    }
    command = [swaps.get(arg, arg) for arg in service["command"]]
    assert set(swaps) <= set(service["command"])  # every swapped argument is the compose one
    executable = str(Path(sys.executable).with_name(service["entrypoint"][0]))
    env = {key: to_test_servers(value, pg, suffix)
           for key, value in service["environment"].items()}
    assert env["MLFLOW_BACKEND_STORE_URI"].endswith(f"/mlflow{suffix}")

    log_path = tmp_path / "mlflow.log"
    full_env = {**os.environ, **env}
    full_env.pop("MLFLOW_TRACKING_URI", None)
    with open(log_path, "w") as log:
        process = subprocess.Popen(
            [executable, *service["entrypoint"][1:], *command], stdout=log,
            stderr=subprocess.STDOUT, env=full_env, start_new_session=True,
        )
    try:
        wait_for_http(f"http://127.0.0.1:{port}/health", process, log_path, START_TIMEOUT_S)

        # The container's health check, aimed at this port.
        check = service["healthcheck"]["test"]
        assert check[0] == "CMD"
        check = [arg.replace("127.0.0.1:5000", f"127.0.0.1:{port}") for arg in check[1:]]
        check[0] = sys.executable if check[0] == "python" else check[0]
        assert subprocess.run(check, timeout=30).returncode == 0

        # Runs land in PostgreSQL, and their artifacts go through the server to its folder.
        from mlflow import MlflowClient

        client = MlflowClient(f"http://127.0.0.1:{port}")
        experiment_id = client.create_experiment("compose-check")
        run_id = client.create_run(experiment_id).info.run_id
        client.log_text(run_id, "hello", "note.txt")
        assert list((tmp_path / "art").rglob("note.txt"))
        import psycopg

        with psycopg.connect(env["MLFLOW_BACKEND_STORE_URI"]) as connection:
            row = connection.execute("SELECT count(*) FROM runs WHERE run_uuid = %s", [run_id])
            assert row.fetchone()[0] == 1

        # The Host headers the server must answer: trainers say mlflow:5000, a browser on the
        # host says localhost or 127.0.0.1 with the published port; others are refused.
        def status(host: str) -> int:
            request = urllib.request.Request(
                f"http://127.0.0.1:{port}/api/2.0/mlflow/experiments/get?experiment_id=0",
                headers={"Host": host},
            )
            try:
                with urllib.request.urlopen(request, timeout=10) as response:
                    return response.status
            except urllib.error.HTTPError as error:
                return error.code

        assert status("mlflow:5000") == 200
        assert status("localhost:5000") == 200
        assert status("127.0.0.1:5123") == 200
        assert status("attacker.example:5000") in (400, 403)
    finally:
        stop_process_group(process)


@pytest.mark.server
@pytest.mark.slow
def test_trainer_service_command_runs_a_sweep_on_the_services(compose_postgres, tmp_path):
    """The trainer's command and environment, on the CPU, against PostgreSQL and MLflow."""
    from conftest import TINY
    from servers import start_mlflow_server

    pg, suffix = compose_postgres
    service = resolved_compose(pg.password)["services"]["trainer"]
    entrypoint = next(a for k, a in dockerfile_instructions() if k == "ENTRYPOINT")
    backend = to_test_servers(f"{pg.url('mlflow')}", pg, suffix)
    with start_mlflow_server(tmp_path / "mlflow", backend_uri=backend) as tracking_uri:
        env = {key: to_test_servers(value, pg, suffix)
               for key, value in service["environment"].items()}
        env |= {
            "MLFLOW_TRACKING_URI": tracking_uri,  # was http://mlflow:5000
            "TBPTT_GPU_LOCK_DIR": str(tmp_path / "gpu-locks"),
            "HOSTNAME": "trainer-1",  # what Docker sets in each replica
            "OMP_NUM_THREADS": "1",
        }
        args = [("trainer=cpu" if arg == "trainer=gpu" else arg.replace("/workspace",
                                                                           str(tmp_path)))
                for arg in service["command"]]
        small = [*TINY, "trainer.num_threads=1", "hydra.sweeper.n_trials=2",
                 "hydra.sweeper.pruner_options.n_startup_trials=100"]
        command = [sys.executable if part == "python" else part
                   for part in yaml.safe_load(entrypoint)]
        result = subprocess.run(
            [*command, *args, *small], cwd=tmp_path, env={**os.environ, **env},
            capture_output=True, text=True, timeout=600, check=False,
        )
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]

        # The study is in the compose file's database, under its name ...
        from hydra_plugins.tbptt_optuna_sweeper.study import load_study

        study_name = next(arg.split("=", 1)[1] for arg in service["command"]
                          if arg.startswith("hydra.sweeper.study_name="))
        study = load_study(env["TBPTT_OPTUNA_STORAGE"], study_name)
        assert [t.state.name for t in study.trials] == ["COMPLETE", "COMPLETE"]
        # ... the sweep folder is the replica's own ...
        assert (tmp_path / "multirun" / "tbptt" / "trainer-1" / "multirun.yaml").exists()
        # ... and the runs are on the tracking server, nested, with no password in a tag.
        from mlflow import MlflowClient

        client = MlflowClient(tracking_uri)
        runs = client.search_runs([client.get_experiment_by_name("tbptt-lab").experiment_id])
        parents = [r for r in runs if r.data.tags.get("sweep.role") == "parent"]
        assert len(parents) == 1 and len(runs) == 3
        assert all(pg.password not in str(r.data.tags) + str(r.data.params) for r in runs)


def test_trainer_command_is_a_valid_train_invocation() -> None:
    """The trainer's arguments, with the GPU swapped for the CPU, parse and compose."""
    from conftest import compose

    service = resolved_compose("pw")["services"]["trainer"]
    args = [arg for arg in service["command"] if arg != "-m"]
    overrides = [("trainer=cpu" if arg == "trainer=gpu" else arg) for arg in args]
    overrides = [arg for arg in overrides if not arg.startswith("hydra.")]
    cfg = compose(overrides)
    assert cfg.trainer.accelerator == "cpu"
    gpu = compose([arg for arg in args if not arg.startswith("hydra.")])
    assert gpu.trainer.accelerator == "gpu"
    assert gpu.trainer.precision == "bf16-mixed"
    assert shlex.join(service["command"])  # plain strings only


# ---- the GPU trainer: precision, clipping, cuDNN, one GPU per worker ---------------------------

# With 16-mixed the loss is scaled by 65536 before backward: clipping before the scaler unscales
# would shrink a step to 1/65536 of what it should be. SGD with lr=1 moves the weights by
# exactly the clipped norm.
CLIP = 1e-3


def _one_step_delta(precision: str, clip: float | None, optimizer: str = "sgd") -> float:
    import lightning.pytorch as pl
    import torch
    from conftest import TINY, compose

    from src.data import build_data
    from src.model import SequenceLSTM
    from src.module import TBPTTModule
    from src.train import _optimizer_factory

    plain = ["optimizer.momentum=0"] if optimizer == "sgd" else []
    cfg = compose([*TINY, f"optimizer={optimizer}", "optimizer.lr=1.0", "tbptt.k=24", *plain,
                   f"trainer.precision={precision}"])
    pl.seed_everything(0, verbose=False)
    data = build_data(cfg.data, stream=cfg.tbptt.stream, seed=0)
    model = SequenceLSTM(data.spec, hidden_size=8, embedding_dim=4)
    module = TBPTTModule(model, data.spec, cfg.tbptt, gradient_clip_val=clip,
                         optimizer_factory=_optimizer_factory(cfg.optimizer, cfg.trainer))
    before = torch.nn.utils.parameters_to_vector(model.parameters()).detach().clone()
    trainer = pl.Trainer(
        accelerator="cpu", precision=precision, max_epochs=1, limit_train_batches=1,
        limit_val_batches=0, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False,
    )
    trainer.fit(module, data.train)
    assert trainer.global_step == 1  # one batch, one window (k = seq_len): one step
    after = torch.nn.utils.parameters_to_vector(model.parameters()).detach()
    return float((after - before).norm())


@pytest.mark.slow
@pytest.mark.parametrize("precision", ["32-true", "16-mixed", "bf16-mixed"])
def test_gradients_are_clipped_after_the_loss_scale_is_undone(precision: str) -> None:
    assert _one_step_delta(precision, CLIP) == pytest.approx(CLIP, rel=1e-2)
    # And without clipping the step is far larger, so the clip did something.
    assert _one_step_delta(precision, None) > 20 * CLIP


@pytest.mark.parametrize(
    ("precision", "fused"), [("32-true", True), ("bf16-mixed", True), ("16-mixed", False)]
)
def test_fused_optimizer_only_where_the_scaler_allows_clipping(precision, fused) -> None:
    import torch
    from conftest import compose

    from src.train import _optimizer_factory

    for accelerator in ("gpu", "cpu"):
        cfg = compose([f"trainer.precision={precision}", f"trainer.accelerator={accelerator}"])
        optimizer = _optimizer_factory(cfg.optimizer, cfg.trainer)([torch.nn.Parameter(
            torch.zeros(2))])
        assert optimizer.defaults["fused"] is fused


@pytest.mark.slow
def test_fused_adam_with_16_mixed_and_clipping_trains() -> None:
    # Lightning refuses to clip the gradients of a fused optimizer under a gradient scaler.
    assert _one_step_delta("16-mixed", CLIP, optimizer="adam") > 0


def test_gpu_config_and_nothing_turns_cudnn_off() -> None:
    import torch
    from conftest import compose

    import src.module
    import src.train  # noqa: F401 (importing must leave cuDNN on)

    assert torch.backends.cudnn.enabled
    cfg = compose(["trainer=gpu"])
    assert (cfg.trainer.accelerator, cfg.trainer.devices, cfg.trainer.precision) == (
        "gpu", 1, "bf16-mixed"
    )
    from src.config import validate

    for precision in ("32-true", "bf16-mixed", "16-mixed"):
        validate(compose(["trainer=gpu", f"trainer.precision={precision}"]))


CLAIM = """
import sys, time
from src.gpus import NoFreeGPUError, claim_gpu
try:
    print(claim_gpu(sys.argv[1], int(sys.argv[2])), flush=True)
except NoFreeGPUError as error:
    print("none:", error, flush=True)
    sys.exit(3)
sys.stdin.read()  # hold the GPU until told to stop
"""


def test_workers_claim_distinct_gpus_and_a_dead_workers_gpu_is_freed(tmp_path: Path) -> None:
    locks = tmp_path / "locks"

    def start() -> subprocess.Popen:
        return subprocess.Popen(
            [sys.executable, "-c", CLAIM, str(locks), "2"], cwd=REPO, text=True,
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        )

    workers = [start(), start()]
    try:
        claimed = [int(worker.stdout.readline()) for worker in workers]
        assert sorted(claimed) == [0, 1]

        # A third worker on a two-GPU host is refused at once, with the reason.
        third = start()
        out, _ = third.communicate(timeout=60)
        assert third.returncode == 3 and "all 2 GPUs are claimed" in out

        # kill -9 a worker: the kernel drops its lock, and the next worker gets its GPU.
        workers[0].kill()
        workers[0].wait(timeout=30)
        workers.append(start())
        assert int(workers[-1].stdout.readline()) == claimed[0]
    finally:
        for worker in workers:
            if worker.poll() is None:
                worker.kill()
            worker.wait(timeout=30)
