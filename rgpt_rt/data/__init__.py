"""Training data: the synthetic shapes world (shapes.py, tasks.py), COCO-format region data
(coco.py), and the samples and batches both become (samples.py)."""
