"""A sweep's :class:`~embedlab.report.table.Table` as a paper would take it: Markdown, LaTeX (booktabs), CSV, a
plot with error bars, and the same table in a W&B summary run of the sweep's group.

Every format shows, per row and metric, the mean ± sample std and n; the best mean per metric is bold; with a
baseline, the difference in points with its 95 % interval and the permutation p; jobs left out of the table
(incomplete, missing) are listed below it.
"""

from __future__ import annotations

import csv
import io
import math
from pathlib import Path

from embedlab.atomic import atomic_file, atomic_write_text
from embedlab.evaluation.per_query import correlation_kind
from embedlab.report.sweep import parse_value
from embedlab.report.table import Comparison, Row, Table

CSV_COLUMNS = ("metric", "mean", "std", "n", "diff", "lo", "hi", "p", "seeds", "units", "note")


def fmt(metric: str, value: float) -> str:
    """A metric value: 4 decimals for fractions (nDCG, recall), 2 for percentages (correlations) and the rest."""
    if not math.isfinite(value):
        return "–"
    return f"{value:.2f}" if correlation_kind(metric) or abs(value) > 1.5 else f"{value:.4f}"


def _signed(value: float) -> str:
    return f"{value:+.2f}".replace("-", "−")


def _diff(c: Comparison) -> str:
    return f"{_signed(c.mean)} [{_signed(c.lo)}, {_signed(c.hi)}]"


def _cells(table: Table, row: Row, metric: str, bold: tuple[str, str]) -> list[str]:
    """The cells of one metric: mean ± std, n and, with a baseline, difference and p."""
    cell = row.cells.get(metric)
    if cell is None:
        out = ["–", "0"]
    else:
        mean = fmt(metric, cell.mean)
        if any(r is row for r in table.best(metric)):
            mean = f"{bold[0]}{mean}{bold[1]}"
        std = f" ± {fmt(metric, cell.std)}" if math.isfinite(cell.std) else ""
        out = [mean + std, str(cell.n)]
    if table.baseline is not None:
        c = row.versus.get(metric)
        if row.is_baseline:
            out += ["baseline", ""]
        elif c is None or c.error:
            out += [f"– ({c.error})" if c else "–", ""]
        else:
            out += [_diff(c), f"{c.p:.3g}"]
    return out


def header(table: Table) -> list[str]:
    cols = list(table.keys) or ["configuration"]
    for metric in table.metrics:
        cols += [metric, "n"]
        if table.baseline is not None:
            cols += [f"Δ {metric} (points, 95 % CI)", "p"]
    return cols


def shown_value(value: str) -> str:
    """An override value for a table: a float drawn by a search (``1.5355286838886852e-05``) to 4 digits."""
    parsed = parse_value(value)
    return f"{parsed:.4g}" if isinstance(parsed, float) and value == repr(parsed) and len(value) > 8 else value


def _body(table: Table, bold: tuple[str, str]) -> list[list[str]]:
    rows = []
    for row in table.rows:
        cells = [shown_value(v) for v in row.values.values()] or [row.label]
        for metric in table.metrics:
            cells += _cells(table, row, metric, bold)
        rows.append(cells)
    return rows


def left_out(table: Table) -> list[str]:
    """One line per job not averaged in: ``job 3 (pooling=cls, seed=2): missing``."""
    reasons = {"missing": "missing (no job folder)", "incomplete": "incomplete (no metrics.json)"}
    return [
        f"job {j.name} ({j.label()}): {reasons.get(j.status, j.status)}" + (f": {j.note}" if j.note else "")
        for j in table.not_complete
    ]


def to_markdown(table: Table, title: str = "") -> str:
    head = header(table)
    lines = [f"# {title}", ""] if title else []
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(cells) + " |" for cells in _body(table, ("**", "**"))]
    lines.append("")
    lines.append("mean ± sample std over the row's complete jobs (n); best mean per metric in bold.")
    if table.baseline is not None:
        lines.append(
            f"Δ: row minus baseline ({table.baseline.label}), in points, jobs paired by seed; 95 % bootstrap interval "
            "over the test units (queries; pairs for correlations), permutation p (two-sided)."
        )
    gone = left_out(table)
    if gone:
        lines += ["", f"Not in the table ({len(gone)} job{'s' if len(gone) > 1 else ''}):", ""] + [f"- {g}" for g in gone]
    return "\n".join(lines) + "\n"


def _tex(text: str) -> str:
    for a, b in (("\\", r"\textbackslash{}"), ("&", r"\&"), ("%", r"\%"), ("_", r"\_"), ("#", r"\#"), ("±", r"$\pm$"),
                 ("Δ", r"$\Delta$"), ("−", "$-$")):
        text = text.replace(a, b)
    return text


