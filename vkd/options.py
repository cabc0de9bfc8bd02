"""Every option of train.py, grouped (method, the authors' choices, model, optimisation, data,
speed, run management), each with its default, and the data options that data.py and evaluate.py
share (add_data_args).

`python train.py --help` prints them; the resolved options are saved in run.json and in every
checkpoint. The model's defaults come from model.VKDConfig; a collection's own defaults
(config/collections.py) and the presets (config/presets.py) are applied by train.get_args.
"""
import argparse

from model import METHODS, VKDConfig
from vkd.openi import OPENI_URL
from vkd.reports import UNCERTAIN_POLICIES, DataError

MODEL = VKDConfig()            # the model's defaults, defined once (model.py)


def probability(text):
    """An argparse type: a float p with 0 <= p < 1 (p = 1 would replace every report word)."""
    p = float(text)
    if not 0 <= p < 1:
        raise argparse.ArgumentTypeError(f"{text} is not a probability in [0, 1)")
    return p


def build_parser(presets, description=None):
    """The options of train.py, grouped; `presets` (train.PRESETS) are named sets of defaults
    (--preset NAME)."""
    parser = argparse.ArgumentParser(description=description)
    add = parser.add_argument_group("method").add_argument
    add("--method", default=MODEL.method, choices=[*METHODS, "all"],
        help="vkd, image (baseline), text (upper bound), distill (from a text teacher, "
             "--teacher), contrastive (image and report features aligned), or all: the five on "
             "one split, the teacher first, then compared (default: vkd)")
    add("--beta", type=float, default=0.1,
        help="weight of KL(q || p) after annealing (default: 0.1)")
    add("--beta-warmup-epochs", type=float, default=3,
        help="epochs over which beta rises from 0 (default: 3)")
    add("--prior-weight", type=float, default=1.0,
        help="lambda: weight of the BCE on prior samples (default: 1.0)")
    add("--latent-samples", type=int, default=1,
        help="L: reparameterised samples per image (default: 1)")
    add("--beta-cycle-epochs", type=float, default=0,
        help="restart the beta ramp every this many epochs, a cyclical schedule (the authors'); "
             "0 = one ramp (default: 0)")
    add("--report-control", default="none", choices=["none", "shuffled", "blank"],
        help="controls, training only (validation and test untouched): shuffled = every training "
             "report gets the text of another training report (one seeded permutation, the same "
             "for every method and seed); blank = an empty text (default: none)")
    add = parser.add_argument_group("the other ways to use the report (model.py)").add_argument
    add("--teacher", default=None,
        help="--method distill: the best.pt of a text run on the same split (default: none)")
    add("--distill-alpha", type=float, default=MODEL.distill_alpha,
        help=f"distill: weight of the teacher's soft targets; 0 = the image baseline "
             f"(default: {MODEL.distill_alpha})")
    add("--distill-temperature", type=float, default=MODEL.distill_temperature,
        help=f"distill: T, the temperature of both sigmoids (default: {MODEL.distill_temperature})")
    add("--contrastive-weight", type=float, default=MODEL.contrastive_weight,
        help=f"contrastive: gamma, the weight of the InfoNCE; 0 = the image baseline "
             f"(default: {MODEL.contrastive_weight})")
    add("--contrastive-temperature", type=float, default=MODEL.contrastive_temperature,
        help=f"contrastive: tau of the InfoNCE (default: {MODEL.contrastive_temperature})")
    add = parser.add_argument_group("the authors' design choices "
                                    "(model.py; all on: --preset authors)").add_argument
    add("--posterior-input", default="image+report", choices=["image+report", "report"],
        help="q(z | x, t) or q(z | t), the authors' (default: image+report)")
    add("--classifier-input", default="z", choices=["z", "z+image"],
        help="f(z) or f([z; h_x]), the authors' (default: z)")
    add("--kl-direction", default="qp", choices=["qp", "pq"],
        help="qp = KL(q || p) of eq. 1, pq = KL(p || q), the authors' (default: qp)")
    add("--average-samples", action="store_true",
        help="feed the mean of the L latent samples to the classifier, the authors' "
             "(with L = 100) (default: off)")
    add = parser.add_argument_group("model").add_argument
    add("--latent-dim", type=int, default=MODEL.latent_dim,
        help=f"size of z (default: {MODEL.latent_dim})")
    add("--backbone", default=MODEL.backbone, choices=["cnn", "resnet18", "densenet121"],
        help=f"image encoder (default: {MODEL.backbone})")
    add("--backbone-weights", default=None,
        help="imagenet (torchvision's ImageNet weights, downloaded once into "
             "torch.hub.get_dir()/checkpoints) or a local torchvision state_dict file, for "
             "--backbone resnet18/densenet121 (default: none, random init)")
    add("--cnn-width", type=int, default=MODEL.cnn_width,
        help=f"channels of the compact CNN's stem (default: {MODEL.cnn_width})")
    add("--vocab-size", type=int, default=MODEL.vocab_size,
        help=f"tokenizer vocabulary (default: {MODEL.vocab_size})")
    add("--max-len", type=int, default=None,
        help="report tokens kept (default: the length that covers 99%% of the training reports, "
             "rounded up to 16, at most 256; demo: 64)")
    add("--text-pooling", default=MODEL.text_pooling, choices=["attention", "mean"],
        help="report feature from its tokens: attention pooling or their mean (default: mean; "
             "openi, mimic, csv: attention)")
    add("--pos-weight", default="none", choices=["sqrt", "none"],
        help="weight of a positive label in the BCE: sqrt(negatives / positives) of the "
             "training split, or 1 (default: none; openi, mimic, csv: sqrt)")
    add("--text-dim", type=int, default=MODEL.text_dim,
        help=f"transformer width (default: {MODEL.text_dim}; openi: 128)")
    add("--text-layers", type=int, default=MODEL.text_layers,
        help=f"transformer layers (default: {MODEL.text_layers}; openi: 1)")
    add("--dropout", type=float, default=MODEL.dropout,
        help=f"transformer dropout (default: {MODEL.dropout}; openi: 0)")
    add("--word-dropout", type=probability, default=MODEL.word_dropout,
        help=f"probability that a report token is replaced by [UNK] in training "
             f"(default: {MODEL.word_dropout}; openi: 0.2)")
    add("--sentence-shuffle", action=argparse.BooleanOptionalAction,
        default=MODEL.sentence_shuffle,
        help="in training, each report's sentences in a random order (vkd/text_tuning.py) "
             "(default: off; openi: on)")
    add("--sentence-attention", action=argparse.BooleanOptionalAction,
        default=MODEL.sentence_attention,
        help="a report token attends only to the tokens of its own sentence "
             "(vkd/text_tuning.py) (default: off; openi: on)")
    add = parser.add_argument_group("optimisation").add_argument
    add("--epochs", type=int, default=12,
        help="training epochs (default: 12; openi: 30; or the resumed run's)")
    add("--batch-size", type=int, default=64,
        help="images per step, over all processes (default: 64)")
    add("--lr", type=float, default=2e-3, help="peak AdamW learning rate (default: 2e-3)")
    add("--weight-decay", type=float, default=1e-4, help="AdamW weight decay (default: 1e-4)")
    add("--warmup-steps", type=int, default=30,
        help="linear learning-rate warm-up steps (default: 30)")
    add("--clip-grad", type=float, default=1.0, help="gradient-norm clip (default: 1.0)")
    add("--no-augment", action="store_true",
        help="turn off random affine augmentation (default: on)")
    add("--oversample", action=argparse.BooleanOptionalAction, default=False,
        help="draw the training images of rare labels more often, with replacement "
             "(batching.draw_weights); an epoch keeps its length (default: off; openi: on)")
    add("--seed", type=int, default=0,
        help="seed of initialisation, shuffling and sampling (default: 0)")
    add_data_args(parser.add_argument_group("data"))
    add = parser.add_argument_group("speed").add_argument
    add("--device", default="auto", help="cpu, cuda, cuda:N or auto (default: auto)")
    add("--amp", default="auto", choices=["auto", "bf16", "fp16", "off"],
        help="autocast: auto = bf16 on CUDA, off on CPU (default: auto)")
    add("--compile", action="store_true", help="torch.compile the model (default: off)")
    add("--preload", default="auto", choices=["auto", "yes", "no"],
        help="copy the whole uint8 image cache to the device once; no = stream batches from the "
             "memory-mapped file; auto = yes when it takes at most half the free device memory "
             "(default: auto)")
    add("--log-every", type=int, default=50,
        help="show the running loss on the progress bar every N steps, one host sync each; "
             "0 = never (default: 50)")
    add("--channels-last", action="store_true",
        help="channels_last memory format, faster convs on GPUs (default: off)")
    add("--group-by-length", action=argparse.BooleanOptionalAction, default=False,
        help="batch reports of similar length and cut each batch's padding "
             "(batching.group_by_length): the report encoder skips the padding beyond each "
             "batch's longest report; batches are then not independent draws; never with "
             "--method image, which reads no report (default: off; openi: on)")
    add = parser.add_argument_group("run management").add_argument
    add("--preset", default=None, choices=sorted(presets),
        help=f"option defaults of a preset: {presets} (default: none)")
    add("--seeds", default=None,
        help="comma-separated seeds, e.g. 0,1,2: one run per seed (and method), then the "
             "comparison with mean +- std across seeds (default: --seed alone)")
    add("--out", default=None,
        help="run folder (default: runs/<data>[-<preset>]-<method>-seed<seed>); with --method "
             "all or --seeds, the folder that holds those run folders (default: runs)")
    add("--resume", action="store_true",
        help="continue from <out>/last.pt with its saved config (default: off)")
    add("--stop-after", type=int, default=None,
        help="leave after this many epochs of this invocation, e.g. for time-limited jobs; "
             "continue with --resume (default: run to --epochs)")
    add("--allow-missing-labels", action="store_true",
        help="train even when a label has no positive training image (its AUROC is then "
             "meaningless) (default: stop)")
    add("--bootstrap", type=int, default=1000,
        help="bootstrap resamples for test intervals (default: 1000)")
    return parser


