"""The KServe manifests validate offline, keep TorchServe's management API off the network,
reference files that exist (or that `make archive` builds), and the predictor image installs
what pyproject.toml pins."""

from __future__ import annotations

import importlib.resources
import json
import re
import urllib.parse
from pathlib import Path

import pytest
import yaml
from jsonschema import Draft202012Validator
from kubernetes_validate import utils as kubernetes_validate
from referencing import Registry, Resource

from loadtest.torchserve import read_properties

REPO_ROOT = Path(__file__).resolve().parents[1]
KSERVE = REPO_ROOT / "deploy" / "kserve"
# The oldest Kubernetes release still maintained upstream when these manifests were written, and the newest
# whose schemas kubernetes-validate ships (it ships them in the package: no network needed).
KUBERNETES_VERSIONS = ("1.30", "1.37")
# Fields of KServe's ModelSpec beside those of a core Container.
MODEL_SPEC_FIELDS = {"modelFormat", "protocolVersion", "storageUri", "runtime"}


def built_archives() -> set[str]:
    """The .mar names the Makefile's archive target writes."""
    makefile = (REPO_ROOT / "Makefile").read_text().replace("\\\n", " ")  # join continued lines
    return {f"{name}.mar" for name in re.findall(r"export\.archive \S+ --name (\w+)", makefile)}


def pinned_versions(text: str) -> dict[str, str]:
    """``{package: version}`` of every ``package==version`` in ``text``."""
    return dict(re.findall(r"\b([a-z][\w-]*)==([\w.]+)", text))


def test_every_manifest_parses_with_kind_and_api_version():
    manifests = sorted(KSERVE.glob("*.yaml"))
    assert manifests
    for path in manifests:
        for document in yaml.safe_load_all(path.read_text()):
            assert document["apiVersion"] and document["kind"], path


def test_kustomization_resources_exist():
    kustomization = yaml.safe_load((KSERVE / "kustomization.yaml").read_text())
    for resource in kustomization["resources"]:
        assert (KSERVE / resource).is_file(), resource


def test_inferenceservice_uses_the_torchserve_predictor_and_the_pvc():
    service = yaml.safe_load((KSERVE / "inferenceservice.yaml").read_text())
    model = service["spec"]["predictor"]["model"]
    assert model["modelFormat"]["name"] == "pytorch"
    claim = yaml.safe_load((KSERVE / "pvc.yaml").read_text())["metadata"]["name"]
    assert model["storageUri"] == f"pvc://{claim}"
    pod = yaml.safe_load((KSERVE / "copy-pod.yaml").read_text())
    assert pod["spec"]["volumes"][0]["persistentVolumeClaim"]["claimName"] == claim


def test_config_snapshot_serves_the_archives_make_builds():
    properties = read_properties(KSERVE / "config.properties")
    snapshot = json.loads(properties["model_snapshot"])
    mar_names = {version["marName"] for model in snapshot["models"].values() for version in model.values()}
    assert snapshot["modelCount"] == len(snapshot["models"])
    assert mar_names == built_archives()
    assert "recommender.mar" in mar_names  # the recommend archive is served beside the rankers
    assert properties["model_store"] == "/mnt/models/model-store"


def test_readme_copies_files_that_exist_or_are_built():
    readme = (KSERVE / "README.md").read_text()
    sources = re.findall(r"kubectl (?:cp|apply -f) (\S+)", readme)
    assert sources
    for source in sources:
        path = REPO_ROOT / source
        assert path.is_file() or (source.startswith("model_store/") and path.name in built_archives()), source


def manifests() -> list[tuple[str, dict]]:
    return [(path.name, document) for path in sorted(KSERVE.glob("*.yaml")) for document in yaml.safe_load_all(path.read_text()) if document]


