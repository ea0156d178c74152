"""From grade rows to `summary.json`, `report.md` and PNG charts.

Per model: mean and 95% bootstrap interval of each score, the age-group distribution, probe
accuracy, failures by reason, tokens and estimated cost; a per-prompt table across models; and,
for transparency, the rubric's full text and example grader answers.
"""

from __future__ import annotations

import collections
import json
import os
import re
from typing import Any

import numpy as np

from tinystories_jax.grading import pricing
from tinystories_jax.grading.completions import REFERENCE_MODEL
from tinystories_jax.grading.rubric import AGE_GROUPS, Rubric

BOOTSTRAP_SAMPLES = 2000
SUMMARY_FILE = "summary.json"
REPORT_FILE = "report.md"


def bootstrap_ci(values: list[float], *, samples: int = BOOTSTRAP_SAMPLES,
                 seed: int = 0) -> tuple[float, float]:
  """95% percentile bootstrap interval of the mean."""
  data = np.asarray(values, dtype=np.float64)
  if data.size < 2:
    return (float(data.mean()), float(data.mean())) if data.size else (float("nan"),) * 2
  rng = np.random.default_rng(seed)
  means = data[rng.integers(0, data.size, size=(samples, data.size))].mean(axis=1)
  low, high = np.percentile(means, [2.5, 97.5])
  return float(low), float(high)


def _reason(error: str | None) -> str:
  """A failure message without its attempt count, so equal causes group together."""
  return re.sub(r"gave up after \d+ attempts; last: ", "", error or "unknown")[:160]


def _prompt_label(row: dict[str, Any]) -> str:
  return row.get("prompt_id") or " ".join(row["prompt"].split()[-8:])


def summarize(rows: list[dict[str, Any]], *, rubric: Rubric, grader_model: str,
              prices: dict[str, tuple[float, float]], expected_items: int,
              batch: bool = False) -> dict[str, Any]:
  """The numbers of the report, as one JSON-able dict."""
  prices = prices or pricing.DEFAULT_PRICES
  by_model: dict[str, list[dict[str, Any]]] = collections.defaultdict(list)
  for row in rows:
    by_model[row["model"]].append(row)
  models = {}
  total_usage = collections.Counter()
  for model in sorted(by_model):
    model_rows = by_model[model]
    graded = [r for r in model_rows if r["status"] == "ok" and r.get("scores")]
    failed = [r for r in model_rows if r["status"] != "ok"]
    scores = {}
    for name in rubric.score_names:
      values = [r["scores"][name] for r in graded]
      if values:
        low, high = bootstrap_ci(values)
        scores[name] = {"mean": float(np.mean(values)), "ci95": [low, high], "n": len(values)}
    ages = collections.Counter(r["age_group"] for r in graded if r.get("age_group"))
    probes: dict[str, dict[str, Any]] = {}
    for r in model_rows:
      if r.get("kind") == "probe":
        entry = probes.setdefault(r["probe_set"], {"correct": 0, "total": 0})
        entry["total"] += 1
        entry["correct"] += int(r["check"]["correct"])
    for entry in probes.values():
      entry["accuracy"] = entry["correct"] / entry["total"]
    checks: dict[str, dict[str, Any]] = {}
    for r in model_rows:
      for name, passed in (r.get("auto_checks") or {}).items():
        entry = checks.setdefault(name, {"passed": 0, "total": 0})
        entry["total"] += 1
        entry["passed"] += int(bool(passed))
    usage = collections.Counter()
    for r in model_rows:
      usage.update(r.get("usage") or {})
    total_usage.update(usage)
    models[model] = {
        "items": len(model_rows), "graded": len(graded), "failed": len(failed),
        "failure_reasons": dict(collections.Counter(_reason(r.get("error")) for r in failed)),
        "scores": scores,
        "age_groups": {g: ages.get(g, 0) for g in AGE_GROUPS} if rubric.age_group else {},
        "probes": probes, "auto_checks": checks, "usage": dict(usage),
        "cost_usd": pricing.estimate_cost(
            prices, grader_model, usage["prompt_tokens"], usage["completion_tokens"],
            batch=batch),
    }
  per_prompt: dict[str, dict[str, Any]] = {}
  for row in rows:
    # Reference stories each have their own beginning: a row apiece would swamp the table.
    if row["status"] != "ok" or not row.get("scores") or row["model"] == REFERENCE_MODEL:
      continue
    entry = per_prompt.setdefault(_prompt_label(row), {"prompt": row["prompt"], "models": {}})
    entry["models"].setdefault(row["model"], []).append(row["scores"])
  per_prompt_table = []
  for label in sorted(per_prompt):
    entry = per_prompt[label]
    per_prompt_table.append({
        "prompt_id": label, "prompt": entry["prompt"],
        "models": {m: {n: float(np.mean([s[n] for s in score_list])) for n in rubric.score_names}
                   for m, score_list in sorted(entry["models"].items())}})
  return {
      "grader_model": grader_model, "rubric": rubric.name, "rubric_version": rubric.version,
      "items": expected_items, "recorded": len(rows),
      "graded": sum(m["graded"] for m in models.values()),
      "failed": sum(m["failed"] for m in models.values()),
      "models": models, "per_prompt": per_prompt_table, "usage": dict(total_usage),
      "cost_usd": pricing.estimate_cost(prices, grader_model, total_usage["prompt_tokens"],
                                        total_usage["completion_tokens"], batch=batch),
  }


