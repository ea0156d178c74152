"""Generating a TinyStories-style corpus through an OpenAI-compatible endpoint, resumably.

Files, for `--output=stories.jsonl`:
  stories.jsonl           kept stories, one JSON row each, appended as they arrive
  stories.rejected.jsonl  rejected answers and failed requests, with the reason
  stories.run.json        the settings the file was made with (a resume must match them)
  stories.txt             the kept stories (or Instruct texts) separated by `<|endoftext|>` lines
  stories.stats.json      rejection rates, vocabulary share, n-gram diversity, tokens and cost
Plan `i` (words, features, Instruct fields) depends only on (seed, i); a killed run, restarted
with the same flags, finishes the plans it lost and never repeats one that was answered. A plan
whose request failed (the endpoint's error, not a judged answer) is sent again by the next run,
and a run stops, with the endpoint's error, once FAILURE_STREAK requests in a row have failed:
a wrong --model or an answer cap the server refuses then costs a rerun, not a thousand errors.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import os
from collections.abc import Iterable
from typing import Any

from absl import logging
import tqdm

from tinystories_jax.datagen import instruct
from tinystories_jax.datagen import prompts as prompts_lib
from tinystories_jax.datagen import quality
from tinystories_jax.datagen import vocabulary as vocabulary_lib
from tinystories_jax.grading import batch as batch_lib
from tinystories_jax.grading import pricing
from tinystories_jax.grading.client import (ChatClient, ChatError, ClientConfig, Usage,
                                            run_bounded, run_event_loop)
from tinystories_jax.grading.journal import Journal, read_rows

END_OF_TEXT = "<|endoftext|>"
# Requests in a row that failed (after their retries) before a run stops.
FAILURE_STREAK = 20


class GenerationError(ValueError):
  """A problem the user must fix (mismatched resume, hopeless rejection rate)."""


@dataclasses.dataclass(frozen=True)
class GenerateConfig:
  """Everything one generation run needs.

  Attributes:
    num_stories: stories to keep (rejected ones are replaced by new plans).
    output: the JSONL file of kept stories; sibling files share its stem.
    client: endpoint, model, concurrency and retry policy.
    seed: fixes every plan.
    instruct: also ask for a summary and render the Instruct layout.
    words: a vocabulary file, or None for the packaged one.
    features: the story features plans may draw from.
    feature_probability: chance of each feature being asked for.
    limits: story length bounds in words.
    max_tokens: answer cap for the story request.
    temperature: sampling temperature for stories.
    prices: USD per million tokens, for the cost estimate.
    progress: show a progress bar.
    max_plans_factor: stop after num_stories * this many plans (plus 20) if too few are kept.
    mode: "online" (interactive requests) or "batch" (the OpenAI Batch API).
    batch: batch sizes and patience, for mode "batch".
  """
  num_stories: int
  output: str
  client: ClientConfig
  seed: int = 0
  instruct: bool = False
  words: str | None = None
  features: tuple[str, ...] = tuple(prompts_lib.FEATURES)
  feature_probability: float = 0.35
  limits: quality.Limits = quality.Limits()
  max_tokens: int = 1000
  temperature: float = 1.0
  prices: dict[str, tuple[float, float]] = dataclasses.field(default_factory=dict)
  progress: bool = True
  max_plans_factor: float = 3.0
  mode: str = "online"
  batch: batch_lib.BatchConfig = batch_lib.BatchConfig()

  def __post_init__(self):
    if self.mode not in ("online", "batch"):
      raise GenerationError(f"Unknown --mode {self.mode!r}; use online or batch.")
    if self.num_stories < 1:
      raise GenerationError(f"--num_stories must be at least 1, got {self.num_stories}.")
    if self.max_tokens < 1:
      raise GenerationError(f"--max_tokens must be at least 1, got {self.max_tokens}.")
    if not 1 <= self.limits.min_words <= self.limits.max_words:
      raise GenerationError(
          f"--min_words={self.limits.min_words} and --max_words={self.limits.max_words} leave no "
          "story length: use 1 <= --min_words <= --max_words.")
    if not 0.0 <= self.feature_probability <= 1.0:
      raise GenerationError(f"--feature_probability={self.feature_probability} is not a "
                            "probability: use a value from 0 to 1.")
    if not self.output.endswith(".jsonl"):
      raise GenerationError(f"--output must be a .jsonl file, got {self.output}; the .txt "
                            "layout is written beside it.")


def rejection_summary(rejected_path: str) -> str:
  """The commonest rejection reasons in a rejected-rows file, with the latest error message of
  failed requests, e.g. "rejected: request_failed 32 (last error: HTTP 422: ...)"."""
  reasons: collections.Counter = collections.Counter()
  last_error = None
  for row in read_rows(rejected_path):
    reasons[row.get("reason", "?")] += 1
    if row.get("error"):
      last_error = str(row["error"])
  if not reasons:
    return "nothing was rejected"
  parts = [f"{reason} {n}" for reason, n in reasons.most_common(3)]
  text = "rejected: " + ", ".join(parts)
  if last_error:
    text += f" (last error: {last_error[:200]})"
  return text


def sibling(output: str, suffix: str) -> str:
  return output[:-len(".jsonl")] + suffix


def story_id(seed: int, index: int) -> str:
  return f"s{seed}-{index:08d}"


class Generation:
  """One run's state: the plans, what is recorded, and the rule for keeping a story."""

  def __init__(self, config: GenerateConfig, vocabulary: vocabulary_lib.Vocabulary):
    self.config = config
    self.vocabulary = vocabulary
    # Only keys in memory: at the paper's scale the rows themselves are gigabytes.
    self.kept = Journal(config.output, key_field="id", keep_rows=False)
    self.rejected = Journal(sibling(config.output, ".rejected.jsonl"), key_field="id",
                            keep_rows=False)
    self.seen: set[str] = set()
    self.done: set[int] = set()
    for row in read_rows(self.kept.path):
      self.seen.add(quality.fingerprint(row["story"]))
      self.done.add(row["index"])
    failed: set[int] = set()
    for row in read_rows(self.rejected.path):
      (failed if row.get("reason") == "request_failed" else self.done).add(row["index"])
    retry = failed - self.done
    if retry:
      logging.info("Sending %d plans again whose requests failed in an earlier run.", len(retry))
    # Requests that failed since the last answer, and the latest failure's error.
    self.failed_in_a_row = 0
    self.last_error = ""

  def close(self) -> None:
    self.kept.close()
    self.rejected.close()

  @property
  def kept_count(self) -> int:
    return len(self.kept.keys)

  def plan(self, index: int) -> prompts_lib.StoryPlan:
    return prompts_lib.make_plan(self.config.seed, index, self.vocabulary, self.config.features,
                                 self.config.feature_probability)

  def next_indices(self, count: int) -> list[int]:
    """The lowest `count` plan indices never recorded (lost ones first, then new ones)."""
    out, index = [], 0
    while len(out) < count:
      if index not in self.done:
        out.append(index)
      index += 1
    return out

  def next_round(self) -> list[int]:
    """Plan indices for the next round: as many as stories still needed (none when done).

    Raises:
      GenerationError: when so many plans were rejected that going on looks hopeless.
    """
    config = self.config
    if self.kept_count >= config.num_stories:
      return []
    if self.failing():
      raise GenerationError(
          f"The last {self.failed_in_a_row} requests all failed; the latest with: "
          f"{self.last_error[:300]}. Nothing is lost: fix the endpoint, --model or --max_tokens "
          "and rerun the same command to go on (failed requests are sent again).")
    max_plans = int(config.num_stories * config.max_plans_factor) + 20
    if len(self.done) >= max_plans:
      raise GenerationError(
          f"Stopped after {len(self.done)} prompts with only {self.kept_count} of "
          f"{config.num_stories} stories kept; {rejection_summary(self.rejected.path)}. "
          f"Every reason is in {self.rejected.path}; fix the model, the endpoint or the limits.")
    return self.next_indices(min(config.num_stories - self.kept_count,
                                 max_plans - len(self.done)))

  def base_row(self, plan: prompts_lib.StoryPlan) -> dict[str, Any]:
    return {
        "id": story_id(self.config.seed, plan.index), "index": plan.index,
        "seed": self.config.seed, "prompt": prompts_lib.render_prompt(plan),
        "words": {"verb": plan.verb, "noun": plan.noun, "adjective": plan.adjective},
        "features": list(plan.features), "model": self.config.client.model,
        "prompt_version": prompts_lib.PROMPT_VERSION,
    }

  def judge(self, plan: prompts_lib.StoryPlan, answer: str) -> str | None:
    """The rejection reason for `answer`, or None; a kept story is marked seen at once."""
    story = answer.strip()
    reason = quality.check_story(
        story, {"verbs": plan.verb, "nouns": plan.noun, "adjectives": plan.adjective},
        self.config.limits, self.seen)
    if reason is None:
      self.seen.add(quality.fingerprint(story))
    return reason

  def failing(self) -> bool:
    """Whether FAILURE_STREAK requests in a row have failed (no new request should start)."""
    return self.failed_in_a_row >= FAILURE_STREAK

  def record_rejected(self, row: dict[str, Any], reason: str) -> None:
    self.rejected.append(row | {"reason": reason})
    if reason == "request_failed":
      self.failed_in_a_row += 1
      self.last_error = str(row.get("error", ""))
    else:
      self.failed_in_a_row = 0
    self.done.add(row["index"])

  def record_kept(self, plan: prompts_lib.StoryPlan, row: dict[str, Any], story: str,
                  summary: str | None) -> None:
    row = row | {"story": story, "summary": summary}
    if self.config.instruct:
      fields = set(plan.instruct_fields)
      if summary is None:
        fields.discard("Summary")
      sentence = instruct.pick_sentence(story, plan.sentence_seed)
      if sentence is None:
        fields.discard("Random sentence")
      row["instructions"] = {
          "features": list(plan.features) if "Features" in fields else None,
          "words": list(plan.words) if "Words" in fields else None,
          "summary": summary if "Summary" in fields else None,
          "random_sentence": sentence if "Random sentence" in fields else None,
      }
      row["text"] = instruct.render(instruct.Instructions(
          features=tuple(plan.features) if "Features" in fields else None,
          words=plan.words if "Words" in fields else None,
          summary=summary if "Summary" in fields else None,
          random_sentence=sentence if "Random sentence" in fields else None), story)
    self.kept.append(row)
    self.failed_in_a_row = 0
    self.done.add(plan.index)


