"""HealthMonitor writers (TensorBoard, W&B, CSV) and the Lightning and transformers callbacks:
each sampled step's readings arrive, exactly the report's numbers, at the sampled steps."""

import math
import statistics

import pytest
import torch

from robust_attn import CSVWriter, HealthMonitor, MetricsWriter, TensorBoardWriter, Thresholds
from robust_attn.health.early_warnings import check
from robust_attn.health.monitor import HEAD_METRICS, LAYER_METRICS
from robust_attn.health.monitor.hf_trainer import HealthMonitorTrainerCallback
from robust_attn.health.monitor.lightning import HealthMonitorCallback
from robust_attn.studies.stack import AttentionStack, init_stack_weights

# Every head's normalised entropy is below 1.01, so entropy_collapse fires at every sample.
ALWAYS_WARN = Thresholds(entropy_collapse=1.01)


def small_stack():
    stack = AttentionStack(2, 16, 2, residual=True)
    init_stack_weights(stack, 2.0, torch.Generator().manual_seed(0))
    return stack


def train(monitor_step, model, steps=7):
    """SGD steps on a small stack; ``monitor_step(loss)`` after backward, before zero_grad."""
    torch.manual_seed(1)
    x = torch.randn(2, 6, 16)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    for _ in range(steps):
        loss = model(x)[-1].square().mean()
        loss.backward()
        monitor_step(loss)
        optimizer.step()
        optimizer.zero_grad()


class Recorder:
    """Stands in for a SummaryWriter: records add_scalar and add_text calls."""

    def __init__(self):
        self.scalars, self.texts = [], []

    def add_scalar(self, tag, value, global_step):
        self.scalars.append((tag, value, global_step))

    def add_text(self, tag, text_string, global_step):
        self.texts.append((tag, text_string, global_step))


def same(a, b):
    return a == b or (math.isnan(a) and math.isnan(b))


def expected_values(report, index):
    """The report's numbers at sample ``index``, by tag, built from the report's own series."""
    values = {}
    for series in report.layers:
        for metric in HEAD_METRICS:
            heads = getattr(series, metric)[index]
            values.update({f"attention/{series.name}/head_{h}/{metric}": v
                           for h, v in enumerate(heads)})
        for metric in LAYER_METRICS:
            values[f"attention/{series.name}/{metric}"] = getattr(series, metric)[index]
    return values


def test_tensorboard_writer_gets_the_reports_numbers_at_the_sampled_steps():
    stack, recorder = small_stack(), Recorder()
    with HealthMonitor(stack, every=3, writers=[TensorBoardWriter(recorder)]) as monitor:
        train(monitor.step, stack)
    report = monitor.report()
    assert report.steps == [0, 3, 6]
    assert sorted({step for _, _, step in recorder.scalars}) == report.steps
    for index, step in enumerate(report.steps):
        written = {tag: value for tag, value, s in recorder.scalars if s == step}
        for tag, value in expected_values(report, index).items():
            assert same(written[tag], value), tag
        for series in report.layers:
            entropy = series.entropy[index]
            prefix = f"attention/{series.name}"
            assert written[f"{prefix}/entropy"] == pytest.approx(statistics.fmean(entropy))
            assert written[f"{prefix}/min_entropy"] == min(series.min_entropy[index])
            assert written[f"{prefix}/max_logit"] == max(series.max_logit[index])
        assert len(written) == sum(len(HEAD_METRICS) * (s.heads + 1) + len(LAYER_METRICS)
                                   for s in report.layers)
    assert math.isfinite(written[f"attention/{report.layers[0].name}/grad_norm"])
    assert recorder.texts == []  # a healthy small stack raises no warning


def test_warnings_reach_add_text_as_the_monitor_raises_them():
    stack, recorder = small_stack(), Recorder()
    with HealthMonitor(stack, every=3, thresholds=ALWAYS_WARN,
                       writers=[TensorBoardWriter(recorder)]) as monitor:
        train(monitor.step, stack)
    report = monitor.report()
    assert [step for _, _, step in recorder.texts] == report.steps
    assert {tag for tag, _, _ in recorder.texts} == {"attention/warnings"}
    for k, (_, text, _) in enumerate(recorder.texts):
        raised = check(report.truncated(k + 1), ALWAYS_WARN, in_use=monitor.in_use)
        assert raised and text == "\n".join(str(w) for w in raised)
    assert "entropy_collapse" in recorder.texts[-1][1]


