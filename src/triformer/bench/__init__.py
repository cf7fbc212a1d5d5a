"""Benchmarks: providers side by side, rates against ceilings measured in the same run."""