def for_method(args, **changes):
    """args with `changes`, and the folder of a single run (runs/<run_name>) unless --out names one.
    `--method image` and `distill` read no report: the report options that would change nothing but
    their batches are turned off, so that the saved config says what ran."""
    args = argparse.Namespace(**vars(args) | changes)
    if args.method != "all" and args.seeds is None:
        args.out = args.out or f"runs/{run_name(args, args.method, args.seed)}"
    if args.method in ("image", "distill"):
        args.group_by_length = args.sentence_shuffle = args.sentence_attention = False
    if args.method == "image":        # distill's control is its teacher's (train.setup)
        args.report_control = "none"
    return args


def collection_name(args):
    """<data>[-<preset>], e.g. demo-tiny: what run folders and comparisons are named after."""
    return f"{args.data}-{args.preset}" if args.preset else args.data


def run_name(args, method, seed):
    """The folder name of one run, e.g. demo-tiny-vkd-seed0, or demo-tiny-vkd-shuffled-seed0 under
    --report-control shuffled (so that a control never overwrites the run it controls)."""
    control = args.report_control
    control = "" if control == "none" or method == "image" else f"-{control}"
    return f"{collection_name(args)}-{method}{control}-seed{seed}"


def model_config(args, num_labels, vocab_size, sentence_end=-1):
    """The model's configuration from the options. sentence_end: the tokenizer's id of "." (None:
    not in its vocabulary)."""
    for flag in ("sentence_shuffle", "sentence_attention"):
        if getattr(args, flag) and sentence_end in (None, -1):
            option = flag.replace("_", "-")
            raise DataError(f'--{option}: the tokenizer has no "." to end a sentence; '
                            f'use --no-{option}')
    return VKDConfig(num_labels=num_labels, latent_dim=args.latent_dim, backbone=args.backbone,
                     cnn_width=args.cnn_width, vocab_size=vocab_size, max_len=args.max_len,
                     text_dim=args.text_dim, text_layers=args.text_layers,
                     text_pooling=args.text_pooling, dropout=args.dropout,
                     word_dropout=args.word_dropout, method=args.method,
                     sentence_shuffle=args.sentence_shuffle,
                     sentence_attention=args.sentence_attention,
                     sentence_end=-1 if sentence_end is None else sentence_end,
                     posterior_reads_image=args.posterior_input == "image+report",
                     classifier_reads_image=args.classifier_input == "z+image",
                     kl_direction=args.kl_direction, average_samples=args.average_samples,
                     distill_alpha=args.distill_alpha,
                     distill_temperature=args.distill_temperature,
                     contrastive_weight=args.contrastive_weight,
                     contrastive_temperature=args.contrastive_temperature)


