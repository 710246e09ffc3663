"""Training in stages: the paper's schedule (section 4) and its shorter forms.

The paper trains in three stages: the heads (40k steps), ResNet stage 4 and
up (80k), then all layers at a tenth of the rate (40k). ``epoch_plan`` fits
such a plan onto exactly ``total_steps`` steps in whole epochs, and
``train_stages`` runs it with ``MaskRCNN.train`` (one call per stage, so a
resumed model skips the stages it has finished and continues the current
one). Used by ``samples/coco/coco.py --training-mode`` and the edge study.
"""

import logging

log = logging.getLogger(__name__)

#: (layers, relative length, learning-rate factor) of the paper's stages.
SCHEDULE = [("heads", 1, 1.0), ("4+", 2, 1.0), ("all", 1, 0.1)]
#: Training mode -> its stages. "single": all layers in one stage; "full":
#: the paper's schedule, "base" its first two stages, "fine" its last;
#: "two-stage": matterport's fine-tuning recipe (shapes, balloon): the heads,
#: then all layers at a tenth of the rate, half the steps each.
TRAINING_MODES = {"single": [("all", 1, 1.0)], "full": SCHEDULE, "base": SCHEDULE[:2], "fine": SCHEDULE[2:],
                  "two-stage": [("heads", 1, 1.0), ("all", 1, 0.1)]}


#: Shortest epoch ``epoch_plan`` makes when it can: every epoch validates and
#: writes a checkpoint, which must stay a small part of the work.
MIN_STEPS_PER_EPOCH = 50


def epoch_plan(mode, total_steps, max_epochs, from_scratch=False, min_steps_per_epoch=MIN_STEPS_PER_EPOCH):
    """How training mode ``mode`` runs exactly ``total_steps`` steps.

    Returns (steps_per_epoch, [(layers, end_epoch, lr_factor), ...]): the
    epochs are the largest divisor E of total_steps that is at most
    ``max_epochs`` and leaves epochs of at least ``min_steps_per_epoch``
    steps, so that E x steps_per_epoch == total_steps; when that gives fewer
    epochs than stages, the smallest divisor that gives each stage an epoch
    (shorter epochs). Each stage ends on a whole epoch, in the paper's
    proportions rounded, and gets at least one. With fewer epochs than
    stages, the first stages and the last one run.
    ``from_scratch``: every stage trains all layers (freezing a randomly
    initialised backbone teaches it nothing); the rates are kept.
    """
    if mode not in TRAINING_MODES:
        raise ValueError(f"unknown training mode {mode!r}; valid: {', '.join(TRAINING_MODES)}")
    stages = list(TRAINING_MODES[mode])
    divisors = [d for d in range(1, min(total_steps, max_epochs) + 1) if total_steps % d == 0]
    long_enough = [d for d in divisors if total_steps // d >= min_steps_per_epoch] or [1]
    enough = [d for d in divisors if d >= len(stages)]
    epochs = max(long_enough)
    if epochs < len(stages):
        epochs = min(enough) if enough else max(divisors)
    if epochs < len(stages):
        log.warning("%d steps make only %d epochs: training mode %s runs %d of its %d stages "
                    "(the last one included)", total_steps, epochs, mode, epochs, len(stages))
        stages = stages[:epochs - 1] + stages[-1:]
    parts = sum(s[1] for s in stages)
    plan, done = [], 0
    for k, (layers, weight, lr_factor) in enumerate(stages):
        done += weight
        left = len(stages) - 1 - k          # later stages need an epoch each
        end = int(round(epochs * done / parts))
        end = min(max(end, (plan[-1][1] if plan else 0) + 1), epochs - left)
        plan.append(("all" if from_scratch else layers, end, lr_factor))
    return total_steps // epochs, plan


def stage_overrides(mode):
    """Config fields a training mode needs: multi-stage modes run each stage at
    its own constant rate (``LEARNING_RATE_SCHEDULE = "constant"``; warm-up is kept)."""
    return {} if mode == "single" else {"LEARNING_RATE_SCHEDULE": "constant"}


def train_stages(model, plan, train_dataset, val_dataset, learning_rate, **train_kwargs):
    """Run ``plan`` (from :func:`epoch_plan`) on a training ``MaskRCNN``: one
    ``train`` call per stage at ``learning_rate x lr_factor``. Stages the model
    has already finished (``model.epoch``, e.g. after loading a checkpoint to
    resume) are skipped. ``train_kwargs`` go to every ``train`` call. Returns
    the last call's logs."""
    logs = {}
    for layers, end_epoch, lr_factor in plan:
        if model.epoch >= end_epoch:
            continue
        log.info("stage: layers=%s until epoch %d at lr %g", layers, end_epoch, learning_rate * lr_factor)
        logs = model.train(train_dataset, val_dataset, learning_rate=learning_rate * lr_factor,
                           epochs=end_epoch, layers=layers, **train_kwargs)
    return logs
