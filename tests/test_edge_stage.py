"""The pipeline's edge stage on a tiny model: GGUF files per quant, llama.cpp speed and memory, and
the accuracy of the quantised file read back through our GGUF loader."""
import json
import os

import pytest

from configs.tiny import get_config
from tests.hf_helpers import tiny_model_dir

pytestmark = pytest.mark.slow  # the full tier only (README: test tiers)

try:
    import xllamacpp  # noqa: F401
    HAVE_LLAMACPP = True
except ImportError:
    HAVE_LLAMACPP = False


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    from train.study import run_study
    base = tmp_path_factory.mktemp("edge")
    config = get_config(tiny_model_dir(base / "model"))
    config.pipeline.methods = ("ce",)
    config.pipeline.data_sizes = ()
    config.pipeline.edge.enabled = True
    config.pipeline.edge.quants = ("f16", "q4_0")
    config.pipeline.edge.threads = (1,)
    config.pipeline.edge.gen_tokens = 8
    config.pipeline.edge.eval_limit = 8
    with pytest.MonkeyPatch.context() as m:  # a conversion cache of its own: see the read-back test
        m.setenv("OLMO_JAX_CACHE", str(base / "cache"))
        return config, str(base / "work"), run_study(config, str(base / "work"))


def test_every_model_and_quant_has_a_row(finished):
    config, workdir, results = finished
    edge = results["edge"]
    assert set(edge) == {"edge-dense", "edge-run-l2-0.5-ce"}
    assert edge["edge-dense"]["intermediate_size"] == 64 and edge["edge-run-l2-0.5-ce"]["intermediate_size"] == 32
    for e in edge.values():
        f16, q4 = e["quants"]
        assert (f16["quant"], q4["quant"]) == ("f16", "q4_0")
        assert 0 < q4["file_mb"] < f16["file_mb"]
        for q in e["quants"]:
            assert os.path.isfile(os.path.join(workdir, f"edge-{e['model_stage']}", f"model-{q['quant']}.gguf"))
            assert q["eval"]["n"] == 8 and 0 <= q["eval"]["acc_per_char"] <= 1
            if HAVE_LLAMACPP:
                t = q["llamacpp"]["1"]
                assert t["gen_tokens_per_s"] > 0 and t["prompt_tokens_per_s"] > 0 and t["peak_rss_mb"] > 0
    text = open(os.path.join(workdir, "results.md")).read()
    assert "On the edge" in text and text.count("| edge-") == 0 and text.count("| run-l2-0.5-ce | 32 |") == 2


def test_the_read_back_files_leave_no_conversion_cache_entry(finished):
    """Each quantised file is read back once, just written: a cache entry (the model in float32)
    would never be read again and only fill the disk, once per file per run."""
    _, workdir, _ = finished
    cache = os.path.join(os.path.dirname(workdir), "cache", "gguf")
    assert not os.path.isdir(cache) or os.listdir(cache) == []


def test_f16_file_scores_like_the_model(finished):
    _, workdir, results = finished
    ours = json.load(open(os.path.join(workdir, "run-l2-0.5-ce", "eval.json")))["predictions"][:8]
    f16 = json.load(open(os.path.join(workdir, "edge-run-l2-0.5-ce", "eval-f16.json")))["predictions"]
    import numpy as np
    # the file's weights are ours rounded to f16: the scored log-likelihoods barely move
    np.testing.assert_allclose([p["loglik"] for p in f16], [p["loglik"] for p in ours], atol=0.05)