def add_data_args(parser, inherit=False):
    """The data options shared by train.py, evaluate.py and this script. With `inherit`
    (evaluate.py) every default is None, meaning "the checkpoint's own"."""
    def add(flag, default=None, help="", **kwargs):
        shown = ("the checkpoint's" if inherit else "off" if default is False
                 else "none" if default is None else default)
        parser.add_argument(flag, default=None if inherit else default,
                            help=f"{help} (default: {shown})", **kwargs)
    add("--data", "demo", choices=["demo", "openi", "mimic", "csv"], help="collection")
    add("--data-dir", "data",
        help="where collections and caches live; for mimic, the MIMIC-CXR-JPG folder")
    add("--split-seed", 0, type=int,
        help="seed of the split by report (by patient for a csv with a patient column); mimic "
             "uses its official split")
    add("--demo-reports", 1500, type=int, help="reports in the demo")
    add("--demo-seed", 0, type=int, help="seed that draws the demo")
    add("--openi-url", OPENI_URL, help="where the OpenI archives are")
    add("--uncertain", "zeros", choices=UNCERTAIN_POLICIES,
        help="uncertain (-1) labels of mimic/csv become 0, 1, or are left out of loss and AUROC")
    add("--mimic-labels", "chexpert", choices=["chexpert", "negbio"], help="mimic label table")
    add("--views", "frontal", choices=["frontal", "all"], help="mimic views: PA/AP only, or all")
    add("--csv", None, help="--data csv: the CSV file, one row per image")
    add("--csv-image-column", "image", help="--data csv: image path column")
    add("--csv-text-column", "text", help="--data csv: report text column")
    add("--csv-labels", None,
        help="--data csv: comma-separated label columns; none: every other column")
    add("--csv-patient-column", "patient_id",
        help="--data csv: optional patient column; when present, the seeded split and the "
             "bootstrap are by patient")
    add("--strict", False, action="store_true",
        help="stop on a bad sample instead of skipping and counting it")
    if not inherit:
        add("--image-size", 128, type=int, help="cached image side in px")
        add("--train-fraction", 1.0, type=float,
            help="train on this seeded fraction of the training reports, the same for every "
                 "method and seed; validation and test unchanged")


