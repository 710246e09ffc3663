"""Subprocess entry point of the Ctrl-C test of tests/test_loader.py: train a
tiny config with 2 forked loader workers on a slow dataset whose images
stall for an hour once the file STALL_FILE exists.

    python tests/loader_train_run.py MODEL_DIR STALL_FILE
"""

import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.dirname(HERE), HERE]


def config():
    from mrcnn import synthetic
    from tiny import TinyConfig
    return TinyConfig().derive(NAME="interrupted", NUM_CLASSES=1 + len(synthetic.CLASS_NAMES),
                               STEPS_PER_EPOCH=3, VALIDATION_STEPS=0)


def main(model_dir, stall_file):
    import faulthandler
    import signal
    faulthandler.register(signal.SIGUSR1, all_threads=True)     # the test asks for stacks if it hangs
    # Ctrl-C as a terminal delivers it: the pytest process that starts this one may
    # have SIGINT ignored or blocked by then (both are inherited across exec), which
    # made this run wait in select() for ever in full-suite runs (as distributed_run.py).
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
    from mrcnn import model as modellib
    from loader_datasets import Slow, shapes
    m = modellib.MaskRCNN("training", config(), model_dir)
    print("training", flush=True)
    m.train(shapes(Slow, count=6, seed=2, delay=0.05, stall_file=stall_file), None, 0.01, epochs=100,
            layers="heads", seed=0, workers=2)


if __name__ == "__main__":
    main(*sys.argv[1:3])
