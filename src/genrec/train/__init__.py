"""Training: the trainer loop, schedules and checkpoints."""