def build_evaluate_parser():
    """The options of evaluate.py, grouped."""
    parser = argparse.ArgumentParser(description="Evaluate VKD checkpoints from images only.")
    add = parser.add_argument_group("checkpoints").add_argument
    add("--ckpt", default=None,
        help="checkpoint written by train.py (default: none; needed unless --compare)")
    add("--compare", nargs="+", default=None, metavar="CKPT",
        help="checkpoints compared on their common test split, paired differences to the first "
             "(--ckpt, if given, is the first); runs differing only in --seed are averaged as one "
             "method (default: none)")
    add("--split", default="test", choices=("train", "val", "test"),
        help="split evaluated (default: test)")
    add("--device", default="cpu", help="torch device (default: cpu)")
    add = parser.add_argument_group("prediction").add_argument
    add("--samples", type=int, default=0, help="prior samples averaged for the probabilities; 0 "
                                               "uses the prior mean (default: 0)")
    add("--uncertainty-samples", type=int, default=100,
        help="prior samples whose spread is the uncertainty, for --image and the rejection curve "
             "(default: 100)")
    add("--bow", action="store_true",
        help="also fit the bag-of-words reference (vkd/bow.py) on the training reports, with the "
             "checkpoint's tokens, and evaluate it on --split (default: off)")
    add = parser.add_argument_group("statistics").add_argument
    add("--bootstrap", type=int, default=1000, help="bootstrap resamples (default: 1000)")
    add("--seed", type=int, default=0,
        help="seed of the bootstrap and of prior sampling (default: 0)")
    add("--reject", default="0.1,0.2,0.3",
        help="fractions of most uncertain images rejected (default: 0.1,0.2,0.3)")
    add("--temperature", action="store_true", help="fit temperature scaling on val and report ECE "
                                                   "after it (default: off)")
    add("--target-sensitivity", type=float, default=None,
        help="choose thresholds on val for this sensitivity instead of Youden's J "
             "(default: Youden's J)")
    add("--bins", type=int, default=15,
        help="equal-width bins of the ECE and reliability diagram (default: 15)")
    add = parser.add_argument_group("single images").add_argument
    add("--image", nargs="+", default=None, metavar="FILE",
        help="PNG/JPEG files: print the label probabilities with uncertainty instead of evaluating "
             "(default: none)")
    add("--cam", default=None, metavar="LABEL", help="write Grad-CAM overlays for this label: for "
                                                     "each --image, or for the most confident "
                                                     "positive test images (default: none)")
    add("--cam-images", type=int, default=4, help="test images in the --cam picture (default: 4)")
    add = parser.add_argument_group("output").add_argument
    add("--plots", action="store_true", help="write ROC/PR, reliability, training and latent "
                                             "pictures as PNGs (needs matplotlib) (default: off)")
    add("--latent-label", default=None,
        help="label colouring the latent picture (default: the most frequent)")
    add("--out", default=None, help="folder for pictures and overlays (default: the checkpoint's "
                                    "run folder; with --compare: runs/compare)")
    add("--json", action="store_true", help="print the results as JSON (default: off)")
    # another collection than the checkpoint's: cross-dataset evaluation
    add_data_args(parser.add_argument_group("data (default: the checkpoint's own)"), inherit=True)
    return parser
