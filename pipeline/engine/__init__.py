"""The training engine shared by every stage: loop, tracking, checkpoints, resume and stop."""
