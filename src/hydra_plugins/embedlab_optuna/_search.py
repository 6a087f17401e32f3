"""The search behind ``EmbedlabOptunaSweeper``: search space, ask / launch / tell, resume, results file.

Search space. ``hydra.sweeper.params`` and the command line's task overrides are parsed with Hydra's override
grammar (``hydra.core.override_parser``), as the basic sweeper does; a sweep expression becomes an Optuna
distribution, anything else is passed to every trial's job as written:

- ``choice(a, b, ...)`` / ``a,b,...`` -> ``CategoricalDistribution`` over the values (a list or dict value is
  stored as its override text, the only non-scalar form Optuna can keep);
- ``range(start, stop[, step])`` of integers -> ``IntDistribution(start, last value, step)`` (Hydra's ``stop``
  is exclusive, Optuna's ``high`` inclusive); a float range -> categorical over its values;
- ``interval(low, high)`` -> ``FloatDistribution(low, high)``; ``int(interval(...))`` -> ``IntDistribution``;
  ``tag(log, ...)`` samples on a log scale.

A key given twice (in ``params`` and on the command line) takes the command line's value: ``loss.scale=20`` on
the command line fixes a key the config searches.

Jobs. A trial's job gets the overrides in the order they were written, the trial's values in place of the sweep
expressions, and runs as Hydra job number ``trial.number`` (its folder ``<sweep dir>/<trial.number>``). The
overrides are stored on the trial (user attribute ``overrides``), so a report can rebuild every row.

Failures. A trial is told FAIL, with the reason in its user attribute ``failure``, when its overrides do not
compose (checked before launch, as the basic sweeper does), the launcher raises, the job raises (Hydra's
``JobReturn`` with status FAILED), or the job returns ``None`` or a value that is not a finite number; the search
goes on. A job that raises ``optuna.TrialPruned`` is told PRUNED. A ``KeyboardInterrupt`` or ``SystemExit``
(Ctrl-C, Lightning's SIGTERM handling) stops the search: its open trials are told FAIL with ``interrupted``
set and the exception propagates. A search in which no trial completed ends with a :class:`UserError` naming
the last trial's failure (the command's exit status 1, as a single run that fails).

Resume. The study is created with ``load_if_exists``: a re-launch with the same storage and study name (by
default: the same ``hydra.sweep.dir``) continues it. Trials still RUNNING then were left by a killed search
(one search process per study: a second search running on the same storage would lose its trials here); they
are told FAIL with ``interrupted`` set. ``n_trials`` counts the trials of the study that ran to an end (complete,
failed or pruned), not the interrupted ones, so re-running a killed search's command finishes its budget. The
TPE sampler is seeded with ``seed + len(study.trials)``: a resumed search does not replay the random start-up
draws of the first launch.
"""

from __future__ import annotations

import copy
import logging
import math
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import optuna
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import ChoiceSweep, IntervalSweep, Override, RangeSweep, Transformer
from hydra.core.utils import JobReturn, JobStatus
from omegaconf import DictConfig, OmegaConf, open_dict, read_write
from optuna.distributions import BaseDistribution, CategoricalDistribution, FloatDistribution, IntDistribution
from optuna.trial import Trial, TrialState

from embedlab.atomic import atomic_write_text
from embedlab.errors import ConfigError, UserError

if TYPE_CHECKING:
    from hydra_plugins.embedlab_optuna.sweeper import EmbedlabOptunaSweeper

log = logging.getLogger(__name__)

# user attributes of the trials (report.py reads them)
OVERRIDES_ATTR = "overrides"
FAILURE_ATTR = "failure"
INTERRUPTED_ATTR = "interrupted"

RESULTS_FILE = "optimization_results.yaml"

DIRECTIONS = {"max": "maximize", "maximize": "maximize", "min": "minimize", "minimize": "minimize"}


def study_direction(direction: str) -> str:
    """``max`` / ``min`` (a ``monitor_mode``) or Optuna's own word -> ``maximize`` / ``minimize``."""
    if str(direction) not in DIRECTIONS:
        raise ConfigError(f"hydra.sweeper.direction must be max, min, maximize or minimize, got {direction!r}")
    return DIRECTIONS[str(direction)]


def absolute_storage(url: str | None, cwd: Path) -> str | None:
    """``url`` with a relative SQLite path made absolute against ``cwd`` (its folder created); other URLs as given.

    The URL is written to ``multirun.yaml`` for readers that run elsewhere (report.py, a job with
    ``hydra.job.chdir=true``), where a relative path would name another file.
    """
    prefix = "sqlite:///"
    if url is None or not url.startswith(prefix):
        return url
    path, sep, query = url[len(prefix) :].partition("?")
    if path in ("", ":memory:"):
        return url
    file = Path(path) if Path(path).is_absolute() else cwd / path
    file.parent.mkdir(parents=True, exist_ok=True)
    return f"{prefix}{file}{sep}{query}"


