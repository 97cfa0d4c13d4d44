"""The Kubernetes deployment files validate, and say what the container tests established.

- ``runtimeclass.yaml`` against the Kubernetes schemas (``kubernetes-validate``,
  offline, strict: unknown fields fail).
- Each Zero-to-JupyterHub values file is rendered into the Pod that KubeSpawner
  (the chart's spawner, ``jupyterhub-kubespawner``) would create, with the chart's
  own mapping of these values to spawner settings, and that Pod is validated
  against the Kubernetes schemas. The chart's values schema is not packaged on
  PyPI or npm (it ships only inside the Helm chart), so the values themselves are
  checked by structure: the keys these files use and their types, as the chart
  documents them.
- The Dockerfile cannot be built here (no container registry for the docker-stacks
  base), so its instructions are parsed and checked.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
from support import containers

yaml = pytest.importorskip("yaml", reason="PyYAML comes with the e2e extra (make test)")
kubernetes_validate = pytest.importorskip(
    "kubernetes_validate", reason="kubernetes-validate comes with the e2e extra (make test)")

ROOT = Path(__file__).resolve().parent.parent
KUBE = ROOT / "deploy" / "kubernetes"
#: The oldest release with appArmorProfile in securityContext, and the newest known.
K8S_VERSIONS = ("1.30.0", kubernetes_validate.utils.latest_version())
GVISOR_PODS = KUBE / "values-gvisor-pods.yaml"
RUNSC_IN_POD = KUBE / "values-runsc-in-pod.yaml"

#: The part of the chart's values schema these files use: key -> type (or nested dict).
#: Other keys at these levels are errors (the chart's schema forbids unknown keys too).
Z2JH_STRUCTURE = {
    "singleuser": {
        "image": {"name": str, "tag": str},
        "extraPodConfig": dict,
        "extraEnv": dict,
        "uid": int,
        "fsGid": int,
        "allowPrivilegeEscalation": bool,
        "cmd": (str, list),
        "storage": {"extraVolumes": list, "extraVolumeMounts": list},
    },
    "hub": {"config": dict},
}


def _validate_k8s(document: dict) -> None:
    """Raise ``kubernetes_validate.ValidationError`` unless valid in every K8S_VERSIONS."""
    for version in K8S_VERSIONS:
        kubernetes_validate.validate(document, version, strict=True)


def _load(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


def _check_structure(values: dict, structure: dict, where: str = "") -> None:
    for key, value in values.items():
        assert key in structure, f"{where}{key}: not a chart value these files may use"
        expected = structure[key]
        if isinstance(expected, dict):
            assert isinstance(value, dict), f"{where}{key}: expected a mapping"
            _check_structure(value, expected, f"{where}{key}.")
        else:
            assert isinstance(value, expected), f"{where}{key}: {value!r} is not {expected}"


def render_pod(values: dict) -> dict:
    """The notebook Pod KubeSpawner makes from these values (the chart's mapping)."""
    pytest.importorskip("kubespawner", reason="jupyterhub-kubespawner comes with the e2e extra")
    from kubernetes_asyncio.client import ApiClient
    from kubespawner.objects import make_pod

    single = values["singleuser"]
    spawner = values.get("hub", {}).get("config", {}).get("KubeSpawner", {})
    storage = single.get("storage", {})
    cmd = single["cmd"]
    pod = make_pod(
        name="jupyter-alice", cmd=[cmd] if isinstance(cmd, str) else cmd, port=8888,
        image=f"{single['image']['name']}:{single['image']['tag']}",
        uid=single["uid"], fs_gid=single["fsGid"],
        allow_privilege_escalation=single["allowPrivilegeEscalation"],
        container_security_context=spawner.get("container_security_context"),
        env=single.get("extraEnv"), volumes=storage.get("extraVolumes"),
        volume_mounts=storage.get("extraVolumeMounts"),
        extra_pod_config=single.get("extraPodConfig"))
    # Serialisation needs no connection; skip the client's event-loop-bound set-up.
    return ApiClient.__new__(ApiClient).sanitize_for_serialization(pod)


# -- RuntimeClass -------------------------------------------------------------

def test_runtimeclass_validates_and_names_runsc():
    document = _load(KUBE / "runtimeclass.yaml")
    _validate_k8s(document)
    assert (document["kind"], document["metadata"]["name"], document["handler"]) == (
        "RuntimeClass", "gvisor", "runsc")


def test_validation_rejects_a_wrong_field():
    # The check above can fail: a misspelt field is an error under strict validation.
    document = _load(KUBE / "runtimeclass.yaml")
    document["handlr"] = document.pop("handler")
    with pytest.raises(kubernetes_validate.ValidationError, match="handlr"):
        _validate_k8s(document)


# -- values files ---------------------------------------------------------------

@pytest.mark.parametrize("path", [GVISOR_PODS, RUNSC_IN_POD], ids=lambda p: p.stem)
def test_values_have_the_charts_structure(path):
    _check_structure(_load(path), Z2JH_STRUCTURE)


def test_structure_check_rejects_an_unknown_key():
    values = _load(GVISOR_PODS)
    values["singleuser"]["runtimeClassName"] = "gvisor"  # belongs under extraPodConfig
    with pytest.raises(AssertionError, match="runtimeClassName"):
        _check_structure(values, Z2JH_STRUCTURE)


@pytest.mark.parametrize("path", [GVISOR_PODS, RUNSC_IN_POD], ids=lambda p: p.stem)
def test_rendered_pod_validates(path):
    _validate_k8s(render_pod(_load(path)))


def test_rendered_pod_with_a_bad_security_field_is_rejected():
    values = _load(RUNSC_IN_POD)
    context = values["hub"]["config"]["KubeSpawner"]["container_security_context"]
    context["apparmorProfile"] = context.pop("appArmorProfile")
    with pytest.raises(kubernetes_validate.ValidationError, match="apparmorProfile"):
        _validate_k8s(render_pod(values))


def test_gvisor_pods_run_under_the_runtimeclass_without_privileges():
    pod = render_pod(_load(GVISOR_PODS))
    assert pod["spec"]["runtimeClassName"] == _load(KUBE / "runtimeclass.yaml")["metadata"][
        "name"]
    container = pod["spec"]["containers"][0]
    assert container["securityContext"] == {"runAsUser": 1000, "allowPrivilegeEscalation": False}
    env = {item["name"]: item["value"] for item in container["env"]}
    # Fail-closed would refuse every cell in a gVisor pod (no sandbox per command there).
    assert "GVISOR_MAGIC_REQUIRE_ISOLATION" not in env


def test_runsc_in_pod_grants_exactly_what_the_container_tests_needed():
    pod = render_pod(_load(RUNSC_IN_POD))
    assert "runtimeClassName" not in pod["spec"]
    container = pod["spec"]["containers"][0]
    context = container["securityContext"]
    # tests/support/containers.py PRIVILEGED: the grant under which runsc ran in a container.
    granted = {f"seccomp={context['seccompProfile']['type'].lower()}",
               f"apparmor={context['appArmorProfile']['type'].lower()}"}
    assert sorted(context["capabilities"]["add"]) == sorted(containers.PRIVILEGED["cap_add"])
    assert granted == set(containers.PRIVILEGED["security_opt"])
    assert "privileged" not in context and "drop" not in context["capabilities"]
    assert context["runAsUser"] == 1000
    # Kubernetes refuses CAP_SYS_ADMIN with allowPrivilegeEscalation: false, and the
    # setuid newuidmap of the rootless path needs it anyway.
    assert context["allowPrivilegeEscalation"] is True
    env = {item["name"]: item["value"] for item in container["env"]}
    assert env["GVISOR_MAGIC_REQUIRE_ISOLATION"] == "1"
    # Sandbox state on an exec-mounted tmpfs (a Memory emptyDir is mounted without noexec).
    state = env["GVISOR_MAGIC_STATE_DIR"]
    mount = next(m for m in container["volumeMounts"] if m["mountPath"] == state)
    volume = next(v for v in pod["spec"]["volumes"] if v["name"] == mount["name"])
    assert volume["emptyDir"]["medium"] == "Memory"


# -- Dockerfile -----------------------------------------------------------------

def _instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    joined = re.sub(r"\\\n", " ", "\n".join(
        line for line in path.read_text().splitlines() if not line.lstrip().startswith("#")))
    result = []
    for line in joined.splitlines():
        if line.strip():
            word, _, rest = line.strip().partition(" ")
            result.append((word.upper(), " ".join(rest.split())))
    return result


def test_dockerfile_builds_on_docker_stacks_with_runsc_and_the_package():
    steps = _instructions(KUBE / "Dockerfile")
    kinds = [kind for kind, _ in steps]
    assert set(kinds) <= {"ARG", "FROM", "USER", "RUN", "COPY", "WORKDIR", "ENV"}, kinds
    args = dict(arg.split("=", 1) for kind, arg in steps if kind == "ARG")
    froms = [arg for kind, arg in steps if kind == "FROM"]
    assert froms == ["${BASE_IMAGE}"]
    assert re.fullmatch(r"quay\.io/jupyter/[a-z-]+-notebook:python-3\.\d+", args["BASE_IMAGE"])
    runs = " && ".join(arg for kind, arg in steps if kind == "RUN")
    assert "apt-get install -y --no-install-recommends uidmap" in runs
    assert ('python3 -B -m gvisor_magic.install --method "${RUNSC_METHOD}" --prefix /usr/local/bin'
            in runs) and args["RUNSC_METHOD"] == "download"
    assert 'for f in /etc/subuid /etc/subgid;' in runs
    assert 'grep -q "^${NB_USER}:" "$f" 2>/dev/null || echo "${NB_USER}:100000:65536" >> "$f"' \
        in runs
    assert "pip install --no-cache-dir /tmp/gvisor-magic" in runs
    assert 'c.InteractiveShellApp.extensions = ["gvisor_magic"]' in runs
    # Everything the image copies exists in the repository.
    for kind, arg in steps:
        if kind == "COPY":
            sources = [word for word in arg.split()[:-1] if not word.startswith("--")]
            for source in sources:
                assert (ROOT / source).exists(), source
    # It ends as the notebook user, not root.
    users = [arg for kind, arg in steps if kind == "USER"]
    assert users[-1] == "${NB_UID}"
    # The steps that need root come before that.
    last_root = max(i for i, (kind, arg) in enumerate(steps) if (kind, arg) == ("USER", "root"))
    install = next(i for i, (kind, arg) in enumerate(steps)
                   if kind == "RUN" and "gvisor_magic.install" in arg)
    assert last_root < install < kinds.index("USER", last_root + 1)


def test_installer_accepts_the_dockerfiles_options():
    done = subprocess.run([sys.executable, "-m", "gvisor_magic.install", "--help"],
                          capture_output=True, text=True, timeout=60, check=True)
    assert "{auto,apt,download}" in done.stdout and "--prefix PREFIX" in done.stdout
