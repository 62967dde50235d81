"""Seeds run as separate studies, pooled (train/study/pool.py): the pooled report equals the report
of one study over the same seeds, and what cannot be pooled is refused in one line."""
import json
import os
import shutil
import subprocess
import sys

import pytest

from configs.tiny import get_config
from olmo_jax.config import OlmoJaxError
from tests.hf_helpers import tiny_model_dir
from train.study import run_study
from train.study.pool import pool
from train.study.results import collect

pytestmark = pytest.mark.slow  # the full tier only (README: test tiers)


def config_of(src, seeds):
    config = get_config(src)
    config.pipeline.data_sizes = ()
    config.pipeline.seeds = seeds
    config.train.steps = 2
    config.eval.lambada = 3
    config.eval.suite = "arc_easy:rc_0shot,boolq:rc_0shot"
    config.eval.suite_limit = 4
    return config


@pytest.fixture(scope="module")
def studies(tmp_path_factory):
    """One study over seeds 0 and 1, and the same study run once per seed."""
    base = tmp_path_factory.mktemp("pool")
    src = tiny_model_dir(base / "model")
    dirs = {name: str(base / name) for name in ("both", "s0", "s1")}
    for name, seeds in (("both", (0, 1)), ("s0", (0,)), ("s1", (1,))):
        run_study(config_of(src, seeds), dirs[name])
    return base, dirs


def _by_key(comparisons):
    return {(c["run"], c["baseline"], c["metric"]): c for c in comparisons}


def test_pooled_studies_report_what_one_study_over_their_seeds_reports(studies):
    base, dirs = studies
    out = str(base / "pooled")
    pool([dirs["s1"], dirs["s0"]], out)
    pooled, one = collect(out), collect(dirs["both"])
    assert set(pooled["runs"]) == set(one["runs"]) == {
        "prune-l2-0.5", "run-l2-0.5-ce-s0", "run-l2-0.5-ce-s1", "run-l2-0.5-kl-s0", "run-l2-0.5-kl-s1"}
    for name, r in one["runs"].items():
        assert pooled["runs"][name]["key"] == r["key"]
        assert pooled["runs"][name]["eval"] == r["eval"] and pooled["runs"][name]["lambada"] == r["lambada"]
    assert pooled["dense"]["eval"] == one["dense"]["eval"]
    a, b = _by_key(pooled["comparisons"]), _by_key(one["comparisons"])
    assert set(a) == set(b) and {m for _, _, m in a} == {"csqa", "suite_macro", "lambada_loss"}
    for k, c in b.items():
        assert a[k] == c and c["seeds"] == [0, 1], k
    config = json.load(open(os.path.join(out, "pipeline_config.json")))
    assert config["pipeline"]["seeds"] == [0, 1] and config["pooled_from"] == [dirs["s1"], dirs["s0"]]


def test_pooling_again_rebuilds_the_pool_and_leaves_the_sources(studies, tmp_path):
    _, dirs = studies
    out = str(tmp_path / "pooled")
    before = sorted(os.listdir(os.path.join(dirs["s0"], "run-l2-0.5-ce")))
    pool([dirs["s0"]], out)
    pool([dirs["s0"], dirs["s1"]], out)
    assert set(collect(out)["runs"]) >= {"run-l2-0.5-ce-s0", "run-l2-0.5-ce-s1"}
    assert sorted(os.listdir(os.path.join(dirs["s0"], "run-l2-0.5-ce"))) == before
    assert os.path.isfile(os.path.join(dirs["s0"], "run-l2-0.5-ce", "model", "olmo_jax.json"))


