"""Writing runs down: results.json, a Markdown table, and plots of metrics against edits.

Plots use matplotlib's object API (`Figure`, no pyplot), so nothing global changes and no
display is needed.
"""
from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from service.errors import InvalidRequest

RESULTS = "results.json"
CASES = "cases.json"
COLUMNS = [  # (header, key); rates in %, fluency ×100 bits, perplexity
    ("Eff.", "efficacy"), ("Gen.", "generalisation"), ("Spe.", "specificity"),
    ("Eff. top-1", "efficacy_top1"), ("Gen. top-1", "generalisation_top1"), ("Spe. top-1", "specificity_top1"),
    ("Flu.", "fluency"), ("PPL", "perplexity"), ("Ctrl kept", "control_retained"), ("Ctrl top-1", "control_top1"),
]
CURVES = [  # panels of curves.png: (title, key)
    ("Efficacy (%)", "efficacy"), ("Generalisation (%)", "generalisation"), ("Specificity (%)", "specificity"),
    ("Efficacy top-1 (%)", "efficacy_top1"), ("Control retained (%)", "control_retained"),
    ("Held-out perplexity", "perplexity"),
]


# ---- files ---------------------------------------------------------------------------------------

def write_run(results: dict[str, Any], out_dir: Path) -> list[Path]:
    """results.json (without per-case rows), cases.json, results.md, curves.png, perplexity.png."""
    out_dir.mkdir(parents=True, exist_ok=True)
    summary = {k: v for k, v in results.items() if k != "case_results"}
    written = [out_dir / RESULTS, out_dir / CASES, out_dir / "results.md"]
    written[0].write_text(json.dumps(summary, indent=2) + "\n")
    written[1].write_text(json.dumps(results.get("case_results", {}), indent=1) + "\n")
    written[2].write_text(run_markdown(summary))
    return written + plot_runs([summary], out_dir)


def write_partial(partial: dict[str, Any], config: dict[str, Any], out_dir: Path) -> Path:
    """The checkpoints so far, as partial.json: a long run that dies keeps what it measured."""
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "partial.json"
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"config": config, **partial}, indent=1, default=str))
    tmp.replace(path)
    return path


def load_run(path: str | Path) -> dict[str, Any]:
    """A run's results.json, from the file or its folder."""
    path = Path(path)
    file = path / RESULTS if path.is_dir() else path
    if not file.is_file():
        raise InvalidRequest(f"{file} does not exist: pass run folders written by `knowpatch eval`")
    results = json.loads(file.read_text())
    results.setdefault("config", {})["run_dir"] = str(file.parent)
    return results


def write_comparison(run_paths: Sequence[str | Path], out_dir: Path) -> list[Path]:
    runs = [load_run(p) for p in run_paths]
    out_dir.mkdir(parents=True, exist_ok=True)
    table = out_dir / "comparison.md"
    table.write_text("# Evaluation comparison\n\n" + metrics_table(runs) + "\n" + timings_table(runs))
    return [table] + plot_runs(runs, out_dir)


# ---- tables --------------------------------------------------------------------------------------

def _cell(value: Any, digits: int = 1) -> str:
    if value is None:
        return "n/a"
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def labels(runs: Sequence[dict[str, Any]]) -> list[str]:
    """Short names that tell the runs apart: the method, plus whatever else differs."""
    configs = [r.get("config", {}) for r in runs]
    parts = []
    for key, fmt in (("model", "{}"), ("dataset", "{}"), ("n", "n={}"), ("batch_size", "batch {}")):
        if len({str(c.get(key)) for c in configs}) > 1:
            parts.append((key, fmt))
    names = [" ".join([str(c.get("method", "?"))] + [fmt.format(c.get(k)) for k, fmt in parts]) for c in configs]
    if len(set(names)) < len(names):
        names = [f"{name} ({Path(c.get('run_dir', str(i))).name})" for i, (name, c) in enumerate(zip(names, configs))]
    return names


def metrics_table(runs: Sequence[dict[str, Any]]) -> str:
    """One row per distinct unedited model (model, dataset, n), then one per run's final model."""
    header = "| model state | edits | " + " | ".join(h for h, _ in COLUMNS) + " |"
    lines = [header, "|" + "---|" * (len(COLUMNS) + 2)]
    seen = set()
    for run, name in zip(runs, labels(runs)):
        config = run.get("config", {})
        key = (config.get("model"), config.get("dataset"), config.get("n"))
        if key not in seen:
            seen.add(key)
            lines.append(_row(f"unedited {config.get('model', '')}".strip(), 0, run["baseline"]))
    for run, name in zip(runs, labels(runs)):
        lines.append(_row(name, run.get("edits_applied", run["final"].get("cases")), run["final"]))
    return "\n".join(lines) + "\n"


