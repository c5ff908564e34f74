"""`finetune modules`: a config's model as a module tree, and the names a `train.unfreeze` stage takes.

fastai's `summary` and timm's model listing show the modules; a stage needs more: the exact
dotted names it accepts and which parameter group trains each module under this config. The
model is built weightless as `plan` builds it, and the names and groups come from
model/schedule.py, the unit `train` and `plan` check stages with, so the three cannot disagree.
A config whose stages that unit refuses still lists, with the refusal above the names to fix it.
"""

from __future__ import annotations

import dataclasses
import textwrap
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from torch import nn

from finetune.config.schema import Config
from finetune.data.sources import split_sizes
from finetune.errors import FinetuneError
from finetune.model.build import check_model_config, skeleton
from finetune.model.schedule import Schedule, stage_modules
from finetune.plan import group_row, short_count

DEFAULT_DEPTH = 2  # ResNet's layer4.0, MobileNetV2's features.14; repeated blocks open further
FROZEN = "frozen all run"
WIDTH = 100


@dataclass
class ModuleRow:
    name: str  # dotted, exactly as a stage names it
    level: int  # 1: a child of the model
    kind: str  # the module's class
    params: int
    groups: list[str]  # the parameter groups that train it, FROZEN for parameters none trains
    stage_takes: bool  # a train.unfreeze stage accepts this name


@dataclass
class ModuleListing:
    arch: str
    classes: int
    head: str
    params: int
    head_params: int
    groups: list[dict[str, Any]]  # plan's group rows: modules, first epoch, base lr
    rows: list[ModuleRow]
    stage_names: list[str]  # every name a stage takes, at any depth, besides `backbone` (the rest)
    problem: str | None  # why the schedule refuses this config's stages; groups are then unknown


def list_modules(cfg: Config, depth: int | None = None) -> ModuleListing:
    """The tree to `depth` levels (default: two, and the blocks of repeated-block lists below)."""
    if depth is not None and depth < 1:
        raise FinetuneError(f"modules --depth {depth}: give 1 or more (1: the model's children)")
    check_model_config(cfg.model)
    classes = len(split_sizes(cfg.data, cfg.task == "multilabel")[0])
    built = skeleton(cfg.model, classes)
    model, head = built.model, built.head_name
    schedule, problem = _schedule(cfg, model, head)
    groups = schedule.groups if schedule else []
    owner = {p: g.name for g in groups for p in g.params}
    order = [g.name for g in groups] + [FROZEN] * bool(schedule)  # refused stages: groups unknown
    takes = stage_modules(model, head)
    accepted = set(takes)
    rows = [
        ModuleRow(name, level, type(m).__name__, _count(m), _groups(m, name, owner, order), name in accepted)
        for name, m, level in _shown(model, depth)
    ]
    shown = [group_row(schedule, g, cfg) for g in groups]
    head_params = _count(model.get_submodule(head))
    return ModuleListing(cfg.model.arch, classes, head, _count(model), head_params, shown, rows, takes, problem)


def _schedule(cfg: Config, model: nn.Module, head: str) -> tuple[Schedule | None, str | None]:
    try:
        return Schedule(cfg.train, model, head, steps_per_epoch=1), None
    except FinetuneError as exc:
        return None, str(exc)


def _shown(model: nn.Module, depth: int | None) -> Iterator[tuple[str, nn.Module, int]]:
    def walk(parent: nn.Module, prefix: str, level: int) -> Iterator[tuple[str, nn.Module, int]]:
        for child_name, child in parent.named_children():
            name = prefix + child_name
            yield name, child, level
            if (level < depth) if depth is not None else (level < DEFAULT_DEPTH or _repeats(child)):
                yield from walk(child, name + ".", level + 1)

    return walk(model, "", 1)


def _repeats(module: nn.Module) -> bool:
    """A list of blocks of one class (ViT's encoder layers, EfficientNet's stages): the names a stage wants."""
    kinds = [type(c) for c in module.children()]
    return isinstance(module, nn.Sequential | nn.ModuleList) and len(kinds) > 1 and len(set(kinds)) == 1


def _count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _groups(module: nn.Module, name: str, owner: dict[str, str], order: list[str]) -> list[str]:
    """The groups training the module's parameters, in joining order; none for a module without any."""
    found = {owner.get(p, FROZEN) for p, _ in module.named_parameters(prefix=name)}
    return [g for g in order if g in found]


def render(listing: ModuleListing) -> str:
    """The header, plan's group table, then one line per module, within WIDTH columns (long
    stage names and module lists are cut in the table: the tree and --json have them whole)."""
    import pandas as pd

    size, head_size = short_count(listing.params), short_count(listing.head_params)
    lines = [f"{listing.arch}: {size} parameters; head {listing.head} ({head_size}, {listing.classes} classes)"]
    if listing.problem:
        lines += [textwrap.fill(f"this config's stages are refused: {listing.problem}", WIDTH), ""]
    else:
        cells = [{**g, "group": _fit(g["group"], 20), "modules": _fit(g["modules"], 30)} for g in listing.groups]
        lines += [pd.DataFrame(cells).to_markdown(index=False), ""]
    lines += _tree(listing.rows)
    lines.append("unfreeze yes: a train.unfreeze stage takes the name (and deeper ones: --depth; backbone: the rest)")
    return "\n".join(lines)


def _tree(rows: list[ModuleRow]) -> list[str]:
    names = ["  " * (r.level - 1) + r.name for r in rows]
    name_w = max(map(len, [*names, "module"]))
    kind_w = min(22, max(len(r.kind) for r in rows))
    group_w = max(8, WIDTH - name_w - kind_w - 23)
    lines = [f"{'module':<{name_w}}  {'type':<{kind_w}}  {'params':>7}  unfreeze  group"]
    for name, r in zip(names, rows, strict=True):
        takes = "yes" if r.stage_takes else "no"
        group = _fit(", ".join(r.groups) or "-", group_w)
        lines.append(
            f"{name:<{name_w}}  {_fit(r.kind, kind_w):<{kind_w}}  {short_count(r.params):>7}  {takes:<8}  {group}"
        )
    return lines


def _fit(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"


def to_json(listing: ModuleListing) -> dict[str, Any]:
    return dataclasses.asdict(listing)