async def _generate_online(gen: Generation, client: ChatClient, bar: tqdm.tqdm) -> None:
  config = gen.config

  async def handle(index: int) -> None:
    if gen.failing():  # left unrecorded: the next run sends it
      return
    plan = gen.plan(index)
    row = gen.base_row(plan)
    usage = Usage()
    try:
      reply = await client.chat([{"role": "user", "content": row["prompt"]}],
                                max_tokens=config.max_tokens, temperature=config.temperature)
    except ChatError as e:
      usage.add(e.usage)
      gen.record_rejected(row | {"usage": usage.as_dict(), "error": str(e)}, "request_failed")
      return
    usage.add(reply.usage)
    story = reply.text.strip()
    reason = gen.judge(plan, story)
    if reason is not None:
      gen.record_rejected(row | {"story": story, "usage": usage.as_dict()}, reason)
      bar.set_postfix(rejected=len(gen.rejected.keys), refresh=False)
      return
    summary = None
    if config.instruct:
      try:
        summary_reply = await client.chat(
            [{"role": "user", "content": prompts_lib.SUMMARY_PROMPT.replace("{story}", story)}],
            max_tokens=120, temperature=0.0)
        usage.add(summary_reply.usage)
        summary = " ".join(summary_reply.text.split())
      except ChatError as e:
        usage.add(e.usage)
        logging.warning("No summary for %s: %s", row["id"], e)
    gen.record_kept(plan, row | {"usage": usage.as_dict()}, story, summary)
    bar.update(1)

  try:
    while (indices := gen.next_round()):
      await run_bounded(indices, handle, config.client.concurrency)
  finally:
    await client.close()


