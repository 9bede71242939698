"""Training data: the synthetic shapes world (shapes.py draws the scenes, tasks.py asks the
questions, phrases.py writes the answers and referring phrases), COCO-format region data
(coco.py), and the samples and batches both become (samples.py)."""
