"""deploy/k8s/, checked offline: every core manifest against the Kubernetes JSON schemas that
PyPI kubernetes-validate bundles (strict: a misspelled field fails), the promises between the
manifests and the app (probes, ports, the shutdown timing, the metric the HPA variant reads), the
GPU variant against the CPU one, and the KServe manifests structurally.

KServe's CRD schemas are not published in any package on PyPI (its SDK ships Python models, not
the CRDs), so the InferenceService and ServingRuntime get a documented structural check
instead: the fields KServe requires and the values imgrec needs, with their container validated
against the core v1 Container schema.
"""

from __future__ import annotations

import copy
import json
import re
from importlib import resources
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import referencing
import yaml

from app.serving.metrics import Metrics
from app.settings import Settings

REPO = Path(__file__).resolve().parents[2]
K8S = REPO / "deploy" / "k8s"
CORE = ["deployment.yaml", "service.yaml", "hpa.yaml", "pdb.yaml", "gpu/deployment.yaml",
        "autoscaling-queue-depth/hpa.yaml"]
# the oldest Kubernetes still commonly run, and the newest the validator knows
LATEST = kubernetes_validate.utils.all_versions()[-1]  # e.g. 1.37.0
VERSIONS = ["1.29.0", LATEST]
PRESTOP_MARGIN_S = 3


def load(name: str) -> dict[str, Any]:
    docs = [d for d in yaml.safe_load_all((K8S / name).read_text()) if d]
    assert len(docs) == 1, f"{name}: one object per file"
    doc: dict[str, Any] = docs[0]
    return doc


def container(deployment: dict[str, Any]) -> dict[str, Any]:
    containers = deployment["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1
    c: dict[str, Any] = containers[0]
    return c


def env(c: dict[str, Any]) -> dict[str, str]:
    return {e["name"]: e["value"] for e in c.get("env", [])}


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("name", CORE)
def test_core_manifests_validate_against_the_kubernetes_schemas(name: str,
                                                                version: str) -> None:
    kubernetes_validate.validate(load(name), version, strict=True)


def test_the_validator_rejects_a_misspelled_field() -> None:
    broken = copy.deepcopy(load("deployment.yaml"))
    container(broken)["readinesProbe"] = container(broken).pop("readinessProbe")
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, VERSIONS[-1], strict=True)


def test_kustomization_lists_the_core_set() -> None:
    kustomization = load("kustomization.yaml")
    assert kustomization["resources"] == ["deployment.yaml", "service.yaml", "hpa.yaml",
                                          "pdb.yaml"]