def _fmt_cost(cost: float | None) -> str:
  return "unknown (no price for this model; pass --prices)" if cost is None else f"${cost:.4f}"


def render_markdown(summary: dict[str, Any], rubric: Rubric, examples: dict[str, dict],
                    charts: list[str]) -> str:
  """The human-readable report."""
  names = list(rubric.score_names)
  lines = [
      f"# Grading report: {rubric.name} rubric v{rubric.version}, graded by "
      f"{summary['grader_model']}", "",
      f"{summary['items']} items: {summary['graded']} graded, {summary['failed']} failed, "
      f"{summary['items'] - summary['recorded']} not yet recorded. Scores are 1-10; intervals "
      f"are 95% bootstrap intervals of the mean. Every grader answer is in `grades.jsonl`.", "",
      "## Scores per model", "",
      "| model | graded | failed | " + " | ".join(names) + " |",
      "|---|---|---|" + "---|" * len(names),
  ]
  for model, m in summary["models"].items():
    cells = []
    for name in names:
      s = m["scores"].get(name)
      cells.append(f"{s['mean']:.2f} [{s['ci95'][0]:.2f}, {s['ci95'][1]:.2f}]" if s else "-")
    lines.append(f"| {model} | {m['graded']} | {m['failed']} | " + " | ".join(cells) + " |")
  if rubric.age_group:
    lines += ["", "## Age group the grader guessed", "",
              "| model | " + " | ".join(f"{g} ({a})" for g, a in AGE_GROUPS.items()) + " |",
              "|---|" + "---|" * len(AGE_GROUPS)]
    for model, m in summary["models"].items():
      lines.append(f"| {model} | " + " | ".join(str(m["age_groups"].get(g, 0))
                                                for g in AGE_GROUPS) + " |")
  probe_sets = sorted({s for m in summary["models"].values() for s in m["probes"]})
  if probe_sets:
    lines += ["", "## Probes (checked automatically, no grader)", "",
              "| model | " + " | ".join(probe_sets) + " |", "|---|" + "---|" * len(probe_sets)]
    for model, m in summary["models"].items():
      cells = [f"{p['correct']}/{p['total']}" if (p := m["probes"].get(s)) else "-"
               for s in probe_sets]
      lines.append(f"| {model} | " + " | ".join(cells) + " |")
  check_names = sorted({c for m in summary["models"].values() for c in m["auto_checks"]})
  if check_names:
    lines += ["", "## Automatic instruction checks", "",
              "| model | " + " | ".join(check_names) + " |", "|---|" + "---|" * len(check_names)]
    for model, m in summary["models"].items():
      cells = [f"{c['passed']}/{c['total']}" if (c := m["auto_checks"].get(n)) else "-"
               for n in check_names]
      lines.append(f"| {model} | " + " | ".join(cells) + " |")
  lines += ["", "## Failures, tokens and cost", "",
            "| model | failed | reasons | prompt tokens | completion tokens | requests | cost |",
            "|---|---|---|---|---|---|---|"]
  for model, m in summary["models"].items():
    reasons = _cell("; ".join(f"{n}× {r}" for r, n in m["failure_reasons"].items()) or "-")
    u = m["usage"]
    lines.append(f"| {model} | {m['failed']} | {reasons} | {u.get('prompt_tokens', 0)} | "
                 f"{u.get('completion_tokens', 0)} | {u.get('requests', 0)} | "
                 f"{_fmt_cost(m['cost_usd'])} |")
  lines += ["", f"Total estimated cost: {_fmt_cost(summary['cost_usd'])}."]
  if charts:
    lines += ["", "## Charts", ""] + [f"![{c}]({c})" for c in charts]
  if summary["per_prompt"]:
    models = list(summary["models"])
    lines += ["", "## Per prompt", "", "Cells: " + " / ".join(names) + ".", "",
              "| prompt | " + " | ".join(models) + " |", "|---|" + "---|" * len(models)]
    for entry in summary["per_prompt"]:
      cells = []
      for model in models:
        s = entry["models"].get(model)
        cells.append(" / ".join(f"{s[n]:.1f}" for n in names) if s else "-")
      lines.append(f"| {_cell(entry['prompt_id'])} | " + " | ".join(cells) + " |")
  lines += ["", "## The rubric, word for word", "", f"System message:", "", _quote(rubric.system),
            "", "First turn (the placeholders are filled per item):", "",
            _quote(rubric.first_turn), "", "Second turn:", "", _quote(rubric.second_turn)]
  if examples:
    lines += ["", "## One graded example per model", ""]
    for model, row in examples.items():
      lines += [f"### {model} — {row['id']}", "", _quote(row["prompt"] + "***" +
                                                         row["completion"]), "",
                "Assessment:", "", _quote(row.get("assessment") or ""), "",
                f"Scores: {json.dumps(row['scores'])}, age group {row.get('age_group')}.", ""]
  return "\n".join(lines) + "\n"


