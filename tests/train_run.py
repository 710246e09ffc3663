"""Subprocess entry point of tests/test_robustness.py: train a tiny config,
resuming from find_last() when the model folder has a checkpoint.

    python tests/train_run.py MODEL_DIR EPOCHS STEPS_PER_EPOCH
"""

import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.dirname(HERE), HERE]


def main(model_dir, epochs, steps_per_epoch):
    from mrcnn import model as modellib, synthetic
    from tiny import TinyConfig, make_dataset
    config = TinyConfig().derive(NAME="killed", NUM_CLASSES=1 + len(synthetic.CLASS_NAMES),
                                 STEPS_PER_EPOCH=int(steps_per_epoch), VALIDATION_STEPS=0)
    m = modellib.MaskRCNN("training", config, model_dir)
    try:
        m.load_weights(m.find_last(), resume=True)
        print(f"resuming from epoch {m.epoch}", flush=True)
    except FileNotFoundError:
        pass
    m.train(make_dataset(6, seed=2), None, 0.01, epochs=int(epochs), layers="all", seed=0, log_every=1,
            workers=0)


if __name__ == "__main__":
    main(*sys.argv[1:4])
