"""clip_train: training code on top of clip_core (optimiser, schedules, training loops)."""
