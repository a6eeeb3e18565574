"""What the CLI runs: training, prediction, query, report, demo."""
