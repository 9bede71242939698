"""Training and evaluation of RegionGPT models (the runtime, rgpt_rt.runtime, never imports this).

    python -m rgpt_rt.training.train --out runs/tiny --preset tiny   # train (train.py)
    python -m rgpt_rt.training.eval --checkpoint runs/tiny/final     # held-out accuracy (eval.py)
    python -m rgpt_rt.training.recipe --out runs/recipe              # the shipped model's chain

    config.py          TrainConfig and the curriculum of a model trained from scratch
    model_init.py      how a run's model starts (built, loaded, connector init, optimizer)
    runs.py            a run folder's checkpoints and log, the learning-rate schedule
    train.py           the language stages' loop and its command line
    vision_pretrain.py the vision stage of a model trained from scratch
    prefetch.py        batches drawn ahead in worker processes
    curriculum.py      the referring curriculum's sample mix (TrainConfig.mix)
    recipe.py          the chain of runs that made the shipped model
    eval.py            per-task held-out accuracy on the shapes world
    position_probe.py  which positions a model confuses when position decides
    data/              the shapes world, COCO-format region data, samples and batches
See docs/training.md.
"""