def test_probes_ports_and_the_drain_timing_match_the_app() -> None:
    d = load("deployment.yaml")
    c = container(d)
    s = Settings()
    assert c["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert c["startupProbe"]["httpGet"]["path"] == "/readyz"
    assert c["livenessProbe"]["httpGet"]["path"] == "/healthz"
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    values = env(c)
    assert ports == {"http": int(values["IMGREC_PORT"]), "grpc": int(values["IMGREC_GRPC_PORT"])}
    # the settings' defaults (the tests' environment turns gRPC off, tests/conftest.py)
    defaults = {name: f.default for name, f in Settings.model_fields.items()}
    assert (ports["http"], ports["grpc"]) == (defaults["port"], defaults["grpc_port"])
    assert values["IMGREC_HOST"] == "0.0.0.0"
    # the pod outlives preStop + the lame duck + the grace for in-flight work, with a margin
    prestop = c["lifecycle"]["preStop"]["exec"]["command"]
    assert prestop[0] == "sleep"
    drain = float(values["IMGREC_DRAIN_DELAY_S"])
    grace = float(values["IMGREC_GRACEFUL_SHUTDOWN_S"])
    assert grace == s.graceful_shutdown_s  # the app's default, stated where it is relied on
    if "drain_delay_s" in Settings.model_fields:
        assert drain == Settings().drain_delay_s  # type: ignore[attr-defined]
    total = float(prestop[1]) + drain + grace + PRESTOP_MARGIN_S
    assert d["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] == total
    # the Service carries both protocols to the named ports
    service = load("service.yaml")
    assert service["spec"]["selector"] == d["spec"]["selector"]["matchLabels"]
    assert {p["name"]: (p["port"], p["targetPort"]) for p in service["spec"]["ports"]} == {
        "http": (8000, "http"), "grpc": (8001, "grpc")}
    # the image exposes them too
    expose = re.findall(r"^EXPOSE (.+)$", (REPO / "Dockerfile").read_text(), re.M)
    assert expose and set(expose[0].split()) == {"8000", "8001"}


def test_autoscalers_and_disruption_budget_target_the_deployment() -> None:
    d = load("deployment.yaml")
    labels = d["spec"]["selector"]["matchLabels"]
    assert load("pdb.yaml")["spec"]["selector"]["matchLabels"] == labels
    cpu, queue = load("hpa.yaml"), load("autoscaling-queue-depth/hpa.yaml")
    for hpa in (cpu, queue):
        assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment",
                                                 "name": d["metadata"]["name"]}
        assert hpa["spec"]["minReplicas"] >= 2  # the PDB keeps one up during a drain
    assert cpu["spec"]["metrics"][0]["resource"]["name"] == "cpu"
    assert container(d)["resources"]["requests"]["cpu"]  # utilisation needs a request
    # the variant reads the very gauge the app exports, through the adapter's rule
    metric = queue["spec"]["metrics"][0]["pods"]["metric"]["name"]
    exported = {m.name for m in Metrics().registry.collect()}
    assert metric in exported
    rules = yaml.safe_load((K8S / "autoscaling-queue-depth" /
                            "prometheus-adapter-rules.yaml").read_text())["rules"]["custom"]
    assert [r["name"]["as"] for r in rules] == [metric]
    assert rules[0]["seriesQuery"].startswith(metric + "{")
    annotations = d["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/path"] == "/metrics"


def test_the_gpu_variant_differs_only_where_the_gpu_needs_it() -> None:
    cpu, gpu = load("deployment.yaml"), load("gpu/deployment.yaml")
    gc = container(gpu)
    assert gc["image"] == "imgrec:gpu" and env(gc)["IMGREC_DEVICE"] == "cuda"
    assert gc["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert gpu["spec"]["template"]["spec"]["tolerations"][0]["key"] == "nvidia.com/gpu"
    # undo exactly those differences: what is left must be the CPU manifest
    undone = copy.deepcopy(gpu)
    uc = container(undone)
    uc["image"] = "imgrec:cpu"
    uc["env"] = [e for e in uc["env"] if e["name"] != "IMGREC_DEVICE"]
    del uc["resources"]["limits"]["nvidia.com/gpu"]
    del undone["spec"]["template"]["spec"]["tolerations"]
    assert undone == cpu


# -- KServe: a documented structural check (no CRD schema is obtainable offline) ----------------
def _core_schema(kind_file: str) -> tuple[dict[str, Any], referencing.Registry]:
    base = (resources.files("kubernetes_validate") / "kubernetes-json-schema"
            / f"v{LATEST}-local-strict")
    schema = json.loads((base / kind_file).read_text())
    definitions = json.loads((base / "_definitions.json").read_text())
    registry: referencing.Registry = referencing.Resource.from_contents(
        definitions) @ (referencing.Resource.from_contents(schema) @ referencing.Registry())
    return schema, registry


def validate_core(fragment: dict[str, Any], kind_file: str) -> None:
    schema, registry = _core_schema(kind_file)
    jsonschema.Draft202012Validator(schema, registry=registry).validate(fragment)


# The parts of KServe's v1alpha1 ServingRuntime and v1beta1 InferenceService CRDs these
# manifests use, as KServe's API reference defines them (required fields, enums).
SERVING_RUNTIME = {
    "type": "object", "required": ["apiVersion", "kind", "metadata", "spec"],
    "properties": {
        "apiVersion": {"const": "serving.kserve.io/v1alpha1"},
        "kind": {"const": "ServingRuntime"},
        "metadata": {"type": "object", "required": ["name"]},
        "spec": {"type": "object", "required": ["containers", "supportedModelFormats"],
                 "properties": {
                     "supportedModelFormats": {"type": "array", "minItems": 1, "items": {
                         "type": "object", "required": ["name"],
                         "properties": {"name": {"type": "string"},
                                        "version": {"type": "string"},
                                        "autoSelect": {"type": "boolean"}}}},
                     "protocolVersions": {"type": "array", "items": {
                         "enum": ["v1", "v2", "grpc-v1", "grpc-v2"]}},
                     "containers": {"type": "array", "minItems": 1}}},
    },
}
INFERENCE_SERVICE = {
    "type": "object", "required": ["apiVersion", "kind", "metadata", "spec"],
    "properties": {
        "apiVersion": {"const": "serving.kserve.io/v1beta1"},
        "kind": {"const": "InferenceService"},
        "metadata": {"type": "object", "required": ["name"]},
        "spec": {"type": "object", "required": ["predictor"], "properties": {"predictor": {
            "type": "object", "additionalProperties": False, "properties": {
                "minReplicas": {"type": "integer", "minimum": 0},
                "maxReplicas": {"type": "integer", "minimum": 1},
                "terminationGracePeriodSeconds": {"type": "integer", "minimum": 0},
                "model": {"type": "object", "required": ["modelFormat"],
                          "additionalProperties": False, "properties": {
                              "modelFormat": {"type": "object", "required": ["name"]},
                              "runtime": {"type": "string"},
                              "protocolVersion": {"enum": ["v1", "v2", "grpc-v1", "grpc-v2"]},
                              "storageUri": {"type": "string"}}}}}}},
    },
}


def test_kserve_manifests_structurally() -> None:
    runtime, isvc = load("kserve/servingruntime.yaml"), load("kserve/inferenceservice.yaml")
    jsonschema.validate(runtime, SERVING_RUNTIME)
    jsonschema.validate(isvc, INFERENCE_SERVICE)
    (c,) = runtime["spec"]["containers"]
    validate_core(c, "container-v1.json")
    assert c["name"] == "kserve-container" and c["image"] == "imgrec:cpu"
    # the runtime runs this model format, speaking v2 on the port KServe routes (http1)
    model = isvc["spec"]["predictor"]["model"]
    assert model["runtime"] == runtime["metadata"]["name"]
    assert model["modelFormat"]["name"] in [f["name"]
                                            for f in runtime["spec"]["supportedModelFormats"]]
    assert model["protocolVersion"] == "v2" and "v2" in runtime["spec"]["protocolVersions"]
    values = env(c)
    assert c["ports"] == [{"name": "http1", "containerPort": int(values["IMGREC_PORT"]),
                           "protocol": "TCP"}]
    assert values["IMGREC_MODEL_DIR"] == "/mnt/models"  # where KServe puts the storageUri
    assert c["readinessProbe"]["httpGet"]["path"] == "/v2/health/ready"
    assert c["livenessProbe"]["httpGet"]["path"] == "/v2/health/live"


def test_the_structural_check_can_fail() -> None:
    isvc = load("kserve/inferenceservice.yaml")
    isvc["spec"]["predictor"]["model"]["protocolVersion"] = "v3"
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(isvc, INFERENCE_SERVICE)
    runtime = load("kserve/servingruntime.yaml")
    runtime["spec"]["containers"][0]["ports"][0]["containerPort"] = "eight thousand"
    with pytest.raises(jsonschema.ValidationError):
        validate_core(runtime["spec"]["containers"][0], "container-v1.json")