def _row(name: str, edits: Any, values: dict[str, Any]) -> str:
    cells = [_cell(values.get(key), 2 if key == "perplexity" else 1) for _, key in COLUMNS]
    return f"| {name} | {edits} | " + " | ".join(cells) + " |"


def timings_table(runs: Sequence[dict[str, Any]]) -> str:
    lines = ["| run | device | batches | editing (s) | per edit (s) | total wall (s) |", "|---|---|---|---|---|---|"]
    for run, name in zip(runs, labels(runs)):
        t, n = run.get("timings", {}), max(1, run["final"].get("cases", 1))
        device, batches = run.get("config", {}).get("device", "n/a"), len(run.get("batches", []))
        per_edit = t.get("editing_s", 0) / n
        lines.append(f"| {name} | {device} | {batches} | {_cell(t.get('editing_s'))} | {_cell(per_edit, 2)} | "
                     f"{_cell(t.get('total_s'))} |")
    return "\n".join(lines) + "\n"


def run_markdown(results: dict[str, Any]) -> str:
    config = results.get("config", {})
    title = (f"# {config.get('dataset', '?')}: {config.get('method', '?')} on {config.get('model', '?')}, "
             f"{config.get('n', '?')} edits in batches of {config.get('batch_size', '?')}\n\n")
    notes = "Rates in %; fluency: n-gram entropy ×100; n/a: not measurable on this backend.\n\n"
    dims = config.get("null_space_dims")
    space = f"Null-space dimensions kept per layer: {dims}\n\n" if dims else ""
    checkpoints = _checkpoint_table(results.get("checkpoints", []))
    return (title + notes + metrics_table([results]) + "\n" + timings_table([results]) + "\n" + space
            + "## Checkpoints\n\n" + checkpoints)


def _checkpoint_table(checkpoints: Sequence[dict[str, Any]]) -> str:
    keys = ["efficacy", "generalisation", "specificity", "control_retained", "perplexity"]
    lines = ["| edits | cases scored | " + " | ".join(keys) + " |", "|" + "---|" * (len(keys) + 2)]
    for c in checkpoints:
        cells = [_cell(c.get(k), 2 if k == "perplexity" else 1) for k in keys]
        lines.append(f"| {c['edits']} | {c.get('cases')} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


# ---- plots ---------------------------------------------------------------------------------------

def _series(run: dict[str, Any], key: str) -> tuple[list[int], list[float]]:
    points = [(c["edits"], c[key]) for c in run.get("checkpoints", []) if c.get(key) is not None]
    return [x for x, _ in points], [y for _, y in points]


def plot_runs(runs: Sequence[dict[str, Any]], out_dir: Path) -> list[Path]:
    return [plot_curves(runs, out_dir / "curves.png"), plot_perplexity(runs, out_dir / "perplexity.png")]


def plot_curves(runs: Sequence[dict[str, Any]], path: Path) -> Path:
    """One panel per metric, one line per run, against the number of edits applied."""
    from matplotlib.figure import Figure

    figure = Figure(figsize=(13, 7.5), layout="constrained")
    axes = figure.subplots(2, 3).flatten()
    for ax, (title, key) in zip(axes, CURVES):
        for run, name in zip(runs, labels(runs)):
            xs, ys = _series(run, key)
            if xs:
                ax.plot(xs, ys, marker="o", markersize=3, label=name)
        _edits_axis(ax, title)
        if key != "perplexity":
            ax.set_ylim(-2, 102)
    axes[0].legend(fontsize=8)
    figure.suptitle(_title(runs))
    figure.savefig(path, dpi=110)
    return path


def plot_perplexity(runs: Sequence[dict[str, Any]], path: Path) -> Path:
    """Held-out perplexity drift: absolute, and relative to each run's unedited model."""
    from matplotlib.figure import Figure

    figure = Figure(figsize=(10, 4), layout="constrained")
    absolute, relative = figure.subplots(1, 2)
    for run, name in zip(runs, labels(runs)):
        xs, ys = _series(run, "perplexity")
        if xs:
            absolute.plot(xs, ys, marker="o", markersize=3, label=name)
            relative.plot(xs, [y / ys[0] for y in ys], marker="o", markersize=3, label=name)
    for ax, title in ((absolute, "held-out perplexity"), (relative, "perplexity / unedited")):
        _edits_axis(ax, title)
    absolute.legend(fontsize=8)
    figure.suptitle(_title(runs))
    figure.savefig(path, dpi=110)
    return path


def _edits_axis(ax: Any, title: str) -> None:
    from matplotlib.ticker import MaxNLocator

    ax.set_title(title)
    ax.set_xlabel("edits")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)


def _title(runs: Sequence[dict[str, Any]]) -> str:
    configs = [r.get("config", {}) for r in runs]
    models = sorted({str(c.get("model")) for c in configs})
    datasets = sorted({str(c.get("dataset")) for c in configs})
    return f"{', '.join(datasets)} on {', '.join(models)}"
