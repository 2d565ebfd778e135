"""deploy/ray: the Serve config validated with Ray's own ``ray.serve.schema`` models (and no field
that they would ignore), the same config embedded in the KubeRay RayService, the RayService's pod
templates valid against the Kubernetes schemas, and both agreeing with the code they configure."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from server.settings import Settings

schema = pytest.importorskip("ray.serve.schema")
config = pytest.importorskip("ray.serve.config")

ROOT = Path(__file__).resolve().parents[2]
RAY = ROOT / "deploy" / "ray"


def _serve_config() -> dict[str, Any]:
    return yaml.safe_load((RAY / "serve.yaml").read_text())


def _rayservice() -> dict[str, Any]:
    return yaml.safe_load((RAY / "rayservice.yaml").read_text())


def _validate(doc: dict[str, Any]) -> Any:
    """Ray's model of ``doc``, after checking that no key is one Ray would drop unread (its
    deployment model ignores unknown fields)."""
    parsed = schema.ServeDeploySchema.model_validate(doc)
    for app in doc["applications"]:
        assert set(app) <= set(schema.ServeApplicationSchema.model_fields), app
        for deployment in app.get("deployments", []):
            assert set(deployment) <= set(schema.DeploymentSchema.model_fields), deployment
            if "autoscaling_config" in deployment:
                assert set(deployment["autoscaling_config"]) <= set(config.AutoscalingConfig.model_fields)
                config.AutoscalingConfig(**deployment["autoscaling_config"])
            if "request_router_config" in deployment:
                config.RequestRouterConfig(**deployment["request_router_config"])
    return parsed


def test_the_serve_config_is_valid_for_ray_serve() -> None:
    parsed = _validate(_serve_config())
    assert [a.name for a in parsed.applications] == ["piggyback"]


@pytest.mark.parametrize(
    "edit",
    [
        lambda d: d["applications"][0]["deployments"][1].__setitem__("num_replica", 2),  # misspelt
        lambda d: d["applications"][0]["deployments"][1]["autoscaling_config"].__setitem__("max_replicas", -1),
        lambda d: d["applications"][0].__setitem__("import_path", "no colon or dot"),
        lambda d: d.__setitem__("proxy_location", "Everywhere"),
    ],
    ids=["misspelt field", "negative bound", "bad import path", "unknown proxy location"],
)
def test_the_validation_really_rejects_a_broken_config(edit) -> None:  # noqa: ANN001
    doc = _serve_config()
    edit(doc)
    with pytest.raises((ValueError, AssertionError)):
        _validate(doc)


def test_the_config_names_the_real_deployments_builder_and_settings() -> None:
    from server import ray_serve

    app = _serve_config()["applications"][0]
    module, _, attr = app["import_path"].partition(":")
    assert (module, attr) == ("server.ray_serve", "app_builder")
    assert {d["name"] for d in app["deployments"]} == {"PiggybackIngress", "TaskReplica"}
    assert set(app["args"]["settings"]) <= set(Settings.model_fields)
    assert all(k.removeprefix("PIGGYBACK_").lower() in Settings.model_fields for k in app["runtime_env"]["env_vars"])
    ray_serve.app_builder({**app["args"], "settings": {**app["args"]["settings"], "token_file": None}})
    replica = next(d for d in app["deployments"] if d["name"] == "TaskReplica")
    assert replica["ray_actor_options"]["num_gpus"] == 1 and replica["autoscaling_config"]["max_replicas"] > 1


def test_the_builder_refuses_a_bad_setting_at_deploy_time() -> None:
    from server import ray_serve

    with pytest.raises(ValueError, match="backbone"):
        ray_serve.app_builder({"settings": {"backbone": "no-such-net"}})
    with pytest.raises(ValueError, match="tasks_per_replica"):
        ray_serve.app_builder({"tasks_per_replica": 0})


def test_the_rayservice_embeds_the_serve_config_and_gives_each_replica_a_gpu() -> None:
    service = _rayservice()
    assert (service["apiVersion"], service["kind"]) == ("ray.io/v1", "RayService")
    embedded = yaml.safe_load(service["spec"]["serveConfigV2"])
    assert embedded == _serve_config()
    _validate(embedded)
    cluster = service["spec"]["rayClusterConfig"]
    import ray

    assert cluster["rayVersion"] == ray.__version__
    assert cluster["enableInTreeAutoscaling"] is True
    (workers,) = cluster["workerGroupSpecs"]
    assert workers["minReplicas"] <= workers["replicas"] <= workers["maxReplicas"]
    replica = next(d for d in embedded["applications"][0]["deployments"] if d["name"] == "TaskReplica")
    assert workers["maxReplicas"] >= replica["autoscaling_config"]["max_replicas"]  # one replica per GPU worker
    (container,) = workers["template"]["spec"]["containers"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert int(container["resources"]["requests"]["cpu"]) >= replica["ray_actor_options"]["num_cpus"]
    settings = embedded["applications"][0]["args"]["settings"]
    for template in (cluster["headGroupSpec"]["template"], workers["template"]):
        mounts = {m["mountPath"] for m in template["spec"]["containers"][0]["volumeMounts"]}
        assert settings["store"] in mounts and str(Path(settings["token_file"]).parent) in mounts


def test_the_rayservices_pod_templates_are_valid_against_the_kubernetes_schemas() -> None:
    kubernetes_validate = pytest.importorskip("kubernetes_validate")
    cluster = _rayservice()["spec"]["rayClusterConfig"]
    templates = [cluster["headGroupSpec"]["template"]] + [g["template"] for g in cluster["workerGroupSpecs"]]
    for template in templates:
        doc = {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "t"}, "template": template}
        kubernetes_validate.validate(doc, "1.30.0", strict=True)
