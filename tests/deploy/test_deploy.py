"""Deployment files: the Dockerfile linted by hadolint, the Compose file validated against the
Compose specification, every Kubernetes manifest validated against the Kubernetes schemas, and the
files checked against the code they configure (settings, routes, metrics, ports)."""

from __future__ import annotations

import copy
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import jsonpatch
import kubernetes_validate
import pytest
import torch
import yaml

from server.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "deploy" / "kubernetes"
KUBERNETES_VERSIONS = ["1.30.0", kubernetes_validate.latest_version()]


def tool(name: str) -> str:
    """A console script of this venv (the tests may run without the venv on PATH)."""
    path = Path(sys.executable).parent / name
    found = str(path) if path.exists() else shutil.which(name)
    assert found, f"{name} is not installed: pip install -e '.[dev]'"
    return found


def load_all(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def manifests() -> dict[str, dict[str, Any]]:
    """The base's resources by kind, as kustomization.yaml lists them."""
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    out: dict[str, dict[str, Any]] = {}
    for name in kustomization["resources"]:
        for doc in load_all(K8S / name):
            out[doc["kind"]] = doc
    return out


# --- Dockerfile -------------------------------------------------------------------------------


def test_hadolint_passes_the_dockerfile() -> None:
    result = subprocess.run([tool("hadolint"), str(ROOT / "Dockerfile")], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_hadolint_would_catch_a_bad_dockerfile(tmp_path: Path) -> None:
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM ubuntu:latest\nRUN apt-get update && apt-get install -y curl\nRUN cd /tmp\n")
    result = subprocess.run([tool("hadolint"), str(bad)], capture_output=True, text=True)
    assert result.returncode != 0 and "DL3007" in result.stdout  # the lint really runs


def test_dockerfile_runs_as_non_root_with_baked_weights_a_store_volume_and_a_healthcheck() -> None:
    text = (ROOT / "Dockerfile").read_text()
    final_stage = text[text.rindex("\nFROM ") :]
    assert re.search(r"^USER 10001:10001$", final_stage, re.M)
    assert re.search(r"^HEALTHCHECK .*\n?.*/healthz", final_stage, re.M)
    assert 'VOLUME ["/store"]' in final_stage and "PIGGYBACK_STORE=/store" in final_stage
    assert re.search(r"^ARG WEIGHTS=", final_stage, re.M) and "TORCH_HOME=/opt/torch" in final_stage
    assert 'piggyback fingerprint --backbone "${BACKBONE}" --weights "${WEIGHTS}"' in final_stage


def test_the_cuda_base_matches_the_pinned_torch_wheel() -> None:
    base = re.search(r"^ARG CUDA_IMAGE=nvidia/cuda:(\d+\.\d+)\.\d+-", (ROOT / "Dockerfile").read_text(), re.M)
    assert base is not None
    assert torch.version.cuda is not None and base.group(1) == torch.version.cuda


def test_dockerignore_sends_only_what_the_image_needs() -> None:
    lines = [ln for ln in (ROOT / ".dockerignore").read_text().splitlines() if ln and not ln.startswith("#")]
    assert lines[0] == "*"
    allowed = {ln[1:].rstrip("/") for ln in lines if ln.startswith("!")}
    assert allowed == {"pyproject.toml", "README.md", "piggyback_core", "server"}
    copied = re.findall(r"^COPY (?!--from)(.+) \S+$", (ROOT / "Dockerfile").read_text(), re.M)
    for sources in copied:
        for source in sources.split():
            assert source.rstrip("/") in allowed, f"COPY {source} is excluded by .dockerignore"


# --- Compose ----------------------------------------------------------------------------------


def test_compose_file_is_valid_against_the_compose_spec() -> None:
    compose = ROOT / "deploy" / "compose.yaml"
    result = subprocess.run(
        [tool("check-jsonschema"), "--builtin-schema", "vendor.compose-spec", str(compose)],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_compose_reserves_a_gpu_keeps_the_store_on_a_volume_and_the_token_in_a_secret() -> None:
    compose = yaml.safe_load((ROOT / "deploy" / "compose.yaml").read_text())
    service = compose["services"]["piggyback"]
    devices = service["deploy"]["resources"]["reservations"]["devices"]
    assert devices == [{"driver": "nvidia", "count": 1, "capabilities": ["gpu"]}]
    assert "store:/store" in service["volumes"] and "store" in compose["volumes"]
    assert service["secrets"] == ["piggyback_token"]
    assert service["environment"]["PIGGYBACK_TOKEN_FILE"] == "/run/secrets/piggyback_token"
    assert "PIGGYBACK_TOKEN" not in service["environment"]


# --- Kubernetes -------------------------------------------------------------------------------


def test_kustomization_lists_every_manifest_and_each_exists() -> None:
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    on_disk = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    assert set(kustomization["resources"]) == on_disk


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_every_manifest_is_valid_against_the_kubernetes_schemas(version: str) -> None:
    docs = manifests()
    assert set(docs) >= {
        "Namespace", "PersistentVolumeClaim", "Deployment", "Service", "PodDisruptionBudget",
        "HorizontalPodAutoscaler",
    }  # fmt: skip
    for doc in docs.values():
        kubernetes_validate.validate(doc, version, strict=True)


def test_the_validation_really_rejects_a_broken_manifest() -> None:
    deployment = copy.deepcopy(manifests()["Deployment"])
    deployment["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["httpGet"]["prot"] = 8000
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, KUBERNETES_VERSIONS[-1], strict=True)


def test_the_s3_overlay_patch_applies_and_stays_valid() -> None:
    overlay = yaml.safe_load((K8S / "overlays" / "s3" / "kustomization.yaml").read_text())
    assert overlay["resources"] == ["../.."]
    patch = jsonpatch.JsonPatch(json.loads((K8S / "overlays" / "s3" / "deployment-patch.json").read_text()))
    deployment = patch.apply(manifests()["Deployment"])  # its "test" ops fail if the base moved
    for version in KUBERNETES_VERSIONS:
        kubernetes_validate.validate(deployment, version, strict=True)
    pod = deployment["spec"]["template"]["spec"]
    env = {e["name"]: e.get("value") for e in pod["containers"][0]["env"]}
    assert env["PIGGYBACK_STORE"].startswith("s3://")
    assert "store" not in {v["name"] for v in pod["volumes"]}
    assert "store" not in {m["name"] for m in pod["containers"][0]["volumeMounts"]}


def test_deployment_wires_gpu_probes_store_secret_and_scraping_to_the_server() -> None:
    from server.app import create_app

    docs = manifests()
    pod_template = docs["Deployment"]["spec"]["template"]
    pod = pod_template["spec"]
    (container,) = pod["containers"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    port = container["ports"][0]["containerPort"]
    assert port == Settings.model_fields["port"].default
    app = create_app(Settings(backbone="resnet18", weights="random"))
    paths = set(app.openapi()["paths"])  # routers are included lazily: app.routes does not list them
    for probe, path in (("livenessProbe", "/healthz"), ("readinessProbe", "/readyz"), ("startupProbe", "/healthz")):
        assert container[probe]["httpGet"]["path"] == path and path in paths
    assert pod_template["metadata"]["annotations"]["prometheus.io/port"] == str(port)
    assert pod_template["metadata"]["annotations"]["prometheus.io/path"] in paths

    env = {e["name"]: e["value"] for e in container["env"]}
    for name in env:  # every variable is a setting the server reads
        assert name.removeprefix("PIGGYBACK_").lower() in Settings.model_fields, name
    Settings(**{k.removeprefix("PIGGYBACK_").lower(): v for k, v in env.items() if k != "PIGGYBACK_TOKEN_FILE"})
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    assert volumes["token"]["secret"]["secretName"] == "piggyback-token"
    assert Path(env["PIGGYBACK_TOKEN_FILE"]).parent == Path(mounts["token"])
    assert mounts["store"] == env["PIGGYBACK_STORE"]
    claim = volumes["store"]["persistentVolumeClaim"]["claimName"]
    assert docs["PersistentVolumeClaim"]["metadata"]["name"] == claim
    assert docs["PersistentVolumeClaim"]["spec"]["accessModes"] == ["ReadWriteMany"]

    labels = pod_template["metadata"]["labels"]
    pdb_selector = docs["PodDisruptionBudget"]["spec"]["selector"]["matchLabels"]
    for selector in (docs["Service"]["spec"]["selector"], pdb_selector):
        assert selector.items() <= labels.items()
    assert docs["Service"]["spec"]["ports"][0]["targetPort"] == container["ports"][0]["name"]


def test_autoscaling_and_the_service_monitor_use_what_the_server_exports() -> None:
    from server.metrics import Metrics

    docs = manifests()
    hpa = docs["HorizontalPodAutoscaler"]["spec"]
    assert hpa["scaleTargetRef"]["name"] == docs["Deployment"]["metadata"]["name"]
    exported = {m.name for m in Metrics().registry.collect()}
    for metric in hpa["metrics"]:
        assert metric["pods"]["metric"]["name"] in exported
    monitor = load_all(K8S / "monitoring" / "servicemonitor.yaml")[0]
    assert monitor["spec"]["selector"]["matchLabels"].items() <= docs["Service"]["metadata"]["labels"].items()
    assert monitor["spec"]["endpoints"][0]["port"] == docs["Service"]["spec"]["ports"][0]["name"]
    adapter = load_all(K8S / "monitoring" / "prometheus-adapter-rule.yaml")[0]
    assert adapter["rules"]["custom"][0]["name"]["as"] == hpa["metrics"][0]["pods"]["metric"]["name"]
