"""Training: typed configs, the trainer (scratch / fine-tune / resume), schedules and setup, batch sampling."""
