"""The torchvision side of ``vs_torchvision.py``: a child process run with the
interpreter of the torchvision venv. It imports only NumPy, torch and
torchvision (never this library).

    <torch venv>/bin/python benchmarks/torchvision_worker.py DATA.npz SIZE

DATA.npz (written by the parent) holds the images, the ground truth and the
torchvision arguments. The worker builds ``maskrcnn_resnet50_fpn`` and answers
one JSON line per command read from stdin: ``{"cmd": "train", "steps": k}``,
``{"cmd": "infer", "images": k, "score_thresh": t, "bfloat16": b}`` (optional
threshold; ``b`` true: under ``torch.autocast("cpu", torch.bfloat16)``),
``{"cmd": "quit"}``. Every reply has ``"ok"``; timings are in seconds.
"""

import json
import sys
import time

from json_lines import serve, take_stdout


def torch_worker(npz_path, size):
    reply = take_stdout()      # the protocol owns the real stdout
    import numpy as np
    import torch
    import torchvision
    from torchvision.models.detection import maskrcnn_resnet50_fpn

    data = np.load(npz_path)
    tv = json.loads(str(data["tv_config"]))
    threads = int(data["torch_threads"])
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    images = data["images"]                       # uint8 [N, H, W, 3]
    n_images = len(images)

    def to_tensor(image):
        return torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).float().div_(255.)

    def target(i):
        masks = data[f"masks_{i}"]                # bool [H, W, N]
        class_ids = data[f"class_ids_{i}"]
        boxes, keep = [], []
        for j in range(masks.shape[-1]):
            ys, xs = np.nonzero(masks[..., j])
            if len(ys) == 0:
                continue
            keep.append(j)
            boxes.append([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1])   # x1, y1, x2, y2
        return {"boxes": torch.tensor(np.asarray(boxes, np.float32).reshape(-1, 4)),
                "labels": torch.tensor(class_ids[keep], dtype=torch.int64),
                "masks": torch.from_numpy(np.ascontiguousarray(
                    masks[..., keep].transpose(2, 0, 1).astype(np.uint8)))}

    bs = tv["optim"]["batch"]
    n_batches = n_images // bs
    batches = [([to_tensor(images[b * bs + k]) for k in range(bs)],
                [target(b * bs + k) for k in range(bs)]) for b in range(n_batches)]

    model = maskrcnn_resnet50_fpn(**tv["model"])
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=tv["optim"]["lr"], momentum=tv["optim"]["momentum"],
                                weight_decay=tv["optim"]["weight_decay"])
    clip = tv["optim"]["clip"]
    n_bn = sum(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())
    frozen_bn = sum(type(m).__name__ == "FrozenBatchNorm2d" for m in model.modules())
    state = {"step": 0, "image": 0}

    def train(steps):
        model.train()
        seconds, losses = [], []
        for _ in range(steps):
            imgs, targets = batches[state["step"] % n_batches]
            state["step"] += 1
            t0 = time.perf_counter()
            loss_dict = model(imgs, targets)
            loss = sum(loss_dict.values())
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, clip)
            optimizer.step()
            value = loss.item()
            seconds.append(time.perf_counter() - t0)
            losses.append(value)
        return {"seconds": seconds, "losses": losses}

    def infer(count, score_thresh=None, bfloat16=False):
        """`count` one-image detections; `score_thresh` overrides the box score
        threshold for these calls only (restored afterwards); `bfloat16`: under
        CPU autocast to bfloat16 (torch's mixed precision for inference)."""
        model.eval()
        seconds, detections = [], []
        saved = model.roi_heads.score_thresh
        if score_thresh is not None:
            model.roi_heads.score_thresh = float(score_thresh)
        try:
            with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bool(bfloat16)):
                for _ in range(count):
                    image = images[state["image"] % n_images]
                    state["image"] += 1
                    t0 = time.perf_counter()
                    out = model([to_tensor(image)])[0]
                    result = {k: v.float().numpy() if v.is_floating_point() else v.numpy()
                              for k, v in out.items()}
                    seconds.append(time.perf_counter() - t0)
                    detections.append(int(len(result["scores"])))
        finally:
            model.roi_heads.score_thresh = saved
        return {"seconds": seconds, "detections": detections,
                "score_thresh": float(model.roi_heads.score_thresh if score_thresh is None
                                      else score_thresh)}

    reply({"ok": True, "ready": True, "torch": torch.__version__,
           "torchvision": torchvision.__version__, "threads": torch.get_num_threads(),
           "interop_threads": torch.get_num_interop_threads(),
           "params": int(sum(p.numel() for p in model.parameters())),
           "trainable_params": int(sum(p.numel() for p in params)),
           "batchnorm_layers": int(n_bn), "frozen_batchnorm_layers": int(frozen_bn)})
    return serve(reply, {"train": lambda cmd: train(int(cmd["steps"])),
                         "infer": lambda cmd: infer(int(cmd["images"]), cmd.get("score_thresh"),
                                                         cmd.get("bfloat16", False))})


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit("usage: torchvision_worker.py DATA.npz SIZE")
    sys.exit(torch_worker(sys.argv[1], int(sys.argv[2])))
