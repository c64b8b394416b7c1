"""Measuring a model: test loss, text-to-SQL accuracy, the WikiSQL notation and SQL scoring."""