def _cell(text: str) -> str:
  """Text that cannot break a markdown table row."""
  return " ".join(str(text).split()).replace("|", "\\|")


def _quote(text: str) -> str:
  return "\n".join("> " + line if line else ">" for line in text.splitlines())


def write_charts(summary: dict[str, Any], rubric: Rubric, output_dir: str) -> list[str]:
  """Scores per model with intervals, and age-group histograms; returns file names."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  from matplotlib import pyplot as plt  # pylint: disable=g-import-not-at-top

  models = [m for m, s in summary["models"].items() if s["scores"]]
  if not models:
    return []
  names = list(rubric.score_names)
  width = 0.8 / len(models)
  charts = []
  fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(names) * max(1, len(models) / 2)), 4))
  for i, model in enumerate(models):
    scores = summary["models"][model]["scores"]
    means = [scores[n]["mean"] if n in scores else np.nan for n in names]
    errors = np.array([[scores[n]["mean"] - scores[n]["ci95"][0],
                        scores[n]["ci95"][1] - scores[n]["mean"]] if n in scores else [0, 0]
                       for n in names]).T
    x = np.arange(len(names)) + (i - (len(models) - 1) / 2) * width
    ax.bar(x, means, width, yerr=errors, capsize=3, label=model)
  ax.set_xticks(np.arange(len(names)), names)
  ax.set_ylim(0, 10)
  ax.set_ylabel("mean score (95% CI)")
  ax.set_title(f"{rubric.name} rubric v{rubric.version}, grader {summary['grader_model']}")
  ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(os.path.join(output_dir, "scores.png"), dpi=120)
  plt.close(fig)
  charts.append("scores.png")
  if rubric.age_group:
    fig, ax = plt.subplots(figsize=(7, 4))
    groups = list(AGE_GROUPS)
    for i, model in enumerate(models):
      counts = summary["models"][model]["age_groups"]
      total = max(1, sum(counts.values()))
      x = np.arange(len(groups)) + (i - (len(models) - 1) / 2) * width
      ax.bar(x, [counts.get(g, 0) / total for g in groups], width, label=model)
    ax.set_xticks(np.arange(len(groups)), [f"{g}\n{a}" for g, a in AGE_GROUPS.items()])
    ax.set_ylabel("share of graded items")
    ax.set_title("Age group the grader guessed")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(os.path.join(output_dir, "age_groups.png"), dpi=120)
    plt.close(fig)
    charts.append("age_groups.png")
  return charts


def write_report(rows: list[dict[str, Any]], *, output_dir: str, rubric: Rubric,
                 grader_model: str, prices: dict[str, tuple[float, float]],
                 expected_items: int, batch: bool = False) -> dict[str, Any]:
  """Writes summary.json, report.md and the charts; returns the summary."""
  summary = summarize(rows, rubric=rubric, grader_model=grader_model, prices=prices,
                      expected_items=expected_items, batch=batch)
  charts = write_charts(summary, rubric, output_dir)
  summary["charts"] = charts
  examples = {}
  for row in rows:
    if row["status"] == "ok" and row.get("scores") and row["model"] not in examples:
      examples[row["model"]] = row
  with open(os.path.join(output_dir, SUMMARY_FILE), "w", encoding="utf-8") as f:
    json.dump(summary, f, indent=2, ensure_ascii=False)
  with open(os.path.join(output_dir, REPORT_FILE), "w", encoding="utf-8") as f:
    f.write(render_markdown(summary, rubric, dict(sorted(examples.items())), charts))
  return summary
