"""Training: patch store, preprocessing, streaming loader, objectives, DDP, the trainer and its run files."""
