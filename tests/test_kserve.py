"""The KServe manifests parse and reference files that exist (or that `make archive` builds)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import yaml

from loadtest.torchserve import read_properties

REPO_ROOT = Path(__file__).resolve().parents[1]
KSERVE = REPO_ROOT / "deploy" / "kserve"


def built_archives() -> set[str]:
    """The .mar names the Makefile's archive target writes."""
    makefile = (REPO_ROOT / "Makefile").read_text()
    return {f"{name}.mar" for name in re.findall(r"export\.archive \S+ --name (\w+)", makefile)}


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
    assert properties["model_store"] == "/mnt/models/model-store"


def test_readme_copies_files_that_exist_or_are_built():
    readme = (KSERVE / "README.md").read_text()
    sources = re.findall(r"kubectl (?:cp|apply -f) (\S+)", readme)
    assert sources
    for source in sources:
        path = REPO_ROOT / source
        assert path.is_file() or (source.startswith("model_store/") and path.name in built_archives()), source
