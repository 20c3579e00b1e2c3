"""The benchmark's phases; each takes the run's Bench context and returns its results."""
