"""MLflow tracking against a real `mlflow server` on loopback (its own SQLite store and artifact
root in a temp dir), started by the tests and stopped after; the client reads back what was logged.
Runs are real: in this process through `finetune.cli.main`, or `finetune` processes that are
killed and resumed, or that train on while the server is stopped and started again."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import yaml
from conftest import make_imagefolder, write_config
from processes import Finetune, Torchrun, csv_rows, resume, stop_when

from finetune.cli import main

pytest.importorskip("mlflow", reason="needs the mlflow extra: pip install -e '.[mlflow]'")
from mlflow import MlflowClient  # noqa: E402

FILES = {"config.yaml", "results.csv", "summary.json", "best.pt"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class MlflowServer:
    """`mlflow server` on 127.0.0.1:`port` with its store and artifacts under `root`; it can be
    stopped and started again on the same port and store."""

    def __init__(self, root: Path):
        self.root, self.port = root, free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        cmd = [str(Path(sys.executable).with_name("mlflow")), "server", "--host", "127.0.0.1", "--port", str(self.port)]
        cmd += ["--backend-store-uri", f"sqlite:///{self.root / 'store.db'}", "--workers", "1"]
        cmd += ["--artifacts-destination", str(self.root / "artifacts")]
        with open(self.root / "server.log", "a") as log:  # its own session: stop() ends its workers too
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + 300  # a loaded CI machine takes tens of seconds to import it
        while not self.healthy():
            assert self.proc.poll() is None, (self.root / "server.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "mlflow server never answered /health"
            time.sleep(0.05)

    def healthy(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.uri}/health", timeout=2) as answer:
                return answer.status == 200
        except (urllib.error.URLError, OSError):
            return False

    def stop(self) -> None:
        os.killpg(self.proc.pid, signal.SIGTERM)
        self.proc.wait(timeout=60)
        while self.healthy():  # the workers of its group leave the port a moment later
            time.sleep(0.05)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    server = MlflowServer(tmp_path_factory.mktemp("mlflow"))
    server.start()
    yield server
    server.stop()


@pytest.fixture
def make_config(tmp_path: Path):
    """A tiny config (3 epochs, the backbone from epoch 2) tracked on `uri` in an experiment named for the test."""

    def make(uri: str, per_class: int = 8, **mlflow) -> Path:
        data = make_imagefolder(tmp_path / "data", train_per_class=per_class, val_per_class=4)
        tracking = {"mlflow": {"uri": uri, "experiment": tmp_path.name, **mlflow}}
        sections = {"data": {"batch_size": 4}, "tracking": tracking}
        return write_config(tmp_path / "config.yaml", data, tmp_path / "runs", **sections)

    return make


def runs_of(client: MlflowClient, experiment: str) -> list:
    found = client.get_experiment_by_name(experiment)
    return client.search_runs([found.experiment_id]) if found else []


def steps(client: MlflowClient, run_id: str, key: str = "val_acc") -> list[int]:
    return sorted(m.step for m in client.get_metric_history(run_id, key))


def artifacts(client: MlflowClient, run_id: str) -> set[str]:
    return {a.path for a in client.list_artifacts(run_id)}


def sent(run: Path) -> list[int]:
    try:
        return json.loads((run / "mlflow.json").read_text())["sent"]
    except (FileNotFoundError, json.JSONDecodeError):
        return []


def test_a_run_logs_its_config_one_point_per_epoch_its_stages_and_files(server, make_config, tmp_path):
    config = make_config(server.uri, log_model=True)
    assert main(["train", str(config)]) == 0
    client = MlflowClient(server.uri)
    (run,) = runs_of(client, tmp_path.name)
    assert run.info.status == "FINISHED" and run.info.run_name == "tiny"
    params, tags = run.data.params, run.data.tags
    assert params["train.epochs"] == "3" and params["model.arch"] == "resnet18" and params["data.batch_size"] == "4"
    assert params["tracking.mlflow.uri"] == server.uri
    for key in ("val_acc", "val_loss", "train_loss", "lr_head", "val_acc_cat"):
        assert steps(client, run.info.run_id, key) == [1, 2, 3], key
    rows = (tmp_path / "runs" / "tiny" / "results.csv").read_text().splitlines()
    last = dict(zip(rows[0].split(","), rows[-1].split(","), strict=True))
    assert run.data.metrics["val_loss"] == pytest.approx(float(last["val_loss"]))
    assert tags["stage_start.head"] == "epoch 1" and tags["stage_start.backbone"] == "epoch 2"
    assert tags["state"] == "complete" and tags["runtime.precision"] == "fp32" and tags["host"]
    assert FILES | {"best.onnx", "best.onnx.json"} <= artifacts(client, run.info.run_id)


def test_kill_9_then_resume_continues_the_same_mlflow_run_with_every_epoch_once(server, make_config, tmp_path):
    config, run_dir = make_config(server.uri), tmp_path / "run"
    proc = Finetune("train", config, "--run-dir", run_dir)
    stop_when(proc, lambda: csv_rows(run_dir) == 2, signal.SIGKILL)  # epoch 2 written; its send in flight or not
    client = MlflowClient(server.uri)
    (killed,) = runs_of(client, tmp_path.name)
    assert killed.info.status == "RUNNING"  # nothing could tell the server
    resume(run_dir)
    (run,) = runs_of(client, tmp_path.name)
    assert run.info.run_id == killed.info.run_id and run.info.status == "FINISHED"
    for key in ("val_acc", "train_loss", "epoch_seconds"):
        assert steps(client, run.info.run_id, key) == [1, 2, 3], key
    assert sent(run_dir) == [1, 2, 3]


def test_a_2x2_sweep_is_a_parent_run_with_4_children(server, make_config, tmp_path):
    config = make_config(server.uri)
    grid = ["--grid", "train.lr_head=1e-3,2e-3", "--grid", "seed=0,1", "--set", "train.epochs=2"]
    assert main(["sweep", str(config), *grid, "--out", str(tmp_path / "sweep")]) == 0
    client = MlflowClient(server.uri)
    found = runs_of(client, tmp_path.name)
    (parent,) = [r for r in found if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in found if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert parent.info.run_name == "sweep" and parent.info.status == "FINISHED" and len(found) == 5
    assert sorted(c.info.run_name for c in children) == [
        "lr_head=1e-3,seed=0",
        "lr_head=1e-3,seed=1",
        "lr_head=2e-3,seed=0",
        "lr_head=2e-3,seed=1",
    ]
    for child in children:
        assert child.info.status == "FINISHED" and steps(client, child.info.run_id) == [1, 2]
        assert child.data.params["seed"] == child.info.run_name[-1]


def test_a_3_trial_study_is_a_parent_run_with_its_trials_and_their_states(server, make_config, tmp_path):
    pytest.importorskip("optuna", reason="needs the tune extra")
    config = make_config(server.uri)
    space = tmp_path / "space.yaml"
    space.write_text("train.lr_head: {low: 1.0e-4, high: 1.0e-2, log: true}\n")
    study = tmp_path / "study"
    args = ["tune", str(config), "--space", str(space), "--trials", "3", "--out", str(study), "--set", "train.epochs=3"]
    assert main(args) == 0
    client = MlflowClient(server.uri)
    found = runs_of(client, tmp_path.name)
    (parent,) = [r for r in found if "mlflow.parentRunId" not in r.data.tags]
    assert parent.info.status == "FINISHED" and parent.data.params["trials"] == "3"
    assert parent.data.params["space.train.lr_head"] == "[0.0001, 0.01, True]"
    trials = {r.data.tags["trial_number"]: r for r in found if r is not parent}
    assert sorted(trials) == ["0", "1", "2"] and parent.data.tags["best_trial"] in trials
    for number, trial in trials.items():
        summary = json.loads((study / f"trial-{int(number):04d}" / "summary.json").read_text())
        assert trial.data.tags["mlflow.parentRunId"] == parent.info.run_id
        assert trial.data.tags["state"] == ("pruned" if summary["pruned"] else "complete")
        assert float(trial.data.tags["trial.train.lr_head"]) == pytest.approx(float(trial.data.params["train.lr_head"]))
        assert steps(client, trial.info.run_id) == list(range(1, summary["epochs_completed"] + 1))


def test_under_torchrun_rank_0_alone_logs_the_run(server, make_config, tmp_path):
    proc = Torchrun(tmp_path / "logs", "train", make_config(server.uri), "--run-dir", tmp_path / "run")
    out = proc.finish()
    assert proc.returncode == 0, out + proc.rank_log(0, "stderr") + proc.rank_log(1, "stderr")
    client = MlflowClient(server.uri)
    (run,) = runs_of(client, tmp_path.name)
    assert run.info.status == "FINISHED" and steps(client, run.info.run_id) == [1, 2, 3]
    assert run.data.params["data.batch_size"] == "4"


def test_finetune_track_uploads_a_run_trained_untracked_once_however_often_it_runs(server, tmp_path):
    data = make_imagefolder(tmp_path / "data")
    config = write_config(tmp_path / "config.yaml", data, tmp_path / "runs", train={"epochs": 2, "unfreeze_epoch": 1})
    assert main(["train", str(config)]) == 0
    run_dir = tmp_path / "runs" / "tiny"
    for _ in range(2):
        assert main(["track", str(run_dir), "--uri", server.uri, "--experiment", tmp_path.name]) == 0
    client = MlflowClient(server.uri)
    (run,) = runs_of(client, tmp_path.name)
    assert run.info.status == "FINISHED" and steps(client, run.info.run_id) == [1, 2]
    assert artifacts(client, run.info.run_id) >= FILES


def test_a_server_down_at_start_is_one_line_and_exit_2_before_any_training(make_config, tmp_path):
    config = make_config(f"http://127.0.0.1:{free_port()}")  # nothing listens there
    proc = Finetune("train", config)
    out, err = proc.finish()
    assert proc.returncode == 2
    (line,) = err.strip().splitlines()
    assert line.startswith("error: tracking.mlflow.uri http://127.0.0.1:") and "did not answer" in line, line
    assert "epoch" not in out and not (tmp_path / "runs" / "tiny" / "results.csv").exists()


def test_a_server_stopped_mid_run_loses_no_epoch_once_it_is_back(make_config, tmp_path):
    """Stopped once epoch 1 is sent (the run held meanwhile, SIGSTOP): the next epoch warns and
    training goes on; the run is held again while the server starts on its port and store, then
    sends what it missed."""
    server = MlflowServer(tmp_path)
    server.start()
    config = make_config(server.uri, per_class=40)
    config.write_text(config.read_text().replace("epochs: 3", "epochs: 4"))
    run_dir = tmp_path / "run"
    proc = Finetune("train", config, "--run-dir", run_dir)
    try:
        assert proc.wait_for(lambda: sent(run_dir) == [1]), proc.screen
        proc.send_signal(signal.SIGSTOP)
        server.stop()
        proc.send_signal(signal.SIGCONT)
        assert proc.wait_for(lambda: "did not answer" in proc.screen), proc.screen
        proc.send_signal(signal.SIGSTOP)
        server.start()
        proc.send_signal(signal.SIGCONT)
        out, screen = proc.finish()
        assert proc.returncode == 0, screen
        assert "answers again" in out
        client = MlflowClient(server.uri)
        (run,) = runs_of(client, tmp_path.name)
        assert run.info.status == "FINISHED" and artifacts(client, run.info.run_id) >= FILES
        for key in ("val_acc", "train_loss"):
            assert steps(client, run.info.run_id, key) == [1, 2, 3, 4], key
    finally:
        proc.kill()
        server.stop()


def test_the_config_section_reads_the_environment_and_resumes_with_tracking_changed(tmp_path, monkeypatch):
    from finetune.config.load import from_dict
    from finetune.runs.mlflow_server import experiment_name, tracking_uri
    from finetune.runs.rundir import config_changes

    raw = yaml.safe_load(write_config(tmp_path / "c.yaml", tmp_path, tmp_path).read_text())
    plain = from_dict(dict(raw))
    tracked = from_dict({**raw, "tracking": {"mlflow": {}}})
    assert plain.tracking.mlflow is None and config_changes(plain, tracked) == []
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow.example:5000")
    monkeypatch.delenv("MLFLOW_EXPERIMENT_NAME", raising=False)
    assert tracking_uri(tracked.tracking.mlflow) == "http://mlflow.example:5000"
    assert experiment_name(tracked.tracking.mlflow, "tiny") == "tiny"
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "team")
    assert experiment_name(tracked.tracking.mlflow, "tiny") == "team"


def test_without_mlflow_a_tracked_config_is_the_install_hint_and_exit_2(make_config, tmp_path, monkeypatch):
    blocker = tmp_path / "blocked" / "mlflow"
    blocker.mkdir(parents=True)
    (blocker / "__init__.py").write_text("raise ImportError('mlflow is not installed here')\n")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(blocker.parent), os.environ.get("PYTHONPATH", "")]))
    proc = Finetune("train", make_config("http://127.0.0.1:5000"))
    out, err = proc.finish()
    assert proc.returncode == 2 and err.strip() == "error: tracking.mlflow needs MLflow: pip install 'finetune[mlflow]'"