def _generate_batch(gen: Generation, bar: tqdm.tqdm) -> None:
  """The same rounds through the Batch API: stories, then (Instruct) their summaries.

  Answers are judged and recorded as they stream out of the downloaded files; only Instruct
  stories waiting for their summary are held in memory, one round at a time.
  """
  config = gen.config
  runner = batch_lib.BatchRunner(config.client, config.batch,
                                 sibling(config.output, ".batch"), log=logging.info)
  while (indices := gen.next_round()):
    waiting: dict[str, tuple] = {}

    def story_requests():
      for index in indices:
        plan = gen.plan(index)
        yield story_id(config.seed, index), {
            "model": config.client.model, "max_tokens": config.max_tokens,
            "temperature": config.temperature,
            "messages": [{"role": "user", "content": prompts_lib.render_prompt(plan)}]}

    def judge(sid: str, result: batch_lib.BatchResult) -> None:
      plan = gen.plan(int(sid.rsplit("-", 1)[1]))
      row = gen.base_row(plan)
      if result.text is None:
        gen.record_rejected(row | {"usage": result.usage.as_dict(), "error": result.error},
                            "request_failed")
        return
      story = result.text.strip()
      reason = gen.judge(plan, story)
      if reason is not None:
        gen.record_rejected(row | {"story": story, "usage": result.usage.as_dict()}, reason)
      elif config.instruct:
        waiting[sid] = (plan, row, story, result.usage)
      else:
        gen.record_kept(plan, row | {"usage": result.usage.as_dict()}, story, None)
        bar.update(1)

    runner.run(story_requests, judge, tag="stories")
    if not waiting:
      continue

    def summary_requests():
      for sid, (_, _, story, _) in waiting.items():
        yield f"{sid}:summary", {
            "model": config.client.model, "max_tokens": 120, "temperature": 0.0,
            "messages": [{"role": "user",
                          "content": prompts_lib.SUMMARY_PROMPT.replace("{story}", story)}]}

    def keep(custom_id: str, result: batch_lib.BatchResult) -> None:
      plan, row, story, usage = waiting.pop(custom_id[:-len(":summary")])
      usage.add(result.usage)
      summary = " ".join(result.text.split()) if result.text else None
      gen.record_kept(plan, row | {"usage": usage.as_dict()}, story, summary)
      bar.update(1)

    runner.run(summary_requests, keep, tag="summaries")

