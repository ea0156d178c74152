"""Report numbers: bootstrap intervals, per-model summaries, costs."""

import pytest

from tinystories_jax.grading import pricing, report
from tinystories_jax.grading.rubric import STORY


def test_bootstrap_interval_brackets_the_mean_and_shrinks_with_data():
  small = report.bootstrap_ci([3, 7, 5, 9, 1])
  large = report.bootstrap_ci([3, 7, 5, 9, 1] * 40)
  assert small[0] < 5 < small[1]
  assert large[1] - large[0] < small[1] - small[0]
  assert report.bootstrap_ci([4]) == (4.0, 4.0)


def row(model, grammar, status="ok", age="C", prompt_id="story-001", usage=10):
  scores = {"grammar": grammar, "creativity": 5, "consistency": 6, "plot": 7}
  ok = status == "ok"
  return {"key": f"{model}{grammar}{status}{prompt_id}", "id": prompt_id, "model": model,
          "prompt_id": prompt_id, "prompt": "Once", "status": status,
          "scores": scores if ok else None, "age_group": age if ok else None,
          "error": None if ok else "scores: gave up after 3 attempts; last: HTTP 500: x",
          "usage": {"prompt_tokens": usage * 100, "completion_tokens": usage, "requests": 2}}


def test_summarize_per_model_ages_failures_cost_and_prompts():
  rows = [row("a", 4), row("a", 6, age="D", prompt_id="story-002"), row("a", 0, status="failed"),
          row("b", 9)]
  summary = report.summarize(rows, rubric=STORY, grader_model="gpt-4o",
                             prices=pricing.DEFAULT_PRICES, expected_items=5)
  a = summary["models"]["a"]
  assert a["graded"] == 2 and a["failed"] == 1
  assert a["scores"]["grammar"]["mean"] == 5
  assert a["age_groups"]["C"] == 1 and a["age_groups"]["D"] == 1
  assert a["failure_reasons"] == {"scores: HTTP 500: x": 1}
  assert a["cost_usd"] == pytest.approx((3000 * 2.5 + 30 * 10) / 1e6)
  assert summary["items"] == 5 and summary["recorded"] == 4
  first = summary["per_prompt"][0]
  assert first["prompt_id"] == "story-001" and set(first["models"]) == {"a", "b"}
  text = report.render_markdown(summary, STORY, {}, [])
  assert "| a | 2 | 1 |" in text and "not yet recorded" in text


def test_prices():
  prices = pricing.parse_prices("my-model=1:2")
  assert pricing.estimate_cost(prices, "my-model", 1_000_000, 500_000) == 2.0
  assert pricing.estimate_cost(prices, "gpt-4o-2024-08-06", 1_000_000, 0) == 2.5
  assert pricing.estimate_cost(prices, "gpt-4o-mini-2024-07-18", 1_000_000, 0) == 0.15
  assert pricing.estimate_cost(prices, "gpt-4o", 1_000_000, 0, batch=True) == 1.25
  assert pricing.estimate_cost(prices, "local-llama", 10, 10) is None
  with pytest.raises(ValueError, match="MODEL=INPUT:OUTPUT"):
    pricing.parse_prices("gpt-4o=cheap")
