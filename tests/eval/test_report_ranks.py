"""`report` under several processes: feature extraction is collective (every rank takes part), the analysis is
rank 0's alone. Every extraction must come first: a rank that went on to the next backbone's extraction while
rank 0 analysed the previous one would wait in that collective for as long as the analysis takes."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from ssl_hybrid.eval import features, report


class AnalysisStarted(Exception):
    pass


@pytest.mark.fault(injected="rank 0's analysis (k-NN, k-shot fits, plots) of backbone 1 running while the other ranks "
                            "wait in backbone 2's collective extraction, past the process group's timeout",
                   did="every collective extraction runs first on every rank; rank 0 analyses afterwards, alone",
                   lost="nothing")
@pytest.mark.parametrize("main", [True, False], ids=["rank-0", "other-rank"])
def test_report_extracts_every_backbone_before_rank_0_analyses_any(monkeypatch, main):
    events = []

    def extract(spec, sets, *args, **kwargs):
        events.append(f"extract {spec}")
        pair = (np.zeros((4, 2), np.float32), np.arange(4))
        return {"spec": spec}, [pair, pair]

    def analyse(name, *args, **kwargs):
        events.append(f"analyse {name}")
        raise AnalysisStarted

    monkeypatch.setattr(features, "features_for_spec", extract)
    monkeypatch.setattr(features, "is_main_process", lambda: main)
    monkeypatch.setattr(report, "evaluate_backbone", analyse)
    labeled = SimpleNamespace(classes=["x", "y"])  # only passed through to the fakes above
    if main:
        with pytest.raises(AnalysisStarted):
            report.build_report(["a", "b"], labeled, labeled, "unused", names=["a", "b"], image_size=32)
    else:
        assert report.build_report(["a", "b"], labeled, labeled, "unused", names=["a", "b"], image_size=32)["entries"] == []
    assert events == ["extract a", "extract b"] + (["analyse a"] if main else [])
