"""`finetune tune`: an Optuna study over a config's keys, each trial an ordinary run dir.

Trials go one after another through one Session (data, weights and head-input caches shared, as
in sweep). The study lives in a storage that several workers share: a journal file in the study
dir (processes on one machine, or on a shared filesystem) or an RDB URL (machines). A trial's run
dir is locked by the process that trains it, so a trial whose worker died (RUNNING in the
storage, its dir unlocked) is resumed from last.pt by the next worker and told under its own
trial id: no zombie trials, and no trial trained twice. Under torchrun rank 0 talks to the
storage and the ranks receive each trial's values and every prune decision from it.
"""

from __future__ import annotations

import json
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from finetune.config.load import apply_overrides, from_dict, read_yaml
from finetune.config.schema import Config
from finetune.errors import FinetuneError
from finetune.files import atomic_write_text
from finetune.runs.lock import RunLock
from finetune.runs.rundir import check_continuation, saved_run_config
from finetune.search.space import Param, check_space, load_space, trial_config

if TYPE_CHECKING:
    import optuna


ATTEMPTS = 5  # opening a new RDB study, which workers started together race to create
STUDY_FILE = "tune.json"  # how `finetune compare STUDY_DIR` and a rerun find the study


@dataclass
class StudyInfo:
    """What names a study, written to `<study dir>/tune.json`."""

    study: str
    storage: str | None  # an RDB URL; None: the journal file in the study dir
    name: str  # the config's name, which best.yaml takes
    monitor: str
    trials: int
    seed: int
    pruner: str
    judge: str = "best"  # checkpoint.judge; a tune.json without it: its trials were told their best epoch

    def direction(self) -> str:
        return "minimize" if self.monitor == "val_loss" else "maximize"


@dataclass
class Tune:
    """A checked request: the base config (file and --set, raw), the space and the study."""

    base: dict[str, Any]
    base_config: Config
    source: str
    params: list[Param]
    study_dir: Path
    info: StudyInfo

    def config(self, number: int, values: dict[str, Any]) -> Config:
        return trial_config({**self.base, "name": trial_name(number)}, values, self.source)


@dataclass
class Job:
    """One trial to train: its number, its values (config keys -> values) and whether its dir holds a run."""

    number: int
    values: dict[str, Any]
    resume: bool


def trial_name(number: int) -> str:
    return f"trial-{number:04d}"


def prepare(config: str, overrides: list[str], space: str, trials: int, opts: dict[str, Any]) -> Tune:
    """Check the config, the space (every bound and choice) and the options; nothing trains yet.
    `opts`: out, storage, study, seed, pruner as given on the command line."""
    base = read_yaml(Path(config))
    apply_overrides(base, overrides)
    cfg = from_dict(base, source=config)
    params = load_space(Path(space))
    check_space(params, base, Path(space), config)
    if any(p.key == "checkpoint.judge" for p in params):
        raise FinetuneError(
            f"tune: {space} searches checkpoint.judge, which says how trials compare; set it in {config}"
        )
    if trials < 1:
        raise FinetuneError(f"tune: --trials {trials}: give the study's total number of trials, at least 1")
    storage = opts.get("storage")
    if storage is not None and storage.split(":", 1)[0].split("+", 1)[0] not in ("sqlite", "postgresql", "mysql"):
        raise FinetuneError(f"tune: --storage {storage}: expected an RDB URL (sqlite:///FILE, postgresql://...)")
    seed = cfg.seed if opts.get("seed") is None else opts["seed"]
    info = StudyInfo(
        study=opts.get("study") or cfg.name,
        storage=storage,
        name=cfg.name,
        monitor=cfg.checkpoint.monitor,
        trials=trials,
        seed=seed,
        pruner=opts.get("pruner") or "median",
        judge=cfg.checkpoint.judge,
    )
    study_dir = Path(opts["out"]) if opts.get("out") else Path(cfg.out_dir) / f"tune-{cfg.name}"
    return Tune(base, cfg, config, params, study_dir, info)


def require_optuna() -> None:
    try:
        import optuna  # noqa: F401
    except ImportError:
        raise FinetuneError("finetune tune needs Optuna: pip install 'finetune[tune]'") from None


def open_study(study_dir: Path, info: StudyInfo) -> optuna.Study:
    """Create the study, or load it when a worker (or an earlier run of the command) did."""
    study = connect(study_dir, info.storage, info.study, info.direction(), _pruner(info.pruner))
    if study.direction.name.lower() != info.direction():
        raise FinetuneError(
            f"tune: study {info.study} {study.direction.name.lower()}s, but checkpoint.monitor {info.monitor} "
            f"{info.direction()}s; give another --study"
        )
    _check_judge(study, info)
    atomic_write_text(study_dir / STUDY_FILE, json.dumps(asdict(info), indent=2))
    return study


