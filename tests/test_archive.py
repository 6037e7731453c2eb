"""The .mar is self-contained: its handler runs from the extracted archive alone.

The archive is unpacked into an empty directory and its handler scores a
request in a fresh interpreter whose ``sys.path`` holds that directory, the
standard library and site-packages, nothing else (``-S`` skips the ``.pth``
files, so this repository's editable install is not on the path either).
"""

from __future__ import annotations

import json
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

from export.archive import RECOMMEND_MAX_BATCH_DELAY_MS, ServingConfig, build_archive, parse_args, serving_config
from featurespec import FEATURES_FILE

pytestmark = pytest.mark.slow

# Runs in the fresh interpreter: argv = archive dir, site-packages dirs (os.pathsep-joined), metrics.yaml, request JSON.
SCORE_FROM_ARCHIVE = r"""
import json, sys
archive, site_dirs, metrics_config, request = sys.argv[1:5]
sys.path[:0] = [archive]
sys.path += site_dirs.split(__import__("os").pathsep)

from ts.context import Context, RequestProcessor
from ts.metrics.metric_cache_yaml_impl import MetricsCacheYamlImpl

import recommender_handler

metrics = MetricsCacheYamlImpl(config_file_path=metrics_config)
metrics.initialize_cache()
manifest = json.load(open(f"{archive}/MAR-INF/MANIFEST.json"))
yaml_config = {"handler": {"max_records": 100, "threads": 1}}
context = Context("tiny", archive, manifest, 1, None, "0.12.0", metrics=metrics, model_yaml_config=yaml_config)
handler = recommender_handler.RecommenderHandler()
handler.initialize(context)
context.request_processor = [RequestProcessor({})]
context.request_ids = {0: "request-0"}
metrics.set_request_ids(context.request_ids)
(output,) = handler.handle([{"body": request}], context)
modules = {
    name: getattr(module, "__file__", None) or ""
    for name, module in sys.modules.items()
    if name.split(".")[0] in {"featurespec", "handlers", "recommender_handler", "training", "export", "loadtest"}
}
print(json.dumps({"response": json.loads(output), "status": context.get_response_status(0)[0], "modules": modules}))
"""


@pytest.mark.parametrize("backend", ["torchscript", "onnx"])
def test_extracted_archive_scores_in_a_fresh_interpreter(backend, tiny_dlrm, sample_records, tmp_path, metrics_config, repo_root):
    archive = build_archive(tiny_dlrm.path, name="tiny", backend=backend, model_store=tmp_path / "store", config=ServingConfig(max_records=100))
    extracted = tmp_path / "extracted"
    extracted.mkdir()
    with zipfile.ZipFile(archive) as packed:
        packed.extractall(extracted)
    assert (extracted / FEATURES_FILE).is_file()

    records = sample_records(5, seed=11)
    site_dirs = sorted({sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]})
    command = [sys.executable, "-S", "-I", "-c", SCORE_FROM_ARCHIVE, str(extracted), ":".join(site_dirs), str(metrics_config),
               json.dumps({"instances": records})]
    empty = tmp_path / "cwd"
    empty.mkdir()
    result = subprocess.run(command, cwd=empty, capture_output=True, text=True, timeout=300, env={"PATH": "/usr/bin:/bin"})
    assert result.returncode == 0, result.stderr[-3000:]
    outcome = json.loads(result.stdout.strip().splitlines()[-1])

    assert outcome["status"] == 200
    assert outcome["response"]["predictions"] == pytest.approx(tiny_dlrm.eager_scores(records), abs=1e-5)
    # Every serving module came from the archive; nothing else of the repository was imported.
    assert {name.split(".")[0] for name in outcome["modules"]} == {"featurespec", "handlers", "recommender_handler"}
    for name, path in outcome["modules"].items():
        assert Path(path).resolve().is_relative_to(extracted.resolve()), (name, path)
        assert not Path(path).resolve().is_relative_to(repo_root), (name, path)


def test_recommend_archives_wait_less_to_batch_unless_told() -> None:
    def delay(*options: str) -> int:
        return serving_config(parse_args(["export_dir", "--name", "m", *options])).max_batch_delay_ms

    assert delay() == ServingConfig.max_batch_delay_ms == 5
    assert delay("--retrieval", "retrieval_export") == RECOMMEND_MAX_BATCH_DELAY_MS == 1
    assert delay("--retrieval", "retrieval_export", "--max-batch-delay", "7") == delay("--max-batch-delay", "7") == 7
    with pytest.raises(ValueError, match="max_batch_delay_ms must be an integer >= 0, got -1"):
        delay("--max-batch-delay", "-1")


def test_archive_keeps_ieee_float32_matmuls_unless_told() -> None:
    def handler_section(*options: str) -> dict:
        return serving_config(parse_args(["export_dir", "--name", "m", *options])).to_model_config()["handler"]

    assert handler_section()["float32_matmul_precision"] == "highest"
    assert handler_section("--float32-matmul-precision", "high")["float32_matmul_precision"] == "high"
    with pytest.raises(ValueError, match="float32_matmul_precision must be one of highest, high, medium, got 'fast'"):
        ServingConfig(float32_matmul_precision="fast")


def test_ranking_archives_build_and_serve_without_faiss(repo_root) -> None:
    # A GPU serving host may lack faiss: only a retrieval index needs it, not the archiver or the ranking handler's code.
    code = (
        "import sys; sys.modules['faiss'] = None\n"  # `import faiss` now raises ImportError
        "import export.archive, handlers.recommend, handlers.request, handlers.backends\n"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=repo_root, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