def test_metrics_writer_logs_one_dict_per_sample_as_wandb_log_takes_it():
    calls = []

    def log(data, step=None, commit=None, sync=None):  # wandb's documented Run.log signature
        calls.append((data, step))

    stack = small_stack()
    with HealthMonitor(stack, every=2, thresholds=ALWAYS_WARN,
                       writers=[MetricsWriter(log)]) as monitor:
        train(monitor.step, stack, steps=5)
    report = monitor.report()
    assert [step for _, step in calls] == report.steps == [0, 2, 4]
    for index, (data, _) in enumerate(calls):
        text = data.pop("attention/warnings")
        assert text == "\n".join(str(w) for w in check(report.truncated(index + 1), ALWAYS_WARN))
        expected = expected_values(report, index)
        assert all(same(data[tag], value) for tag, value in expected.items())


def test_metrics_writer_without_a_warnings_key_logs_numbers_only():
    calls = []
    stack = small_stack()
    with HealthMonitor(stack, every=2, thresholds=ALWAYS_WARN, writers=[
            MetricsWriter(lambda data, step: calls.append(data), warnings_key=None)]) as monitor:
        train(monitor.step, stack, steps=3)
    assert len(calls) == 2 and all(isinstance(v, float) for data in calls for v in data.values())


def test_csv_writer_file_equals_to_csv_during_and_after_the_run(tmp_path):
    stack = small_stack()
    writer = CSVWriter(tmp_path / "live" / "health.csv")
    with HealthMonitor(stack, every=3, writers=[writer]) as monitor:
        train(monitor.step, stack, steps=4)
        monitor.to_csv(tmp_path / "mid.csv")
        assert writer.path.read_text() == (tmp_path / "mid.csv").read_text()
        train(monitor.step, stack, steps=4)
    monitor.to_csv(tmp_path / "end.csv")
    assert writer.path.read_text() == (tmp_path / "end.csv").read_text()
    assert monitor.report().steps == [0, 3, 6] and not list(writer.path.parent.glob("*.sample"))


def test_bad_writers_are_refused_naming_the_argument():
    stack = small_stack()
    with pytest.raises(TypeError, match="writers="):
        HealthMonitor(stack, writers="tb")
    with pytest.raises(TypeError, match="writers: .*no write"):
        HealthMonitor(stack, writers=[Recorder()])  # a SummaryWriter needs TensorBoardWriter
    with pytest.raises(TypeError, match="writer=.*no add_text"):
        TensorBoardWriter(type("OnlyScalars", (), {"add_scalar": lambda *a: None})())
    with pytest.raises(TypeError, match="log=3"):
        MetricsWriter(3)


