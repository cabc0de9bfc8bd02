"""Grad-CAM: where in the image the image-only path f(mu_p(x)) looks for one label.

evaluate.py calls grad_cam for --cam: on --image files, drawing each map over its image with
overlay, or on the most confident positive test images of a label (cam_picture); save_rgb writes
the picture.
"""
import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

import data
from model import ImageEncoder
from vkd.reports import DataError, label_index, save_atomically

def feature_maps_module(model):
    """The module whose output is the image encoder's last feature maps (B, C, h, w): where Grad-CAM
    looks."""
    encoder = model.image_encoder
    if isinstance(encoder, ImageEncoder):
        return encoder.stages
    return encoder.net.layer4 if hasattr(encoder.net, "layer4") else encoder.net.features


def grad_cam(model, x, label_index):
    """Grad-CAM (Selvaraju et al., 2017) of one label's logit on the image-only path f(mu_p(x)):
    alpha_c = spatial mean of d logit / d A_c over the last feature maps A (B, C, h, w),
    map = ReLU(sum_c alpha_c A_c), upsampled to the image and scaled to [0, 1] per image.
    x (B, 1, H, W) -> (B, H, W). The text encoder never runs."""
    model.eval()
    captured = {}
    hook = feature_maps_module(model).register_forward_hook(
        lambda module, inputs, output: captured.update(A=output))
    try:
        with torch.enable_grad():
            h_x, mu_p, _ = model.encode_prior(x)
            logit_k = model.classify(mu_p, h_x)[:, label_index]                 # (B,)
            (gradient,) = torch.autograd.grad(logit_k.sum(), captured["A"])     # (B, C, h, w)
    finally:
        hook.remove()
    alpha = gradient.mean(dim=(2, 3), keepdim=True)                              # (B, C, 1, 1)
    cam = F.relu((alpha * captured["A"].detach()).sum(1, keepdim=True))         # (B, 1, h, w)
    cam = F.interpolate(cam.float(), size=x.shape[-2:], mode="bilinear", align_corners=False)[:, 0]
    return (cam / cam.flatten(1).max(1).values.clamp(min=1e-12)[:, None, None]).cpu()


def overlay(image_uint8, cam, scale=2):
    """Gray image (H, W) uint8 and a map (H, W) in [0, 1] -> RGB uint8 (scale H, scale W, 3): a
    'hot' colour blended in where the map is high, so that the anatomy stays visible where it is
    low."""
    gray = np.repeat(image_uint8.astype(np.float32)[..., None] / 255.0, 3, axis=-1)     # (H, W, 3)
    cam = np.asarray(cam, dtype=np.float32)[..., None]
    # black-red-yellow-white
    hot = np.clip(np.concatenate([3 * cam, 3 * cam - 1, 3 * cam - 2], axis=-1), 0, 1)
    rgb = (1 - 0.6 * cam) * gray + 0.6 * cam * hot
    height, width = image_uint8.shape
    picture = Image.fromarray((rgb * 255).round().astype(np.uint8))
    return np.asarray(picture.resize((scale * width, scale * height), Image.BILINEAR))


def save_rgb(array, path):
    return save_atomically(path, lambda tmp: Image.fromarray(array).save(tmp, format="PNG"))


def slug(name):
    return name.lower().replace(" ", "-")


def cam_picture(model, images, indices, y, p, config, label_names, args, out):
    """One PNG: the most confidently predicted positive images of a label, each next to its Grad-CAM
    overlay."""
    k = label_index(label_names, args.cam)
    positives = np.flatnonzero(y[:, k] == 1)
    if not len(positives):
        raise DataError(f"no positive {label_names[k]} image in the {args.split} split to explain")
    chosen = positives[np.argsort(-p[positives, k], kind="stable")[:args.cam_images]]
    batch = np.array(images[indices[chosen]])                  # (B, S, S) uint8
    x = data.normalise(torch.from_numpy(batch).to(args.device), config["pixel_mean"],
                       config["pixel_std"])
    cams = grad_cam(model, x, k).numpy()
    # each image above its overlay, at 1:1
    columns = [np.concatenate([overlay(image, np.zeros_like(cam), scale=1),
                               overlay(image, cam, scale=1)], axis=0)
               for image, cam in zip(batch, cams)]
    gap = np.full((columns[0].shape[0], 4, 3), 255, dtype=np.uint8)
    picture = np.concatenate([part for column in columns for part in (column, gap)][:-1], axis=1)
    return save_rgb(picture, out / f"cam-{slug(label_names[k])}.png")
