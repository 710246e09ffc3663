"""The torchvision side of ``torchvision_parity.py`` and ``pretrained.py``: a
child process run with the interpreter of the torchvision venv. It imports
only NumPy, torch and torchvision (never this library).

    <torch venv>/bin/python benchmarks/torchvision_reference.py

One JSON command per stdin line, one JSON reply per stdout line (``"ok"``);
arrays travel in ``.npz`` files named in the commands:

    {"cmd": "build", "variant": "v1"|"v2", "num_classes": N, "min_size": s,
     "max_size": S, "seed": k, "randomize_bn": bool, "weights": PTH or null,
     "export": NPZ or null, "backbone": name, "width": C or null, "box_fc": F or null,
     "options": {other keyword arguments of the model}}
        maskrcnn_resnet50_fpn(_v2)(weights=None, weights_backbone=None), or
        with "backbone" "resnet18" / "resnet34" / "mobilenet_v3_large" a
        ``MaskRCNN`` on that backbone with an FPN (random weights, trainable
        BatchNorm: from scratch, torchvision's frozen BatchNorm would be an
        identity); "width" narrows a ResNet model's FPN, RPN conv and mask
        head to C channels and "box_fc" its box head to F (torchvision: 256
        and 1024); eval mode; ``randomize_bn`` draws the BatchNorm statistics and
        affine parameters (so that BN matters) and scales the class logits
        to a standard deviation of 2; ``weights`` loads a state
        dict; ``export`` writes the state dict as NPZ (for the converter).
    {"cmd": "stages", "image": NPZ ("image": uint8 [H, W, 3]), "out": NPZ, "mask_rois": K}
        the model's intermediate outputs on the image: the input tensor,
        C2..C5, P2..P6, RPN objectness / deltas per level, proposals, the box
        head's class logits and deltas on the proposals, the mask logits of
        the first K proposals, and the end-to-end detections (boxes, labels,
        scores, mask probabilities pasted on the image).
    {"cmd": "detect", "images": NPZ ("image_<i>", uint8), "out": NPZ}
        detections of each image (boxes, labels, scores, masks > 0.5).
    {"cmd": "train", "data": NPZ, "steps": n, "batch": b, "lr": r, "warmup": w,
     "seed": k, "save": PTH or null, "export": NPZ or null, "flip": bool, "clip": norm or null,
     "budget_seconds": T or null, "schedule": "constant"|"cosine",
     "eval": {"images": NPZ, "every_seconds": e, "out": PREFIX} or null}
        trains the built model (SGD, momentum 0.9, weight decay 1e-4, linear
        warm-up from lr/1000 over w steps, gradients clipped to a global norm
        of "clip" when given) on the images and instances of DATA ("image_<i>"
        uint8, "masks_<i>" bool [N, H, W], "labels_<i>" int; reshuffled every
        epoch), saves its state dict. With a budget: stops after T seconds of
        training (evaluation excluded), and "cosine" decays the rate over
        those seconds (after the warm-up). "eval": every e seconds of training,
        and at the end, detects the images of the NPZ (as "detect") into
        PREFIX<k>.npz; the reply's "evals" lists step, training seconds and file.
    {"cmd": "quit"}
"""

import math
import os
import sys
import time

from json_lines import serve, take_stdout


