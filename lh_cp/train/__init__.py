"""Training: recipes and their checks (recipe.py, plan.py), the process groups (runtime.py), one
step (steps.py) under an engine (engines.py), the stage loop (trainer.py), checkpoints, the
schedule, metrics, the leak probe, profiling and the loss plot."""