def write_text_layout(rows: Iterable[dict[str, Any]], path: str) -> None:
  """The `.txt` layout: each story (or Instruct text) followed by an `<|endoftext|>` line."""
  tmp = path + ".tmp"
  with open(tmp, "w", encoding="utf-8") as f:
    for row in rows:
      f.write(row.get("text", row["story"]).strip() + "\n" + END_OF_TEXT + "\n")
  os.replace(tmp, path)


def run_settings(config: GenerateConfig, vocabulary: vocabulary_lib.Vocabulary) -> dict:
  """What fixes the plans and their answers; a resumed run must match it."""
  return {"seed": config.seed, "model": config.client.model, "instruct": config.instruct,
          "features": list(config.features), "feature_probability": config.feature_probability,
          "vocabulary": quality.fingerprint(json.dumps(dataclasses.asdict(vocabulary))),
          "prompt_version": prompts_lib.PROMPT_VERSION}


def _check_settings(config: GenerateConfig, settings: dict) -> None:
  path = sibling(config.output, ".run.json")
  if os.path.exists(path):
    with open(path, encoding="utf-8") as f:
      before = json.load(f)
    changed = [k for k in settings if before.get(k) != settings[k]]
    if changed and os.path.exists(config.output):
      raise GenerationError(
          f"{config.output} was made with other settings ({', '.join(changed)} differ); "
          "resume with the same flags or choose a new --output.")
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path, "w", encoding="utf-8") as f:
    json.dump(settings, f, indent=2)