def main():
    reply = take_stdout()
    import numpy as np
    import torch
    import torchvision
    from torchvision.models.detection import maskrcnn_resnet50_fpn, maskrcnn_resnet50_fpn_v2

    torch.set_num_threads(int(os.environ.get("TORCH_THREADS", "2")))
    state = {"model": None}

    def to_tensor(image):
        return torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).float().div_(255.)

    def export(model, path):
        np.savez(path, **{k: v.detach().cpu().numpy() for k, v in model.state_dict().items()})

    def small_backbone_model(name, num_classes, min_size, max_size, sizes, options, width=None, box_fc=None):
        """A from-scratch Mask R-CNN on a small backbone with an FPN; ``width``
        (ResNets): the FPN, RPN and mask head channels (torchvision: 256),
        ``box_fc``: the box head's hidden size (torchvision: 1024)."""
        from torchvision.models import resnet
        from torchvision.models.detection import MaskRCNN
        from torchvision.models.detection.anchor_utils import AnchorGenerator
        from torchvision.models.detection.backbone_utils import (BackboneWithFPN, mobilenet_backbone,
                                                                 resnet_fpn_backbone)
        from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
        from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
        from torchvision.ops import MultiScaleRoIAlign
        from torchvision.ops.feature_pyramid_network import LastLevelMaxPool
        norm = torch.nn.BatchNorm2d
        if name.startswith("resnet") and width:
            body = getattr(resnet, name)(weights=None, norm_layer=norm)
            stages = [body.layer1[-1], body.layer2[-1], body.layer3[-1], body.layer4[-1]]
            in_channels = [(b.conv3 if hasattr(b, "conv3") else b.conv2).out_channels for b in stages]
            backbone = BackboneWithFPN(body, {f"layer{k}": str(k - 1) for k in range(1, 5)}, in_channels,
                                       int(width), extra_blocks=LastLevelMaxPool())
            levels = ["0", "1", "2", "3"]
            hidden = int(box_fc or 1024)
            options = dict(options, box_head=TwoMLPHead(int(width) * 7 * 7, hidden),
                           box_predictor=FastRCNNPredictor(hidden, num_classes),
                           mask_head=MaskRCNNHeads(int(width), [int(width)] * 4, 1),
                           mask_predictor=MaskRCNNPredictor(int(width), int(width), num_classes))
            num_classes = None          # given by the predictors
        elif name.startswith("resnet"):
            backbone = resnet_fpn_backbone(backbone_name=name, weights=None, trainable_layers=5, norm_layer=norm)
            levels = ["0", "1", "2", "3"]
        elif name == "mobilenet_v3_large":
            backbone = mobilenet_backbone(backbone_name=name, weights=None, fpn=True, trainable_layers=6,
                                          norm_layer=norm)
            levels = ["0", "1"]
        else:
            raise ValueError(f"unknown backbone {name!r}")
        n_maps = len(levels) + 1              # and the "pool" level of the FPN
        sizes = list(sizes or [32, 64, 128, 256, 512])
        if len(sizes) != n_maps:              # every size on every level (torchvision's mobilenet recipe)
            anchors = AnchorGenerator((tuple(int(s) for s in sizes),) * n_maps, ((0.5, 1.0, 2.0),) * n_maps)
        else:
            anchors = AnchorGenerator(tuple((int(s),) for s in sizes), ((0.5, 1.0, 2.0),) * n_maps)
        return MaskRCNN(backbone, num_classes=num_classes, min_size=min_size, max_size=max_size,
                        rpn_anchor_generator=anchors,
                        box_roi_pool=MultiScaleRoIAlign(levels, 7, 2),
                        mask_roi_pool=MultiScaleRoIAlign(levels, 14, 2), **options)

    def build(cmd):
        torch.manual_seed(int(cmd.get("seed", 0)))
        options = dict(cmd.get("options", {}))
        sizes = options.pop("anchor_sizes", None)
        backbone = cmd.get("backbone", "resnet50")
        if backbone != "resnet50" or cmd.get("width"):
            model = small_backbone_model(backbone, int(cmd["num_classes"]), int(cmd["min_size"]),
                                         int(cmd["max_size"]), sizes, options, cmd.get("width"), cmd.get("box_fc"))
        else:
            fn = maskrcnn_resnet50_fpn_v2 if cmd["variant"] == "v2" else maskrcnn_resnet50_fpn
            if sizes:     # one anchor size per FPN level, torchvision's aspect ratios
                from torchvision.models.detection.anchor_utils import AnchorGenerator
                options["rpn_anchor_generator"] = AnchorGenerator(tuple((int(s),) for s in sizes),
                                                                  ((0.5, 1.0, 2.0),) * len(sizes))
            model = fn(weights=None, weights_backbone=None, num_classes=int(cmd["num_classes"]),
                       min_size=int(cmd["min_size"]), max_size=int(cmd["max_size"]), **options)
        if cmd.get("weights"):
            model.load_state_dict(torch.load(cmd["weights"], map_location="cpu", weights_only=True))
        if cmd.get("randomize_bn"):
            g = torch.Generator().manual_seed(int(cmd.get("seed", 0)) + 1)
            with torch.no_grad():
                for m in model.modules():
                    if hasattr(m, "running_var") and m.running_var is not None:
                        n = m.running_var.shape[0]
                        m.weight.copy_(0.5 + torch.rand(n, generator=g))
                        m.bias.copy_(0.2 * torch.randn(n, generator=g))
                        m.running_mean.copy_(0.2 * torch.randn(n, generator=g))
                        m.running_var.copy_(0.5 + 1.5 * torch.rand(n, generator=g))
        model.eval()
        if cmd.get("randomize_bn"):
            # Random BatchNorm statistics can blow the class logits up until softmax scores are
            # exactly 1.0: ties, which NMS keeps in an arbitrary order. Scale the class logits to a
            # standard deviation of 2 (measured on a random image) to keep scores apart.
            with torch.no_grad():
                x = torch.rand(3, int(cmd["min_size"]), int(cmd["min_size"]), generator=g)
                images, _ = model.transform([x])
                features = model.backbone(images.tensors)
                proposals, _ = model.rpn(images, features)
                heads = model.roi_heads
                pooled = heads.box_roi_pool(features, proposals, images.image_sizes)
                logits, _ = heads.box_predictor(heads.box_head(pooled))
                factor = 2. / float(logits.std())
                heads.box_predictor.cls_score.weight.mul_(factor)
                heads.box_predictor.cls_score.bias.mul_(factor)
                heads.box_roi_pool.scales = heads.mask_roi_pool.scales = None   # set again by the next image
        state["model"] = model
        if cmd.get("export"):
            export(model, cmd["export"])
        return {"params": int(sum(p.numel() for p in model.parameters())),
                "torch": torch.__version__, "torchvision": torchvision.__version__}

    @torch.no_grad()
    def stages(cmd):
        model = state["model"]
        image = np.load(cmd["image"])["image"]
        out = {}
        images, _ = model.transform([to_tensor(image)])
        x = images.tensors
        out["input"] = x.numpy()
        out["image_size"] = np.array(images.image_sizes[0])
        body = model.backbone.body(x)
        for i, k in enumerate(body):
            out[f"C{i + 2}"] = body[k].numpy()
        features = model.backbone(x)
        for i, k in enumerate(features):
            out[f"P{i + 2}"] = features[k].numpy()
        objectness, deltas = model.rpn.head(list(features.values()))
        for i, (o, d) in enumerate(zip(objectness, deltas)):
            out[f"objectness{i + 2}"], out[f"deltas{i + 2}"] = o.numpy(), d.numpy()
        proposals, _ = model.rpn(images, features)
        out["proposals"] = proposals[0].numpy()
        heads = model.roi_heads
        pooled = heads.box_roi_pool(features, proposals, images.image_sizes)
        logits, regression = heads.box_predictor(heads.box_head(pooled))
        out["class_logits"], out["box_regression"] = logits.numpy(), regression.numpy()
        k = int(cmd.get("mask_rois", 100))
        mask_rois = [proposals[0][:k]]
        pooled = heads.mask_roi_pool(features, mask_rois, images.image_sizes)
        out["mask_logits"] = heads.mask_predictor(heads.mask_head(pooled)).numpy()
        det = model([to_tensor(image)])[0]
        for key in ("boxes", "labels", "scores"):
            out[f"det_{key}"] = det[key].numpy()
        out["det_masks"] = det["masks"][:, 0].numpy()
        np.savez(cmd["out"], **out)
        return {"proposals": int(len(out["proposals"])), "detections": int(len(out["det_scores"]))}

    def detect(cmd):
        return detect_images(np.load(cmd["images"]), cmd["out"])

    @torch.no_grad()
    def detect_images(data, path):
        model = state["model"]
        model.eval()
        out, seconds = {}, 0.
        names = sorted((k for k in data.files if k.startswith("image_")), key=lambda k: int(k[6:]))
        for name in names:
            t0 = time.perf_counter()
            det = model([to_tensor(data[name])])[0]
            seconds += time.perf_counter() - t0
            i = name[6:]
            out[f"boxes_{i}"] = det["boxes"].numpy()
            out[f"labels_{i}"] = det["labels"].numpy()
            out[f"scores_{i}"] = det["scores"].numpy()
            out[f"masks_{i}"] = (det["masks"][:, 0] > 0.5).numpy()
        np.savez_compressed(path, **out)
        return {"images": len(names), "seconds": seconds}

    def train(cmd):
        model = state["model"]
        data = np.load(cmd["data"])
        n = len([k for k in data.files if k.startswith("image_")])
        samples = []
        for i in range(n):
            masks = data[f"masks_{i}"]
            boxes = []
            for m in masks:
                ys, xs = np.nonzero(m)
                boxes.append([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1])
            samples.append((data[f"image_{i}"], masks, data[f"labels_{i}"],
                            np.asarray(boxes, np.float32).reshape(-1, 4)))
        g = np.random.default_rng(int(cmd.get("seed", 0)))
        torch.manual_seed(int(cmd.get("seed", 0)))
        params = [p for p in model.parameters() if p.requires_grad]
        lr, warmup = float(cmd["lr"]), int(cmd.get("warmup", 0))
        budget = cmd.get("budget_seconds")
        cosine = cmd.get("schedule", "constant") == "cosine"
        if cosine and not budget:
            raise ValueError("schedule 'cosine' decays over budget_seconds: give one")
        evaluation = cmd.get("eval")
        eval_images = np.load(evaluation["images"]) if evaluation else None
        evals, next_eval = [], (float(evaluation["every_seconds"]) if evaluation else None)
        optimizer = torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=1e-4)
        model.train()
        losses, trained, t0 = [], 0., time.perf_counter()
        batch = int(cmd["batch"])
        order = []
        steps = int(cmd.get("steps") or 10 ** 9)

        def evaluate(step):
            path = f"{evaluation['out']}{len(evals)}.npz"
            info = detect_images(eval_images, path)
            evals.append({"step": step, "train_seconds": trained, "out": path, "detect_seconds": info["seconds"]})
            print(f"eval {len(evals)} at step {step}, {trained / 60:.1f} min", file=sys.stderr, flush=True)
            model.train()

        step = 0
        while step < steps and not (budget and trained >= float(budget)):
            t_step = time.perf_counter()
            if warmup and step < warmup:
                alpha = step / warmup
                factor = 0.001 * (1 - alpha) + alpha
            elif cosine:
                factor = 0.5 * (1 + math.cos(math.pi * min(trained / float(budget), 1.)))
            else:
                factor = 1.
            for group in optimizer.param_groups:
                group["lr"] = lr * factor
            imgs, targets = [], []
            for j in range(batch):
                if not order:
                    order = list(g.permutation(n))
                idx = order.pop()
                image, masks, labels, boxes = samples[idx]
                if cmd.get("flip", True) and g.random() < 0.5:
                    image, masks = image[:, ::-1], masks[:, :, ::-1]
                    w = image.shape[1]
                    boxes = np.stack([w - boxes[:, 2], boxes[:, 1], w - boxes[:, 0], boxes[:, 3]], axis=1)
                imgs.append(to_tensor(image))
                targets.append({"boxes": torch.from_numpy(np.ascontiguousarray(boxes, np.float32)),
                                "labels": torch.from_numpy(np.asarray(labels, np.int64)),
                                "masks": torch.from_numpy(np.ascontiguousarray(masks).astype(np.uint8))})
            loss_dict = model(imgs, targets)
            loss = sum(loss_dict.values())
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if cmd.get("clip"):
                torch.nn.utils.clip_grad_norm_(params, float(cmd["clip"]))
            optimizer.step()
            losses.append(float(loss.item()))
            if not math.isfinite(losses[-1]):
                raise FloatingPointError(f"non-finite loss {losses[-1]} at step {step}")
            step += 1
            trained += time.perf_counter() - t_step
            if step % 25 == 0:
                print(f"step {step}: loss {np.mean(losses[-25:]):.3f} "
                      f"({trained:.0f} s)", file=sys.stderr, flush=True)
            if next_eval is not None and trained >= next_eval:
                evaluate(step)
                next_eval += float(evaluation["every_seconds"])
        if evaluation and (not evals or evals[-1]["step"] != step):
            evaluate(step)
        model.eval()
        if cmd.get("save"):
            torch.save(model.state_dict(), cmd["save"])
        if cmd.get("export"):
            export(model, cmd["export"])
        return {"losses": losses, "seconds": time.perf_counter() - t0, "train_seconds": trained,
                "steps": step, "evals": evals}

    commands = {"build": build, "stages": stages, "detect": detect, "train": train}
    reply({"ok": True, "ready": True, "torch": torch.__version__, "torchvision": torchvision.__version__})
    return serve(reply, commands)


if __name__ == "__main__":
    sys.exit(main())
