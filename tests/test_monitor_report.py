"""HealthMonitor.report(): a snapshot that shares the monitor's append-only series instead of
copying them (its cost does not grow with the run), and still behaves as a snapshot."""

import copy
import json
import pickle

import pytest
import torch

from robust_attn import HealthMonitor
from robust_attn.health.monitor.report import HEAD_METRICS, LAYER_METRICS, SeriesSnapshot
from robust_attn.studies.stack import AttentionStack


def monitored_run(steps: int, every: int = 1):
    torch.manual_seed(0)
    stack = AttentionStack(2, 32, 2, residual=True)
    monitor = HealthMonitor(stack, every=every)
    x = torch.randn(2, 8, 32)

    def train(count: int) -> None:
        for _ in range(count):
            loss = stack(x)[-1].square().mean()
            loss.backward()
            monitor.step(loss)
            stack.zero_grad()

    train(steps)
    return monitor, train


def test_later_steps_do_not_change_a_report_already_returned():
    monitor, train = monitored_run(3)
    report = monitor.report()
    frozen = copy.deepcopy(report)  # plain lists, as they stood
    assert json.dumps(frozen.to_dict()) == json.dumps(report.to_dict())
    train(4)
    assert report == frozen and json.dumps(report.to_dict()) == json.dumps(frozen.to_dict())
    assert len(report.steps) == 3 and len(report.layers[0].entropy) == 3
    later = monitor.report()
    assert later.steps == [0, 1, 2, 3, 4, 5, 6] and later.steps[:3] == report.steps
    assert later.layers[1].grad_norm[:3] == report.layers[1].grad_norm


def test_a_report_shares_the_series_and_cannot_change_them():
    monitor, _ = monitored_run(3, every=2)
    report = monitor.report()
    for series in report.layers:
        for metric in HEAD_METRICS + LAYER_METRICS:
            assert isinstance(getattr(series, metric), SeriesSnapshot)  # no copy of the history
    with pytest.raises(TypeError):
        report.steps[0] = 5
    assert not hasattr(report.layers[0].entropy, "append")
    report.layers[0].entropy[0][0] = 123.0  # a copy of the per-head values: changes nothing
    report.layers[0].entropy[-1].append(1.0)
    again = monitor.report()
    assert 123.0 not in again.layers[0].entropy[0] and 123.0 not in report.layers[0].entropy[0]
    assert len(again.layers[0].entropy[-1]) == 2 == len(report.layers[0].entropy[-1])


def test_a_report_pickles_and_copies_as_plain_lists():
    monitor, _ = monitored_run(2)
    report = monitor.report()
    for other in (pickle.loads(pickle.dumps(report)), copy.deepcopy(report)):
        assert json.dumps(other.to_dict()) == json.dumps(report.to_dict())  # nan != a copy of nan
        assert type(other.steps) is list
        assert type(other.layers[0].entropy) is list and type(other.layers[0].entropy[0]) is list


def test_series_snapshot_reads_as_the_list_prefix():
    values = [[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]]
    view = SeriesSnapshot(values, 2)
    values.append([7.0, 8.0])  # what the monitor appends after the report does not show
    assert len(view) == 2 and list(view) == [[1.0, 2.0], [3.0, 4.0]]
    assert view[-1] == [3.0, 4.0] and view[::-1] == [[3.0, 4.0], [1.0, 2.0]] and view[5:] == []
    with pytest.raises(IndexError):
        view[2]
    assert view == [[1.0, 2.0], [3.0, 4.0]] == view and view != values and view != "ab"
    assert [3.0, 4.0] in view and repr(view) == "[[1.0, 2.0], [3.0, 4.0]]"
    nan = float("nan")
    assert SeriesSnapshot([nan], 1) == [nan]  # as lists compare: the same value is equal