def core_definition(name: str, version: str) -> Draft202012Validator:
    """A validator for one definition of the Kubernetes OpenAPI schema (strict: unknown fields are errors)."""
    schemas = importlib.resources.files("kubernetes_validate") / "kubernetes-json-schema" / f"v{version}.0-local-strict"
    definitions = json.loads((schemas / "_definitions.json").read_text())
    registry = Resource.from_contents(definitions) @ Registry()
    return Draft202012Validator({"$ref": f"{definitions['$id']}#/$defs/{name}"}, registry=registry)


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_core_objects_validate_against_the_kubernetes_schema(version):
    validated = []
    for name, document in manifests():
        if document["apiVersion"] == "v1":
            kubernetes_validate.validate(document, version, strict=True)  # raises on an invalid or unknown field
            validated.append(document["kind"])
        elif document["kind"] != "Kustomization":  # a kustomize file, not an object
            with pytest.raises(kubernetes_validate.SchemaNotFoundError):
                kubernetes_validate.validate(document, version, strict=True)
    assert sorted(validated) == ["PersistentVolumeClaim", "Pod"]


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_inferenceservice_predictor_validates_as_a_core_container(version):
    """KServe's ModelSpec is a core Container plus the model's format and storage: the container part is checked."""
    service = yaml.safe_load((KSERVE / "inferenceservice.yaml").read_text())
    core_definition("io.k8s.apimachinery.pkg.apis.meta.v1.ObjectMeta", version).validate(service["metadata"])
    model = service["spec"]["predictor"]["model"]
    container = {key: value for key, value in model.items() if key not in MODEL_SPEC_FIELDS}
    core_definition("io.k8s.api.core.v1.Container", version).validate({"name": "kserve-container", **container})
    with pytest.raises(Exception, match="cpus"):  # the check does catch a misspelt field
        core_definition("io.k8s.api.core.v1.Container", version).validate({"name": "x", "resources": {"requests": {"cpu": "2"}}, "cpus": 2})
    predictor = service["spec"]["predictor"]
    assert 1 <= predictor["minReplicas"] <= predictor["maxReplicas"]


def test_management_api_is_not_reachable_from_the_pod_network():
    """TorchServe's token authorization is off in the pod (the KServe wrapper sends no token), so its
    management API and gRPC must listen on loopback only, where only the wrapper in the same container calls them."""
    properties = read_properties(KSERVE / "config.properties")
    assert properties["disable_token_authorization"] == "true"
    for key in ("inference_address", "management_address"):
        assert urllib.parse.urlsplit(properties[key]).hostname == "127.0.0.1", key
    assert properties["grpc_inference_address"] == properties["grpc_management_address"] == "127.0.0.1"
    assert properties["enable_model_api"] == "false"
    # The local configuration keeps tokens on instead, and expiring.
    local = read_properties(REPO_ROOT / "config.properties")
    assert local["disable_token_authorization"] == "false" and int(local["token_expiration_min"]) > 0
    assert all(urllib.parse.urlsplit(local[f"{api}_address"]).hostname == "127.0.0.1" for api in ("inference", "management", "metrics"))


def test_both_configurations_use_the_shipped_log_config():
    local = read_properties(REPO_ROOT / "config.properties")["vmargs"]
    assert local == "-Dlog4j.configurationFile=log4j2.xml" and (REPO_ROOT / "log4j2.xml").is_file()
    kserve = read_properties(KSERVE / "config.properties")["vmargs"]
    readme = (KSERVE / "README.md").read_text()
    assert kserve == "-Dlog4j.configurationFile=/mnt/models/config/log4j2.xml"
    assert "kubectl cp log4j2.xml model-store-copy:/pv/config/log4j2.xml" in readme


def test_predictor_image_installs_what_pyproject_pins():
    """The archives run in the image's second environment: its pins are pyproject's, its base the TorchServe
    release the bundle pins, and the InferenceService runs the image the README builds."""
    dockerfile = (KSERVE / "Dockerfile").read_text()
    pins = pinned_versions((REPO_ROOT / "pyproject.toml").read_text())
    (base,) = re.findall(r"^FROM (\S+)", dockerfile, flags=re.MULTILINE)
    assert base == f"pytorch/torchserve-kfs:{pins['torchserve']}"
    installed = pinned_versions(dockerfile)
    assert {"onnxruntime", "faiss-cpu", "pyarrow", "numpy", "torch", "torchserve"} <= installed.keys()
    assert installed == {name: pins.get(name) for name in installed}
    service = yaml.safe_load((KSERVE / "inferenceservice.yaml").read_text())
    image = service["spec"]["predictor"]["model"]["image"]
    assert f"docker build -t {image} deploy/kserve" in (KSERVE / "README.md").read_text()
    assert f"docker build -t {image} deploy/kserve" in dockerfile
