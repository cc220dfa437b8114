"""RunnerHub control plane: webhook validation, routing, job state and demand."""