def summarize(config: GenerateConfig, vocabulary: vocabulary_lib.Vocabulary,
              batch: bool = False) -> dict[str, Any]:
  """Rejection rates, vocabulary share, n-gram diversity, tokens and cost, read from the files."""
  reasons: collections.Counter = collections.Counter()
  usage: collections.Counter = collections.Counter()
  kept = 0
  for row in read_rows(config.output):
    kept += 1
    usage.update(row.get("usage") or {})
  for row in read_rows(sibling(config.output, ".rejected.jsonl")):
    reasons[row["reason"]] += 1
    usage.update(row.get("usage") or {})
  rejected = sum(reasons.values())
  attempts = kept + rejected
  stats = quality.corpus_stats((r["story"] for r in read_rows(config.output)), vocabulary)
  prices = config.prices or pricing.DEFAULT_PRICES
  return {
      "output": config.output, "model": config.client.model, "kept": kept,
      "attempts": attempts, "rejected": rejected,
      "rejection_rates": {reason: reasons.get(reason, 0) / attempts if attempts else 0.0
                          for reason in quality.REASONS + ("request_failed",)},
      "rejected_by_reason": dict(reasons),
      "out_of_vocabulary_share": stats.out_of_vocabulary_share,
      "top_out_of_vocabulary": stats.top_out_of_vocabulary,
      "distinct_ngram_ratio": {str(n): r for n, r in stats.distinct_ngram_ratio.items()},
      "stats_stories": stats.stories, "words": stats.words, "usage": dict(usage),
      "cost_usd": pricing.estimate_cost(prices, config.client.model, usage["prompt_tokens"],
                                        usage["completion_tokens"], batch=batch),
  }


def generate(config: GenerateConfig) -> dict[str, Any]:
  """Generates until `num_stories` are kept, then writes the .txt layout and the stats.

  Returns:
    The stats written to `<output stem>.stats.json`.

  Raises:
    GenerationError, VocabularyError, client.ConfigError, client.StopRun: with the fix.
  """
  vocabulary = vocabulary_lib.load(config.words)
  _check_settings(config, run_settings(config, vocabulary))
  gen = Generation(config, vocabulary)
  try:
    logging.info("%d stories kept already, %d to go, with %s.", gen.kept_count,
                 max(0, config.num_stories - gen.kept_count), config.client.model)
    if gen.kept_count < config.num_stories:
      bar = tqdm.tqdm(total=config.num_stories, initial=min(gen.kept_count, config.num_stories),
                      desc="stories", unit="story", disable=not config.progress)
      try:
        if config.mode == "batch":
          _generate_batch(gen, bar)
        else:
          run_event_loop(_generate_online(gen, ChatClient(config.client, seed=config.seed), bar))
      finally:
        bar.close()
  finally:
    gen.close()
  return finish(config, vocabulary, batch=config.mode == "batch")


def finish(config: GenerateConfig, vocabulary: vocabulary_lib.Vocabulary,
           batch: bool = False) -> dict[str, Any]:
  """Writes the .txt layout (in the JSONL's order) and the stats file; returns the stats."""
  write_text_layout(read_rows(config.output), sibling(config.output, ".txt"))
  stats = summarize(config, vocabulary, batch=batch)
  with open(sibling(config.output, ".stats.json"), "w", encoding="utf-8") as f:
    json.dump(stats, f, indent=2)
  return stats



def describe(stats: dict[str, Any]) -> str:
  """A few lines for the terminal: what was kept, why others were not, what it cost."""
  cost = stats["cost_usd"]
  lines = [
      f"{stats['kept']} stories kept of {stats['attempts']} prompts ({stats['output']}).",
      "Rejected: " + (", ".join(f"{reason} {n} ({n / stats['attempts']:.1%})"
                                for reason, n in sorted(stats["rejected_by_reason"].items()))
                      or "none") + ".",
      f"Words outside the basic vocabulary: {stats['out_of_vocabulary_share']:.1%}; distinct "
      "n-gram ratio " + ", ".join(f"{n}-gram {r:.3f}"
                                  for n, r in stats["distinct_ngram_ratio"].items()) + ".",
      f"Tokens: {stats['usage'].get('prompt_tokens', 0)} prompt, "
      f"{stats['usage'].get('completion_tokens', 0)} completion; estimated cost "
      + ("unknown (no price for this model; pass --prices)" if cost is None else f"${cost:.4f}")
      + ".",
  ]
  return "\n".join(lines)