def study_name_for(sweep_dir: Path) -> str:
    """The default study name: the sweep dir's name (its timestamp, or the name given with ``hydra.sweep.dir``)."""
    return Path(sweep_dir).resolve().name


@dataclass
class SearchSpace:
    """The parsed ``params`` and command line: what Optuna samples and what every trial's job gets.

    ``entries`` keeps the overrides' order as ``(name, fixed text)``: a fixed override's text, ``None`` for a
    searched param. A name is the key without ``+`` / ``++`` / ``~`` (``keys`` holds a param's key as written);
    ``texts`` holds, per categorical param, the override text of each choice, by the choice's index.
    """

    entries: list[tuple[str, str | None]] = field(default_factory=list)
    distributions: dict[str, BaseDistribution] = field(default_factory=dict)
    keys: dict[str, str] = field(default_factory=dict)
    texts: dict[str, list[str]] = field(default_factory=dict)

    def overrides(self, params: Mapping[str, Any]) -> list[str]:
        """The job's override strings for a trial's ``params`` (name -> sampled value)."""
        out = []
        for name, fixed in self.entries:
            if fixed is not None:
                out.append(fixed)
                continue
            value, dist = params[name], self.distributions[name]
            if isinstance(dist, CategoricalDistribution):
                text = self.texts[name][int(dist.to_internal_repr(value))]
            else:
                text = Transformer.str(value)
            out.append(f"{self.keys[name]}={text}")
        return out


def distribution(override: Override) -> tuple[BaseDistribution, list[str] | None]:
    """The Optuna distribution of a sweep override, and for a categorical one its choices' override texts."""
    value = override.value()
    line = override.input_line
    try:
        if override.is_interval_sweep():
            assert isinstance(value, IntervalSweep)
            log_scale = "log" in value.tags
            if all(isinstance(x, int) and not isinstance(x, bool) for x in (value.start, value.end)):
                return IntDistribution(int(value.start), int(value.end), log=log_scale), None
            return FloatDistribution(float(value.start), float(value.end), log=log_scale), None
        if override.is_range_sweep():
            assert isinstance(value, RangeSweep)
            elements = list(value.range())
            if not elements:
                raise ValueError("the range is empty")
            if all(isinstance(x, int) for x in [value.start, value.stop, value.step, *elements]):
                return IntDistribution(min(elements), max(elements), step=abs(int(value.step))), None
        elif isinstance(value, ChoiceSweep):
            elements = list(value.list)
        else:  # glob(...): the config loader lists the group's options
            elements = list(override.sweep_iterator())
    except ValueError as ex:
        raise ConfigError(f"hydra.sweeper.params: {line}: {ex}") from None
    if not elements:
        raise ConfigError(f"hydra.sweeper.params: {line}: no values to choose from")
    # Optuna stores str, int, float, bool (and None) choices; a list or dict value is kept as its override text
    return CategoricalDistribution([Transformer.encode(x) for x in elements]), [Transformer.str(x) for x in elements]


def search_space(lines: Sequence[str], config_loader: Any = None) -> SearchSpace:
    """Parse ``params`` entries (``key=expression``) followed by the command line's overrides; a key given again
    replaces the earlier entry."""
    space = SearchSpace()
    for override in OverridesParser.create(config_loader=config_loader).parse_overrides(list(lines)):
        key = override.get_key_element()
        name = key.lstrip("+~")
        space.entries = [e for e in space.entries if e[0] != name]
        for table in (space.distributions, space.keys, space.texts):
            table.pop(name, None)
        if not override.is_sweep_override():
            space.entries.append((name, override.input_line))
            continue
        dist, texts = distribution(override)
        space.entries.append((name, None))
        space.distributions[name], space.keys[name] = dist, key
        if texts is not None:
            space.texts[name] = texts
    return space


def failure_message(ex: BaseException) -> str:
    """One line saying why: a user error's message as the entry points print it, else type and first line."""
    from embedlab.cli import error_message, user_error

    cause = user_error(ex)
    if cause is not None:
        return error_message(cause)
    first = next((line.strip() for line in str(ex).splitlines() if line.strip()), "")
    return f"{type(ex).__name__}: {first}" if first else type(ex).__name__


