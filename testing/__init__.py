"""`navil.testing`: what tests, benchmarks and the fuzz share: the tiny NaViL config (`configs`) and the hypothesis
generators and checks of the fuzz (`fuzzing`, which needs the `test` extra and is imported only on use)."""

from .configs import TINY_TEXT, TINY_VISION, special_token_ids_at_end, tiny_config

__all__ = ["TINY_TEXT", "TINY_VISION", "special_token_ids_at_end", "tiny_config"]