def test_real_summary_writer_events_hold_the_reports_numbers(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from torch.utils.tensorboard import SummaryWriter

    stack = small_stack()
    with SummaryWriter(str(tmp_path)) as summary, \
            HealthMonitor(stack, every=3, writers=[TensorBoardWriter(summary)]) as monitor:
        train(monitor.step, stack)
    events = EventAccumulator(str(tmp_path)).Reload()
    report = monitor.report()
    tag = f"attention/{report.layers[0].name}/head_1/entropy"
    assert [e.step for e in events.Scalars(tag)] == report.steps
    assert [e.value for e in events.Scalars(tag)] == pytest.approx(
        report.layers[0].head_series("entropy", 1), rel=1e-6)


class StandInLogger:
    """Stands in for a Lightning logger: log_metrics(metrics, step)."""

    def __init__(self):
        self.calls = []

    def log_metrics(self, metrics, step=None):
        self.calls.append((metrics, step))


def test_lightning_callback_logic_with_a_stand_in_trainer():
    stack, logger, recorder = small_stack(), StandInLogger(), Recorder()
    trainer = type("StandInTrainer", (), {"loggers": [logger]})()
    callback = HealthMonitorCallback(every=3, writers=[TensorBoardWriter(recorder)],
                                     thresholds=ALWAYS_WARN)
    callback.on_fit_start(trainer, stack)
    losses = []

    def batch_end(loss):
        losses.append(loss.item())
        callback.on_train_batch_end(trainer, stack, {"loss": loss}, None, len(losses) - 1)

    train(batch_end, stack, steps=6)  # step 6 is due: its observers are attached until fit ends
    callback.on_fit_end(trainer, stack)
    report = callback.monitor.report()
    assert report.losses == pytest.approx(losses)
    assert [step for _, step in logger.calls] == report.steps == [0, 3]
    for index, (metrics, _) in enumerate(logger.calls):
        assert all(same(metrics[t], v) for t, v in expected_values(report, index).items())
        assert "attention/warnings" not in metrics
    assert [step for _, _, step in recorder.texts] == report.steps
    assert callback.monitor.modules and not any(m._observers for m in stack.layers)


def test_lightning_callback_in_a_real_fit():
    pl = pytest.importorskip("lightning.pytorch")

    class Module(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.stack = small_stack()

        def training_step(self, batch, batch_idx):
            return self.stack(batch)[-1].square().mean()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.01)

    class Logger(pl.loggers.Logger):  # records log_metrics; the rest of Logger's interface
        name, version, calls = "stand-in", 0, []

        def log_hyperparams(self, params, *args, **kwargs):
            pass

        def log_metrics(self, metrics, step=None):
            self.calls.append((metrics, step))

    logger, callback = Logger(), HealthMonitorCallback(every=2)
    trainer = pl.Trainer(max_steps=5, callbacks=[callback], logger=logger,
                         enable_checkpointing=False, enable_progress_bar=False)
    trainer.fit(Module(), torch.utils.data.DataLoader(torch.randn(5, 6, 16), batch_size=1))
    report = callback.monitor.report()
    assert report.steps == [0, 2, 4] and len(report.losses) == 5
    assert all(math.isfinite(g) for g in report.layers[0].grad_norm)
    assert [step for metrics, step in logger.calls if "attention/stack.layers.0/entropy" in metrics
            ] == report.steps


def test_transformers_callback_through_the_trainers_callback_handler():
    transformers = pytest.importorskip("transformers")
    from transformers.trainer_callback import CallbackHandler, TrainerControl, TrainerState

    stack = small_stack()
    optimizer = torch.optim.SGD(stack.parameters(), lr=0.01)
    callback = HealthMonitorTrainerCallback(every=2)
    assert isinstance(callback, transformers.TrainerCallback)
    handler = CallbackHandler([callback], stack, None, optimizer, None)
    args, state, control = None, TrainerState(), TrainerControl()
    handler.on_train_begin(args, state, control)
    logged = []

    def step(loss):  # the Trainer's order: pre-step hook, step, hook, zero_grad, step_end
        handler.on_pre_optimizer_step(args, state, control)
        optimizer.step()
        handler.on_optimizer_step(args, state, control)
        optimizer.zero_grad()
        handler.on_step_end(args, state, control)
        logs = {"loss": loss.item()}
        handler.on_log(args, state, control, logs)
        logged.append(logs)

    x = torch.randn(2, 6, 16)
    for _ in range(4):
        loss = stack(x)[-1].square().mean()
        loss.backward()
        step(loss)
    handler.on_train_end(args, state, control)
    report = callback.monitor.report()
    assert report.steps == [0, 2]
    with_health = [i for i, logs in enumerate(logged) if len(logs) > 1]
    assert with_health == [0, 2]  # once per sample, at the first log after it
    for index, i in enumerate(with_health):
        assert all(same(logged[i][t], v) for t, v in expected_values(report, index).items())
    assert all(math.isfinite(g) for g in report.layers[0].grad_norm)  # read before zero_grad
    assert not any(m._observers for m in stack.layers)  # step 4 was due: closed at train end
    with pytest.raises(ValueError, match="model=None"):
        callback.on_train_begin(args, state, control)