class Search:
    """One run of the search loop over ``study`` (see the module docstring)."""

    def __init__(self, sweeper: EmbedlabOptunaSweeper, study: optuna.Study, space: SearchSpace) -> None:
        self.sweeper, self.study, self.space = sweeper, study, space
        self.config_loader = sweeper.hydra_context.config_loader if sweeper.hydra_context is not None else None
        self.open: dict[int, Trial] = {}  # asked and not yet told, by number

    def fail(self, trial: Trial, reason: str, interrupted: bool = False) -> None:
        trial.set_user_attr(FAILURE_ATTR, reason)
        if interrupted:
            trial.set_user_attr(INTERRUPTED_ATTR, True)
        self.study.tell(trial, state=TrialState.FAIL)
        self.open.pop(trial.number, None)
        log.warning(f"trial {trial.number} FAIL: {reason}")

    def tell(self, trial: Trial, ret: JobReturn) -> None:
        """Tell the study the job's value, or FAIL / PRUNED."""
        if ret.status == JobStatus.FAILED:
            # the job's exception (the return_value property would re-raise it)
            ex = ret._return_value
            if isinstance(ex, optuna.TrialPruned):
                self.study.tell(trial, state=TrialState.PRUNED)
                self.open.pop(trial.number, None)
                log.info(f"trial {trial.number} pruned")
                return
            return self.fail(trial, f"the job failed: {failure_message(ex)}")
        value = ret.return_value
        if value is None:
            return self.fail(trial, "the job returned no value (is optimized_metric among its validation metrics?)")
        try:
            number = float(value)
        except (TypeError, ValueError):
            return self.fail(trial, f"the job returned {value!r}, not a number")
        if not math.isfinite(number):
            return self.fail(trial, f"the job returned {number}")
        self.study.tell(trial, number)
        self.open.pop(trial.number, None)
        log.info(f"trial {trial.number}: {number:.6g}")

    def run_batch(self, size: int) -> None:
        """Ask ``size`` trials, launch the ones whose overrides compose, tell every result."""
        trials = [self.study.ask(self.space.distributions) for _ in range(size)]
        self.open.update({t.number: t for t in trials})
        try:
            runnable: list[tuple[Trial, list[str]]] = []
            for trial in trials:
                overrides = self.space.overrides(trial.params)
                trial.set_user_attr(OVERRIDES_ATTR, overrides)
                if self.config_loader is not None:
                    try:
                        self.config_loader.load_sweep_config(master_config=self.sweeper.config, sweep_overrides=overrides)
                    except Exception as ex:
                        self.fail(trial, f"the overrides do not compose: {failure_message(ex)}")
                        continue
                runnable.append((trial, overrides))
            for group in consecutive(runnable):
                self.launch(group)
        finally:
            # KeyboardInterrupt, SystemExit: the search stops, the trials it was running count as not run
            for trial in list(self.open.values()):
                self.fail(trial, "interrupted: the search stopped while the trial was running", interrupted=True)

    def launch(self, group: list[tuple[Trial, list[str]]]) -> None:
        """Launch trials numbered n, n+1, ... as jobs n, n+1, ... (the launcher numbers a batch's jobs in order)."""
        try:
            returns = self.sweeper.launcher.launch([o for _, o in group], initial_job_idx=group[0][0].number)
        except Exception as ex:
            for trial, _ in group:
                self.fail(trial, f"the launcher failed: {failure_message(ex)}")
            return
        for (trial, _), ret in zip(group, returns):
            self.tell(trial, ret)
        for trial, _ in group[len(returns) :]:
            self.fail(trial, "the launcher returned no result for the job")


def consecutive(runnable: list[tuple[Trial, list[str]]]) -> list[list[tuple[Trial, list[str]]]]:
    """Split into runs of consecutive trial numbers (trials that failed to compose leave gaps)."""
    groups: list[list[tuple[Trial, list[str]]]] = []
    for item in runnable:
        if groups and item[0].number == groups[-1][-1][0].number + 1:
            groups[-1].append(item)
        else:
            groups.append([item])
    return groups


def fail_interrupted_trials(study: optuna.Study, storage: optuna.storages.BaseStorage) -> list[int]:
    """Tell FAIL (``interrupted``) to the trials a killed search left RUNNING; returns their numbers. ``storage``:
    the study's (a FrozenTrial has no trial id, the storage maps the number to it)."""
    study_id = storage.get_study_id_from_name(study.study_name)
    numbers = []
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        trial_id = storage.get_trial_id_from_study_id_trial_number(study_id, trial.number)
        storage.set_trial_user_attr(trial_id, FAILURE_ATTR, "interrupted: RUNNING when the search was re-launched")
        storage.set_trial_user_attr(trial_id, INTERRUPTED_ATTR, True)
        study.tell(trial.number, state=TrialState.FAIL)
        numbers.append(trial.number)
    return numbers


def trials_done(study: optuna.Study) -> int:
    """Trials that count towards ``n_trials``: finished (complete, failed, pruned) and not interrupted."""
    return sum(1 for t in study.get_trials(deepcopy=False) if t.state.is_finished() and not t.user_attrs.get(INTERRUPTED_ATTR))


