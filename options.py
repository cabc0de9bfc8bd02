"""Every option of train.py, grouped (method, optimisation, data, speed, run management), each with its default.

`python train.py --help` prints them; the resolved options are saved in run.json and in every checkpoint. The
model's defaults come from model.VKDConfig, the data options from data.add_data_args: each defined once.
"""
import argparse

import data
from model import METHODS, VKDConfig

MODEL = VKDConfig()            # the model's defaults, defined once (model.py)


def build_parser(presets, description=None):
    """The options of train.py, grouped; `presets` (train.PRESETS) are named sets of defaults (--preset NAME)."""
    parser = argparse.ArgumentParser(description=description)
    add = parser.add_argument_group("method").add_argument
    add("--method", default="vkd", choices=[*METHODS, "all"],
        help="vkd, image (baseline), text (upper bound), or all: the three on one split, then compared (default: vkd)")
    add("--beta", type=float, default=0.1, help="weight of KL(q || p) after annealing (default: 0.1)")
    add("--beta-warmup-epochs", type=float, default=3, help="epochs over which beta rises from 0 (default: 3)")
    add("--prior-weight", type=float, default=1.0, help="lambda: weight of the BCE on prior samples (default: 1.0)")
    add("--latent-samples", type=int, default=1, help="L: reparameterised samples per image (default: 1)")
    add("--latent-dim", type=int, default=MODEL.latent_dim, help=f"size of z (default: {MODEL.latent_dim})")
    add("--backbone", default=MODEL.backbone, choices=["cnn", "resnet18", "densenet121"],
        help=f"image encoder (default: {MODEL.backbone})")
    add("--backbone-weights", default=None,
        help="imagenet (torchvision's ImageNet weights, downloaded once into torch.hub.get_dir()/checkpoints) or a "
             "local torchvision state_dict file, for --backbone resnet18/densenet121 (default: none, random init)")
    add("--cnn-width", type=int, default=MODEL.cnn_width,
        help=f"channels of the compact CNN's first stage (default: {MODEL.cnn_width})")
    add("--vocab-size", type=int, default=MODEL.vocab_size, help=f"tokenizer vocabulary (default: {MODEL.vocab_size})")
    add("--max-len", type=int, default=MODEL.max_len, help=f"report tokens kept (default: {MODEL.max_len})")
    add("--text-dim", type=int, default=MODEL.text_dim, help=f"transformer width (default: {MODEL.text_dim})")
    add("--text-layers", type=int, default=MODEL.text_layers, help=f"transformer layers (default: {MODEL.text_layers})")
    add("--dropout", type=float, default=MODEL.dropout, help=f"transformer dropout (default: {MODEL.dropout})")
    add = parser.add_argument_group("optimisation").add_argument
    add("--epochs", type=int, default=None, help="training epochs (default: 12, or the resumed run's)")
    add("--batch-size", type=int, default=64, help="images per step, over all processes (default: 64)")
    add("--lr", type=float, default=2e-3, help="peak AdamW learning rate (default: 2e-3)")
    add("--weight-decay", type=float, default=1e-4, help="AdamW weight decay (default: 1e-4)")
    add("--warmup-steps", type=int, default=30, help="linear learning-rate warm-up steps (default: 30)")
    add("--clip-grad", type=float, default=1.0, help="gradient-norm clip (default: 1.0)")
    add("--no-augment", action="store_true", help="turn off random affine augmentation (default: on)")
    add("--seed", type=int, default=0, help="seed of initialisation, shuffling and sampling (default: 0)")
    data.add_data_args(parser.add_argument_group("data"))
    add = parser.add_argument_group("speed").add_argument
    add("--device", default="auto", help="cpu, cuda, cuda:N or auto (default: auto)")
    add("--amp", default="auto", choices=["auto", "bf16", "fp16", "off"],
        help="autocast: auto = bf16 on CUDA, off on CPU (default: auto)")
    add("--compile", action="store_true", help="torch.compile the model (default: off)")
    add("--preload", default="auto", choices=["auto", "yes", "no"],
        help="copy the whole uint8 image cache to the device once; no = stream batches from the memory-mapped "
             "file; auto = yes when it takes at most half the free device memory (default: auto)")
    add("--log-every", type=int, default=50,
        help="show the running loss on the progress bar every N steps, one host sync each; 0 = never (default: 50)")
    add("--channels-last", action="store_true", help="channels_last memory format, faster convs on GPUs (default: off)")
    add = parser.add_argument_group("run management").add_argument
    add("--preset", default=None, choices=sorted(presets),
        help=f"option defaults of a preset: {presets} (default: none)")
    add("--seeds", default=None, help="comma-separated seeds, e.g. 0,1,2: one run per seed (and method), then the "
                                      "comparison with mean +- std across seeds (default: --seed alone)")
    add("--out", default=None, help="run folder (default: runs/<data>[-<preset>]-<method>-seed<seed>); with --method "
                                    "all or --seeds, the folder that holds those run folders (default: runs)")
    add("--resume", action="store_true", help="continue from <out>/last.pt with its saved config (default: off)")
    add("--stop-after", type=int, default=None,
        help="leave after this many epochs of this invocation, e.g. for time-limited jobs; continue with --resume "
             "(default: run to --epochs)")
    add("--allow-missing-labels", action="store_true",
        help="train even when a label has no positive training image (its AUROC is then meaningless) (default: stop)")
    add("--bootstrap", type=int, default=1000, help="bootstrap resamples for test intervals (default: 1000)")
    return parser


def get_args(argv=None, presets=None, description=None):
    """Parse the command line; a --preset's values become the defaults, so that explicit flags still win."""
    presets = presets or {}
    parser = build_parser(presets, description)
    args = parser.parse_args(argv)
    if args.preset:
        parser.set_defaults(**presets[args.preset])
        args = parser.parse_args(argv)
    if args.method != "all" and args.seeds is None:
        args.out = args.out or f"runs/{run_name(args, args.method, args.seed)}"
    return args


def collection_name(args):
    """<data>[-<preset>], e.g. demo-tiny: what run folders and comparisons are named after."""
    preset = getattr(args, "preset", None)                   # configs saved before presets existed have none
    return f"{args.data}-{preset}" if preset else args.data


def run_name(args, method, seed):
    """The folder name of one run, e.g. demo-tiny-vkd-seed0."""
    return f"{collection_name(args)}-{method}-seed{seed}"
