"""Training: the loop (trainer.py) and the small functions it calls."""
