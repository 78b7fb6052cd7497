"""Head distillation: data pipeline, train step and trainer."""
