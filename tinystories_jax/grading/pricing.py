"""Token prices, to turn usage into an estimated cost.

The defaults are OpenAI's list prices per million tokens (USD, standard tier) at the time of
writing; prices change, so `--prices` overrides or extends them. The Batch API bills half.
"""

from __future__ import annotations

# model: (input USD per 1M tokens, output USD per 1M tokens)
DEFAULT_PRICES = {
    "gpt-4o": (2.50, 10.00),
    "gpt-4o-mini": (0.15, 0.60),
    "gpt-4.1": (2.00, 8.00),
    "gpt-4.1-mini": (0.40, 1.60),
    "gpt-4.1-nano": (0.10, 0.40),
    "gpt-4-turbo": (10.00, 30.00),
    "gpt-4": (30.00, 60.00),
    "gpt-3.5-turbo": (0.50, 1.50),
}
BATCH_DISCOUNT = 0.5


def parse_prices(spec: str) -> dict[str, tuple[float, float]]:
  """Parses `model=IN:OUT,model2=IN:OUT` (USD per million tokens) over the defaults.

  Raises:
    ValueError: with the expected form, when `spec` does not parse.
  """
  prices = dict(DEFAULT_PRICES)
  for part in filter(None, (p.strip() for p in spec.split(","))):
    try:
      model, rates = part.split("=", 1)
      rate_in, rate_out = rates.split(":", 1)
      prices[model.strip()] = (float(rate_in), float(rate_out))
    except ValueError:
      raise ValueError(
          f"--prices entry {part!r} is not MODEL=INPUT:OUTPUT in USD per million tokens, "
          "e.g. gpt-4o=2.5:10.") from None
  return prices


def estimate_cost(
    prices: dict[str, tuple[float, float]], model: str, prompt_tokens: int,
    completion_tokens: int, *, batch: bool = False) -> float | None:
  """USD for the tokens, or None when the model has no price (exact name or dated snapshot)."""
  rates = prices.get(model)
  if rates is None:
    # Dated snapshots ("gpt-4o-2024-08-06") bill like their family name; longest match wins.
    family = max((name for name in prices if model.startswith(name + "-")), key=len, default=None)
    rates = prices.get(family) if family else None
  if rates is None:
    return None
  cost = (prompt_tokens * rates[0] + completion_tokens * rates[1]) / 1e6
  return cost * BATCH_DISCOUNT if batch else cost
