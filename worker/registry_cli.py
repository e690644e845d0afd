"""`roi-model registry list|promote|rollback|report`: the model registry from the command line.

Registered with `roi-model` through the "roi_model.commands" entry point (pyproject.toml).
The registry root is --model-dir, else MODEL_DIR. list, promote, rollback and report take --project P: the
lineage of project P's adapters (worker/registry.py); without it, the global lineage of bases.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path

from backend.settings import Settings
from roi_model.families import DESCRIPTIONS, detect_family
from worker.registry import ModelRegistry, RegistryError, adapter_version_name, card_version
from worker.replay_store import ReplayStore


def register_cli(add_command: Callable[..., argparse.ArgumentParser]) -> None:
    command = add_command("registry", help="import, list, promote, roll back model versions; plot them")
    command.add_argument("--model-dir", type=Path, help="registry root (default: MODEL_DIR)")
    actions = command.add_subparsers(dest="action", required=True)
    lineage = argparse.ArgumentParser(add_help=False)
    lineage.add_argument(
        "--project",
        type=int,
        help="a Label Studio project id: that project's adapters (default: the global lineage of bases)",
    )
    actions.add_parser(
        "list",
        parents=[lineage],
        help="every version with its card, one JSON line each (served: the current one)",
    )
    add = actions.add_parser(
        "import", help="add a model directory as a new version (served when none is yet)"
    )
    add.add_argument("directory", type=Path)
    add.add_argument("--version", help="its name (default: the card's version, else the next v<N>)")
    promote = actions.add_parser("promote", parents=[lineage], help="serve this version from the next job on")
    promote.add_argument("version")
    actions.add_parser(
        "rollback",
        parents=[lineage],
        help="serve the previously promoted version again (a project's first adapter: the base again)",
    )
    report = actions.add_parser(
        "report",
        parents=[lineage],
        help="plot acceptance rate, reviewers' edits and held-out metrics per version over time",
    )
    report.add_argument("--out", type=Path, default=Path("report.png"))
    benchmark = actions.add_parser(
        "add-benchmark",
        help="register a spatial-instruction JSONL file (images relative to it) as a benchmark the gate "
        "evaluates every candidate on; a drop beyond the replay tolerance refuses the promotion",
    )
    benchmark.add_argument("file", type=Path)
    benchmark.add_argument("--name", help="its name in the gate's reasons (default: the file's stem)")
    command.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    root = ModelRegistry(args.model_dir or Settings.from_env().model_dir)
    try:
        project = getattr(args, "project", None)
        registry = root.lineage(project)
        if args.action == "list":
            current = registry.current()
            serving = root.serving(project)
            for card in registry.versions():
                served = card["version"] == current and (
                    project is None or (serving is not None and serving.adapter == current)
                )
                line = {"served": served, **card}
                if project is not None:
                    line["model_version"] = adapter_version_name(card.get("base"), project, card["version"])
                print(json.dumps(line))
        elif args.action == "import":
            family = detect_family(args.directory)  # refuses, saying why, what no family can serve
            version = registry.import_model(
                args.directory, version=args.version or card_version(args.directory), extra={"family": family}
            )
            print(
                json.dumps(
                    {
                        "version": version,
                        "family": family,
                        "about": DESCRIPTIONS[family],
                        "current": registry.current(),
                    }
                )
            )
        elif args.action == "promote":
            registry.promote(args.version)
            print(json.dumps({"current": registry.current(), **_served(root, project)}))
        elif args.action == "rollback":
            print(json.dumps({"current": registry.rollback(), **_served(root, project)}))
        elif args.action == "add-benchmark":
            print(json.dumps(ReplayStore(registry.root).add_benchmark(args.file, args.name)))
        else:
            plot_report(registry, args.out)
            print(json.dumps({"report": str(args.out)}))
    except RegistryError as error:
        raise ValueError(str(error)) from None
    return 0


def _served(root: ModelRegistry, project: int | None) -> dict:
    """For a project's lineage, the model version its predictions carry from now on."""
    if project is None:
        return {}
    serving = root.serving(project)
    return {"model_version": serving.version if serving is not None else None}


def plot_report(registry: ModelRegistry, out: Path) -> list[str]:
    """Held-out exact match of every version (at its creation), and the reviewers' effort on each version's
    proposals as measured by later fine-tuning runs (the share accepted unchanged, the normalised edit
    distance from proposal to the answer kept), over time. Returns the legend's labels."""
    import matplotlib

    matplotlib.use("Agg")
    from datetime import datetime

    import matplotlib.dates as dates
    import matplotlib.pyplot as plt

    cards = registry.versions()
    runs = [run for run in registry.training_runs() if _of_lineage(run, registry.project)]
    figure, axis = plt.subplots(figsize=(7, 3.8))
    held_out = [
        (datetime.fromisoformat(card["created_at"]), _held_out(card), card["version"])
        for card in cards
        if _held_out(card) is not None
    ]
    if held_out:
        axis.plot(
            [t for t, _, _ in held_out], [v for _, v, _ in held_out], "o-", label="held-out exact match"
        )
        for moment, value, version in held_out:
            axis.annotate(version, (moment, value), textcoords="offset points", xytext=(0, 6), fontsize=8)
    _plot_served_versions(axis, runs, "rate", "s--", "proposals accepted unchanged")
    _plot_served_versions(axis, runs, "edit_distance", "^:", "reviewers' edits (normalised edit distance)")
    rejected = [datetime.fromisoformat(run["at"]) for run in runs if not run.get("promoted")]
    for moment in rejected:
        axis.axvline(moment, color="grey", alpha=0.3, linewidth=1)
    axis.set_ylim(0, 1.05)
    axis.set_ylabel("share")
    locator = dates.AutoDateLocator()
    axis.xaxis.set_major_locator(locator)
    axis.xaxis.set_major_formatter(dates.ConciseDateFormatter(locator))
    axis.set_title("model versions (grey lines: fine-tunes the gate rejected)")
    axis.legend(loc="lower right")
    figure.tight_layout()
    figure.savefig(out, dpi=100)
    plt.close(figure)
    return [text.get_text() for text in axis.get_legend().get_texts()]  # the lines drawn


def _plot_served_versions(axis, runs: list[dict], figure: str, style: str, label: str) -> None:
    """One of the reviewers' effort figures of the version each run started from, at the run's time."""
    from datetime import datetime

    points = [
        (datetime.fromisoformat(run["at"]), effort[figure])
        for run in runs
        for version, effort in run.get("acceptance", {}).items()
        if version == run["parent"] and effort.get(figure) is not None
    ]
    if points:
        axis.plot([moment for moment, _ in points], [value for _, value in points], style, label=label)


def _of_lineage(run: dict, project: int | None) -> bool:
    """A run of the global lineage (older runs say no lineage), or of project `project`'s adapters."""
    if project is None:
        return run.get("lineage", "global") == "global"
    return run.get("lineage") == "project" and run.get("project") == project


def _held_out(card: dict) -> float | None:
    metrics = card.get("metrics") or {}
    if "held_out_exact_match" in metrics:
        return metrics["held_out_exact_match"]
    return metrics.get("exact_match")