def _check_judge(study: optuna.Study, info: StudyInfo) -> None:
    """Every trial of a study is judged by one rule, kept in the storage: values by two rules do
    not compare. A study from before the rule has trials but no rule: they were told their best."""
    judge = study.user_attrs.get("judge", "best" if study.get_trials(deepcopy=False) else info.judge)
    if judge != info.judge:
        raise FinetuneError(
            f"tune: study {info.study} judged its trials by checkpoint.judge {judge}, this config by {info.judge}; "
            f"set checkpoint.judge={judge} or give another --study"
        )
    study.set_user_attr("judge", judge)


def connect(
    folder: Path, url: str | None, name: str, direction: str, pruner: optuna.pruners.BasePruner | None = None
) -> optuna.Study:
    """The study `name` in the storage at `url` (None: the journal file in `folder`), created
    by whichever worker comes first; tune and `sweep --storage` share it."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    folder.mkdir(parents=True, exist_ok=True)
    try:
        storage = _storage(folder, url)
        return _retrying(
            lambda: optuna.create_study(
                storage=storage, study_name=name, pruner=pruner, direction=direction, load_if_exists=True
            )
        )
    except ImportError as exc:
        driver = exc.name or "its database driver"
        raise FinetuneError(f"--storage {url} needs {driver}: pip install 'finetune[tune]'") from None


def _storage(study_dir: Path, url: str | None) -> Any:
    import optuna
    import sqlalchemy.exc

    if url is None:
        from optuna.storages.journal import JournalFileBackend

        return optuna.storages.JournalStorage(JournalFileBackend(str(study_dir / "study.journal")))
    try:
        return _retrying(lambda: optuna.storages.RDBStorage(url))
    except (sqlalchemy.exc.SQLAlchemyError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise FinetuneError(f"--storage {url} cannot be opened ({first}); check the URL and server") from None


def _retrying(make: Callable[[], Any]) -> Any:
    """`make()`, again after a moment when workers started together raced to create the same
    tables or study in a new database (the loser's insert fails; the next try finds them)."""
    import sqlalchemy.exc

    for attempt in range(1, ATTEMPTS):
        try:
            return make()
        except (sqlalchemy.exc.IntegrityError, sqlalchemy.exc.OperationalError, sqlalchemy.exc.ProgrammingError):
            time.sleep(0.2 * attempt)  # "already exists"; a server that is down fails the last try too
    return make()


def _pruner(name: str) -> optuna.pruners.BasePruner:
    import optuna

    if name == "median":  # two finished trials before any prune: the median needs a baseline
        return optuna.pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=0)
    if name == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=1, reduction_factor=3)
    return optuna.pruners.NopPruner()


def load_info(study_dir: Path) -> StudyInfo | None:
    path = study_dir / STUDY_FILE
    return StudyInfo(**json.loads(path.read_text())) if path.is_file() else None


def check_trial_dir(tune: Tune, lock: RunLock, number: int, values: dict[str, Any]) -> Job:
    """The job for a claimed trial dir: a new run, or a run to continue by the rules of `--resume`."""
    cfg = tune.config(number, values)
    resume = (lock.folder / "config.yaml").is_file()
    if resume:
        fix = "rerun tune with the study's original config and space, or give another --out / --study"
        check_continuation(saved_run_config(lock.folder), cfg, f"tune: {lock.folder}", fix)
    return Job(number, values, resume)


def best_trial(study: optuna.Study) -> optuna.trial.FrozenTrial | None:
    """The completed trial judged best; of equal ones, the one with the best final value (its
    `final` user attr), so trials that tie on an epoch they share are still told apart."""
    from optuna.study import StudyDirection
    from optuna.trial import TrialState

    from finetune.runs.results import judged_order

    maximize = study.direction == StudyDirection.MAXIMIZE
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    return min(
        complete, key=lambda t: judged_order(t.value, t.user_attrs.get("final", t.value), maximize), default=None
    )


def write_best(best: optuna.trial.FrozenTrial, study_dir: Path, info: StudyInfo) -> Path | None:
    """best.yaml: the best trial's full config under the config's own name, ready for `finetune train`."""
    saved = study_dir / trial_name(best.number) / "config.yaml"
    if not saved.is_file():
        print(f"best: {trial_name(best.number)} ran on another machine; its run dir there holds its config")
        return None
    raw = read_yaml(saved)
    raw["name"] = info.name
    path = study_dir / "best.yaml"
    atomic_write_text(path, yaml.safe_dump(raw, sort_keys=False))
    return path
