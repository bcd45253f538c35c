"""deploy/k8s: every core manifest validates against Kubernetes' own schemas (kubernetes-validate, offline,
strict: unknown fields are errors); the KServe InferenceService (a CRD without a bundled schema) is checked by
validating its predictor as a Pod; probes, ports, GPU requests and the HPA metric agree with what Triton serves."""
from __future__ import annotations

from pathlib import Path

import pytest
import yaml

kubernetes_validate = pytest.importorskip("kubernetes_validate")

K8S = Path(__file__).resolve().parents[2] / "deploy" / "k8s"
VERSION = "1.30.0"


def docs(name: str) -> list[dict]:
    return [d for d in yaml.safe_load_all((K8S / name).read_text()) if d]


@pytest.mark.parametrize("name", ["deployment.yaml", "service.yaml", "hpa.yaml", "prometheus-adapter-rules.yaml"])
def test_core_manifests_validate_strictly(name):
    for doc in docs(name):
        kubernetes_validate.validate(doc, VERSION, strict=True)


def test_validation_catches_a_mistake():
    bad = docs("deployment.yaml")[0]
    bad["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["httpGet"]["port"] = [8000]
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(bad, VERSION, strict=True)


def test_deployment_probes_ports_and_gpus_match_the_server():
    (dep,) = docs("deployment.yaml")
    (svc,) = docs("service.yaml")
    (hpa,) = docs("hpa.yaml")
    c = dep["spec"]["template"]["spec"]["containers"][0]
    assert c["readinessProbe"]["httpGet"]["path"] == "/v2/health/ready"
    assert c["livenessProbe"]["httpGet"]["path"] == "/v2/health/live"
    assert c["resources"]["limits"]["nvidia.com/gpu"] == "1"
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    args = c["args"]
    for flag, name in (("--http-port", "http"), ("--grpc-port", "grpc"), ("--metrics-port", "metrics")):
        assert int(args[args.index(flag) + 1]) == ports[name]
    assert {p["targetPort"] for p in svc["spec"]["ports"]} == set(ports)
    assert svc["spec"]["selector"] == dep["spec"]["selector"]["matchLabels"]
    assert hpa["spec"]["scaleTargetRef"]["name"] == dep["metadata"]["name"]
    metric = hpa["spec"]["metrics"][0]["pods"]["metric"]["name"]
    assert metric in (K8S / "prometheus-adapter-rules.yaml").read_text()


def test_kserve_inference_service_predictor_is_a_valid_pod():
    (isvc,) = docs("kserve-inferenceservice.yaml")
    assert isvc["apiVersion"] == "serving.kserve.io/v1beta1" and isvc["kind"] == "InferenceService"
    predictor = isvc["spec"]["predictor"]
    pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "predictor"},
           "spec": {"containers": predictor["containers"]}}
    kubernetes_validate.validate(pod, VERSION, strict=True)
    c = predictor["containers"][0]
    assert c["readinessProbe"]["httpGet"]["path"] == "/v2/health/ready"
    assert c["args"][c["args"].index("--http-port") + 1] == str(c["ports"][0]["containerPort"])
