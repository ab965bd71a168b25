"""Cost: prices per model and day, and the exact cost of one request (see docs/costs.md)."""

from gateway.cost.prices import Price, PriceBook, picodollars

__all__ = ["Price", "PriceBook", "picodollars"]
