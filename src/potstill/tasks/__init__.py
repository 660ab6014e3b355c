"""Tasks: what a batch holds, the model's forward, the task's metrics and how its student is
exported: one file per task."""