def save_multirun_config(config: DictConfig, sweep_dir: Path, storage: str | None, study_name: str) -> None:
    """``<sweep dir>/multirun.yaml`` as Hydra's basic sweeper writes it, with the study's storage URL and name
    as values (the config has interpolations there: ``${hydra.sweep.dir}``, whose ``${now:}`` would not
    resolve to this sweep's time again)."""
    saved = copy.deepcopy(config)
    with read_write(saved), open_dict(saved):
        saved.hydra.sweeper.storage = storage
        saved.hydra.sweeper.study_name = study_name
    atomic_write_text(sweep_dir / "multirun.yaml", OmegaConf.to_yaml(saved))


def write_results(study: optuna.Study, sweep_dir: Path, storage: str | None, direction: str) -> dict[str, Any]:
    """``<sweep dir>/optimization_results.yaml`` (as hydra-optuna-sweeper's: name, best_params, best_value, plus
    the study's location, its best trial's number and overrides, and the trials per state); returns it."""
    trials = study.get_trials(deepcopy=False)
    results: dict[str, Any] = {
        "name": "embedlab_optuna",
        "study_name": study.study_name,
        "storage": storage,
        "direction": direction,
        "n_trials": len(trials),
        "states": dict(Counter(t.state.name for t in trials)),
    }
    if any(t.state == TrialState.COMPLETE for t in trials):
        best = study.best_trial
        results.update(
            best_trial=best.number, best_value=best.value, best_params=best.params,
            best_overrides=best.user_attrs.get(OVERRIDES_ATTR),
        )  # fmt: skip
        log.info(f"best trial {best.number}: {best.value:.6g} with {best.params}")
    else:
        log.warning("no trial completed: no best trial")
    atomic_write_text(sweep_dir / RESULTS_FILE, OmegaConf.to_yaml(OmegaConf.create(results)))
    return results


def run_search(sweeper: EmbedlabOptunaSweeper, arguments: Sequence[str]) -> optuna.Study:
    """Create or resume the study, run the trials it lacks, write the results; returns the study."""
    config = sweeper.config
    assert config is not None
    direction = study_direction(sweeper.direction)
    if sweeper.n_trials < 0:
        raise ConfigError(f"hydra.sweeper.n_trials must be >= 0, got {sweeper.n_trials}")
    if sweeper.n_jobs < 1:
        raise ConfigError(f"hydra.sweeper.n_jobs must be >= 1, got {sweeper.n_jobs}")
    sweep_dir = Path(str(config.hydra.sweep.dir))
    sweep_dir.mkdir(parents=True, exist_ok=True)
    study_name = sweeper.study_name or study_name_for(sweep_dir)
    storage_url = absolute_storage(sweeper.storage, Path.cwd())
    config_loader = sweeper.hydra_context.config_loader if sweeper.hydra_context is not None else None
    space = search_space([f"{k}={v}" for k, v in sweeper.params.items()] + list(arguments), config_loader)

    storage = optuna.storages.get_storage(storage_url)
    study = optuna.create_study(storage=storage, study_name=study_name, direction=direction, load_if_exists=True)
    if study.direction.name.lower() != direction:
        raise ConfigError(
            f"hydra.sweeper.direction is {direction} but study {study_name!r} in {storage_url} was created to "
            f"{study.direction.name.lower()}: use another hydra.sweep.dir or hydra.sweeper.study_name"
        )
    save_multirun_config(config, sweep_dir, storage_url, study_name)
    interrupted = fail_interrupted_trials(study, storage)
    if interrupted:
        log.warning(f"trials {interrupted} were left running by a stopped search: marked failed, run again")
    seed = None if sweeper.seed is None else int(sweeper.seed) + len(study.trials)
    sampler = optuna.samplers.TPESampler(seed=seed, n_startup_trials=sweeper.n_startup_trials)
    study = optuna.load_study(study_name=study_name, storage=storage, sampler=sampler)
    done = trials_done(study)
    remaining = max(sweeper.n_trials - done, 0)
    log.info(
        f"study {study_name!r} ({direction}) in {storage_url or 'memory'}: {done} of {sweeper.n_trials} trials done, "
        f"{remaining} to run, {sweeper.n_jobs} at a time"
    )
    search = Search(sweeper, study, space)
    while remaining > 0:
        size = min(sweeper.n_jobs, remaining)
        search.run_batch(size)
        remaining -= size
    results = write_results(study, sweep_dir, storage_url, direction)
    if "best_trial" not in results and study.trials:
        # every trial failed: most likely one cause in the config or the data, as in a single run
        last = study.trials[-1]
        raise UserError(
            f"no trial of study {study_name!r} completed ({len(study.trials)} failed or pruned); "
            f"trial {last.number}: {last.user_attrs.get(FAILURE_ATTR, last.state.name.lower())}"
        )
    return study
