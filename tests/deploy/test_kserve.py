"""deploy/kserve: every manifest validated against KServe's own CRD schemas (given as data in
``../shared/kserve-crds``), strictly (an unknown field is an error, as ``kubectl --validate=strict``
makes it), and checked against the code it configures (settings, routes, the v2 protocol)."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from server.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
KSERVE = ROOT / "deploy" / "kserve"
CRDS = next((p for p in (ROOT.parent / "shared" / "kserve-crds", ROOT / "shared" / "kserve-crds") if p.is_dir()), None)

pytestmark = pytest.mark.skipif(CRDS is None, reason="KServe's CRD schemas (../shared/kserve-crds) are not here")


def _strict(schema: Any) -> Any:
    """The schema with ``additionalProperties: false`` wherever an object lists its properties and
    does not keep unknown fields: Kubernetes would prune a misspelt field silently."""
    if isinstance(schema, dict):
        out = {k: _strict(v) for k, v in schema.items()}
        if (
            "properties" in out
            and "additionalProperties" not in out
            and not out.get("x-kubernetes-preserve-unknown-fields")
        ):
            out["additionalProperties"] = False
        return out
    if isinstance(schema, list):
        return [_strict(v) for v in schema]
    return schema


def _schemas() -> dict[tuple[str, str], dict[str, Any]]:
    """(apiVersion, kind) -> the strict openAPIV3Schema of that version."""
    assert CRDS is not None
    out = {}
    for path in CRDS.glob("*.yaml"):
        crd = yaml.safe_load(path.read_text())
        group, kind = crd["spec"]["group"], crd["spec"]["names"]["kind"]
        for version in crd["spec"]["versions"]:
            out[(f"{group}/{version['name']}", kind)] = _strict(version["schema"]["openAPIV3Schema"])
    return out


def _validate(doc: dict[str, Any], schemas: dict[tuple[str, str], dict[str, Any]]) -> None:
    schema = schemas.get((doc.get("apiVersion", ""), doc.get("kind", "")))
    assert schema is not None, f"no KServe CRD for {doc.get('apiVersion')} {doc.get('kind')}"
    jsonschema.Draft7Validator(schema).validate(doc)


def _manifests() -> dict[str, dict[str, Any]]:
    return {p.name: yaml.safe_load(p.read_text()) for p in sorted(KSERVE.glob("*.yaml"))}


def test_every_kserve_manifest_is_valid_against_kserves_crd_schemas() -> None:
    schemas = _schemas()
    manifests = _manifests()
    assert set(manifests) == {"servingruntime.yaml", "inferenceservice.yaml", "inferenceservice-s3.yaml"}
    for name, doc in manifests.items():
        try:
            _validate(doc, schemas)
        except jsonschema.ValidationError as exc:
            pytest.fail(f"{name}: {exc.message} at {'/'.join(map(str, exc.absolute_path))}")


@pytest.mark.parametrize(
    "edit",
    [
        lambda d: d["spec"].__setitem__("protocolVersion", ["v2"]),  # misspelt: protocolVersions
        lambda d: d["spec"].__setitem__("protocolVersions", "v2"),  # a string, not a list
        lambda d: d["spec"]["containers"][0]["ports"][0].__setitem__("containerPort", "8080"),
        lambda d: d["spec"]["containers"][0].pop("name"),
    ],
    ids=["unknown field", "wrong type", "port as a string", "container without a name"],
)
def test_the_validation_really_rejects_a_broken_runtime(edit) -> None:  # noqa: ANN001
    doc = copy.deepcopy(_manifests()["servingruntime.yaml"])
    edit(doc)
    with pytest.raises(jsonschema.ValidationError):
        _validate(doc, _schemas())


def test_the_runtime_speaks_v2_on_the_port_it_listens_on_with_the_token_in_a_secret() -> None:
    manifests = _manifests()
    runtime = manifests["servingruntime.yaml"]["spec"]
    assert runtime["protocolVersions"] == ["v2"]
    formats = {f["name"] for f in runtime["supportedModelFormats"]}
    container = runtime["containers"][0]
    assert container["name"] == "kserve-container"  # the name KServe merges the predictor into
    env = {e["name"]: e for e in container["env"]}
    fields = {f"PIGGYBACK_{name.upper()}" for name in Settings.model_fields}
    assert {n for n in env if n.startswith("PIGGYBACK_")} <= fields  # every variable is a real setting
    port = int(env["PIGGYBACK_PORT"]["value"])
    assert [p["containerPort"] for p in container["ports"]] == [port]
    assert env["PIGGYBACK_STORE"]["value"] == "/mnt/models"  # where KServe puts storageUri
    assert "secretKeyRef" in env["PIGGYBACK_TOKEN"]["valueFrom"]
    for probe, path in (("readinessProbe", "/v2/health/ready"), ("livenessProbe", "/v2/health/live")):
        assert container[probe]["httpGet"] == {"path": path, "port": port}
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "1"
    for name in ("inferenceservice.yaml", "inferenceservice-s3.yaml"):
        model = manifests[name]["spec"]["predictor"]["model"]
        assert model["runtime"] == manifests["servingruntime.yaml"]["metadata"]["name"]
        assert model["modelFormat"]["name"] in formats and model["protocolVersion"] == "v2"
        assert model["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert manifests["inferenceservice.yaml"]["spec"]["predictor"]["model"]["storageUri"].startswith("pvc://")
    s3_env = {e["name"]: e for e in manifests["inferenceservice-s3.yaml"]["spec"]["predictor"]["model"]["env"]}
    assert s3_env["PIGGYBACK_STORE"]["value"].startswith("s3://")
    assert all("secretKeyRef" in s3_env[k]["valueFrom"] for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"))


def test_the_probed_routes_exist_in_the_app() -> None:
    from server.app import create_app

    paths = set(create_app(Settings(store="x")).openapi()["paths"])
    assert {"/v2/health/ready", "/v2/health/live", "/v2/models/{task}/infer", "/metrics"} <= paths
