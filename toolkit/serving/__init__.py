"""Serving: the continuous-batching generation model and the Triton launcher."""