def to_latex(table: Table, caption: str = "") -> str:
    """A booktabs ``tabular`` (in a ``table`` float with ``caption``); needs ``\\usepackage{booktabs}``."""
    head = header(table)
    n_keys = max(len(table.keys), 1)
    spec = "l" * n_keys + "r" * (len(head) - n_keys)
    lines = [r"\begin{table}[t]", r"\centering", rf"\begin{{tabular}}{{{spec}}}", r"\toprule"]
    lines.append(" & ".join(_tex(h) for h in head) + r" \\")
    lines.append(r"\midrule")
    # bold marked by control characters that _tex leaves alone, then turned into \textbf{...}
    for cells in _body(table, ("\x01", "\x02")):
        lines.append(" & ".join(_tex(c).replace("\x01", r"\textbf{").replace("\x02", "}") for c in cells) + r" \\")
    lines += [r"\bottomrule", r"\end{tabular}"]
    if caption:
        lines.append(rf"\caption{{{_tex(caption)}}}")
    lines.append(r"\end{table}")
    return "\n".join(lines) + "\n"


def csv_rows(table: Table) -> list[list]:
    """Long format: one line per row and metric (``keys..., metric, mean, std, n, diff, lo, hi, p, seeds, units, note``)."""
    out = []
    for row in table.rows:
        for metric in table.metrics:
            cell = row.cells.get(metric)
            c = row.versus.get(metric)
            note = "baseline" if row.is_baseline else (c.error if c and c.error else "")
            stats = [cell.mean, cell.std, cell.n] if cell else [math.nan, math.nan, 0]
            test = [c.mean, c.lo, c.hi, c.p, c.seeds, c.units] if c and not c.error else [math.nan] * 4 + [0, 0]
            out.append([*row.values.values(), metric, *stats, *test, note])
    return out


def to_csv(table: Table) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow([*table.keys, *CSV_COLUMNS])
    writer.writerows(csv_rows(table))
    return buf.getvalue()


def plot(table: Table, path: str | Path, title: str = "") -> Path:
    """One panel per metric: each row's mean with a ±std error bar and its runs as dots; the baseline in orange."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(table.metrics)
    fig, axes = plt.subplots(1, n, figsize=(max(4.0, 1.1 * len(table.rows) + 2) * n, 4.2), squeeze=False)
    labels = [r.label.replace(", ", "\n") for r in table.rows]
    for ax, metric in zip(axes[0], table.metrics):
        for x, row in enumerate(table.rows):
            cell = row.cells.get(metric)
            if cell is None:
                continue
            color = "tab:orange" if row.is_baseline else "tab:blue"
            err = cell.std if math.isfinite(cell.std) else 0.0
            ax.errorbar([x], [cell.mean], yerr=[err], fmt="o", color=color, capsize=5, markersize=7)
            ax.scatter([x + 0.12] * len(cell.values), cell.values, color=color, alpha=0.35, s=14)
        ax.set_xticks(range(len(labels)), labels, fontsize=8)
        ax.set_xlim(-0.6, len(labels) - 0.4)
        ax.set_title(metric)
        ax.grid(axis="y", alpha=0.3)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    path = Path(path)
    with atomic_file(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)
    return path


def write_all(table: Table, out_dir: str | Path, title: str = "") -> dict[str, Path]:
    """``report.md``, ``report.tex``, ``report.csv`` and ``report.png`` in ``out_dir``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    files = {"md": out_dir / "report.md", "tex": out_dir / "report.tex", "csv": out_dir / "report.csv"}
    atomic_write_text(files["md"], to_markdown(table, title))
    atomic_write_text(files["tex"], to_latex(table, title))
    atomic_write_text(files["csv"], to_csv(table))
    files["png"] = plot(table, out_dir / "report.png", title)
    return files


def log_to_wandb(table: Table, files: dict[str, Path], group: str, project: str = "embedlab", save_dir: str | Path = ".",
                 config: dict | None = None) -> str:
    """The table as a W&B run of the sweep's ``group`` (job type ``report``): a ``wandb.Table`` (the CSV's
    columns), the plot, and ``<row>/<metric>`` means in the summary. Offline unless W&B credentials exist
    (:func:`embedlab.resolvers.wandb_offline`). Returns the run's folder."""
    import wandb

    from embedlab.resolvers import wandb_offline

    run = wandb.init(
        project=project, group=group, name=f"report-{group}", job_type="report", dir=str(save_dir),
        mode="offline" if wandb_offline() else "online", config=config or {}, reinit="finish_previous",
    )
    try:
        run.log({
            "report/table": wandb.Table(columns=[*table.keys, *CSV_COLUMNS], data=[[str(v) if isinstance(v, str) else v for v in r] for r in csv_rows(table)]),
            "report/plot": wandb.Image(str(files["png"])),
        })
        for row in table.rows:
            for metric, cell in row.cells.items():
                run.summary[f"{row.label}/{metric}/mean"] = cell.mean
                run.summary[f"{row.label}/{metric}/n"] = cell.n
                c = row.versus.get(metric)
                if c is not None and not c.error:
                    run.summary[f"{row.label}/{metric}/diff"] = c.mean
                    run.summary[f"{row.label}/{metric}/p"] = c.p
        run.summary["report/jobs_left_out"] = len(table.not_complete)
        return str(Path(run.dir).parent)
    finally:
        run.finish()