def test_methods_are_compared_on_the_seeds_both_ran(studies, tmp_path):
    """KL over seeds 0 and 1 against CE of seed 0 only: KL vs CE pairs seed 0 (what the seed-0
    study reports), KL vs its unrecovered start pools both seeds (what the two-seed study reports)."""
    _, dirs = studies
    kl_only = _copy(dirs["s1"], tmp_path / "kl_only")
    shutil.rmtree(os.path.join(kl_only, "run-l2-0.5-ce"))
    pool([dirs["s0"], kl_only], str(tmp_path / "pooled"))
    pooled = _by_key(collect(str(tmp_path / "pooled"))["comparisons"])
    s0, both = _by_key(collect(dirs["s0"])["comparisons"]), _by_key(collect(dirs["both"])["comparisons"])
    for metric in ("csqa", "suite_macro", "lambada_loss"):
        versus_ce = pooled[("run-l2-0.5-kl", "run-l2-0.5-ce", metric)]
        assert versus_ce["seeds"] == [0]
        assert {k: v for k, v in versus_ce.items() if k != "seeds"} == {
            k: v for k, v in s0[("run-l2-0.5-kl", "run-l2-0.5-ce", metric)].items() if k != "seeds"}
        assert pooled[("run-l2-0.5-kl", "prune-l2-0.5", metric)] == both[("run-l2-0.5-kl", "prune-l2-0.5", metric)]
        assert pooled[("run-l2-0.5-ce", "prune-l2-0.5", metric)]["seeds"] == [0]


def _copy(src, dst, edit_config=None):
    shutil.copytree(src, dst, symlinks=True)
    if edit_config:
        path = os.path.join(dst, "pipeline_config.json")
        config = json.load(open(path))
        edit_config(config)
        json.dump(config, open(path, "w"))
    return str(dst)


def test_what_cannot_be_pooled_is_refused(studies, tmp_path):
    _, dirs = studies
    with pytest.raises(OlmoJaxError, match="also in .*each seed once"):
        pool([dirs["s0"], dirs["both"]], str(tmp_path / "a"))
    other_ratio = _copy(dirs["s1"], tmp_path / "ratio", lambda c: c["pipeline"].update(ratios=[0.3]))
    with pytest.raises(OlmoJaxError, match=r"different studies: they differ in \['pipeline.ratios'\]"):
        pool([dirs["s0"], other_ratio], str(tmp_path / "b"))
    other_lr = _copy(dirs["s1"], tmp_path / "lr", lambda c: c["pipeline"]["hparams"].update(ce={"lr": 1.0}))
    with pytest.raises(OlmoJaxError, match="pipeline.hparams 'ce' in .* differs"):
        pool([dirs["s0"], other_lr], str(tmp_path / "c"))
    start = _copy(dirs["s1"], tmp_path / "start")
    path = os.path.join(start, "prune-l2-0.5", "eval.json")
    ev = json.load(open(path))
    ev["predictions"][0]["correct"] = not ev["predictions"][0]["correct"]
    json.dump(ev, open(path, "w"))
    with pytest.raises(OlmoJaxError, match="prune-l2-0.5 differs between .* not start from the same model"):
        pool([dirs["s0"], start], str(tmp_path / "d"))
    assert not os.path.exists(tmp_path / "a") and not os.path.exists(tmp_path / "d")  # refused before writing
    with pytest.raises(OlmoJaxError, match="exists and is not a pool"):
        pool([dirs["s0"]], dirs["s1"])


def test_report_cli_pools_and_a_bad_pool_is_one_line_and_exit_2(studies, tmp_path):
    _, dirs = studies
    cmd = [sys.executable, "-m", "train.report", f"--workdir={tmp_path / 'pooled'}"]
    ok = subprocess.run(cmd + [f"--pool={dirs['s0']},{dirs['s1']}"], capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    assert "Pooled over the seeds of" in ok.stdout and "| run-l2-0.5-kl | 0,1 | prune-l2-0.5 | csqa |" in ok.stdout
    bad = subprocess.run(cmd + [f"--pool={dirs['s0']},{tmp_path}"], capture_output=True, text=True)
    assert bad.returncode == 2 and bad.stderr.strip().count("\n") == 0 and "is not a pipeline workdir" in bad.stderr
