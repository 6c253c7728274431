"""Tools on top of the package: benchmarks, reports, sweep summaries. Nothing in the package imports them."""
