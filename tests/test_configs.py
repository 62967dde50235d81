"""Every variant of the CPU study config validates and plans (a typo in a variant fails here, not
an hour into a run), and the distillation-options variant plans what docs/RESULTS.md says it ran."""
import dataclasses

import pytest

from configs.smollm2_csqa import VARIANTS, get_config
from olmo_jax.config import OlmoJaxError
from train.settings import Settings
from train.study import plan as plan_lib


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_every_variant_validates_and_plans(variant):
    stages = plan_lib.build(Settings.from_config(get_config(variant)))
    assert stages and stages[0].name == "dense"


def test_recovery_distill_tunes_the_two_options_and_runs_no_grid():
    s = Settings.from_config(get_config("recovery_distill"))
    assert [st.name for st in plan_lib.build(s)] == [
        "dense", "eval-dense", "prune-activation-0.5", "tune-activation-0.5-kl-t2-lr0.00015",
        "tune-activation-0.5-kd-blend-lr0.00015", "tuning"]
    kl_t2, blend = s.pipeline.methods
    assert (kl_t2.distill.temperature, kl_t2.distill.temperature_end, kl_t2.distill.max_alpha) == (2.0, 1.0, 0)
    assert not kl_t2.reads_labels and blend.reads_labels
    assert (blend.distill.alpha, blend.distill.alpha_end) == (0.9, 0.5)
    # the same data, budget and heldout scoring as recovery_tune, whose T = 1 rows sit beside these
    tune = Settings.from_config(get_config("recovery_tune"))
    assert (s.data, s.train, s.pipeline.tune.steps, s.pipeline.tune.limit, s.pipeline.tune.lambada) == (
        tune.data, tune.train, tune.pipeline.tune.steps, tune.pipeline.tune.limit, tune.pipeline.tune.lambada)
    assert s.distill.positions == tune.distill.positions == "all_once"


def test_recovery_schedule_pairs_three_rounds_with_part_4s_one_shot_runs():
    s = Settings.from_config(get_config("recovery_schedule"))
    names = [st.name for st in plan_lib.build(s)]
    one_shot = [f"run-activation-0.5-{m}-s{k}" for k in (0, 1, 2) for m in ("ce", "kl")]
    rounds = [f"sched-activation-{m}-s{k}-r{r}" for k in (0, 1, 2) for m in ("ce", "kl") for r in (1, 2, 3)]
    assert names == ["dense", "eval-dense", "prune-activation-0.5"] + one_shot + ["sched-masks-activation"] + rounds
    assert s.pipeline.schedule.round_steps() == (20, 20, 20) and s.train.steps == 60
    part4 = Settings.from_config(get_config("recovery"))
    assert (s.data, s.train, s.prune, s.distill, s.eval) == (part4.data, part4.train, part4.prune, part4.distill,
                                                             part4.eval)
    assert s.pipeline.methods == part4.pipeline.methods
    assert s.pipeline.hparams == {m: part4.pipeline.hparams[m] for m in ("ce", "kl")}


def test_recovery_blend_adds_the_blend_to_part_4s_grid_and_changes_nothing_else():
    s = Settings.from_config(get_config("recovery_blend"))
    names = [st.name for st in plan_lib.build(s)]
    assert names == ["dense", "eval-dense", "prune-activation-0.5"] + [
        f"run-activation-0.5-{m}-s{k}" for k in (0, 1, 2) for m in ("ce", "kl", "kd-blend")]
    part4, distill = (Settings.from_config(get_config(v)) for v in ("recovery", "recovery_distill"))
    assert (s.data, s.train, s.prune, s.distill, s.eval) == (part4.data, part4.train, part4.prune, part4.distill,
                                                             part4.eval)
    assert s.pipeline.methods[:2] == part4.pipeline.methods
    assert s.pipeline.methods[2] == distill.pipeline.methods[1] and s.pipeline.methods[2].reads_labels
    assert s.pipeline.hparams == {m: part4.pipeline.hparams[m] for m in ("ce", "kl")} | {"kd-blend": {"lr": 1.5e-4}}


def test_recovery_schedule_late_moves_steps_to_the_last_cut_only():
    late, even = (Settings.from_config(get_config(v)) for v in ("recovery_schedule_late", "recovery_schedule"))
    assert late.pipeline.schedule.round_steps() == (10, 10, 40)
    assert dataclasses.replace(late.pipeline.schedule, steps=(20,)) == even.pipeline.schedule
    assert (late.data, late.train, late.prune, late.distill, late.eval) == (even.data, even.train, even.prune,
                                                                            even.distill, even.eval)
    assert [st.name for st in plan_lib.build(late)] == [st.name for st in plan_lib.build(even)]


@pytest.mark.parametrize("steps", [(), (20, 20), (20, 0, 20), (1.5,)])
def test_schedule_steps_are_one_value_or_one_per_round(steps):
    c = get_config("recovery_schedule")
    c.pipeline.schedule.steps = steps
    with pytest.raises(OlmoJaxError, match=r"pipeline.schedule.steps.*one value for every round or one per round \(3\)"):
        Settings.from_config(c)
