"""The learner RSS measurement (issue 11.3) runs end to end in its own process and reports a
peak for every phase of an iteration (tiny model: the figures themselves are meaningless here;
SmolLM2 figures come from ``python -m nlhf.learner.memory``)."""

from __future__ import annotations

import pytest
from _learner_util import make_cfg


@pytest.mark.parametrize("snapshot", ["disk"])
def test_measure_learner_rss_reports_every_phase(tiny_model_dir, snapshot):
    from nlhf.learner.memory import measure_learner_rss

    cfg = make_cfg(algorithm={"inner_steps": 2})
    object.__setattr__(cfg.learner, "snapshot", snapshot)  # until the config has the field
    res = measure_learner_rss(cfg, str(tiny_model_dir), prompts=2, responses=2, prompt_tokens=8, response_tokens=4,
                              iterations=2, timeout_s=600)
    assert set(res["phase_peak_rss_gb"]) == {"init", "half_step", "export", "full_step"}
    assert 0.2 < res["peak_rss_gb"] == max(res["phase_peak_rss_gb"].values()) < 8
    assert res["snapshot"] == snapshot and res["iterations"] == 2 and len(res["iteration_s"]) == 2
    assert res["cpu_capability"]
